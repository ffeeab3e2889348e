"""One typed, validated, frozen settings root, read from a TOML file with environment overrides.

    settings = load_settings("nextbest.toml")          # or load_settings(None) for the defaults
    settings.train.als_factors                          # 64

An environment variable `NEXTBEST_<SECTION>__<KEY>` overrides a file value, e.g.
`NEXTBEST_POLICY__DEFAULT_CONSENT=allow`. Lists are given as comma-separated strings there.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from nextbest.errors import ConfigError

__all__ = [
    "DataSettings",
    "TrainSettings",
    "PolicySettings",
    "ServeSettings",
    "LifecycleSettings",
    "Experiment",
    "Variant",
    "Settings",
    "load_settings",
    "config_reference",
    "CONSENT_DEFAULTS",
    "ROLES",
    "ClientToken",
    "REMOVED_KEYS",
    "clock_day",
]

REMOVED_KEYS = {
    "serve.consumable_repeat_rate": "the learned blend decides when a bought product comes back; "
    "only durables are held back (serve.durable_repeat_rate)",
    "serve.due_fraction": "the learned blend decides when a bought product comes back; "
    "only durables are held back (serve.durable_repeat_rate)",
}
"""Keys of earlier versions: a config that sets one gets an error saying what replaced it."""


def clock_day(text: str) -> float | None:
    """A fixed `serve.clock` date `YYYY-MM-DD` as days since the epoch, None when not a date."""
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
        return None
    import datetime as dt

    try:
        return (dt.date.fromisoformat(text) - dt.date(1970, 1, 1)).days * 1.0
    except ValueError:
        return None


CONSENT_DEFAULTS = ("allow", "deny")
ROLES = ("recommend", "consent", "admin")
"""Client roles: `recommend` (Recommender and Events), `consent` (Consent), `admin` (Admin)."""


@dataclass(frozen=True, kw_only=True)
class ClientToken:
    """One client allowed to call the server (`[[serve.clients]]` in the config file)."""

    name: str
    """Who the client is; logged with each of its calls (never the token)."""
    token_sha256: str = ""
    """SHA-256 of the client's bearer token, 64 hex digits (`nextbest token` makes both)."""
    certificate_sha256: str = ""
    """SHA-256 fingerprint of the client's certificate (DER), 64 hex digits, colons allowed
    (`nextbest certificate CERT.pem` prints it, as does `openssl x509 -fingerprint -sha256`): a
    call on a connection with this certificate needs no token. Only with `serve.tls_client_ca`.
    An entry needs `token_sha256` or this or both; each identifies the client on its own, and a
    token sent with a call decides over the certificate."""
    roles: tuple[str, ...]
    """Some of `recommend`, `consent`, `admin`."""
    rate_per_s: float = 0.0
    """Calls per second this client may make to each server process (a token bucket; absent =
    no limit); more are refused (RESOURCE_EXHAUSTED with `grpc-retry-pushback-ms`). A stream
    counts as one call."""
    burst: int = 0
    """Calls the client may make at once above `rate_per_s` after a quiet spell (the bucket's
    size; absent = one second's worth, `rate_per_s` rounded up)."""


@dataclass(frozen=True, kw_only=True)
class DataSettings:
    """How input files are read."""

    max_reject_share: float = 0.05
    """Fail a run when more than this share of an input file's rows is rejected."""
    event_weights: dict[str, float] = field(
        default_factory=lambda: {
            "purchase": 1.0,
            "cart": 0.3,
            "email_click": 0.2,
            "view": 0.1,
        }
    )
    """Interaction weight per event type. Returns are not weighted: they cancel purchases."""


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Training, candidate models, validation and blending."""

    cf_model: str = "als"
    """The collaborative-filtering model blended into the served ranking: als, bpr, cosine, bm25."""
    candidates: tuple[str, ...] = ("als", "bpr", "cosine", "bm25")
    """CF models fitted and evaluated beside each other (cf_model is always among them)."""
    half_life_days: float = 120.0
    """Recency half-life of interaction weights in the CF matrix."""
    validation_days: int = 30
    """Length of the validation window cut from the end of the training data."""
    tune: bool = True
    """Choose ALS hyperparameters and blend weights on the validation window."""
    k: int = 10
    """Cut-off of the validation metrics (and the default of `evaluate --k`)."""
    seed: int = 42
    """Random seed of every model fit: same data, settings and seed → the same served model, to
    the bit, with the implicit engine (BPR always fits on one thread for that: implicit's
    multi-threaded BPR races its SGD updates). The Spark engine's ALS is not checked for it."""
    als_factors: int = 64
    """ALS latent factors (when not tuning)."""
    als_regularization: float = 0.05
    """ALS L2 regularization (when not tuning)."""
    als_iterations: int = 15
    """ALS alternating least-squares sweeps."""
    als_alpha: float = 10.0
    """Confidence scaling: the ALS input is 1 + alpha * log1p(weight) for observed pairs."""
    als_grid: tuple[str, ...] = ("64:0.05:10", "128:0.05:10", "64:0.5:2", "128:1.0:40")
    """ALS candidates tried when tuning, each `factors:regularization:alpha`."""
    bpr_factors: int = 64
    """BPR latent factors."""
    bpr_learning_rate: float = 0.05
    """BPR SGD learning rate."""
    bpr_regularization: float = 0.01
    """BPR L2 regularization."""
    bpr_iterations: int = 100
    """BPR epochs."""
    item_neighbours: int = 100
    """K of the item-item models (cosine, bm25)."""
    repeat_half_life_days: float = 90.0
    """Recency half-life of the repeat-purchase model's frequency."""
    candidate_pool: int = 100
    """CF candidates per customer offered to the blend besides the customer's own products."""
    cf_candidate_products: int = 20_000
    """A factor model's (als, bpr) CF candidates are drawn from this many best sellers (distinct
    buyers) only; 0 = from every product. On Complete Journey (68k products) the served answers
    score the same with 20,000 as with all (EVALUATION.md); at a million customers the trainer's
    top-k over every product was half its time (BENCHMARKS.md, make bench-scale)."""
    max_store_lead_days: float = 90.0
    """The model's clock is its newest training event (`serve.clock = "model"` and every timing
    feature count from it). Recorded events of the store (`--store`) dated more than this many
    days after the newest event of the events file are left out of the training, with a warning
    naming the store and how many: RecordEvents dates an event without a timestamp by the
    server's clock, and a replay of historic data would otherwise move the model's clock by
    years. They stay in the store (a later events file of their time brings them in)."""
    blend_weights: dict[str, float] = field(default_factory=dict)
    """Blend weights used when `tune` is off (feature name → weight); empty = built-in defaults."""
    num_threads: int = 0
    """Threads of implicit's fit (0 = all cores; BPR uses one whatever this says). BLAS is held
    to one thread during fits."""
    engine: str = "implicit"
    """What fits ALS: `implicit` (this machine; the default) or `spark` (Apache Spark MLlib ALS on
    `spark_master`; needs `pip install nextbest[spark]` and Java 17+). Only the ALS fits move,
    tuning grid included: data preparation, consent rules, BPR, item-item, the repeat-purchase
    model and the blend run here either way. `als_*` and `als_grid` mean the same on both: they
    are translated into Spark's ratings, alpha and regParam (README, "Training on Apache
    Spark")."""
    spark_master: str = "local[*]"
    """Spark master URL (`local[*]`: every core of this machine; `spark://host:7077`, `yarn`,
    `k8s://...` for a cluster). Ignored under spark-submit, which sets its own."""
    spark_driver_memory: str = "2g"
    """JVM heap of the Spark driver started by `nextbest train` (ignored under spark-submit: use
    its --driver-memory)."""
    spark_checkpoint_dir: str = ""
    """Where Spark checkpoints ALS (a fresh subdirectory, removed after each fit). Empty = a
    temporary directory on this machine, right for local masters; on a cluster, a path every
    executor can reach (hdfs://..., or a shared mount)."""
    spark_checkpoint_interval: int = 5
    """ALS iterations between checkpoints (cuts the lineage that otherwise overflows the stack)."""
    spark_blocks: int = 0
    """ALS user and item blocks (partitions) in Spark; 0 = Spark's default parallelism."""


@dataclass(frozen=True, kw_only=True)
class PolicySettings:
    """Consent and sensitivity."""

    default_consent: str = "deny"
    """What a missing consent record means: `deny` (privacy by default) or `allow`."""
    sensitive_categories: tuple[str, ...] = ()
    """Catalog categories treated as sensitive (exact, case-insensitive match). Which products
    are sensitive is fixed in each model by `nextbest train`: a change reaches product answers
    with the next model trained, not at a server restart."""
    sensitive_departments: tuple[str, ...] = ()
    """Catalog departments treated as sensitive (exact, case-insensitive match); fixed in each
    model by `nextbest train`, as `sensitive_categories`."""
    channel_exposure: dict[str, float] = field(
        default_factory=lambda: {"email": 0.15, "app": 0.1, "web": 0.05}
    )
    """How exposed an answer is on each channel (an email is read where others may see it, a
    logged-in page less so): privacy_loss = item sensitivity × exposure."""
    trust_full: float = 1.0
    """Trust of a customer who granted personalization, behavioral and sensitive consent."""
    trust_step: float = 0.1
    """Trust lost for each of behavioral and sensitive consent not granted."""
    min_value: float = 0.01
    """Personalized items whose value (relevance × timeliness − privacy_loss) × trust falls
    below this are withheld; the list is filled with best sellers."""
    fatigue_impressions: int = 3
    """Cross-channel fatigue: a product shown to a customer this many times (any channel)..."""
    fatigue_days: float = 7.0
    """...within this many days, without a click, view, cart or purchase of it since..."""
    fatigue_demotion: float = 0.5
    """...has its value multiplied by this (1 = fatigue off)."""


@dataclass(frozen=True, kw_only=True)
class ServeSettings:
    """The gRPC server."""

    host: str = "127.0.0.1"
    port: int = 50051
    models_dir: str = "models"
    durable_repeat_rate: float = 0.05
    """A product whose buyers almost never buy it again (smoothed share of its buyers who bought
    it on two or more days below this) is durable: it is not offered again to a customer who
    bought it. Every other product bought before is ranked by the learned blend like any
    candidate: whether and when to offer it again is the blend's decision (EVALUATION.md says how
    the threshold was chosen on data)."""
    discovery_share: float = 0.2
    """At least this share of a personalized answer are products new to the customer (when the
    model has such candidates), the best of them by the blend: replenishment beside the
    complement the customer has not bought yet. Within the answer every product is ranked by its
    value; 0 = rank repeats and new products together only."""
    clock: str = "model"
    """What "now" is when judging repurchase timing and recency: `model` (the newest training
    event of the served model; right for historic data and daily retraining), `wall` (the
    server's clock) or a date `YYYY-MM-DD` (a fixed clock: replaying or checking historic data,
    as `nextbest evaluate` does at its cutoff). `replay` (replays of history only, one process):
    now is the newest event time recorded through this server (the model's newest event before
    any), and impressions are stamped with it."""
    store: str = "sqlite:///nextbest-store.db"
    """The consent and event store: `sqlite:///path.db` (a file; the default, relative to the
    working directory) or `postgresql://user@host:port/db` for several servers sharing it."""
    metrics_port: int = 9464
    """Port of the Prometheus metrics (HTTP /metrics, on `host`); 0 = any free port, -1 = off."""
    processes: int = 0
    """Server processes answering on the one port (`SO_REUSEPORT`), each with `max_workers`
    threads and its own copy of the model; 0 = one per core. Metrics are summed over them on
    `metrics_port`."""
    max_workers: int = 16
    """Threads answering calls in each server process (and the most calls it handles at once)."""
    reload_interval_s: float = 2.0
    """How often `models_dir/CURRENT` is checked for a newly published model (0 = never; the
    Admin.ReloadModel call still works)."""
    grace_s: float = 10.0
    """On SIGTERM: how long calls in flight may take to finish before the server stops."""
    content_half_life_days: float = 30.0
    """ScoreContent: relevance of content about a bought product halves with this purchase age."""
    insecure: bool = False
    """Plaintext gRPC without TLS, and without tokens unless `clients` are listed: only when chosen
    explicitly (a local demo, a test, TLS ended by a sidecar); logged as INSECURE at start.
    Otherwise the server needs `tls_cert`, `tls_key` and at least one client."""
    tls_cert: str = ""
    """PEM certificate chain of the server (path)."""
    tls_key: str = ""
    """PEM private key of the server (path)."""
    tls_client_ca: str = ""
    """PEM CA certificates (path): when set, clients must present a certificate signed by one
    of them (mutual TLS), on top of their token (or instead of it, for a client whose
    certificate is listed in `[[serve.clients]] certificate_sha256`)."""
    clients: tuple[ClientToken, ...] = ()
    """Clients and their roles, as `[[serve.clients]]` tables with `name`, `token_sha256` and/or
    `certificate_sha256`, `roles`, optionally `rate_per_s` and `burst`. When any are listed,
    every call except health and reflection needs `authorization: Bearer <token>` of a client
    holding the method's role, or a client certificate listed in `certificate_sha256`."""
    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request or response message; a larger request is refused (RESOURCE_EXHAUSTED)."""
    max_concurrent_streams: int = 4
    """StreamRecommendations calls open at once; one more is refused (RESOURCE_EXHAUSTED). Each
    open stream holds a worker thread, so keep this below `max_workers`."""
    max_concurrent_calls: int = 256
    """Calls being answered or waiting for a worker; one more is refused (RESOURCE_EXHAUSTED)."""
    slate_cache_size: int = 50_000
    """Rankings kept per server process, per customer (known, consenting, asking without
    filters), so that a customer's next call only applies consent, fatigue and the privacy rule
    to it; least recently used dropped beyond this, emptied at a model swap and for an erased
    customer; 0 = off. About 4 KB each. When a model is loaded, a background thread ranks the
    known customers once each (the most recent buyers first, up to this many), so first calls
    find their slate too."""
    warm_before_swap_s: float = 300.0
    """A new model version is swapped in once it has ranked those slates (at a quarter of the
    process: the old version answers meanwhile), or after this many seconds of ranking them,
    whichever comes first; the rest are ranked after the swap. First calls after a swap then
    find their customer ranked: a call that finds no slate ranks its customer alone, several
    times the cost of a warm answer, and right after a swap with most slates missing that took
    the capacity below the load (`make bench-swap`: at a twentieth for at most 60 s, until
    2026-12-06, a fifth of the slates were ranked and 2,150 calls refused after the swap;
    267 and 770 with every slate ranked first). 0 = swap at once; a server's start always
    swaps at once. Each process logs "slates of model ... ranked" when all are."""
    max_running_calls: int = 2
    """Unary calls one server process computes at once (one process computes one at a time under
    the GIL, so more only make each slower; two let one compute while the other waits for the
    store; `serve.processes` uses the cores); the others wait for a slot (admission control)..."""
    max_queue_ms: float = 100.0
    """...for at most this long, then are refused before any work (RESOURCE_EXHAUSTED with
    `grpc-retry-pushback-ms`); a call whose deadline is nearer than the method's recent service
    time is refused at once (DEADLINE_EXCEEDED). Streams are admitted by
    `max_concurrent_streams` instead. A call that arrives behind more queued work than this is
    refused on arrival, without waiting its turn."""
    switch_interval_ms: float = 0.5
    """How long a thread of a server process may keep the GIL while another waits for it
    (Python's default: 5 ms). gRPC's poller is a Python thread that needs the GIL for every
    arriving call: with the default, under load, calls waited unseen and refusals took seconds."""
    log_format: str = "json"
    """`nextbest serve` logs: `json` (one object per line, with request ids) or `text`."""
    log_hash_key: str = ""
    """Key of the HMAC that replaces customer ids in logs. Set it (env
    `NEXTBEST_SERVE__LOG_HASH_KEY`) to correlate one customer across restarts and replicas;
    empty = a random key per process."""


@dataclass(frozen=True, kw_only=True)
class LifecycleSettings:
    """Customer state (stages, churn risk, expected value), computed by the trainer."""

    horizon_days: float = 90.0
    """Churn risk is the probability of no purchase in this many days; expected purchases and
    value are over them too."""
    new_days: float = 30.0
    """A customer whose first purchase is younger than this is `new`."""
    rhythm_days: int = 3
    """Purchase days a customer needs before their own mean interval judges their stage."""
    at_risk_intervals: float = 2.0
    """With a rhythm: `at_risk` once the days since the last purchase pass this many intervals
    (at least 7 days)..."""
    dormant_intervals: float = 4.0
    """...`dormant` past this many (at least 14 days)..."""
    lapsed_intervals: float = 8.0
    """...and `lapsed` past this many (at least 28 days)."""
    at_risk_days: float = 30.0
    """Without a rhythm yet: `at_risk` after this many days without a purchase..."""
    dormant_days: float = 60.0
    """...`dormant` after this many (SPEC §1: dormant = no purchase for 60–90 days)..."""
    lapsed_days: float = 180.0
    """...and `lapsed` after this many."""
    human_touch_share: float = 0.1
    """NextBestAction: customers this valuable (the top share by purchase value in the model) who
    are at risk or dormant get `human_touch` (a person, no automated message)."""
    care_days: float = 14.0
    """NextBestAction: a durable bought this recently gets `care` (content about it)."""


VARIANT_KEYS = {
    "policy": ("min_value", "fatigue_impressions", "fatigue_days", "fatigue_demotion"),
    "serve": ("durable_repeat_rate", "discovery_share", "content_half_life_days"),
}
"""What a variant may change. Consent and sensitivity are never varied: every variant keeps the
same privacy rules."""


@dataclass(frozen=True, kw_only=True)
class Variant:
    """One arm of an experiment (`[[experiments.variants]]`)."""

    name: str
    """Shown in answers, impressions and the report (letters, digits, `._-`)."""
    share: float
    """Share of the experiment's customers in this arm; the arms' shares sum to 1."""
    control: bool = False
    """The holdout: best sellers, no personalization, for consenting customers (what lift is
    measured against)."""
    model_version: str = ""
    """A published model version to serve this arm ('' = the version being served)."""
    policy: dict[str, float] = field(default_factory=dict)
    """Overrides of [policy] for this arm: min_value, fatigue_impressions, fatigue_days,
    fatigue_demotion."""
    serve: dict[str, float] = field(default_factory=dict)
    """Overrides of [serve] for this arm: durable_repeat_rate, discovery_share,
    content_half_life_days."""


@dataclass(frozen=True, kw_only=True)
class Experiment:
    """An A/B test (`[[experiments]]`): a share of the consenting customers split over variants
    by a keyed hash of the customer id. A customer is in at most one experiment."""

    name: str
    """Unique; also the hash key unless `salt` is set (letters, digits, `._-`)."""
    share: float = 1.0
    """Share of all customers in this experiment; the experiments' shares sum to at most 1."""
    attribution_days: float = 14.0
    """A purchase of a product shown within this many days before it is attributed to the
    showing."""
    salt: str = ""
    """Key of the assignment hash ('' = the name): change it to draw a new split."""
    variants: tuple[Variant, ...] = ()
    """Two or more arms."""


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The settings root."""

    data: DataSettings = field(default_factory=DataSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    serve: ServeSettings = field(default_factory=ServeSettings)
    lifecycle: LifecycleSettings = field(default_factory=LifecycleSettings)
    experiments: tuple[Experiment, ...] = ()
    """`[[experiments]]` tables (not settable from the environment)."""

    def with_overrides(self, section: str, **values: object) -> Settings:
        """A copy with some values of one section replaced (validated like file values)."""
        current = getattr(self, section)
        merged = {f.name: getattr(current, f.name) for f in dataclasses.fields(current)}
        merged.update(values)
        return dataclasses.replace(self, **{section: _build(type(current), section, merged)})


_SECTIONS = {f.name: f for f in dataclasses.fields(Settings) if f.name != "experiments"}
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


def _coerce(value: object, hint: object, where: str) -> object:
    origin = typing.get_origin(hint)
    if hint is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        elif isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    elif hint is str:
        if isinstance(value, str):
            return value
    elif origin is tuple and typing.get_args(hint)[0] is ClientToken:
        if isinstance(value, list | tuple) and all(isinstance(v, ClientToken) for v in value):
            return tuple(value)
        if isinstance(value, list | tuple) and all(isinstance(v, dict) for v in value):
            return tuple(_client(v, f"{where}[{k}]") for k, v in enumerate(value))
        raise ConfigError(
            f"config: {where} must be a list of [[serve.clients]] tables in the config file"
        )
    elif origin is tuple:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif origin is dict:
        if isinstance(value, dict) and all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in value.values()
        ):
            return {str(k): float(v) for k, v in value.items()}
    raise ConfigError(f"config: {where} has an invalid value {value!r} (expected {hint})")


_HEX = set("0123456789abcdef")


def _client(value: dict, where: str) -> ClientToken:
    unknown = set(value) - {f.name for f in dataclasses.fields(ClientToken)}
    if unknown:
        raise ConfigError(f"config: {where} has an unknown key {sorted(unknown)[0]}")
    name, roles = value.get("name"), value.get("roles")
    digest, certificate = value.get("token_sha256"), value.get("certificate_sha256")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"config: {where}.name is required")
    if digest is None and certificate is None:
        raise ConfigError(
            f"config: {where} needs token_sha256 (a bearer token) or certificate_sha256 (a "
            "client certificate) or both"
        )
    if digest is not None and (
        not isinstance(digest, str) or len(digest) != 64 or set(digest) - _HEX
    ):
        raise ConfigError(
            f"config: {where}.token_sha256 must be 64 lowercase hex digits (the token's SHA-256, "
            "never the token itself; `nextbest token` prints it)"
        )
    if certificate is not None:
        certificate = certificate.replace(":", "").lower() if isinstance(certificate, str) else ""
        if len(certificate) != 64 or set(certificate) - _HEX:
            raise ConfigError(
                f"config: {where}.certificate_sha256 must be the SHA-256 fingerprint of the "
                "client's certificate, 64 hex digits, colons allowed (`nextbest certificate "
                "CERT.pem` prints it)"
            )
    rate = value.get("rate_per_s")
    if rate is not None and (
        isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 < rate < float("inf")
    ):
        raise ConfigError(
            f"config: {where}.rate_per_s must be a number > 0 (calls per second; leave it out "
            "for no limit)"
        )
    burst = value.get("burst")
    if burst is not None and (isinstance(burst, bool) or not isinstance(burst, int) or burst < 1):
        raise ConfigError(f"config: {where}.burst must be a whole number >= 1")
    if burst is not None and rate is None:
        raise ConfigError(f"config: {where}.burst needs rate_per_s (the rate the bucket refills)")
    if (
        not isinstance(roles, list)
        or not roles
        or not all(isinstance(r, str) and r in ROLES for r in roles)
    ):
        raise ConfigError(f"config: {where}.roles must be a non-empty list of {', '.join(ROLES)}")
    return ClientToken(
        name=name.strip(),
        token_sha256=digest or "",
        certificate_sha256=certificate or "",
        roles=tuple(roles),
        rate_per_s=float(rate or 0.0),
        burst=burst or 0,
    )


def _table(value: object, where: str, known: set[str]) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"config: {where} must be a table")
    unknown = set(value) - known
    if unknown:
        raise ConfigError(f"config: {where} has an unknown key {sorted(unknown)[0]}")
    return value


def _share(value: object, where: str, *, zero_ok: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"config: {where} must be a number in (0, 1]")
    if not (0.0 <= value <= 1.0) or (value == 0 and not zero_ok):
        raise ConfigError(f"config: {where} must be in {'[0' if zero_ok else '(0'}, 1]")
    return float(value)


def _name(value: object, where: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise ConfigError(
            f"config: {where} must be 1-64 letters, digits or ._- (starting with a letter or digit)"
        )
    return value


def _variant(value: object, where: str, base: Settings) -> Variant:
    v = _table(value, where, {f.name for f in dataclasses.fields(Variant)})
    name = _name(v.get("name"), f"{where}.name")
    overrides: dict[str, dict[str, float]] = {}
    for section, allowed in VARIANT_KEYS.items():
        given = _table(v.get(section, {}), f"{where}.{section}", set(allowed))
        # Validated like the section's own keys; the error names the variant's key.
        try:
            base.with_overrides(section, **given)
        except ConfigError as exc:
            raise ConfigError(
                str(exc).replace(f"config: {section}.", f"config: {where}.{section}.")
            ) from None
        overrides[section] = {k: float(x) for k, x in given.items()}
    control = v.get("control", False)
    if not isinstance(control, bool):
        raise ConfigError(f"config: {where}.control must be true or false")
    version = v.get("model_version", "")
    if not isinstance(version, str):
        raise ConfigError(f"config: {where}.model_version must be a model version string")
    if control and (version or any(overrides.values())):
        raise ConfigError(
            f"config: {where} is the control (best sellers): it takes no model_version, policy "
            "or serve"
        )
    return Variant(
        name=name,
        share=_share(v.get("share"), f"{where}.share", zero_ok=True),
        control=control,
        model_version=version,
        **overrides,
    )


def _experiments(value: object, base: Settings) -> tuple[Experiment, ...]:
    if not isinstance(value, list):
        raise ConfigError("config: experiments must be [[experiments]] tables")
    out = []
    for k, raw in enumerate(value):
        where = f"experiments[{k}]"
        e = _table(raw, where, {f.name for f in dataclasses.fields(Experiment)})
        variants_raw = e.get("variants", [])
        if not isinstance(variants_raw, list) or len(variants_raw) < 2:
            raise ConfigError(
                f"config: {where}.variants needs two or more [[experiments.variants]] tables"
            )
        variants = tuple(
            _variant(v, f"{where}.variants[{j}]", base) for j, v in enumerate(variants_raw)
        )
        names = [v.name for v in variants]
        if len(set(names)) != len(names):
            raise ConfigError(f"config: {where}.variants has two variants with one name")
        total = sum(v.share for v in variants)
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"config: {where}.variants shares sum to {total:g}, not 1")
        if sum(v.control for v in variants) > 1:
            raise ConfigError(f"config: {where}.variants has more than one control")
        days = e.get("attribution_days", 14.0)
        if isinstance(days, bool) or not isinstance(days, int | float) or not 0 < days <= 365:
            raise ConfigError(f"config: {where}.attribution_days must be in (0, 365]")
        salt = e.get("salt", "")
        if not isinstance(salt, str):
            raise ConfigError(f"config: {where}.salt must be a string")
        out.append(
            Experiment(
                name=_name(e.get("name"), f"{where}.name"),
                share=_share(e.get("share", 1.0), f"{where}.share", zero_ok=False),
                attribution_days=float(days),
                salt=salt,
                variants=variants,
            )
        )
    names = [e.name for e in out]
    if len(set(names)) != len(names):
        raise ConfigError("config: experiments has two experiments with one name")
    total = sum(e.share for e in out)
    if total > 1.0 + 1e-6:
        raise ConfigError(f"config: experiments shares sum to {total:g}, more than 1")
    return tuple(out)


def _build(cls: type, section: str, values: dict[str, object]) -> object:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
        if f"{section}.{key}" in REMOVED_KEYS:
            raise ConfigError(
                f"config: {section}.{key} was removed: {REMOVED_KEYS[f'{section}.{key}']}"
            )
        if key not in known:
            raise ConfigError(f"config: unknown key {section}.{key}")
    coerced = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    settings = cls(**coerced)
    _validate(section, settings)
    return settings


def _validate(section: str, s: object) -> None:
    def need(ok: bool, key: str, what: str) -> None:
        if not ok:
            raise ConfigError(f"config: {section}.{key} {what}")

    if isinstance(s, DataSettings):
        need(0.0 <= s.max_reject_share <= 1.0, "max_reject_share", "must be within [0, 1]")
        need(all(w >= 0 for w in s.event_weights.values()), "event_weights", "must be >= 0")
    elif isinstance(s, TrainSettings):
        models = ("als", "bpr", "cosine", "bm25")
        need(s.cf_model in models, "cf_model", f"must be one of {', '.join(models)}")
        need(all(m in models for m in s.candidates), "candidates", f"must be among {models}")
        need(s.half_life_days > 0, "half_life_days", "must be > 0")
        need(s.repeat_half_life_days > 0, "repeat_half_life_days", "must be > 0")
        need(s.validation_days >= 1, "validation_days", "must be >= 1")
        need(1 <= s.k <= 100, "k", "must be within [1, 100]")
        need(s.als_factors >= 1 and s.bpr_factors >= 1, "als_factors", "must be >= 1")
        need(s.als_iterations >= 1 and s.bpr_iterations >= 1, "als_iterations", "must be >= 1")
        need(s.item_neighbours >= 1, "item_neighbours", "must be >= 1")
        need(s.candidate_pool >= 1, "candidate_pool", "must be >= 1")
        need(s.cf_candidate_products >= 0, "cf_candidate_products", "must be >= 0")
        need(s.max_store_lead_days > 0, "max_store_lead_days", "must be > 0")
        for spec in s.als_grid:
            parse_als_spec(spec)
        need(s.engine in ("implicit", "spark"), "engine", "must be implicit or spark")
        need(
            s.engine == "implicit" or s.cf_model == "als",
            "engine",
            "= spark fits ALS only: set train.cf_model = als",
        )
        need(bool(s.spark_master.strip()), "spark_master", "must not be empty")
        need(
            re.fullmatch(r"\d+[kmgt]?", s.spark_driver_memory.strip().lower()) is not None,
            "spark_driver_memory",
            "must be a JVM memory size such as 2g or 512m",
        )
        need(s.spark_checkpoint_interval >= 1, "spark_checkpoint_interval", "must be >= 1")
        need(s.spark_blocks >= 0, "spark_blocks", "must be >= 0")
    elif isinstance(s, PolicySettings):
        need(s.default_consent in CONSENT_DEFAULTS, "default_consent", "must be allow or deny")
        channels = ("email", "app", "web")
        need(set(s.channel_exposure) == set(channels), "channel_exposure", f"must set {channels}")
        need(
            all(0 <= v <= 1 for v in s.channel_exposure.values()),
            "channel_exposure",
            "values must be within [0, 1]",
        )
        need(0 < s.trust_full <= 1, "trust_full", "must be within (0, 1]")
        need(0 <= s.trust_step < s.trust_full / 2, "trust_step", "must be >= 0, < trust_full / 2")
        need(0 < s.min_value < 1, "min_value", "must be within (0, 1)")
        need(s.fatigue_impressions >= 1, "fatigue_impressions", "must be >= 1")
        need(s.fatigue_days > 0, "fatigue_days", "must be > 0")
        need(0 <= s.fatigue_demotion <= 1, "fatigue_demotion", "must be within [0, 1]")
    elif isinstance(s, LifecycleSettings):
        need(s.horizon_days >= 1, "horizon_days", "must be >= 1")
        need(s.new_days >= 0, "new_days", "must be >= 0")
        need(s.rhythm_days >= 2, "rhythm_days", "must be >= 2")
        need(0 <= s.human_touch_share <= 1, "human_touch_share", "must be in [0, 1]")
        need(s.care_days >= 0, "care_days", "must be >= 0")
        need(
            0 < s.at_risk_intervals < s.dormant_intervals < s.lapsed_intervals,
            "at_risk_intervals",
            "at_risk_intervals < dormant_intervals < lapsed_intervals must hold (all > 0)",
        )
        need(
            0 < s.at_risk_days < s.dormant_days < s.lapsed_days,
            "at_risk_days",
            "at_risk_days < dormant_days < lapsed_days must hold (all > 0)",
        )
    elif isinstance(s, ServeSettings):
        need(0 <= s.port <= 65535, "port", "must be within [0, 65535]")
        need(0.0 <= s.durable_repeat_rate <= 1.0, "durable_repeat_rate", "must be in [0, 1]")
        need(0.0 <= s.discovery_share <= 1.0, "discovery_share", "must be in [0, 1]")
        need(
            s.clock in ("model", "wall", "replay") or clock_day(s.clock) is not None,
            "clock",
            "must be model, wall, replay or a date YYYY-MM-DD",
        )
        need(s.processes >= 0, "processes", "must be >= 0 (0 = one per core)")
        need(s.max_workers >= 1, "max_workers", "must be >= 1")
        need(-1 <= s.metrics_port <= 65535, "metrics_port", "must be within [-1, 65535]")
        need(s.reload_interval_s >= 0, "reload_interval_s", "must be >= 0")
        need(s.grace_s >= 0, "grace_s", "must be >= 0")
        need(s.content_half_life_days > 0, "content_half_life_days", "must be > 0")
        need(s.max_message_bytes >= 1024, "max_message_bytes", "must be >= 1024")
        need(s.max_concurrent_streams >= 1, "max_concurrent_streams", "must be >= 1")
        need(s.max_concurrent_calls >= 1, "max_concurrent_calls", "must be >= 1")
        need(s.max_running_calls >= 1, "max_running_calls", "must be >= 1")
        need(s.slate_cache_size >= 0, "slate_cache_size", "must be >= 0")
        need(s.warm_before_swap_s >= 0, "warm_before_swap_s", "must be >= 0")
        need(s.max_queue_ms >= 0, "max_queue_ms", "must be >= 0")
        need(0 < s.switch_interval_ms <= 1000, "switch_interval_ms", "must be > 0 and <= 1000")
        need(s.log_format in ("json", "text"), "log_format", "must be json or text")
        names = [c.name for c in s.clients]
        need(len(set(names)) == len(names), "clients", "has two clients with one name")
        digests = [c.token_sha256 for c in s.clients if c.token_sha256]
        need(len(set(digests)) == len(digests), "clients", "has two clients with one token")
        certificates = [c.certificate_sha256 for c in s.clients if c.certificate_sha256]
        need(
            len(set(certificates)) == len(certificates),
            "clients",
            "has two clients with one certificate",
        )
        for k, c in enumerate(s.clients):
            need(
                not c.certificate_sha256 or bool(s.tls_client_ca),
                f"clients[{k}].certificate_sha256",
                "needs serve.tls_client_ca: the server sees client certificates only when it "
                "requires them (mutual TLS)",
            )


def config_reference() -> str:
    """The configuration reference in Markdown: every key of every section with its type,
    default and docstring, read from this module (README's reference is generated from it)."""
    tree = ast.parse(Path(__file__).read_text())
    docs: dict[str, dict[str, str]] = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            body = node.body
            for stmt, after in zip(body, [*body[1:], None], strict=True):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr)
                    and isinstance(after.value, ast.Constant)
                ):
                    text = " ".join(str(after.value.value).split())
                    docs.setdefault(node.name, {})[stmt.target.id] = text
    out = []
    defaults = Settings()
    for section in _SECTIONS:
        cls = typing.get_type_hints(Settings)[section]
        out += [f"**[{section}]** {cls.__doc__}", ""]
        out += ["| key | default | meaning |", "|---|---|---|"]
        for key in dataclasses.fields(cls):
            value = getattr(getattr(defaults, section), key.name)
            shown = json.dumps(list(value) if isinstance(value, tuple) else value)
            meaning = docs.get(cls.__name__, {}).get(key.name, "")
            out.append(f"| `{key.name}` | `{shown}` | {meaning.replace('|', '/')} |")
        out.append("")
    client_docs = docs["ClientToken"]
    out += ["**[[serve.clients]]** " + ClientToken.__doc__, ""]
    out += [f"- `{name}`: {text}" for name, text in client_docs.items()]
    for cls in (Experiment, Variant):
        table = "experiments" if cls is Experiment else "experiments.variants"
        out += ["", f"**[[{table}]]** " + str(cls.__doc__), ""]
        for key in dataclasses.fields(cls):
            default = "required" if key.default is dataclasses.MISSING else key.default
            if key.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = key.default_factory()  # type: ignore[misc]
            shown = json.dumps(list(default) if isinstance(default, tuple) else default)
            out.append(f"- `{key.name}` (`{shown}`): {docs[cls.__name__].get(key.name, '')}")
    return "\n".join(out) + "\n"


REFERENCE_START = "<!-- config reference: generated by `make docs` from src/nextbest/config.py -->"
REFERENCE_END = "<!-- end of config reference -->"


def write_reference(readme: str | Path) -> bool:
    """Replace the reference between the markers in `readme`; True when it changed."""
    path = Path(readme)
    text = path.read_text()
    head, start, rest = text.partition(REFERENCE_START)
    _, end, tail = rest.partition(REFERENCE_END)
    if not start or not end:
        raise ConfigError(f"{path}: the config reference markers are missing")
    new = f"{head}{start}\n{config_reference()}{end}{tail}"
    path.write_text(new)
    return new != text


def parse_als_spec(spec: str) -> tuple[int, float, float]:
    """`"64:0.05:10"` → (factors, regularization, alpha); ConfigError when malformed."""
    try:
        factors, reg, alpha = spec.split(":")
        parsed = int(factors), float(reg), float(alpha)
    except ValueError:
        raise ConfigError(
            f"config: train.als_grid entry {spec!r} is not factors:regularization:alpha"
        ) from None
    if parsed[0] < 1 or parsed[1] < 0 or parsed[2] <= 0:
        raise ConfigError(f"config: train.als_grid entry {spec!r} has a value out of range")
    return parsed


def load_settings(
    path: str | Path | None, environ: typing.Mapping[str, str] | None = None
) -> Settings:
    """Read `path` (or only defaults when None), apply `NEXTBEST_*` overrides, validate."""
    raw: dict[str, dict[str, object]] = {}
    if path is not None:
        try:
            with open(path, "rb") as fh:
                raw = tomllib.load(fh)
        except FileNotFoundError:
            raise ConfigError(f"config: file {path} not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {path} is not valid TOML: {exc}") from None
    experiments = raw.pop("experiments", [])
    for key in raw:
        if key not in _SECTIONS:
            raise ConfigError(f"config: unknown section [{key}] in {path}")
        if not isinstance(raw[key], dict):
            raise ConfigError(f"config: [{key}] in {path} must be a table")
    env = os.environ if environ is None else environ
    for name, value in env.items():
        if not name.startswith("NEXTBEST_") or "__" not in name:
            continue
        section, _, key = name[len("NEXTBEST_") :].lower().partition("__")
        if section not in _SECTIONS:
            raise ConfigError(f"config: {name} names an unknown section {section!r}")
        raw.setdefault(section, {})[key] = value
    sections = {}
    for name in _SECTIONS:
        cls = typing.get_type_hints(Settings)[name]
        sections[name] = _build(cls, name, dict(raw.get(name, {})))
    settings = Settings(**sections)
    if experiments:
        settings = dataclasses.replace(settings, experiments=_experiments(experiments, settings))
    return settings


if __name__ == "__main__":  # `make docs`
    import sys

    print("README.md config reference", "updated" if write_reference(sys.argv[1]) else "current")
