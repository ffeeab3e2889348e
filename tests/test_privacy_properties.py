"""Property-based tests of the privacy invariants of SPEC §5 (issue #4) over random worlds.

Each example draws a small world (catalog with sensitive categories, departments and products,
unavailable products, a purchase history over ~90 days, a content snapshot, a consent state per
customer, purchases recorded after training and past impressions), trains a model in-process on
the whole history (as if everyone had consented at training time) and serves it with the random
consent state: consent withdrawn or narrowed after training, some customers erased, new
customers known only from recorded purchases. What is sensitive, available, known to the model
or allowed is computed here from the generated world, never read back from the bundle.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nextbest.config import Settings, load_settings
from nextbest.data.readers import CATALOG_SCHEMA, CONTENT_SCHEMA, EVENT_SCHEMA
from nextbest.errors import DataError, NotFound
from nextbest.policy import ConsentState, filter_training_events
from nextbest.service import (
    ContentQuery,
    CustomerConsent,
    ProductQuery,
    ServedModel,
    fixed_consent,
)
from nextbest.training import train

SENSITIVE_CATEGORIES = ("pharmacy", "Adult")
SENSITIVE_DEPARTMENTS = ("WELLNESS",)
CATEGORIES = ("home", "Home", "pantry", "toys", "pharmacy", "PHARMACY", "adult")
DEPARTMENTS = (None, "grocery", "living", "wellness", "Wellness")
FILTER_NAMES = ("home", "PANTRY", "toys", "Pharmacy", "adult", "grocery", "wellness", "nothing")
START = dt.datetime(2024, 3, 1)
RECORDED_START = START + dt.timedelta(days=91)
"""Recorded (store) events come after the newest training event."""
CHANNELS = ("email", "web", "app")
UNKNOWN = "nobody"

PROPERTY_SETTINGS = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass(frozen=True)
class Product:
    product_id: str
    category: str
    department: str | None
    available: bool
    sensitivity: float | None
    repurchase_days: float | None


@dataclass(frozen=True)
class Customer:
    customer_id: str
    events: tuple[tuple[int, int, int, str], ...]
    """Training events: (product position, day 0..89, hour, event type); none for a new
    customer."""
    personalization: bool | None
    """None: no record (the serving default applies)."""
    sensitive: bool | None
    behavioral: bool | None
    erased: bool


@dataclass(frozen=True)
class Content:
    content_id: str
    product_ids: tuple[str, ...]
    categories: tuple[str, ...]
    sensitivity: float | None


@dataclass(frozen=True)
class World:
    products: tuple[Product, ...]
    customers: tuple[Customer, ...]
    content: tuple[Content, ...]
    recorded: tuple[tuple[str, int, int, str], ...]
    """Events in the store after training: (customer id, product position, day, event type)."""
    impressions: tuple[tuple[str, int, int], ...]
    """Unanswered impressions: (customer id, product position, times shown)."""
    default_allow: bool
    """Serving default for customers without a record (training always allows)."""
    forget_at_load: bool
    """Also hand the erased customers to ServedModel (forgotten before the model was loaded)."""

    @property
    def product_ids(self) -> list[str]:
        return [p.product_id for p in self.products]

    # --- the oracle: everything below comes from the generated world, not from the bundle ---

    def catalog(self) -> pa.Table:
        ps = self.products
        return pa.table(
            {
                "product_id": [p.product_id for p in ps],
                "title": [f"Product {p.product_id}" for p in ps],
                "category": [p.category for p in ps],
                "department": [p.department for p in ps],
                "product_type": [None] * len(ps),
                "price": [1.0 + k for k in range(len(ps))],
                "available": [p.available for p in ps],
                "sensitivity": [p.sensitivity for p in ps],
                "repurchase_days": [p.repurchase_days for p in ps],
            },
            schema=CATALOG_SCHEMA,
        )

    def events(self) -> pa.Table:
        rows = [(c.customer_id, *e) for c in self.customers for e in c.events]
        return pa.table(
            {
                "customer_id": [r[0] for r in rows],
                "product_id": [self.products[r[1]].product_id for r in rows],
                "timestamp": [START + dt.timedelta(days=r[2], hours=r[3]) for r in rows],
                "event_type": [r[4] for r in rows],
                "quantity": [1.0] * len(rows),
                "value": [None] * len(rows),
                "channel": [None] * len(rows),
            },
            schema=EVENT_SCHEMA,
        )

    def content_table(self) -> pa.Table:
        cs = self.content
        return pa.table(
            {
                "content_id": [c.content_id for c in cs],
                "title": [f"About {c.content_id}" for c in cs],
                "kind": ["guide"] * len(cs),
                "product_ids": [list(c.product_ids) for c in cs],
                "categories": [list(c.categories) for c in cs],
                "sensitivity": [c.sensitivity for c in cs],
                "published_at": [None] * len(cs),
            },
            schema=CONTENT_SCHEMA,
        )

    def recorded_events(self, customer_ids) -> pa.Table:
        wanted = set(customer_ids)
        rows = [r for r in self.recorded if r[0] in wanted]
        return pa.table(
            {
                "customer_id": [r[0] for r in rows],
                "product_id": [self.products[r[1]].product_id for r in rows],
                "timestamp": [RECORDED_START + dt.timedelta(days=r[2]) for r in rows],
                "event_type": [r[3] for r in rows],
                "quantity": [1.0] * len(rows),
                "value": [None] * len(rows),
                "channel": [None] * len(rows),
            },
            schema=EVENT_SCHEMA,
        )

    def shown(self, customer_ids, since) -> dict[str, dict[str, int]]:
        wanted = set(customer_ids)
        out: dict[str, dict[str, int]] = {}
        for customer_id, k, times in self.impressions:
            if customer_id in wanted:
                mine = out.setdefault(customer_id, {})
                product_id = self.products[k].product_id
                mine[product_id] = mine.get(product_id, 0) + times
        return out

    def recorded_purchases(self, customer_id: str) -> set[str]:
        """Products known to the model that the customer bought (net of returns) after training."""
        net: dict[str, int] = {}
        for c, k, _, kind in self.recorded:
            if c == customer_id and kind in ("purchase", "return"):
                p = self.products[k].product_id
                net[p] = net.get(p, 0) + (1 if kind == "purchase" else -1)
        return {p for p, n in net.items() if n > 0} & self.in_model()

    def sensitive(self) -> set[str]:
        """Sensitive products by SPEC §5, from this file's plain lists (SENSITIVE_CATEGORIES,
        SENSITIVE_DEPARTMENTS: whole names, any case) and the product's own sensitivity."""
        categories = {c.upper() for c in SENSITIVE_CATEGORIES}
        departments = {d.upper() for d in SENSITIVE_DEPARTMENTS}
        return {
            p.product_id
            for p in self.products
            if (p.sensitivity or 0) > 0
            or p.category.upper() in categories
            or (p.department or "").upper() in departments
        }

    def unavailable(self) -> set[str]:
        return {p.product_id for p in self.products if not p.available}

    def in_model(self) -> set[str]:
        """Products with an event: what the model knows (every event is kept for training)."""
        return {self.products[e[0]].product_id for c in self.customers for e in c.events}

    def known_customers(self) -> set[str]:
        return {c.customer_id for c in self.customers if c.events}

    def customer(self, customer_id: str) -> Customer | None:
        return next((c for c in self.customers if c.customer_id == customer_id), None)

    def personal_ok(self, customer_id: str) -> bool:
        c = self.customer(customer_id)
        if c is None:
            return self.default_allow
        choice = self.default_allow if c.personalization is None else c.personalization
        return choice and not c.erased

    def sensitive_ok(self, customer_id: str) -> bool:
        c = self.customer(customer_id)
        if c is None:
            return self.default_allow
        choice = self.default_allow if c.sensitive is None else c.sensitive
        return choice and not c.erased

    def erased(self, customer_id: str) -> bool:
        c = self.customer(customer_id)
        return c is not None and c.erased

    def matching(self, names) -> set[str]:
        """Products whose category or department is one of `names` (case-insensitive)."""
        wanted = {n.lower() for n in names}
        return {
            p.product_id
            for p in self.products
            if p.category.lower() in wanted or (p.department or "").lower() in wanted
        }

    def consent_source(self):
        """Consent as the store gives it: records per purpose, the default, erased customers."""
        granted: dict[str, dict[str, bool]] = {}
        for c in self.customers:
            for purpose in ("personalization", "sensitive", "behavioral"):
                if getattr(c, purpose) is not None:
                    granted.setdefault(purpose, {})[c.customer_id] = getattr(c, purpose)
        base = fixed_consent(ConsentState(default_allow=self.default_allow, granted=granted))
        erased = {c.customer_id for c in self.customers if c.erased}

        def lookup(customer_ids):
            ids = list(customer_ids)
            found = base(ids)
            return CustomerConsent(
                personalization=found.personalization,
                sensitive=found.sensitive,
                erased=np.asarray([c in erased for c in ids], dtype=bool),
                behavioral=found.behavioral,
            )

        return lookup


MAYBE_BOOL = st.sampled_from([True, False, None])


@st.composite
def worlds(draw) -> World:
    n_products = draw(st.integers(8, 30))
    products = tuple(
        Product(
            product_id=f"p{k:02d}",
            category=draw(st.sampled_from(CATEGORIES)),
            department=draw(st.sampled_from(DEPARTMENTS)),
            available=draw(st.sampled_from([True, True, True, True, True, False])),
            sensitivity=draw(st.sampled_from([0.0, None, 0.0, 0.0, 0.0, 0.1, 0.5, 1.0])),
            repurchase_days=draw(st.sampled_from([None, None, None, 7.0, 30.0])),
        )
        for k in range(n_products)
    )
    event = st.tuples(
        st.integers(0, n_products - 1),
        st.integers(0, 89),
        st.integers(8, 20),
        st.sampled_from(["purchase", "purchase", "purchase", "purchase", "view"]),
    )
    n_customers = draw(st.integers(5, 30))
    n_new = draw(st.integers(0, 3))  # customers the model does not know (recorded events only)
    customers = tuple(
        Customer(
            customer_id=f"c{k:02d}" if k < n_customers else f"n{k - n_customers}",
            events=tuple(draw(st.lists(event, min_size=1, max_size=15))) if k < n_customers else (),
            personalization=draw(MAYBE_BOOL),
            sensitive=draw(MAYBE_BOOL),
            behavioral=draw(MAYBE_BOOL),
            erased=draw(st.sampled_from([False, False, False, False, False, False, True])),
        )
        for k in range(n_customers + n_new)
    )
    everyone = [c.customer_id for c in customers]

    def recorded_by(customer_ids):
        return st.tuples(
            st.sampled_from(customer_ids),
            st.integers(0, n_products - 1),
            st.integers(0, 20),
            st.sampled_from(["purchase", "purchase", "purchase", "return", "view"]),
        )

    recorded = draw(st.lists(recorded_by(everyone), max_size=8))
    for new in everyone[n_customers:]:  # new customers: mostly some recorded purchases
        recorded += draw(st.lists(recorded_by([new]), max_size=6))
    shown = st.tuples(st.sampled_from(everyone), st.integers(0, n_products - 1), st.integers(1, 5))
    ids = [p.product_id for p in products] + ["p-unknown"]
    content = tuple(
        Content(
            content_id=f"k{k}",
            product_ids=tuple(draw(st.lists(st.sampled_from(ids), max_size=3, unique=True))),
            categories=tuple(draw(st.lists(st.sampled_from(FILTER_NAMES), max_size=2))),
            sensitivity=draw(st.sampled_from([0.0, None, 0.0, 1.0])),
        )
        for k in range(draw(st.integers(0, 4)))
    )
    return World(
        products=products,
        customers=customers,
        content=content,
        recorded=tuple(recorded),
        impressions=tuple(draw(st.lists(shown, max_size=12))),
        default_allow=draw(st.booleans()),
        forget_at_load=draw(st.booleans()),
    )


def fast_settings() -> Settings:
    s = load_settings(None, environ={})
    s = s.with_overrides(
        "train",
        tune=False,
        candidates=("als",),
        als_factors=4,
        als_iterations=3,
        candidate_pool=10,
        num_threads=1,
    )
    return s.with_overrides(
        "policy",
        default_consent="allow",
        sensitive_categories=SENSITIVE_CATEGORIES,
        sensitive_departments=SENSITIVE_DEPARTMENTS,
    )


def serve(world: World) -> tuple[ServedModel, Settings]:
    """Train on every event (training-time consent: allow) and serve with the world's consent."""
    s = fast_settings()
    catalog = world.catalog()
    events, _ = filter_training_events(
        world.events(),
        ConsentState(default_allow=True),
        sensitive_products=pa.array(sorted(world.sensitive()), pa.string()),
    )
    try:
        bundle, _, _ = train(events, catalog, s, content=world.content_table())
    except DataError:
        assume(False)
    # Forgotten when the model was loaded: erased after everything it learned of them.
    erased = (
        {c.customer_id: dt.datetime(2100, 1, 1) for c in world.customers if c.erased}
        if world.forget_at_load
        else {}
    )
    served = ServedModel(
        bundle,
        s,
        world.consent_source(),
        erased=erased,
        events=world.recorded_events,
        impressions=world.shown,
    )
    return served, s


def names(draw, pool, max_size):
    return tuple(draw(st.lists(st.sampled_from(pool), max_size=max_size, unique=True)))


def assert_ranked(scores: list[float]) -> None:
    assert all(np.isfinite(scores)), scores
    assert all(0.0 <= s <= 1.0 for s in scores), scores
    assert all(a >= b for a, b in zip(scores, scores[1:], strict=False)), scores


# --- RecommendProducts ---------------------------------------------------------------------------


def draw_queries(data, world: World) -> list[ProductQuery]:
    """One random RecommendProducts query per customer of the world, and one for a stranger."""
    queries = []
    for customer_id in [c.customer_id for c in world.customers] + [UNKNOWN]:
        include = names(data.draw, FILTER_NAMES, 2) if data.draw(st.booleans()) else ()
        queries.append(
            ProductQuery(
                customer_id=customer_id,
                limit=data.draw(st.integers(1, 20)),
                include_categories=include,
                exclude_categories=names(data.draw, FILTER_NAMES, 2),
                exclude_product_ids=names(data.draw, world.product_ids, 3),
                include_purchased=data.draw(st.booleans()),
                channel=data.draw(st.sampled_from(CHANNELS)),
            )
        )
    return queries


@PROPERTY_SETTINGS
@given(world=worlds(), data=st.data())
def test_recommend_respects_consent_availability_and_filters(world: World, data) -> None:
    served, s = serve(world)
    sensitive = world.sensitive()
    unavailable = world.unavailable()
    known = world.known_customers()
    queries = draw_queries(data, world)
    customer_ids = [q.customer_id for q in queries]
    answers = served.recommend(queries)
    assert [a.customer_id for a in answers] == customer_ids
    for q, a in zip(queries, answers, strict=True):
        c = q.customer_id
        if c in known or not world.recorded_purchases(c):
            assert a.personalized == (world.personal_ok(c) and c in known), (q, a)
        else:  # a new customer may be personal from recorded purchases (ALS fold-in)
            assert world.personal_ok(c) or not a.personalized, (q, a)
        if a.personalized:
            assert a.not_personalized_reason == "", (q, a)
        elif world.erased(c):
            assert a.not_personalized_reason == "erased", (q, a)
        elif not world.personal_ok(c):
            assert a.not_personalized_reason == "no_consent", (q, a)
        else:
            assert a.not_personalized_reason == "unknown_customer", (q, a)
        ids = [item.product_id for item in a.items]
        assert len(ids) <= q.limit and len(set(ids)) == len(ids), (q, ids)
        assert not set(ids) & unavailable, (q, ids)
        if not (a.personalized and world.sensitive_ok(c)):
            # Non-personal answers never show sensitive products; personal ones only with consent.
            shown = set(ids) & sensitive
            cited = {r.product_id for item in a.items for r in item.reasons} & sensitive
            assert not shown, (q, a.personalized, sorted(shown), a)
            assert not cited, (q, a.personalized, sorted(cited), a)
        assert all(len(item.reasons) >= 1 for item in a.items), (q, a)
        assert_ranked([item.score for item in a.items])
        assert not set(ids) & set(q.exclude_product_ids), (q, ids)
        assert not set(ids) & world.matching(q.exclude_categories), (q, ids)
        if q.include_categories:
            assert set(ids) <= world.matching(q.include_categories), (q, ids)


@PROPERTY_SETTINGS
@given(world=worlds(), data=st.data())
def test_recorded_sensitive_purchases_are_no_evidence_without_consent(world: World, data) -> None:
    """Purchases of sensitive products recorded after training change nothing for a customer
    without sensitive consent: neither the products nor the ranking nor the reasons."""
    sensitive = world.sensitive()
    without = tuple(
        r
        for r in world.recorded
        if not (world.products[r[1]].product_id in sensitive and not world.sensitive_ok(r[0]))
    )
    assume(len(without) < len(world.recorded))
    served, s = serve(world)
    blind = ServedModel(
        served.bundle,
        s,
        world.consent_source(),
        erased=served.erased,
        events=dataclasses.replace(world, recorded=without).recorded_events,
        impressions=world.shown,
    )
    queries = [q for q in draw_queries(data, world) if not world.sensitive_ok(q.customer_id)]
    for q, a, b in zip(queries, served.recommend(queries), blind.recommend(queries), strict=True):
        assert a == b, (q, a, b)


# --- ScoreContent --------------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(world=worlds(), data=st.data())
def test_score_content_never_uses_sensitive_products_without_consent(world: World, data) -> None:
    served, s = serve(world)
    sensitive = world.sensitive()
    in_model = world.in_model()
    known = world.known_customers()
    ids = world.product_ids + ["p-unknown"]
    snapshot = {c.content_id: c for c in world.content}
    listed = {n.lower() for n in (*SENSITIVE_CATEGORIES, *SENSITIVE_DEPARTMENTS)}
    customer_ids = [c.customer_id for c in world.customers] + [UNKNOWN]
    for customer_id in data.draw(st.lists(st.sampled_from(customer_ids), min_size=1, max_size=4)):
        candidates = []
        linked: dict[str, set[str]] = {}
        sensitive_content: set[str] = set()
        for k in range(data.draw(st.integers(1, 6))):
            if snapshot and data.draw(st.booleans()):
                c = snapshot[data.draw(st.sampled_from(sorted(snapshot)))]
                q = ContentQuery(content_id=c.content_id)
                products, categories = c.product_ids, c.categories
                marked = np.nan_to_num(c.sensitivity or 0.0) > 0
            else:
                products = names(data.draw, ids, 3)
                categories = names(data.draw, FILTER_NAMES, 2)
                if not products and not categories:
                    products = (data.draw(st.sampled_from(ids)),)
                q = ContentQuery(
                    content_id=f"inline{k}", product_ids=products, categories=categories
                )
                marked = False
            # Sensitive content: marked so in the snapshot, naming a sensitive category or
            # department, or linking a sensitive product the model knows.
            if (
                marked
                or {n.lower() for n in categories} & listed
                or set(products) & in_model & sensitive
            ):
                sensitive_content.add(q.content_id)
            candidates.append(q)
            linked[q.content_id] = (set(products) | world.matching(categories)) & in_model
        answer = served.score_content(customer_id, candidates)
        expect_personal = world.personal_ok(customer_id) and customer_id in known
        sens_ok = world.sensitive_ok(customer_id)
        where = (customer_id, candidates, answer)
        assert answer.personalized == expect_personal, where
        assert sorted(i.content_id for i in answer.items) == sorted(
            q.content_id for q in candidates
        )
        assert_ranked([i.relevance for i in answer.items])
        for item in answer.items:
            assert len(item.reasons) >= 1, where
            cited = {r.product_id for r in item.reasons} - {""}
            assert cited <= linked[item.content_id], (item, where)
            if not sens_ok:
                assert not cited & sensitive, (item, where)
                if item.content_id in sensitive_content:
                    assert item.relevance == 0.0, (item, where)
                if not linked[item.content_id] - sensitive:
                    assert item.relevance == 0.0, (item, where)


# --- SimilarProducts -----------------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(world=worlds(), data=st.data())
def test_similar_shows_sensitive_products_only_to_a_consenting_customer(world: World, data) -> None:
    served, s = serve(world)
    sensitive = world.sensitive()
    unavailable = world.unavailable()
    in_model = world.in_model()
    ids = world.product_ids + ["p-unknown"]
    callers = [""] + [c.customer_id for c in world.customers] + [UNKNOWN]
    for _ in range(data.draw(st.integers(1, 4))):
        requested = list(data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=4)))
        limit = data.draw(st.integers(1, 20))
        customer_id = data.draw(st.sampled_from(callers))
        if not set(requested) & in_model:
            with pytest.raises(NotFound):
                served.similar(requested, limit, customer_id)
            continue
        items, unknown = served.similar(requested, limit, customer_id)
        where = (requested, limit, customer_id, items)
        assert sorted(set(unknown)) == sorted(set(requested) - in_model), where
        got = [i.product_id for i in items]
        assert len(got) <= limit and len(set(got)) == len(got), where
        assert not set(got) & set(requested), where
        assert not set(got) & unavailable, where
        if not (customer_id and world.sensitive_ok(customer_id)):
            assert not set(got) & sensitive, (sorted(set(got) & sensitive), where)
        assert_ranked([i.score for i in items])
        for item in items:
            assert len(item.reasons) >= 1, where
            assert {r.product_id for r in item.reasons} <= set(requested), where


@st.composite
def twin_worlds(draw) -> World:
    """A world plus two customers without sensitive consent whose histories differ only in when
    they bought one sensitive product (on a shopping day they share, or on a day of its own)."""
    world = draw(worlds())
    sensitive = world.sensitive()
    s_pos = [k for k, p in enumerate(world.products) if p.product_id in sensitive]
    n_pos = [k for k, p in enumerate(world.products) if p.product_id not in sensitive]
    assume(s_pos and n_pos)
    base = tuple(
        draw(
            st.lists(
                st.tuples(
                    st.sampled_from(n_pos), st.integers(0, 60), st.just(12), st.just("purchase")
                ),
                min_size=1,
                max_size=6,
            )
        )
    )
    product = draw(st.sampled_from(s_pos))
    other_day = draw(st.integers(61, 89))
    twins = (
        Customer("t1", (*base, (product, base[0][1], 13, "purchase")), True, False, None, False),
        Customer("t2", (*base, (product, other_day, 13, "purchase")), True, False, None, False),
    )
    return dataclasses.replace(world, customers=world.customers + twins)


@PROPERTY_SETTINGS
@given(
    world=twin_worlds(),
    channel=st.sampled_from(CHANNELS),
    limit=st.integers(1, 20),
    include_purchased=st.booleans(),
)
def test_sensitive_history_is_no_evidence_without_consent(
    world: World, channel: str, limit: int, include_purchased: bool
) -> None:
    """Two customers without sensitive consent whose histories differ only in a sensitive
    purchase get the same answer: the model learned it (training consent allowed it), but
    serving may not use it (found: shopping days counted sensitive-only days in log_share)."""
    served, _ = serve(world)
    queries = [
        ProductQuery(
            customer_id=c, limit=limit, channel=channel, include_purchased=include_purchased
        )
        for c in ("t1", "t2")
    ]
    a, b = served.recommend(queries)

    def strip(answer):
        return [(i.product_id, i.score, i.reasons) for i in answer.items]

    assert strip(a) == strip(b)
