"""The Recommender's answers, without gRPC: a loaded model with its catalog and content lookups.

`server.py` turns protobuf requests into the plain queries here and the answers back into
protobuf; everything a channel gets is decided in this module (and `scoring.py`), so the batch
CLI, the unary calls and the stream give the same answer for the same customer and model.

    served = ServedModel(load_bundle("models"), settings, fixed_consent(state))
    [answer] = served.recommend([ProductQuery(customer_id="12347")])

Fail closed: when the consent store cannot be read for an answer (`StoreError` from the consent,
tombstone, event or impression reads), the answer is non-personal with the reason
`consent_unavailable` (best sellers, nothing sensitive), never an error and never personal on a
consent that could not be read; the outage is logged (no customer id) and personal answers come
back with the first call that reads the store again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nextbest.bundle import ModelBundle, lookup
from nextbest.config import Settings, clock_day
from nextbest.data.interactions import to_days
from nextbest.data.readers import EVENT_SCHEMA
from nextbest.errors import InvalidRequest, ModelError, NotFound
from nextbest.lifecycle.actions import ACTIONS, Situation, decide
from nextbest.lifecycle.model import CustomerState, purchases_of
from nextbest.lifecycle.stages import STAGES
from nextbest.policy import ConsentState, still_erased
from nextbest.scoring import (
    best_sellers_for,
    cf_candidates_for,
    discovery_slots,
    is_durable,
    item_interval,
    recommend_for,
    with_discovery,
)
from nextbest.store.consent_store import StoreError
from nextbest.value_rule import AnswerTrace, value_terms

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "CONSENT_UNAVAILABLE",
    "Reason",
    "Item",
    "ProductQuery",
    "ProductAnswer",
    "ContentQuery",
    "ScoredContent",
    "ActionAnswer",
    "ContentAnswer",
    "ServedModel",
    "CustomerConsent",
    "ConsentSource",
    "fixed_consent",
    "store_consent",
]

logger = logging.getLogger(__name__)

DEFAULT_LIMIT = 10
MAX_LIMIT = 100
CONSENT_UNAVAILABLE = "consent_unavailable"
"""The not-personalized reason of answers made while the consent store could not be read."""
_WHY_NOT = {CONSENT_UNAVAILABLE: "consent_unavailable (the consent store could not be read)"}
"""Words for a not-personalized reason in `decisions`, where the bare reason says too little."""


@dataclass(frozen=True)
class Reason:
    """Why an item is in an answer. `kind` is one of bought_related, repurchase_due, popular,
    bought_recently, predicted_interest, similar_to, none."""

    kind: str
    text: str
    product_id: str = ""
    product_title: str = ""
    days: float = 0.0


@dataclass(frozen=True)
class Item:
    product_id: str
    score: float
    reasons: tuple[Reason, ...]
    title: str = ""
    category: str = ""
    price: float | None = None


@dataclass(frozen=True)
class ProductQuery:
    """One RecommendProducts request, validated."""

    customer_id: str
    limit: int = DEFAULT_LIMIT
    include_categories: tuple[str, ...] = ()
    exclude_categories: tuple[str, ...] = ()
    exclude_product_ids: tuple[str, ...] = ()
    include_purchased: bool = False
    channel: str = "email"
    """email, web or app: sets the exposure in the privacy rule."""


@dataclass(frozen=True)
class ProductAnswer:
    customer_id: str
    items: list[Item]
    personalized: bool
    not_personalized_reason: str = ""
    """'' when personalized, else no_consent, erased, unknown_customer or consent_unavailable."""
    decisions: tuple[str, ...] = ()
    """What the consent and privacy rules did to this answer, in words."""
    withheld: int = 0
    """Personalized items the privacy rule withheld (value below policy.min_value)."""
    trace: AnswerTrace | None = field(default=None, compare=False, repr=False)
    """How the answer was made, when asked for (`recommend(..., trace=True)`: explanations)."""


@dataclass(frozen=True)
class ContentQuery:
    """One ScoreContent candidate: by id from the snapshot when `inline` is false."""

    content_id: str
    title: str = ""
    product_ids: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()

    @property
    def inline(self) -> bool:
        return bool(self.product_ids or self.categories)


@dataclass(frozen=True)
class ScoredContent:
    content_id: str
    title: str
    kind: str
    relevance: float
    reasons: tuple[Reason, ...]


@dataclass(frozen=True)
class ActionAnswer:
    """NextBestAction's answer (`lifecycle.actions` decides; the payload comes from the same
    serving path as RecommendProducts and ScoreContent)."""

    customer_id: str
    action: str
    personalized: bool
    not_personalized_reason: str
    reasons: tuple[str, ...]
    products: ProductAnswer | None = None
    """The product answer the payload is from (its items: the payload), None without one."""
    items: tuple[Item, ...] = ()
    content: tuple[ScoredContent, ...] = ()
    state: CustomerState | None = None


@dataclass(frozen=True)
class ContentAnswer:
    customer_id: str
    items: list[ScoredContent]
    personalized: bool
    not_personalized_reason: str = ""


def _words(reason: str) -> str:
    return _WHY_NOT.get(reason, reason)


def _texts(table: pa.Table, name: str, rows: np.ndarray) -> list[str]:
    """Column values for catalog rows (-1 = not in the catalog) as strings ('' when unknown)."""
    if name not in table.column_names or table.num_rows == 0:
        return [""] * len(rows)
    values = table.column(name).to_pylist()
    return ["" if r < 0 or values[r] is None else str(values[r]) for r in rows]


class _StoreOutage:
    """Logs the consent store's read failures on the answer path without flooding the log: the
    first failure at once, then at most one line every `every_s` seconds with the number of
    answers made non-personal meanwhile, and one line when a read succeeds again. Never a
    customer id."""

    def __init__(self, every_s: float = 10.0):
        self.every_s = every_s
        self._lock = threading.Lock()
        self._failing = False
        self._answers = 0
        self._logged_at = 0.0

    def failed(self, what: str, answers: int, exc: StoreError) -> None:
        with self._lock:
            self._answers += answers
            now = time.monotonic()
            if self._failing and now - self._logged_at < self.every_s:
                return
            first, self._failing, self._logged_at = not self._failing, True, now
            count = self._answers
        logger.error(
            "consent store unreadable%s: %s answered non-personal with reason %s (%d such "
            "answers since it failed): %s",
            "" if first else " still",
            what,
            CONSENT_UNAVAILABLE,
            count,
            exc,
        )

    def ok(self) -> None:
        if not self._failing:  # the common case: no lock
            return
        with self._lock:
            if not self._failing:
                return
            count, self._failing, self._answers = self._answers, False, 0
        logger.warning(
            "consent store readable again: personal answers resume (%d answers were "
            "non-personal meanwhile)",
            count,
        )


_outage = _StoreOutage()
AUDIENCE_STAGES = {
    "welcome": ("new",),
    "human_touch": ("at_risk", "dormant"),
    "win_back": ("dormant",),
    "care": ("active", "at_risk"),
    "replenish": ("active", "at_risk"),
    "cross_sell": ("active", "at_risk"),
    "rest": STAGES,
}
"""The stages a customer with each action can be in (`lifecycle.actions.decide`)."""
DUE_SHARE = 0.8
"""NextBestAction's replenish: a bought product is due once this share of its interval passed."""
_NOTHING_RECORDED = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0))
_NO_EVENTS = EVENT_SCHEMA.empty_table()
"""`ServedModel._recorded` of a customer without recorded purchases."""


@dataclass(frozen=True)
class CustomerConsent:
    """Per customer of a request: may the history be used, may sensitive products be, erased
    (`policy.still_erased`: a tombstone and no personalization consent recorded since)."""

    personalization: np.ndarray
    sensitive: np.ndarray
    erased: np.ndarray
    behavioral: np.ndarray | None = None
    """None: as personalization."""


ConsentSource = Callable[[Sequence[str]], CustomerConsent]
"""Where a served model reads consent, once per request (or stream batch). It may raise
StoreError: the answers are then non-personal (`consent_unavailable`)."""
EventSource = Callable[[Sequence[str]], pa.Table]
"""The recorded events (EVENT_SCHEMA) of some customers, e.g. `Store.events`."""
ImpressionSource = Callable[[Sequence[str], dt.datetime], dict[str, dict[str, int]]]
"""customer → product → unanswered impressions since a time, e.g.
`Store.unanswered_impressions`."""


class CustomerReads(NamedTuple):
    """What one request reads about its customers: consent, recorded purchases and returns
    (EVENT_SCHEMA), unanswered impressions."""

    consent: CustomerConsent
    purchases: pa.Table
    impressions: dict[str, dict[str, int]]


ReadSource = Callable[[Sequence[str], dt.datetime, dt.datetime | None], CustomerReads]
"""The three in one call (`store_reads`): (customer ids, purchases since, impressions since or
None) → CustomerReads. It may raise StoreError, like ConsentSource."""


def fixed_consent(state: ConsentState) -> ConsentSource:
    """Consent from a ConsentState (a consent file, or only the default); nobody erased."""

    def lookup(customer_ids: Sequence[str]) -> CustomerConsent:
        ids = pa.array(list(customer_ids), pa.string())
        return CustomerConsent(
            personalization=state.allowed("personalization", ids),
            sensitive=state.allowed("sensitive", ids),
            erased=np.zeros(len(ids), dtype=bool),
            behavioral=state.allowed("behavioral", ids),
        )

    return lookup


def store_consent(store, default_allow: bool) -> ConsentSource:
    """Consent from the consent store (`store/consent_store.py`), read on every call: a change
    made through any server sharing the store acts on the next request."""

    def lookup(customer_ids: Sequence[str]) -> CustomerConsent:
        ids = list(customer_ids)
        return _customer_consent(ids, store.consent_state(ids, default_allow), store.erased(ids))

    return lookup


def _customer_consent(ids: list[str], state: ConsentState, erased) -> CustomerConsent:
    """The consent of `ids` from their records and their tombstones (`erased`: customer →
    erased_at); still erased: `policy.still_erased`."""
    fixed = fixed_consent(state)(ids)
    return CustomerConsent(
        personalization=fixed.personalization,
        sensitive=fixed.sensitive,
        erased=still_erased(state, pa.array(ids, pa.string()), erased),
        behavioral=fixed.behavioral,
    )


def separate_reads(
    consent: ConsentSource, events: EventSource | None, impressions: ImpressionSource | None
) -> ReadSource:
    """The ReadSource of separate sources (a consent file, or a store read piece by piece):
    consent, the recorded events, and the unanswered impressions of the customers who may be
    personal (none asked for when nobody may)."""

    def read(customer_ids: Sequence[str], purchases_since, impressions_since) -> CustomerReads:
        ids = list(customer_ids)
        consent_of = consent(ids)
        recorded = events(ids) if events is not None else _NO_EVENTS
        personal = [
            c
            for c, ok in zip(ids, consent_of.personalization & ~consent_of.erased, strict=True)
            if ok
        ]
        shown = (
            impressions(personal, impressions_since)
            if impressions is not None and impressions_since is not None and personal
            else {}
        )
        return CustomerReads(consent_of, recorded, shown)

    return read


def store_reads(store, default_allow: bool) -> ReadSource:
    """`store_consent`, the store's recorded purchases and its unanswered impressions, in one
    query per request (`Store.customer_reads`)."""

    def read(customer_ids: Sequence[str], purchases_since, impressions_since) -> CustomerReads:
        ids = list(customer_ids)
        r = store.customer_reads(
            ids,
            default_allow,
            purchases_since=purchases_since,
            impressions_since=impressions_since,
        )
        consent = _customer_consent(ids, r.consent, r.erased)
        return CustomerReads(consent, r.purchases, r.impressions)

    return read


@dataclass(frozen=True)
class Slate:
    """One customer's ranking before the per-call rules: candidates (item indices) with their
    relevance, best-seller flags and reasons, as the ranking stage left them."""

    ids: np.ndarray
    scores: np.ndarray
    popular: np.ndarray
    reasons: list
    personalized: bool
    why_not: str


class SlateCache:
    """Slates of known customers without filters, per (user, sensitive consent, depth, clock
    day), least recently used dropped beyond `size` (0 = off). Per model: a new model version
    starts empty. Thread-safe."""

    def __init__(self, size: int):
        self.size = size
        self._slates: OrderedDict[tuple, Slate] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple) -> Slate | None:
        if not self.size:
            return None
        with self._lock:
            slate = self._slates.get(key)
            if slate is None:
                self.misses += 1
                return None
            self._slates.move_to_end(key)
            self.hits += 1
            return slate

    def put(self, key: tuple, slate: Slate) -> None:
        if not self.size:
            return
        with self._lock:
            self._slates[key] = slate
            while len(self._slates) > self.size:
                self._slates.popitem(last=False)

    def drop_user(self, user: int) -> None:
        """Forget every slate of `user` (erasure)."""
        with self._lock:
            for key in [k for k in self._slates if k[0] == user]:
                del self._slates[key]


class ReplayClock:
    """`serve.clock = "replay"`: the newest event time recorded through this server."""

    def __init__(self) -> None:
        self.at: dt.datetime | None = None
        self._lock = threading.Lock()

    def advance(self, at: dt.datetime) -> None:
        with self._lock:
            if self.at is None or at > self.at:
                self.at = at


_EPOCH = dt.datetime(1970, 1, 1)


@dataclass
class ServedModel:
    """A model version ready to answer: the bundle plus per-item catalog fields and indexes."""

    bundle: ModelBundle
    settings: Settings
    consent: ConsentSource
    erased: Mapping[str, dt.datetime] = field(default_factory=dict)
    """The tombstones when this model was loaded (customer → erased_at): a customer the model
    learned from history at or before their erasure is dropped from it at once (`forget`)."""
    as_of: float | None = None
    """Days since the epoch to judge repurchase timing at, overriding serve.clock (batch
    exports of historic data)."""
    events: EventSource | None = None
    """Recorded events (the store's): purchases after the model's newest event are excluded from
    answers, and make customers unknown to the model personal through ALS fold-in."""
    impressions: ImpressionSource | None = None
    """What each customer was already shown: the fatigue rule demotes products shown too often
    without an answer."""
    replay: ReplayClock | None = None
    """The clock of `serve.clock = "replay"` (advanced by recorded events)."""
    reads: ReadSource | None = None
    """Where RecommendProducts and the stream read consent, recorded purchases and impressions
    (`store_reads`: one query to the store, see `on_store`); None: `separate_reads` of
    `consent`, `events` and `impressions`."""
    holdout: bool = False
    """An experiment's control arm: consenting customers get best sellers (reason `holdout`),
    as if without personalization consent, so that the experiment measures what it adds."""
    loaded_at: str = field(
        default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    )
    retired: threading.Event = field(default_factory=threading.Event, repr=False)
    """Set when a newer model replaces this one (its background work stops)."""

    @classmethod
    def on_store(cls, bundle: ModelBundle, settings: Settings, store, **kwargs) -> ServedModel:
        """A served model reading consent, tombstones, recorded events and impressions from
        `store` as the server does: one query per request (`store_reads`)."""
        allow = settings.policy.default_consent == "allow"
        return cls(
            bundle,
            settings,
            store_consent(store, allow),
            events=store.events,
            impressions=store.unanswered_impressions,
            reads=store_reads(store, allow),
            **kwargs,
        )

    def __post_init__(self) -> None:
        b = self.bundle
        # Each call computes on one thread: calls run side by side on the server's worker
        # threads, and implicit's default (every core per call) makes them fight for the cores.
        b.cf.model.num_threads = 1
        # The CF candidates of every known customer, once per model (by the trainer; computed
        # here only for a version published without them): a call then scores ~200 candidates
        # instead of the whole catalog.
        self.cf_candidates = (
            b.cf_candidates
            if b.cf_candidates is not None
            else cf_candidates_for(b, self.settings.train.candidate_pool)
        )
        self.slates = SlateCache(self.settings.serve.slate_cache_size)
        for customer_id, erased_at in self.erased.items():
            if self._learned_before(customer_id, erased_at):
                self.forget(customer_id)
        catalog = b.catalog
        if catalog.num_rows:
            rows = pc.fill_null(
                pc.index_in(pa.array(b.item_ids), value_set=catalog["product_id"]), -1
            ).to_numpy(zero_copy_only=False)
        else:
            rows = np.full(len(b.item_ids), -1)
        self.titles = _texts(catalog, "title", rows)
        self.categories = _texts(catalog, "category", rows)
        departments = _texts(catalog, "department", rows)
        prices = (
            catalog.column("price").to_numpy(zero_copy_only=False).astype(np.float64)
            if "price" in catalog.column_names and catalog.num_rows
            else np.zeros(0)
        )
        self.prices = [
            None if r < 0 or not np.isfinite(prices[r]) else float(prices[r]) for r in rows
        ]
        # Category filters and content links match a category or a department, ignoring case.
        groups: dict[str, list[int]] = {}
        for i, (cat, dep) in enumerate(zip(self.categories, departments, strict=True)):
            for key in {cat.lower(), dep.lower()} - {""}:
                groups.setdefault(key, []).append(i)
        self.by_category = {k: np.asarray(v, dtype=np.int64) for k, v in groups.items()}
        policy = self.settings.policy
        self.sensitive_groups = {
            c.lower() for c in (*policy.sensitive_categories, *policy.sensitive_departments)
        }
        """Category and department names (lower case) that make content sensitive."""
        content = b.content
        order = np.argsort(np.asarray(content.column("content_id").to_pylist(), dtype=str))
        self.content = content.take(pa.array(order, pa.int64())) if content.num_rows else content
        self.content_ids = np.asarray(self.content.column("content_id").to_pylist(), dtype=str)
        self.content_by_product: dict[str, list[str]] = {}
        """Product id → ids of the content linked to it (NextBestAction's care)."""
        if self.content.num_rows:
            lists = self.content.column("product_ids")
            flat = pc.list_flatten(lists).to_numpy(zero_copy_only=False)
            parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
            for product, row in sorted(set(zip(flat.tolist(), parents.tolist(), strict=True))):
                self.content_by_product.setdefault(product, []).append(str(self.content_ids[row]))
        buyers = b.repeat.item_recent_buyers.astype(np.float64)
        if buyers.max(initial=0) <= 0:
            buyers = b.repeat.item_buyers.astype(np.float64)
        self.popularity = buyers / max(buyers.max(initial=0), 1.0)
        # Sensitivity level per item for the privacy rule: the catalog's, or 1 for products
        # sensitive by a listed category or department.
        level = np.zeros(len(b.item_ids))
        if "sensitivity" in catalog.column_names and catalog.num_rows:
            values = np.nan_to_num(
                catalog.column("sensitivity").to_numpy(zero_copy_only=False).astype(np.float64)
            )
            level[rows >= 0] = values[rows[rows >= 0]]
        self.sensitivity = np.where(b.item_sensitive & (level <= 0), 1.0, level)
        # Stages are judged by this server's [lifecycle] rules; risk is the model's.
        self.lifecycle = (
            dataclasses.replace(b.lifecycle, settings=self.settings.lifecycle)
            if b.lifecycle is not None
            else None
        )
        self._valuable_from = np.inf
        """Purchase value from which a customer counts as valuable (NextBestAction)."""
        if self.lifecycle is not None:
            values = self.lifecycle.summary.value[self.lifecycle.summary.days > 0]
            share = self.settings.lifecycle.human_touch_share
            if len(values) and share > 0:
                self._valuable_from = float(np.quantile(values, 1.0 - share))

    @property
    def version(self) -> str:
        return self.bundle.version

    def now_day(self) -> float:
        if self.as_of is not None:
            return self.as_of
        clock = self.settings.serve.clock
        if clock == "wall":
            return time.time() / 86400.0
        if clock == "model":
            return self.bundle.reference_day
        if clock == "replay":
            return (self.now() - _EPOCH).total_seconds() / 86400.0
        return clock_day(clock)

    def now(self) -> dt.datetime:
        """The time impressions are stamped with and fatigue counts back from (naive UTC): the
        wall clock, or the replay clock's."""
        if self.settings.serve.clock == "replay":
            at = self.replay.at if self.replay is not None else None
            return at if at is not None else _EPOCH + dt.timedelta(days=self.bundle.reference_day)
        return dt.datetime.now(dt.UTC).replace(tzinfo=None)

    def consents(self, customer_ids: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:
        """(personalization allowed, sensitive allowed, why not personal: '' / no_consent /
        erased) per customer; erased customers are never personalized."""
        personal, sensitive, why, _ = self.consent_details(customer_ids)
        return personal, sensitive, why

    def consent_details(
        self, customer_ids: list[str]
    ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
        """`consents` plus each customer's trust for the privacy rule: policy.trust_full less
        policy.trust_step for each of behavioral and sensitive consent not granted."""
        return self._consent_terms(self.consent(customer_ids))

    def _consent_terms(
        self, c: CustomerConsent
    ) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
        """`consent_details` of consent already read."""
        personal = c.personalization & ~c.erased
        why = [
            "erased" if e else ("" if p else "no_consent")
            for p, e in zip(c.personalization, c.erased, strict=True)
        ]
        sensitive = c.sensitive & ~c.erased
        if self.holdout:  # the control arm: nothing personal, for the consenting too
            why = ["holdout" if ok else w for ok, w in zip(personal, why, strict=True)]
            personal = np.zeros_like(personal)
            sensitive = np.zeros_like(sensitive)
        behavioral = c.personalization if c.behavioral is None else c.behavioral
        policy = self.settings.policy
        trust = policy.trust_full - policy.trust_step * ((~behavioral).astype(float) + ~sensitive)
        return personal, sensitive, why, trust

    def _unreadable(self, n: int) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
        """`consent_details` of `n` customers whose consent could not be read: nothing allowed
        (fail closed), reason consent_unavailable."""
        policy = self.settings.policy
        trust = np.full(n, policy.trust_full - 2 * policy.trust_step)
        no = np.zeros(n, dtype=bool)
        return no, no.copy(), [CONSENT_UNAVAILABLE] * n, trust

    def _read(self, customer_ids: list[str]):
        """(personal, sensitive, why not personal, trust, unanswered impressions, recorded
        purchases) of a request's customers, read once (`reads`)."""
        since = _EPOCH + dt.timedelta(days=self.bundle.reference_day)
        read = self.reads or separate_reads(self.consent, self.events, self.impressions)
        reads = read(customer_ids, since, self._fatigue_since())
        personal_ok, sensitive_ok, why_not, trust = self._consent_terms(reads.consent)
        personal = {c for c, ok in zip(customer_ids, personal_ok, strict=True) if ok}
        shown = {c: v for c, v in reads.impressions.items() if c in personal}
        recorded = self._recorded(customer_ids, reads.purchases)
        return personal_ok, sensitive_ok, why_not, trust, shown, recorded

    def _fatigue_since(self) -> dt.datetime | None:
        """Where fatigue counts impressions from; None when fatigue is off."""
        policy = self.settings.policy
        if policy.fatigue_demotion >= 1:
            return None
        return self.now() - dt.timedelta(days=policy.fatigue_days)

    def warm_slates(
        self,
        stop: threading.Event,
        batch: int = 32,
        idle: float = 3.0,
        *,
        skip: int = 0,
        budget_s: float = float("inf"),
    ) -> int:
        """Rank the known customers once each, the most recent buyers first, up to
        `serve.slate_cache_size` (run off the call path, by the model holder before and after
        the swap): a customer's first call then finds their slate. Each batch is answered as a
        call with the default limit would be, consent and recorded events read from the store,
        and nothing is sent or recorded. After each batch the thread rests `idle` times as long
        as the batch took, so that warming takes at most a quarter of the interpreter from the
        calls (at full speed it held it ~90% of the time, and a model swap under load stalled
        the calls: `make bench-soak`). Starts after the first `skip` customers of that order;
        stops early when `stop` is set (a newer model), the store cannot be read or `budget_s`
        seconds have passed. Returns the number of customers ranked, `skip` included."""
        size = self.settings.serve.slate_cache_size
        if not size:
            return 0
        days = self.bundle.repeat.last_day
        rows = np.diff(days.indptr)
        last = np.full(len(rows), -np.inf)
        busy = rows > 0
        if busy.any():
            last[busy] = np.maximum.reduceat(days.data, days.indptr[:-1][busy])
        order = np.argsort(-last, kind="stable")[:size]
        ids = self.bundle.user_ids
        done = min(skip, len(order))
        until = time.perf_counter() + budget_s
        for lo in range(done, len(order), batch):
            if stop.is_set() or time.perf_counter() >= until:
                break
            started = time.perf_counter()
            queries = [ProductQuery(customer_id=str(ids[u])) for u in order[lo : lo + batch]]
            try:  # an unreadable store ends the warming quietly: calls report the outage
                self.consent([q.customer_id for q in queries])
            except StoreError:
                break
            self._recommend(queries, DEFAULT_LIMIT)
            done += len(queries)
            # The slates just ranked live as long as the model: out of the collector's sight
            # (gc.freeze is O(1)). Otherwise each full collection walks every cached slate,
            # holding the GIL all the while (42 ms here at 2,469 slates, every call of the
            # process waiting; more with the old model's beside them during a swap, and in
            # proportion at a million customers). A model's objects are freed by reference
            # counting when it is released (no cycle holds them), frozen or not. The young
            # generations are collected first (about a millisecond) so that little garbage in
            # cycles is frozen with them.
            gc.collect(1)
            gc.freeze()
            stop.wait(idle * (time.perf_counter() - started))  # the calls' share
        return done

    def _learned_before(self, customer_id: str, erased_at: dt.datetime) -> bool:
        """Did this model learn from the customer's history at or before `erased_at`? (A model
        trained after the erasure learned only what came after it, `policy.erased_rows`: such a
        customer, back with new consent, is served from it.)"""
        b = self.bundle
        user = int(lookup(b.user_ids, np.asarray([customer_id], dtype=str))[0])
        if user < 0:
            return False
        if b.history is None:  # no record of what was learned: assume the worst
            return True
        return bool(b.history.first_day[user] <= (erased_at - _EPOCH) / dt.timedelta(days=1))

    def forget(self, customer_id: str) -> bool:
        """Drop a customer from this loaded model: their factors and CF candidates are zeroed and
        the model no longer knows them (`ModelBundle.forgotten`: unknown to every answer, as if
        never seen); True when the model knew them. An erased customer's answers are
        non-personal anyway; one who consents again is a new customer, whose answers come from
        what is recorded after the erasure, never from what the model learned before it."""
        b = self.bundle
        user = int(b.user_index(np.asarray([customer_id], dtype=str))[0])
        if user < 0:
            return False
        model = b.cf.model
        if hasattr(model, "user_factors"):
            model.user_factors[user] = 0.0
        self.cf_candidates[user] = -1
        if b.forgotten is None:
            b.forgotten = np.zeros(len(b.user_ids), dtype=bool)
        b.forgotten[user] = True
        self.slates.drop_user(user)
        return True

    # --- RecommendProducts / StreamRecommendations --------------------------------------------

    def _item_mask(self, q: ProductQuery) -> np.ndarray | None:
        """Products that may be returned to `q`, or None when it has no filter."""
        if not (q.include_categories or q.exclude_categories or q.exclude_product_ids):
            return None
        n_items = self.bundle.shape[1]
        empty = np.zeros(0, dtype=np.int64)
        if q.include_categories:
            mask = np.zeros(n_items, dtype=bool)
            for c in q.include_categories:
                mask[self.by_category.get(c.lower(), empty)] = True
        else:
            mask = np.ones(n_items, dtype=bool)
        for c in q.exclude_categories:
            mask[self.by_category.get(c.lower(), empty)] = False
        if q.exclude_product_ids:
            idx = self.bundle.item_index(np.asarray(q.exclude_product_ids, dtype=str))
            mask[idx[idx >= 0]] = False
        return mask

    def recommend(self, queries: list[ProductQuery], *, trace: bool = False) -> list[ProductAnswer]:
        """Answers in query order; one vectorised pass per distinct limit. With `trace`, each
        answer says how it was made (`ProductAnswer.trace`, for `explain.py`)."""
        answers: list[ProductAnswer | None] = [None] * len(queries)
        for limit in sorted({q.limit for q in queries}):
            part = [i for i, q in enumerate(queries) if q.limit == limit]
            batch = self._recommend([queries[i] for i in part], limit, trace)
            for i, answer in zip(part, batch, strict=True):
                answers[i] = answer
        return answers  # type: ignore[return-value]

    def _recommend(
        self, queries: list[ProductQuery], limit: int, trace: bool = False
    ) -> list[ProductAnswer]:
        b = self.bundle
        customer_ids = [q.customer_id for q in queries]
        now = self.now_day()
        try:
            personal_ok, sensitive_ok, why_not, trust, shown, recorded = self._read(customer_ids)
        except StoreError as exc:  # fail closed: nothing personal without a readable consent
            _outage.failed("product requests", len(queries), exc)
            personal_ok, sensitive_ok, why_not, trust = self._unreadable(len(customer_ids))
            shown = {}
            recorded = [_NOTHING_RECORDED] * len(customer_ids)
        else:
            _outage.ok()
        masks = [
            self._without_recorded(self._item_mask(q), q, items)
            for q, (items, _, _) in zip(queries, recorded, strict=True)
        ]
        fetch = limit + max(5, limit // 2)  # spare candidates for items the privacy rule withholds
        users = b.user_index(np.asarray(customer_ids, dtype=str))
        # The ranking of a known, consenting customer without filters or recorded purchases
        # depends only on the model, the clock and sensitive consent: computed once (a slate),
        # then every call applies consent, fatigue and the privacy rule to it.
        cacheable = [
            bool(personal_ok[r] and users[r] >= 0 and masks[r] is None) and not q.include_purchased
            for r, q in enumerate(queries)
        ]
        keys = [(int(users[r]), bool(sensitive_ok[r]), fetch, now) for r in range(len(queries))]
        slates = [self.slates.get(keys[r]) if cacheable[r] else None for r in range(len(queries))]
        todo = [r for r in range(len(queries)) if slates[r] is None]
        if todo:
            computed = self._rank(
                [queries[r] for r in todo],
                users[todo],
                personal_ok[todo],
                sensitive_ok[todo],
                [masks[r] for r in todo],
                fetch,
                now,
            )
            for r, slate in zip(todo, computed, strict=True):
                slates[r] = slate
                if cacheable[r]:
                    self.slates.put(keys[r], slate)
        out = []
        for r, q in enumerate(queries):
            items, counts, _ = recorded[r]
            user = int(users[r])
            slate = slates[r]
            if user < 0 and personal_ok[r] and len(items):
                folded = self._folded(q, items, counts, bool(sensitive_ok[r]), masks[r], fetch)
                if folded is not None:
                    chosen, relevance, evidence = folded
                    popular = np.zeros(len(chosen), dtype=bool)
                    reasons = self._reasons(-1, chosen, popular, False, now, cited=evidence)
                    bought = items
            else:
                folded = None
            if folded is None:
                chosen, relevance, popular, reasons = (
                    slate.ids,
                    slate.scores,
                    slate.popular,
                    slate.reasons,
                )
                bought = self._history(user)
            if not (folded is not None or slate.personalized):
                answer = ProductAnswer(
                    customer_id=q.customer_id,
                    items=[
                        self._item(int(i), float(s), why)
                        for i, s, why in zip(
                            chosen[:limit], relevance[:limit], reasons, strict=False
                        )
                    ],
                    personalized=False,
                    not_personalized_reason=why_not[r] or slate.why_not,
                    decisions=(f"not personalized: {_words(why_not[r] or slate.why_not)}",),
                )
                if trace:
                    shown_ids = chosen[:limit]
                    answer = dataclasses.replace(
                        answer,
                        trace=AnswerTrace(
                            personalized=False,
                            sensitive_ok=bool(sensitive_ok[r]),
                            mask=masks[r],
                            recorded=items,
                            bought=np.union1d(bought, items),
                            candidates=shown_ids,
                            valued=None,
                            chosen=np.arange(len(shown_ids)),
                            fetch=fetch,
                        ),
                    )
            else:
                answer = self._privacy_rule(
                    shown.get(q.customer_id, {}),
                    q,
                    chosen,
                    relevance,
                    popular,
                    reasons,
                    float(trust[r]),
                    bool(sensitive_ok[r]),
                    masks[r],
                    np.union1d(bought, items) if len(items) else bought,
                    limit,
                    recorded=items if trace else None,
                    fetch=fetch,
                )
            out.append(answer)
        return out

    def _rank(
        self,
        queries: list[ProductQuery],
        users: np.ndarray,
        personal_ok: np.ndarray,
        sensitive_ok: np.ndarray,
        masks: list[np.ndarray | None],
        fetch: int,
        now: float,
    ) -> list[Slate]:
        """The ranking stage: `recommend_for` and the reasons of its items, per query."""
        b, serve = self.bundle, self.settings.serve
        refolded = {
            r: f
            for r in np.flatnonzero(personal_ok & ~sensitive_ok & (users >= 0)).tolist()
            if (f := self._without_sensitive(int(users[r]))) is not None
        }  # SPEC §5: sensitive purchases are no evidence without sensitive consent
        recs = recommend_for(
            b,
            np.asarray([q.customer_id for q in queries], dtype=str),
            N=fetch,
            now_day=now,
            personalization_ok=personal_ok,
            sensitive_ok=sensitive_ok,
            durable_repeat_rate=serve.durable_repeat_rate,
            discovery_share=serve.discovery_share,
            pool=self.settings.train.candidate_pool,
            item_masks=masks,
            include_purchased=np.asarray([q.include_purchased for q in queries], dtype=bool),
            cf_candidates=self.cf_candidates,
            user_scores=refolded,
        )
        out = []
        for r in range(len(queries)):
            valid = recs.ids[r] >= 0
            ids, popular = recs.ids[r][valid], recs.popular[r][valid]
            user = int(recs.users[r])
            out.append(
                Slate(
                    ids=ids,
                    scores=recs.scores[r][valid],
                    popular=popular,
                    reasons=self._reasons(user, ids, popular, bool(sensitive_ok[r]), now),
                    personalized=bool(recs.personalized[r]),
                    why_not=recs.reasons[r],
                )
            )
        return out

    def _without_sensitive(self, user: int) -> np.ndarray | None:
        """The CF score of every item for a known customer from their history without sensitive
        products (`CFModel.history_scores`, for every kind of model: the model learned the
        customer with them, as sensitive consent was given then or the default allowed it), or
        None when the history has none (the model's own scores are theirs then)."""
        b = self.bundle
        ui = b.user_items
        items = ui.indices[ui.indptr[user] : ui.indptr[user + 1]]
        sensitive = b.item_sensitive[items]
        if not sensitive.any():
            return None
        keep = ~sensitive
        if not keep.any():
            return np.zeros(b.shape[1])
        weights = ui.data[ui.indptr[user] : ui.indptr[user + 1]][keep]
        return b.cf.history_scores(items[keep], weights, b.manifest.get("params", {}))

    def _history(self, user: int) -> np.ndarray:
        """Item indices the customer bought (none for customers the model does not know)."""
        if user < 0:
            return np.zeros(0, dtype=np.int64)
        rs = self.bundle.repeat.days_bought
        return rs.indices[rs.indptr[user] : rs.indptr[user + 1]]

    def _privacy_rule(
        self,
        shown: dict[str, int],
        q: ProductQuery,
        items: np.ndarray,
        relevance: np.ndarray,
        popular: np.ndarray,
        reasons: list[tuple[Reason, ...]],
        trust: float,
        sensitive_ok: bool,
        mask: np.ndarray | None,
        bought: np.ndarray,
        limit: int,
        recorded: np.ndarray | None = None,
        fetch: int = 0,
    ) -> ProductAnswer:
        """SPEC §5 on a personalized candidate list: value = (relevance × timeliness −
        privacy_loss) × trust, privacy_loss = sensitivity × the channel's exposure; items below
        policy.min_value are withheld, the rest ranked by value, the list filled with best
        sellers (never sensitive), and the decisions said.

        `relevance` is relevance × timeliness counted once: the blend's calibrated probability
        that the customer buys the product soon, which learned the repurchase timing from its
        features (a fold-in answer's relative CF score, which has no timing). The rule itself is
        `value_rule.value_terms`. `recorded` (the purchases recorded since training), when
        given, asks for the answer's trace (`fetch`: how many candidates the ranking offered)."""
        policy, serve = self.settings.policy, self.settings.serve
        b = self.bundle
        times = (
            np.asarray([shown.get(str(b.item_ids[i]), 0) for i in items], dtype=np.int64)
            if shown
            else np.zeros(len(items), dtype=np.int64)
        )
        valued = value_terms(
            relevance,
            self.sensitivity[items],
            policy.channel_exposure[q.channel],
            trust,
            times,
            policy,
        )
        value, tired, keep = valued.value, valued.tired, valued.kept
        if tired.any():
            reasons = list(reasons)
            for k in np.flatnonzero(tired):
                note = Reason(
                    "fatigue",
                    f"shown {times[k]} times in {policy.fatigue_days:g} days without a click or "
                    "purchase: demoted",
                    days=policy.fatigue_days,
                )
                reasons[k] = (*reasons[k], note)
        withheld = int((~keep & ~popular).sum())
        ranked = np.flatnonzero(keep)
        ranked = ranked[np.argsort(-value[ranked], kind="stable")]
        # The best by value, with the discovery places kept for products new to the customer.
        at = np.minimum(np.searchsorted(bought, items[ranked]), max(len(bought) - 1, 0))
        fresh = bought[at] != items[ranked] if len(bought) else np.ones(len(ranked), bool)
        order = ranked[with_discovery(fresh, limit, discovery_slots(limit, serve.discovery_share))]
        chosen = [self._item(int(items[k]), float(value[k]), reasons[k]) for k in order]
        decisions = []
        if not sensitive_ok:
            decisions.append("sensitive products neither used nor shown: no sensitive consent")
        if tired.any():
            decisions.append(f"{int(tired.sum())} items demoted for fatigue")
        if withheld:
            decisions.append(
                f"{withheld} items withheld: value below {policy.min_value:g} on the "
                f"{q.channel} channel"
            )
        if len(chosen) < limit:
            exclude = ~b.item_available | b.item_sensitive
            if mask is not None:
                exclude = exclude | ~mask
            exclude = exclude.copy()
            exclude[items[order]] = True
            if not q.include_purchased:
                exclude[bought] = True
            fill, _ = best_sellers_for(b, 1, limit - len(chosen), exclude)
            fill = fill[0][fill[0] >= 0]
            low = chosen[-1].score if chosen else policy.min_value
            for k, i in enumerate(fill.tolist(), 1):
                score = low * (1.0 - k / (len(fill) + 1) * 1e-3)
                chosen.append(self._item(i, score, (self._popular_reason(i),)))
            if len(fill):
                decisions.append(f"{len(fill)} best sellers added to fill the list")
        return ProductAnswer(
            customer_id=q.customer_id,
            items=chosen,
            personalized=True,
            decisions=tuple(decisions),
            withheld=withheld,
            trace=None
            if recorded is None
            else AnswerTrace(
                personalized=True,
                sensitive_ok=sensitive_ok,
                mask=mask,
                recorded=recorded,
                bought=bought,
                candidates=items,
                valued=valued,
                chosen=order,
                fetch=fetch,
            ),
        )

    def _recorded(
        self, customer_ids: list[str], table: pa.Table
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per customer: (item indices, net purchase count, day of the last purchase) of the
        purchases recorded after the model's newest event, on products the model knows, from
        the recorded events `table` of those customers."""
        out = [_NOTHING_RECORDED] * len(customer_ids)
        if table.num_rows == 0:
            return out
        kind = table.column("event_type").to_numpy(zero_copy_only=False)
        day = to_days(table.column("timestamp"))
        keep = np.isin(kind, ("purchase", "return")) & (day > self.bundle.reference_day)
        if not keep.any():
            return out
        customers = table.column("customer_id").to_numpy(zero_copy_only=False)[keep]
        items = self.bundle.item_index(
            table.column("product_id").to_numpy(zero_copy_only=False)[keep]
        )
        sign = np.where(kind[keep] == "return", -1.0, 1.0)
        day = day[keep]
        position = {c: k for k, c in enumerate(customer_ids)}
        for c in set(customers.tolist()):
            mine = (customers == c) & (items >= 0)
            if not mine.any():
                continue
            uniq, inverse = np.unique(items[mine], return_inverse=True)
            count = np.bincount(inverse, weights=sign[mine])
            last = np.full(len(uniq), -np.inf)
            np.maximum.at(last, inverse, np.where(sign[mine] > 0, day[mine], -np.inf))
            bought = count > 0
            out[position[c]] = (uniq[bought], count[bought], last[bought])
        return out

    def _without_recorded(
        self,
        mask: np.ndarray | None,
        q: ProductQuery,
        items: np.ndarray,
    ) -> np.ndarray | None:
        """The query's item mask without the purchases recorded since the model was trained: the
        model cannot time a purchase it has not seen, so they come back after the next training
        (and durables never), unless the request asks for bought products."""
        if not len(items) or q.include_purchased:
            return mask
        mask = np.ones(self.bundle.shape[1], dtype=bool) if mask is None else mask.copy()
        mask[items] = False
        return mask

    def _folded(
        self,
        q: ProductQuery,
        items: np.ndarray,
        counts: np.ndarray,
        sensitive_ok: bool,
        mask: np.ndarray | None,
        limit: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """Candidates for a customer unknown to the model from their recorded purchases, scored
        as the model would score that history (`CFModel.history_scores`: ALS fold-in, BPR's
        objective with the item factors fixed, the item-item row times the similarity): (items,
        relevance in (0, 1] relative to the best, the purchases used as evidence — without
        sensitive ones unless sensitive consent). None when nothing may be used."""
        b = self.bundle
        if not sensitive_ok:
            keep = ~b.item_sensitive[items]
            items, counts = items[keep], counts[keep]
        if not len(items):
            return None
        scores = b.cf.history_scores(items, counts, b.manifest.get("params", {}))
        blocked = ~b.item_available
        if not sensitive_ok:
            blocked |= b.item_sensitive
        if mask is not None:
            blocked |= ~mask
        if not q.include_purchased:
            blocked[items] = True
        scores = np.where(blocked, -np.inf, scores.astype(np.float64))
        n = min(limit, int(np.isfinite(scores).sum()))
        top = np.lexsort((np.arange(len(scores)), -scores))[:n]
        if not n:
            return None
        best = scores[top[0]]
        scaled = np.clip(scores[top] / best, 1e-6, 1.0) if best > 0 else np.full(n, 1e-6)
        return top, scaled, items

    def _item(self, i: int, score: float, reasons: tuple[Reason, ...]) -> Item:
        return Item(
            product_id=str(self.bundle.item_ids[i]),
            # Rounded: a batch of 256 and a single call may differ in the last bits of a float.
            score=round(score, 9),
            reasons=reasons,
            title=self.titles[i],
            category=self.categories[i],
            price=self.prices[i],
        )

    def _name(self, i: int) -> str:
        """A product's title for reason texts, its id when the catalog has no title."""
        return self.titles[i] or str(self.bundle.item_ids[i])

    def _popular_reason(self, i: int) -> Reason:
        return Reason("popular", "a best seller", str(self.bundle.item_ids[i]), self.titles[i])

    def _bought(self, user: int, sensitive_ok: bool) -> np.ndarray:
        """Item indices the customer bought that may be cited (no sensitive ones without
        sensitive consent)."""
        bought = self._history(user)
        if not sensitive_ok:
            bought = bought[~self.bundle.item_sensitive[bought]]
        return bought

    def _reasons(
        self,
        user: int,
        items: np.ndarray,
        popular: np.ndarray,
        sensitive_ok: bool,
        now: float,
        cited: np.ndarray | None = None,
    ) -> list[tuple[Reason, ...]]:
        """One reason per item: repurchase due (a bought product), bought related (the bought
        product closest to it in the model), else popular. `cited`: the purchases that may be
        cited for a customer the model does not know (recorded ones)."""
        if (user < 0 and cited is None) or popular.all():
            return [(self._popular_reason(int(i)),) for i in items]
        b, rs = self.bundle, self.bundle.repeat
        if user >= 0:
            start, stop = rs.days_bought.indptr[user], rs.days_bought.indptr[user + 1]
        else:
            start = stop = 0
        row_items = rs.days_bought.indices[start:stop]
        pos = np.minimum(np.searchsorted(row_items, items), max(len(row_items) - 1, 0))
        is_bought = row_items[pos] == items if len(row_items) else np.zeros(len(items), bool)
        is_bought &= ~popular
        if cited is None:
            cited = self._bought(user, sensitive_ok)
        new = np.flatnonzero(~popular & ~is_bought)
        best_src = np.full(len(items), -1, dtype=np.int64)
        if len(new) and len(cited):
            sim = b.cf.item_similarity(items[new], cited)
            best = sim.argmax(axis=1)
            ok = sim[np.arange(len(new)), best] > 0
            best_src[new[ok]] = cited[best[ok]]
        interval = item_interval(b, items)
        out: list[tuple[Reason, ...]] = []
        for j, i in enumerate(items.tolist()):
            if is_bought[j]:
                at = start + pos[j]
                days = rs.days_bought.data[at]
                last = rs.last_day.data[at]
                age = max(now - last, 0.0)
                every = (last - rs.first_day.data[at]) / max(days - 1, 1)
                if days >= 2 and every >= 2:
                    text = f"you buy this about every {every:.0f} days; last {age:.0f} days ago"
                else:
                    every = interval[j] if np.isfinite(interval[j]) else age
                    text = f"you bought this {age:.0f} days ago"
                why = Reason("repurchase_due", text, b.item_ids[i], self.titles[i], float(every))
            elif best_src[j] >= 0:
                src = int(best_src[j])
                title = self._name(src)
                why = Reason(
                    "bought_related",
                    f"because you bought {title}",
                    str(b.item_ids[src]),
                    self.titles[src],
                )
            else:
                why = self._popular_reason(i)
            out.append((why,))
        return out

    # --- SimilarProducts ----------------------------------------------------------------------

    def customer_state(self, customer_id: str) -> tuple[CustomerState | None, str]:
        """The lifecycle state of one customer now (their training history plus the purchases
        recorded since), or (None, why not): no_consent, erased, consent_unavailable (fail
        closed), no_lifecycle_model, or unknown_customer (no purchase known)."""
        state, why, _ = self._state_and_consent(customer_id)
        return state, why

    def _state_and_consent(self, customer_id: str) -> tuple[CustomerState | None, str, bool]:
        """`customer_state` and whether the customer gave sensitive consent (one store read)."""
        try:
            personal, sensitive, why, _ = self.consent_details([customer_id])
            table = self.events([customer_id]) if self.events is not None else None
        except StoreError as exc:
            _outage.failed("lifecycle requests", 1, exc)
            return None, CONSENT_UNAVAILABLE, False
        _outage.ok()
        if not personal[0]:
            return None, why[0] or "no_consent", False
        lifecycle = self.lifecycle
        if lifecycle is None:
            return None, "no_lifecycle_model", bool(sensitive[0])
        days, values = np.zeros(0), np.zeros(0)
        if table is not None and table.num_rows:
            _, days, values = purchases_of(table)
            since = days > self.bundle.reference_day  # the rest trained the model
            days, values = days[since], values[since]
        row = int(self.bundle.user_index(np.asarray([customer_id], dtype=str))[0])
        state = lifecycle.state(row, days, values, self.now_day())
        why = "" if state is not None else "unknown_customer"
        return state, why, bool(sensitive[0])

    def next_best_action(self, customer_id: str, channel: str, limit: int) -> ActionAnswer:
        """One action for the customer (see `lifecycle.actions.decide`) with its payload."""
        state, why, sensitive_ok = self._state_and_consent(customer_id)
        base = ProductQuery(customer_id=customer_id, limit=limit, channel=channel)
        b = self.bundle
        user = int(b.user_index(np.asarray([customer_id], dtype=str))[0])
        plain = None
        due: set[str] = set()
        bought = set(b.item_ids[self._history(user)].tolist()) if user >= 0 else set()
        fresh: list[Item] = []
        if state is not None or why in ("no_lifecycle_model", "unknown_customer"):
            [plain] = self.recommend([base])
            if plain.personalized:
                due = self._due(user, [i.product_id for i in plain.items if i.product_id in bought])
                fresh = [i for i in plain.items if i.product_id not in bought]
        valuable, durable = False, -1
        if state is not None and user >= 0:
            value = self.lifecycle.summary.value
            valuable = bool(value[user] > 0 and value[user] >= self._valuable_from)
            durable = self._recent_durable(user, sensitive_ok)
        situation = Situation(
            state=state,
            why_not=why,
            valuable=valuable,
            recent_durable=(self.titles[durable] or str(b.item_ids[durable]))
            if durable >= 0
            else "",
            due=len(due),
            new=len(fresh),
        )
        action, reasons = decide(situation, self.settings.lifecycle.care_days)
        products, items, content = None, (), ()
        if action == "welcome" and state is not None:
            products = self.action_products(base, user, sensitive_ok, action)
            items = tuple(products.items)
        elif action in ("welcome", "win_back", "replenish", "cross_sell"):
            products = plain
            if action == "replenish":
                items = tuple(i for i in plain.items if i.product_id in due)
            elif action == "cross_sell":
                items = tuple(fresh)
            else:
                items = tuple(plain.items)
        elif action == "care":
            about = self._content_about(str(b.item_ids[durable]))
            answer = self.score_content(customer_id, [ContentQuery(content_id=c) for c in about])
            content = tuple(c for c in answer.items if c.relevance > 0)[:limit]
        return ActionAnswer(
            customer_id=customer_id,
            action=action,
            personalized=state is not None,
            not_personalized_reason=why,
            reasons=reasons,
            products=products,
            items=items,
            content=content,
            state=state,
        )

    def audience(
        self,
        *,
        stage: str = "",
        action: str = "",
        channel: str = "email",
        limit: int = DEFAULT_LIMIT,
        max_customers: int = 0,
    ) -> Iterator[ActionAnswer]:
        """Every customer of the model whose state now is `stage` (or whose next best action is
        `action`), with their action and payload, in the model's customer order. Customers
        without personalization consent or erased are in no audience. Customers are picked
        by the training summaries' stage at the clock (recorded purchases only move a customer
        towards active), then each is decided like NextBestAction."""
        if bool(stage) == bool(action):
            raise InvalidRequest("name exactly one of stage and action")
        if stage and stage not in STAGES:
            raise InvalidRequest(f"stage: {stage!r} is not one of {', '.join(STAGES)}")
        if action and action not in ACTIONS:
            raise InvalidRequest(f"action: {action!r} is not one of {', '.join(ACTIONS)}")
        if self.lifecycle is None:
            raise ModelError("the served model has no lifecycle state (retrain it)")
        plausible = (stage,) if stage else AUDIENCE_STAGES[action]
        stages = self.lifecycle.stages(self.now_day())
        rows = np.flatnonzero(np.isin(stages, [STAGES.index(s) for s in plausible]))
        if self.bundle.forgotten is not None:  # erased: their summaries are not theirs any more
            rows = rows[~self.bundle.forgotten[rows]]
        return self._audience(rows, stage, action, channel, limit, max_customers)

    def _audience(
        self, rows, stage: str, action: str, channel: str, limit: int, max_customers: int
    ) -> Iterator[ActionAnswer]:
        sent = 0
        for row in rows.tolist():
            answer = self.next_best_action(str(self.bundle.user_ids[row]), channel, limit)
            if answer.state is None:
                continue
            if (stage and answer.state.stage != stage) or (action and answer.action != action):
                continue
            yield answer
            sent += 1
            if max_customers and sent >= max_customers:
                return

    def _due(self, user: int, product_ids: list[str]) -> set[str]:
        """Of the customer's bought `product_ids`: those due again now (days since the last
        purchase at least DUE_SHARE of the customer's own interval for it, else the product's
        usual repurchase interval)."""
        if user < 0 or not product_ids:
            return set()
        b = self.bundle
        rs = b.repeat
        items = b.item_index(np.asarray(product_ids, dtype=str))
        start, stop = rs.days_bought.indptr[user], rs.days_bought.indptr[user + 1]
        mine = rs.days_bought.indices[start:stop]
        at = start + np.searchsorted(mine, items)
        days = rs.days_bought.data[at]
        last = rs.last_day.data[at]
        own = (last - rs.first_day.data[at]) / np.maximum(days - 1, 1)
        every = np.where(days >= 2, own, item_interval(b, items))
        age = np.floor(self.now_day()) - np.floor(last)
        ok = np.isfinite(every) & (every > 0) & (age >= DUE_SHARE * every)
        return {p for p, y in zip(product_ids, ok.tolist(), strict=True) if y}

    def _recent_durable(self, user: int, sensitive_ok: bool) -> int:
        """The most recent durable the customer bought within lifecycle.care_days that some
        content is about (item index), or -1."""
        b = self.bundle
        rs = b.repeat
        start, stop = rs.days_bought.indptr[user], rs.days_bought.indptr[user + 1]
        items = rs.days_bought.indices[start:stop]
        last = rs.last_day.data[start:stop]
        today = np.floor(self.now_day())
        recent = last >= today - self.settings.lifecycle.care_days
        durable = is_durable(b, items, durable_repeat_rate=self.settings.serve.durable_repeat_rate)
        ok = recent & durable & (sensitive_ok | ~b.item_sensitive[items])
        for k in np.flatnonzero(ok)[np.argsort(-last[ok], kind="stable")]:
            if self._content_about(str(b.item_ids[items[k]])):
                return int(items[k])
        return -1

    def action_products(
        self, query: ProductQuery, user: int, sensitive_ok: bool, action: str
    ) -> ProductAnswer:
        """The products of an action: for `welcome`, RecommendProducts' answer within the
        categories of the first purchase day; for the others (`win_back` included), its plain
        answer. Win-back leans on the last purchases through the ranking's own recency features:
        restricting it to the last purchase day's categories scored lower on the customers who
        came back (EVALUATION.md)."""
        categories = self._first_categories(user, sensitive_ok) if action == "welcome" else ()
        query = dataclasses.replace(query, include_categories=categories) if categories else query
        [answer] = self.recommend([query])
        return answer

    def _first_categories(self, user: int, sensitive_ok: bool) -> tuple[str, ...]:
        """Categories of the customer's first purchase day's products, without sensitive ones
        unless sensitive consent."""
        b = self.bundle
        rs = b.repeat
        start, stop = rs.days_bought.indptr[user], rs.days_bought.indptr[user + 1]
        items = rs.days_bought.indices[start:stop]
        days = np.floor(rs.first_day.data[start:stop])
        keep = sensitive_ok | ~b.item_sensitive[items]
        if not keep.any():
            return ()
        items, days = items[keep], days[keep]
        chosen = items[days == days.min()]
        return tuple(sorted({self.categories[i] for i in chosen.tolist()} - {""}))

    def _content_about(self, product_id: str) -> list[str]:
        """Ids of the snapshot's content linked to `product_id`."""
        return self.content_by_product.get(product_id, [])

    def similar(
        self, product_ids: list[str], limit: int, customer_id: str = ""
    ) -> tuple[list[Item], list[str]]:
        """Products similar to the set `product_ids` (mean similarity, in [0, 1]) and the ids the
        model does not know. NotFound when it knows none of them. Sensitive products only when
        `customer_id` names a customer with sensitive consent."""
        b = self.bundle
        requested = list(dict.fromkeys(product_ids))
        idx = b.item_index(np.asarray(requested, dtype=str))
        unknown = [p for p, i in zip(requested, idx, strict=True) if i < 0]
        known = idx[idx >= 0]
        if len(known) == 0:
            raise NotFound(
                f"product_ids: none of the requested products is known to model {self.version} "
                f"({', '.join(requested[:5])}{', ...' if len(requested) > 5 else ''})"
            )
        sim = b.cf.item_similarity(known)
        if b.cf.kind in ("cosine", "bm25"):
            top = sim.max(axis=1, keepdims=True)
            sim = sim / np.where(top > 0, top, 1.0)
        sim = np.clip(sim, 0.0, 1.0)
        score = sim.mean(axis=0)
        score[known] = 0.0
        sensitive_ok = False
        if customer_id:
            try:
                (_,), (sensitive_ok,), _ = self.consents([customer_id])
            except StoreError as exc:  # fail closed: no sensitive products
                _outage.failed("a similar-products request", 1, exc)
            else:
                _outage.ok()
        score[~b.item_available] = 0.0
        if not sensitive_ok:
            score[b.item_sensitive] = 0.0
        n = min(limit, int((score > 0).sum()))
        order = np.lexsort((np.arange(len(score)), -score))[:n]
        source = known[sim[:, order].argmax(axis=0)] if n else known[:0]
        items = []
        for i, src in zip(order, source, strict=True):
            title = self._name(src)
            why = Reason(
                "similar_to", f"similar to {title}", str(b.item_ids[src]), self.titles[src]
            )
            items.append(self._item(int(i), float(score[i]), (why,)))
        return items, unknown

    # --- ScoreContent -------------------------------------------------------------------------

    def _content_items(self, q: ContentQuery) -> tuple[str, str, np.ndarray, bool]:
        """(title, kind, linked item indices, sensitive) of a candidate; NotFound for unknown
        ids. Content is sensitive when the snapshot says so (sensitivity > 0), when it names a
        sensitive category or department of the config, or links a sensitive product."""
        sensitive = False
        if q.inline:
            title, kind, products, categories = q.title, "inline", q.product_ids, q.categories
        else:
            at = lookup(self.content_ids, np.asarray([q.content_id], dtype=str))[0]
            if at < 0:
                raise NotFound(f"content_id {q.content_id!r} is not in model {self.version}")
            row = {c: self.content.column(c)[int(at)].as_py() for c in self.content.column_names}
            title, kind = row["title"] or "", row["kind"] or "article"
            products, categories = row["product_ids"] or [], row["categories"] or []
            sensitive = float(row["sensitivity"] or 0.0) > 0
        linked = self.bundle.item_index(np.asarray(list(products), dtype=str))
        linked = linked[linked >= 0]
        sensitive |= bool(self.bundle.item_sensitive[linked].any())
        sensitive |= any(c.lower() in self.sensitive_groups for c in categories)
        parts = [linked]
        parts += [self.by_category.get(c.lower(), np.zeros(0, np.int64)) for c in categories]
        return title, kind, np.unique(np.concatenate(parts)), sensitive

    def score_content(self, customer_id: str, candidates: list[ContentQuery]) -> ContentAnswer:
        """Relevance in [0, 1] of each candidate for the customer, ranked (ties: request order).

        Content about products the customer bought scores 0.5 + 0.5 · 2^(−age / half-life) (the
        most recently bought linked product counts); other content 0.5 × the model's best score
        for its products over the customer's best score overall. Non-personal answers: the best
        popularity share of the linked products. Without sensitive consent, sensitive products
        are no evidence and sensitive content scores 0.
        """
        b = self.bundle
        resolved = [self._content_items(q) for q in candidates]
        try:
            (personal_ok,), (sensitive_ok,), (why_not,) = self.consents([customer_id])
        except StoreError as exc:  # fail closed: popularity only, nothing sensitive
            _outage.failed("a content request", 1, exc)
            personal_ok, sensitive_ok, why_not = False, False, CONSENT_UNAVAILABLE
        else:
            _outage.ok()
        user = int(b.user_index(np.asarray([customer_id]))[0])
        personal = bool(personal_ok) and user >= 0
        if not personal and not why_not:
            why_not = "unknown_customer"
        now = self.now_day()
        half_life = self.settings.serve.content_half_life_days
        if personal:
            rs = b.repeat
            start, stop = rs.days_bought.indptr[user], rs.days_bought.indptr[user + 1]
            bought_items = rs.days_bought.indices[start:stop]
            bought_last = rs.last_day.data[start:stop]
            refolded = None if sensitive_ok else self._without_sensitive(user)
            # Interest from the history without sensitive products when they may not be used.
            cf_all = b.cf.user_scores(user, b.user_items) if refolded is None else refolded
            cf_top = max(float(cf_all.max(initial=0.0)), 1e-12)
        scored = []
        for q, (title, kind, items, sensitive) in zip(candidates, resolved, strict=True):
            if not sensitive_ok:
                items = items[~b.item_sensitive[items]]
            relevance, reason = 0.0, Reason("none", "links no product the model knows")
            if sensitive and not sensitive_ok:
                reason = Reason("none", "sensitive content needs the customer's consent")
            elif len(items) and personal:
                hit = np.isin(bought_items, items)
                if hit.any():
                    k = int(np.argmax(np.where(hit, bought_last, -np.inf)))
                    i, age = int(bought_items[k]), max(now - float(bought_last[k]), 0.0)
                    relevance = 0.5 + 0.5 * 0.5 ** (age / half_life)
                    what = self._name(i)
                    reason = Reason(
                        "bought_recently",
                        f"about {what}, bought {age:.0f} days ago",
                        str(b.item_ids[i]),
                        self.titles[i],
                        age,
                    )
                else:
                    i = int(items[np.argmax(cf_all[items])])
                    relevance = 0.5 * min(max(float(cf_all[i]) / cf_top, 0.0), 1.0)
                    what = self._name(i)
                    reason = Reason(
                        "predicted_interest",
                        f"about {what}, which matches your purchases",
                        str(b.item_ids[i]),
                        self.titles[i],
                    )
            elif len(items):
                i = int(items[np.argmax(self.popularity[items])])
                relevance = float(self.popularity[i])
                what = self._name(i)
                reason = Reason(
                    "popular", f"about {what}, a best seller", str(b.item_ids[i]), self.titles[i]
                )
            scored.append(ScoredContent(q.content_id, title, kind, relevance, (reason,)))
        order = sorted(range(len(scored)), key=lambda k: -scored[k].relevance)
        return ContentAnswer(customer_id, [scored[k] for k in order], personal, why_not)
