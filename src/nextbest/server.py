"""The gRPC server: the only module that imports grpc (SPEC §4, §6).

    running = create_server(settings)              # port 0 in settings → a free port
    running.server.start(); ...; running.stop()
    serve(settings)                                # `nextbest serve`: until SIGTERM / SIGINT

Requests are validated here (INVALID_ARGUMENT naming the field), answered by `service.py` and
turned back into protobuf. The served model sits in a `ModelHolder`: a watcher thread loads each
newly published `CURRENT` beside the old one and swaps the reference under a lock, so a call in
flight finishes on the model it started with and no call is refused. A version that fails to load
is refused (logged) and the old one keeps serving. Health is NOT_SERVING until a model is loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import datetime as dt
import json
import logging
import math
import os
import queue
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pyarrow as pa
from google.protobuf.message import DecodeError
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from threadpoolctl import threadpool_limits

from nextbest.admission import (
    Admission,
    Decision,
    StampedExecutor,
    UnaryExecutor,
    queued_ms,
    refused_on_arrival,
)
from nextbest.auth import Gate
from nextbest.bundle import ModelBundle
from nextbest.config import ServeSettings, Settings
from nextbest.data.readers import EVENT_SCHEMA, PURCHASE, PURPOSES, RETURN
from nextbest.errors import ConfigError, InvalidRequest, ModelError, NotFound
from nextbest.experiments import Assignment, assigner, attribution
from nextbest.explain import RULES, explain
from nextbest.export import ExportContext, export_customer
from nextbest.logs import call_context, context_value, hash_customer_id, log_call
from nextbest.metrics import Metrics
from nextbest.policy import BEHAVIORAL_EVENTS, erasure_blocks
from nextbest.ratelimit import RateLimits
from nextbest.service import (
    DEFAULT_LIMIT,
    MAX_LIMIT,
    ConsentSource,
    ContentQuery,
    Item,
    ProductAnswer,
    ProductQuery,
    Reason,
    ReplayClock,
    ServedModel,
    store_consent,
)
from nextbest.store.artifacts import current_version, load_bundle
from nextbest.store.consent_store import Impression, Store, StoreError, open_store
from nextbest.v1 import (
    admin_pb2,
    admin_pb2_grpc,
    consent_pb2,
    consent_pb2_grpc,
    events_pb2,
    events_pb2_grpc,
    lifecycle_pb2,
    lifecycle_pb2_grpc,
    recommender_pb2,
    recommender_pb2_grpc,
)

__all__ = ["ModelHolder", "Running", "create_server", "serve", "SERVICE_NAMES"]

logger = logging.getLogger(__name__)
calls_logger = logging.getLogger("nextbest.calls")
"""One line per call (INFO); raise its level to silence the access log."""

MAX_ID_LENGTH = 128
MAX_CATEGORIES = 100
MAX_EXCLUDED = 1000
MAX_SIMILAR_INPUTS = 100
MAX_CANDIDATES = 1000
STREAM_BATCH = 256
"""Most stream requests answered in one vectorised pass."""
STREAM_BUFFER = 1024
"""Stream requests read ahead of the answers; a full buffer stops reading (flow control)."""

pb = recommender_pb2
SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Recommender"].full_name,
    admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
    consent_pb2.DESCRIPTOR.services_by_name["Consent"].full_name,
    events_pb2.DESCRIPTOR.services_by_name["Events"].full_name,
    lifecycle_pb2.DESCRIPTOR.services_by_name["Lifecycle"].full_name,
)
_REASON_KINDS = {
    "bought_related": pb.REASON_KIND_BOUGHT_RELATED,
    "repurchase_due": pb.REASON_KIND_REPURCHASE_DUE,
    "popular": pb.REASON_KIND_POPULAR,
    "bought_recently": pb.REASON_KIND_BOUGHT_RECENTLY,
    "predicted_interest": pb.REASON_KIND_PREDICTED_INTEREST,
    "similar_to": pb.REASON_KIND_SIMILAR_TO,
    "fatigue": pb.REASON_KIND_FATIGUE,
    "none": pb.REASON_KIND_UNSPECIFIED,
}
_NOT_PERSONALIZED = {
    "": pb.NOT_PERSONALIZED_REASON_UNSPECIFIED,
    "no_consent": pb.NOT_PERSONALIZED_REASON_NO_CONSENT,
    "unknown_customer": pb.NOT_PERSONALIZED_REASON_UNKNOWN_CUSTOMER,
    "erased": pb.NOT_PERSONALIZED_REASON_ERASED,
    "consent_unavailable": pb.NOT_PERSONALIZED_REASON_CONSENT_UNAVAILABLE,
    "holdout": pb.NOT_PERSONALIZED_REASON_HOLDOUT,
}
_WITHOUT_CONSENT = frozenset({"no_consent", "erased", "consent_unavailable"})
"""Reasons of answers to customers who are outside every experiment and of whom nothing is
kept (no consent, erased, or consent unknown)."""
_PURPOSES = {
    consent_pb2.PURPOSE_PERSONALIZATION: "personalization",
    consent_pb2.PURPOSE_BEHAVIORAL: "behavioral",
    consent_pb2.PURPOSE_SENSITIVE: "sensitive",
}
assert set(_PURPOSES.values()) == set(PURPOSES)


class NoModel(Exception):
    """No model is loaded yet (UNAVAILABLE)."""


# --- the served model --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shown:
    """An answer as served: the model and experiment arm it came from and the id its
    impressions are recorded under ('' when nothing is recorded: no consent)."""

    answer: ProductAnswer
    model: ServedModel
    arm: Assignment | None = None
    attribution_id: str = ""


class ImpressionRecorder:
    """Records what the server returned as impressions (for the fatigue rule and attribution),
    written in batches by a background thread: a call never waits for this write, and a crash
    loses at most the last `interval_s` of impressions (they are not acknowledged writes)."""

    def __init__(self, store: Store, interval_s: float = 0.5, metrics: Metrics | None = None):
        self.store = store
        self.interval_s = interval_s
        self.metrics = metrics
        self._pending: list[Impression] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="impressions", daemon=True)
        self._thread.start()

    def add(self, shown: list[Shown], channels: list[str]) -> None:
        # Only answers with an attribution id: personalized ones and those of an experiment arm.
        # What a customer without consent was shown is not kept about them.
        at = [s.model.now() for s in shown]  # one time per answer
        rows = [
            Impression(
                s.answer.customer_id,
                item.product_id,
                channel,
                when,
                s.arm.experiment if s.arm else "",
                s.arm.variant if s.arm else "",
                s.attribution_id,
                rank,
                s.model.version,
                ",".join(r.kind for r in item.reasons),
            )
            for s, channel, when in zip(shown, channels, at, strict=True)
            if s.attribution_id
            for rank, item in enumerate(s.answer.items, start=1)
        ]
        if self.metrics is not None:
            for s in shown:
                if s.arm is not None and s.attribution_id:
                    self.metrics.experiment_impressions.labels(s.arm.experiment, s.arm.variant).inc(
                        len(s.answer.items)
                    )
        with self._lock:
            self._pending.extend(rows)

    def flush(self) -> None:
        with self._lock:
            rows, self._pending = self._pending, []
        if rows:
            try:
                self.store.record_impressions(rows)
            except StoreError as exc:  # fatigue is best effort: answers never fail for it
                logger.error("impressions not recorded (%d rows): %s", len(rows), exc)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.flush()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.flush()


def _warm_rest(model: ServedModel, skip: int) -> None:
    """After a swap (or a start): the slates not ranked before it, then one log line."""
    started = time.perf_counter()
    done = model.warm_slates(model.retired, skip=skip)
    if not model.retired.is_set():
        logger.info(
            "slates of model %s ranked: %d customers (%d before the swap), %.1f s after it",
            model.version,
            done,
            skip,
            time.perf_counter() - started,
        )


class ModelHolder:
    """The model being served, swapped atomically; `current` never blocks."""

    def __init__(
        self,
        settings: Settings,
        consent: ConsentSource,
        store: Store | None = None,
        metrics: Metrics | None = None,
    ):
        self.metrics = metrics or Metrics()
        self.settings = settings
        self.consent = consent
        self.store = store
        self.models_dir = Path(settings.serve.models_dir)
        self._current: ServedModel | None = None
        self._arms: dict[str, ServedModel] = {}
        """Experiment arm label → the model answering it, for arms that differ from the served
        model (the control, a pinned version, policy or serve overrides)."""
        self._pinned: dict[str, ModelBundle] = {}
        self._assign = assigner(settings.experiments)
        self.replay = ReplayClock()
        """Advanced by recorded events; the clock of `serve.clock = "replay"`."""
        self._lock = threading.Lock()
        """Guards the swap and erasures reaching the models (held briefly)."""
        self._loading = threading.Lock()
        """One load at a time (held while a version is read and warmed)."""
        self._forgotten_meanwhile: set[str] | None = None
        """Customers erased while a version is being loaded (None: no load running)."""
        self._warmers: list[threading.Thread] = []
        """The slate-warming threads started by `load` (joined by `join`)."""
        self._refused: str | None = None
        self._waiting_for_store: str | None = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self.on_loaded: Callable[[ServedModel], None] = lambda model: None

    @property
    def current(self) -> ServedModel:
        model = self._current
        if model is None:
            raise NoModel(f"no model loaded yet from {self.models_dir} (run `nextbest train`)")
        return model

    @property
    def loaded(self) -> bool:
        return self._current is not None

    def load(self, version: str | None = None) -> tuple[ServedModel, bool]:
        """Load `version` (default: CURRENT) and swap it in; ModelError leaves the old one.

        All off the call path: calls go on being answered by the old model while the new one is
        read and, when there is an old one, while the new one ranks its customers' slates (up to
        `serve.warm_before_swap_s`): after the swap, first calls find them ranked. Customers
        erased meanwhile are forgotten by the new model too."""
        with self._loading:  # one load at a time (the watcher, ReloadModel)
            wanted = version or current_version(self.models_dir)
            old = self._current
            if old is not None and old.version == wanted:
                return old, False
            try:
                exists = (self.models_dir / wanted).is_dir()
            except OSError:  # e.g. a name longer than the file system allows
                exists = False
            if not exists:
                raise NotFound(f"version: {wanted!r} is not a model in {self.models_dir}")
            with self._lock:
                self._forgotten_meanwhile = set()
            try:
                erased = self.store.tombstones() if self.store is not None else {}
                bundle = load_bundle(self.models_dir, wanted)
                model = self._served(bundle, self.settings, erased)
                arms = self._arms_of(model, erased)
                budget = self.settings.serve.warm_before_swap_s if old is not None else 0.0
                warmed = model.warm_slates(self._stop, budget_s=budget) if budget > 0 else 0
                with self._lock:
                    for customer_id in self._forgotten_meanwhile:
                        for m in (model, *arms.values()):
                            m.forget(customer_id)
                    self._current, self._arms = model, arms
            finally:
                with self._lock:
                    self._forgotten_meanwhile = None
            self._refused = None
            if old is not None:
                old.retired.set()  # stops its slate warming
        warmer = threading.Thread(
            target=_warm_rest, args=(model, warmed), name="warm-slates", daemon=True
        )
        self._warmers = [t for t in self._warmers if t.is_alive()] + [warmer]
        warmer.start()
        logger.info(
            "serving model %s (%d customers, %d products, %d content items; %d slates ranked "
            "before the swap)",
            model.version,
            *model.bundle.shape,
            len(model.content_ids),
            warmed,
        )
        self.metrics.serving(model.version, model.bundle.cf.kind)
        del old  # the previous model: freed once its calls in flight finish
        trim_malloc()
        self.on_loaded(model)
        return model, True

    def _served(
        self,
        bundle: ModelBundle,
        settings: Settings,
        erased: dict[str, dt.datetime],
        holdout: bool = False,
    ) -> ServedModel:
        kwargs = {"erased": erased, "replay": self.replay, "holdout": holdout}
        if self.store is None:
            return ServedModel(bundle, settings, self.consent, **kwargs)
        return ServedModel.on_store(bundle, settings, self.store, **kwargs)

    def _arms_of(
        self, model: ServedModel, erased: dict[str, dt.datetime]
    ) -> dict[str, ServedModel]:
        """The models of the experiment arms that differ from `model` (same bundle unless the
        arm pins a version; pinned bundles are loaded once)."""
        arms = {}
        for e in self.settings.experiments:
            for v in e.variants:
                if not (v.control or v.model_version or v.policy or v.serve):
                    continue
                bundle = model.bundle
                if v.model_version and v.model_version != model.version:
                    if v.model_version not in self._pinned:
                        self._pinned[v.model_version] = load_bundle(
                            self.models_dir, v.model_version
                        )
                    bundle = self._pinned[v.model_version]
                settings = self.settings
                for section in ("policy", "serve"):
                    if getattr(v, section):
                        settings = settings.with_overrides(section, **getattr(v, section))
                arms[f"{e.name}/{v.name}"] = self._served(bundle, settings, erased, v.control)
        return arms

    def route(self, customer_id: str) -> tuple[ServedModel, Assignment | None]:
        """The model that answers the customer and their experiment arm (None outside every
        experiment). Applies to customers with personalization consent only: see `answered`."""
        model, arms = self.current, self._arms
        arm = self._assign(customer_id)
        return (arms.get(arm.label, model) if arm is not None else model), arm

    def answered(
        self, routed: tuple[ServedModel, Assignment | None], answer, redo: Callable
    ) -> tuple[object, ServedModel, Assignment | None, str]:
        """(answer, model, arm, attribution id) of an answer computed on the routed model. A
        customer without consent is outside every experiment: answered by the served model
        (`redo(model)`) and nothing about them is kept (no arm, no attribution id)."""
        model, arm = routed
        if answer.not_personalized_reason in _WITHOUT_CONSENT:
            default = self.current
            if model is not default:
                answer, model = redo(default), default
            return answer, model, None, ""
        keep = answer.personalized or arm is not None
        return answer, model, arm, new_id() if keep else ""

    def recommend(self, queries: list[ProductQuery]) -> list[Shown]:
        """RecommendProducts' answers, each from the model of the customer's arm."""
        routed = [self.route(q.customer_id) for q in queries]
        answers: list = [None] * len(queries)
        groups: dict[int, list[int]] = {}
        for r, (model, _) in enumerate(routed):
            groups.setdefault(id(model), []).append(r)
        for rows in groups.values():
            model = routed[rows[0]][0]
            for r, answer in zip(rows, model.recommend([queries[r] for r in rows]), strict=True):
                answers[r] = answer
        out = []
        for r, q in enumerate(queries):
            answer, model, arm, aid = self.answered(
                routed[r], answers[r], lambda m, q=q: m.recommend([q])[0]
            )
            out.append(Shown(answer, model, arm, aid))
        return out

    def forget(self, customer_id: str) -> None:
        """Drop an erased customer from every loaded model (the served one and the arms', and
        the one being loaded once it is swapped in)."""
        with self._lock:
            if self._forgotten_meanwhile is not None:
                self._forgotten_meanwhile.add(customer_id)
            if self._current is not None:
                self._current.forget(customer_id)
            for model in self._arms.values():
                model.forget(customer_id)

    def check(self) -> None:
        """Load CURRENT if it changed; a broken version is refused once and logged."""
        try:
            wanted = current_version(self.models_dir)
        except ModelError:
            return  # nothing published yet
        if self._current is not None and self._current.version == wanted:
            return
        if wanted == self._refused:
            return
        serving = self._current.version if self._current else "none"
        try:
            self.load(wanted)
        except (ModelError, NotFound) as exc:
            self.metrics.reload_failures.inc()
            self._refused = wanted
            logger.error("refused model %s: %s (still serving %s)", wanted, exc, serving)
        except StoreError as exc:  # the tombstones cannot be read: try again next round
            if self._waiting_for_store != wanted:
                self._waiting_for_store = wanted
                logger.error(
                    "model %s not loaded yet: the store cannot be read (%s); still serving %s, "
                    "retrying",
                    wanted,
                    exc,
                    serving,
                )
        else:
            self._waiting_for_store = None

    def watch(self, interval_s: float) -> None:
        """Check for new models every `interval_s` seconds in a daemon thread."""
        if interval_s <= 0:
            return

        def run() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.check()
                except Exception:  # the watcher must survive anything a bad directory does
                    logger.exception("model watcher")

        self._watcher = threading.Thread(target=run, name="model-watcher", daemon=True)
        self._watcher.start()

    def stop(self) -> None:
        self._stop.set()
        if self._current is not None:
            self._current.retired.set()

    def join(self, timeout_s: float = 10.0) -> None:
        """After `stop`: wait for the watcher and the slate warming to end their batch, so that
        the store they read can be closed (a read on a closed SQLite connection can crash)."""
        deadline = time.monotonic() + timeout_s
        for thread in [self._watcher, *self._warmers]:
            if thread is not None and thread is not threading.current_thread():
                thread.join(max(deadline - time.monotonic(), 0.0))


# --- request validation ------------------------------------------------------------------------


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def _id(value: str, field: str, *, required: bool = True) -> str:
    value = value.strip()
    if not value:
        if required:
            raise InvalidRequest(f"{field} is required")
        return value
    if len(value) > MAX_ID_LENGTH:
        raise InvalidRequest(f"{field} is longer than {MAX_ID_LENGTH} characters")
    if _CONTROL.search(value):
        # "c001\x00" must not be c001 to one part (numpy strings drop trailing NULs) and a
        # stranger to another (the store compares exactly): found by tests/test_fuzz.py.
        raise InvalidRequest(f"{field} contains a control character")
    return value


def _ids(values, field: str, max_n: int) -> tuple[str, ...]:
    if len(values) > max_n:
        raise InvalidRequest(f"{field} has {len(values)} entries, more than {max_n}")
    return tuple(_id(v, f"{field}[{k}]") for k, v in enumerate(values))


def _limit(request) -> int:
    if not request.HasField("limit"):
        return DEFAULT_LIMIT
    if not 1 <= request.limit <= MAX_LIMIT:
        raise InvalidRequest(f"limit must be within 1..{MAX_LIMIT} (got {request.limit})")
    return request.limit


_CHANNELS = {
    pb.CHANNEL_UNSPECIFIED: "email",
    pb.CHANNEL_EMAIL: "email",
    pb.CHANNEL_WEB: "web",
    pb.CHANNEL_APP: "app",
}


def _channel(value: int) -> None:
    if value not in _CHANNELS:
        raise InvalidRequest(f"channel has an unknown value {value}")


def product_query(request: pb.RecommendProductsRequest) -> ProductQuery:
    """A validated query from a RecommendProducts request; InvalidRequest names the field."""
    _id(request.request_id, "request_id", required=False)
    _channel(request.channel)
    return ProductQuery(
        customer_id=_id(request.customer_id, "customer_id"),
        limit=_limit(request),
        include_categories=_ids(request.include_categories, "include_categories", MAX_CATEGORIES),
        exclude_categories=_ids(request.exclude_categories, "exclude_categories", MAX_CATEGORIES),
        exclude_product_ids=_ids(request.exclude_product_ids, "exclude_product_ids", MAX_EXCLUDED),
        include_purchased=request.include_purchased,
        channel=_CHANNELS[request.channel],
    )


# --- protobuf out ------------------------------------------------------------------------------


def _reason_pb(r: Reason) -> pb.Reason:
    return pb.Reason(
        kind=_REASON_KINDS[r.kind],
        product_id=r.product_id,
        product_title=r.product_title,
        days=r.days,
        text=r.text,
    )


def _item_pb(item: Item) -> pb.RecommendedProduct:
    out = pb.RecommendedProduct(
        product_id=item.product_id,
        score=item.score,
        reasons=[_reason_pb(r) for r in item.reasons],
        title=item.title,
        category=item.category,
    )
    if item.price is not None:
        out.price = item.price
    return out


def _scored_pb(s) -> pb.ScoredContent:
    return pb.ScoredContent(
        content_id=s.content_id,
        title=s.title,
        kind=s.kind,
        relevance=s.relevance,
        reasons=[_reason_pb(r) for r in s.reasons],
    )


def _arm_pb(arm: Assignment | None) -> pb.ExperimentArm | None:
    return pb.ExperimentArm(experiment=arm.experiment, variant=arm.variant) if arm else None


def _answer_pb(shown: Shown, request: pb.RecommendProductsRequest) -> pb.RecommendProductsResponse:
    answer = shown.answer
    return pb.RecommendProductsResponse(
        customer_id=answer.customer_id,
        request_id=request.request_id,
        items=[_item_pb(i) for i in answer.items],
        model_version=shown.model.version,
        personalized=answer.personalized,
        not_personalized_reason=_NOT_PERSONALIZED[answer.not_personalized_reason],
        decisions=answer.decisions,
        withheld=answer.withheld,
        experiment=_arm_pb(shown.arm),
        attribution_id=shown.attribution_id,
    )


# --- errors → status codes ---------------------------------------------------------------------


def _status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, InvalidRequest):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc)
    if isinstance(exc, NotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc)
    if isinstance(exc, NoModel):
        return grpc.StatusCode.UNAVAILABLE, str(exc)
    if isinstance(exc, ModelError):
        return grpc.StatusCode.FAILED_PRECONDITION, str(exc)
    if isinstance(exc, StoreError):
        logger.error("consent store: %s", exc)
        return grpc.StatusCode.UNAVAILABLE, f"consent store unavailable: {exc}"
    logger.exception("unexpected error")
    return grpc.StatusCode.INTERNAL, "internal error (logged by the server)"


def _unary(method):
    """Run a unary handler: deadline check first, then map nextbest errors to status codes."""

    def handler(self, request, context: grpc.ServicerContext):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline passed before the call ran")
        try:
            return method(self, request, context)
        except (InvalidRequest, NotFound, NoModel, ModelError, StoreError) as exc:
            context.abort(*_status_of(exc))
        except Exception as exc:  # a bug: logged with its traceback, no details to the caller
            if context.code() is not None:  # context.abort() already chose the status
                raise
            context.abort(*_status_of(exc))

    handler.__name__ = method.__name__
    handler.__doc__ = method.__doc__
    return handler


# --- services ----------------------------------------------------------------------------------

_END = object()


class RecommenderService(recommender_pb2_grpc.RecommenderServicer):
    def __init__(self, holder: ModelHolder, impressions: ImpressionRecorder):
        self.holder = holder
        self.impressions = impressions

    @_unary
    def RecommendProducts(self, request, context):
        query = product_query(request)
        shown = self.holder.recommend([query])
        self.impressions.add(shown, [query.channel])
        self.holder.metrics.answered([s.answer for s in shown])
        return _answer_pb(shown[0], request)

    def StreamRecommendations(self, request_iterator, context) -> Iterator:
        pending: queue.Queue = queue.Queue(maxsize=STREAM_BUFFER)

        def put(item) -> bool:
            """Queue `item`, waiting while the buffer is full; False once the call is over."""
            while context.is_active():
                try:
                    pending.put(item, timeout=0.5)
                    return True
                except queue.Full:
                    continue
            return False

        def read() -> None:
            try:
                for request in request_iterator:
                    if not put(request):
                        return
            except Exception as exc:  # cancelled or broken stream: end the answers
                logger.debug("stream reader ended: %s", exc)
            finally:
                put(_END)

        threading.Thread(target=read, name="stream-reader", daemon=True).start()
        done = False
        while not done and context.is_active():
            try:
                batch = [pending.get(timeout=0.5)]
            except queue.Empty:
                continue
            while len(batch) < STREAM_BATCH and batch[-1] is not _END:
                try:
                    batch.append(pending.get_nowait())
                except queue.Empty:
                    break
            if batch[-1] is _END:
                batch.pop()
                done = True
            yield from self._answer_batch(batch)

    def _answer_batch(self, batch: list) -> Iterator[pb.RecommendProductsResponse]:
        queries: list[ProductQuery | None] = []
        errors: list[tuple[grpc.StatusCode, str] | None] = []
        for request in batch:
            try:
                queries.append(product_query(request))
                errors.append(None)
            except InvalidRequest as exc:
                queries.append(None)
                errors.append(_status_of(exc))
        try:
            valid = [q for q in queries if q is not None]
            answered = self.holder.recommend(valid)
            self.impressions.add(answered, [q.channel for q in valid])
            self.holder.metrics.answered([s.answer for s in answered])
            answers = iter(answered)
        except NoModel as exc:
            errors = [e or _status_of(exc) for e in errors]
            answers = iter(())
        for request, error in zip(batch, errors, strict=True):
            if error is not None:
                code, message = error
                yield pb.RecommendProductsResponse(
                    customer_id=request.customer_id,
                    request_id=request.request_id,
                    error=pb.RequestError(code=code.value[0], message=message),
                )
            else:
                yield _answer_pb(next(answers), request)

    @_unary
    def SimilarProducts(self, request, context):
        if not request.product_ids:
            raise InvalidRequest("product_ids is required (one or more product ids)")
        product_ids = _ids(request.product_ids, "product_ids", MAX_SIMILAR_INPUTS)
        limit = _limit(request)
        customer_id = _id(request.customer_id, "customer_id", required=False)
        model = self.holder.current
        items, unknown = model.similar(list(product_ids), limit, customer_id)
        return pb.SimilarProductsResponse(
            items=[_item_pb(i) for i in items],
            unknown_product_ids=unknown,
            model_version=model.version,
        )

    @_unary
    def ScoreContent(self, request, context):
        customer_id = _id(request.customer_id, "customer_id")
        _channel(request.channel)
        if not request.candidates:
            raise InvalidRequest("candidates is required (one or more pieces of content)")
        if len(request.candidates) > MAX_CANDIDATES:
            raise InvalidRequest(
                f"candidates has {len(request.candidates)} entries, more than {MAX_CANDIDATES}"
            )
        queries = []
        for k, c in enumerate(request.candidates):
            field = f"candidates[{k}]"
            q = ContentQuery(
                content_id=_id(c.content_id, f"{field}.content_id", required=False),
                title=c.title,
                product_ids=_ids(c.product_ids, f"{field}.product_ids", MAX_EXCLUDED),
                categories=_ids(c.categories, f"{field}.categories", MAX_CATEGORIES),
            )
            if not q.inline and not q.content_id:
                raise InvalidRequest(
                    f"{field} needs a content_id from the content catalog, or product_ids or "
                    "categories"
                )
            queries.append(q)
        routed = self.holder.route(customer_id)
        answer, model, arm, _ = self.holder.answered(
            routed,
            routed[0].score_content(customer_id, queries),
            lambda m: m.score_content(customer_id, queries),
        )
        return pb.ScoreContentResponse(
            customer_id=customer_id,
            items=[_scored_pb(s) for s in answer.items],
            model_version=model.version,
            personalized=answer.personalized,
            not_personalized_reason=_NOT_PERSONALIZED[answer.not_personalized_reason],
            experiment=_arm_pb(arm),
        )

    @_unary
    def ExplainRecommendation(self, request, context):
        product_id = _id(request.product_id, "product_id")
        query = product_query(_explained_request(request))
        routed = self.holder.route(query.customer_id)  # the customer's experiment arm's answer
        explanation, model, _, _ = self.holder.answered(
            routed,
            explain(routed[0], query, product_id),
            lambda m: explain(m, query, product_id),
        )
        return _explanation_pb(explanation, model.version)


def _explained_request(request) -> pb.RecommendProductsRequest:
    """The RecommendProducts request an ExplainRecommendation request explains."""
    out = pb.RecommendProductsRequest(
        customer_id=request.customer_id,
        channel=request.channel,
        include_categories=request.include_categories,
        exclude_categories=request.exclude_categories,
        exclude_product_ids=request.exclude_product_ids,
        include_purchased=request.include_purchased,
    )
    if request.HasField("limit"):
        out.limit = request.limit
    return out


_RULES = {name: pb.Rule.Value(f"RULE_{name.upper()}") for name in RULES}
_RULES[""] = pb.RULE_UNSPECIFIED


def _explanation_pb(e, version: str) -> pb.ExplainRecommendationResponse:
    out = pb.ExplainRecommendationResponse(
        customer_id=e.customer_id,
        product_id=e.product_id,
        in_answer=e.in_answer,
        rank=e.rank,
        score=e.score,
        personalized=e.personalized,
        not_personalized_reason=_NOT_PERSONALIZED[e.not_personalized_reason],
        removed_by=_RULES[e.removed_by],
        detail=e.detail,
        reasons=[_reason_pb(r) for r in e.reasons],
        title=e.title,
        category=e.category,
        model_version=version,
    )
    if e.terms is not None:
        t = e.terms
        out.terms.CopyFrom(
            pb.ValueTerms(
                relevance_timeliness=t.relevance,
                privacy_loss=t.privacy_loss,
                trust=t.trust,
                fatigue=t.fatigue,
                times_shown=t.times_shown,
                value=t.value,
                min_value=t.min_value,
            )
        )
    return out


def model_info(model: ServedModel) -> admin_pb2.ModelInfo:
    m = model.bundle.manifest
    return admin_pb2.ModelInfo(
        version=model.version,
        created_at=str(m.get("created_at", "")),
        cf_model=str(m.get("cf_model", "")),
        customers=model.bundle.shape[0],
        products=model.bundle.shape[1],
        content_items=len(model.content_ids),
        reference_time=str(m.get("reference_time", "")),
        loaded_at=model.loaded_at,
        manifest_json=json.dumps(m, sort_keys=True),
    )


class AdminService(admin_pb2_grpc.AdminServicer):
    def __init__(self, holder: ModelHolder):
        self.holder = holder

    @_unary
    def GetModelInfo(self, request, context):
        return model_info(self.holder.current)

    @_unary
    def ReloadModel(self, request, context):
        version = _id(request.version, "version", required=False)
        if version and not _VERSION.fullmatch(version):
            raise InvalidRequest(f"version {version!r} is not a version name")
        try:
            model, changed = self.holder.load(version or None)
        except (ModelError, NotFound):
            self.holder.metrics.reload_failures.inc()
            raise
        return admin_pb2.ReloadModelResponse(model=model_info(model), changed=changed)


_STAGES = {
    "new": lifecycle_pb2.STAGE_NEW,
    "active": lifecycle_pb2.STAGE_ACTIVE,
    "at_risk": lifecycle_pb2.STAGE_AT_RISK,
    "dormant": lifecycle_pb2.STAGE_DORMANT,
    "lapsed": lifecycle_pb2.STAGE_LAPSED,
}


class LifecycleService(lifecycle_pb2_grpc.LifecycleServicer):
    def __init__(self, holder: ModelHolder, impressions: ImpressionRecorder):
        self.holder = holder
        self.impressions = impressions

    @_unary
    def GetCustomerState(self, request, context):
        customer_id = _id(request.customer_id, "customer_id")
        model = self.holder.current
        state, why = model.customer_state(customer_id)
        return _state_pb(customer_id, model, state, why)

    @_unary
    def NextBestAction(self, request, context):
        customer_id = _id(request.customer_id, "customer_id")
        _channel(request.channel)
        limit, channel = _limit(request), _CHANNELS[request.channel]
        routed = self.holder.route(customer_id)
        answer, model, arm, aid = self.holder.answered(
            routed,
            routed[0].next_best_action(customer_id, channel, limit),
            lambda m: m.next_best_action(customer_id, channel, limit),
        )
        if not answer.items:
            aid = ""
        self._record_shown(answer, channel, model, arm, aid)
        reply = lifecycle_pb2.NextBestActionResponse(
            customer_id=customer_id,
            action=_ACTIONS[answer.action],
            personalized=answer.personalized,
            not_personalized_reason=answer.not_personalized_reason,
            products=[_item_pb(i) for i in answer.items],
            content=[_scored_pb(c) for c in answer.content],
            reasons=answer.reasons,
            model_version=model.version,
            experiment=_arm_pb(arm),
            attribution_id=aid,
        )
        if answer.state is not None:
            reply.state.CopyFrom(
                _state_pb(customer_id, model, answer.state, answer.not_personalized_reason)
            )
        return reply

    def _record_shown(
        self,
        answer,
        channel: str,
        model: ServedModel,
        arm: Assignment | None = None,
        attribution_id: str = "",
    ) -> None:
        """The products an action shows count as impressions (fatigue, attribution), as
        RecommendProducts'."""
        if answer.products is not None and answer.items:
            products = dataclasses.replace(answer.products, items=list(answer.items))
            if not attribution_id and products.personalized:
                attribution_id = new_id()
            self.impressions.add([Shown(products, model, arm, attribution_id)], [channel])

    def StreamAudience(self, request, context):
        stage = _STAGE_NAMES.get(request.stage, "")
        action = _ACTION_NAMES.get(request.action, "")
        try:
            if request.stage and not stage:
                raise InvalidRequest(f"stage has an unknown value {request.stage}")
            if request.action and not action:
                raise InvalidRequest(f"action has an unknown value {request.action}")
            _channel(request.channel)
            if request.max_customers < 0:
                raise InvalidRequest("max_customers must be >= 0")
            limit, channel = _limit(request), _CHANNELS[request.channel]
            model = self.holder.current
            members = model.audience(
                stage=stage,
                action=action,
                channel=channel,
                limit=limit,
                max_customers=request.max_customers,
            )
        except (InvalidRequest, NotFound, NoModel, ModelError, StoreError) as exc:
            context.abort(*_status_of(exc))
        for answer in members:
            self._record_shown(answer, channel, model)
            yield _audience_member(answer.customer_id, model, answer)


_STAGE_NAMES = {v: k for k, v in _STAGES.items()}


def _audience_member(customer_id: str, model: ServedModel, answer) -> lifecycle_pb2.AudienceMember:
    return lifecycle_pb2.AudienceMember(
        customer_id=customer_id,
        state=_state_pb(customer_id, model, answer.state, ""),
        action=_ACTIONS[answer.action],
        products=[_item_pb(i) for i in answer.items],
        content=[_scored_pb(c) for c in answer.content],
        reasons=answer.reasons,
    )


_ACTIONS = {
    "welcome": lifecycle_pb2.ACTION_WELCOME,
    "human_touch": lifecycle_pb2.ACTION_HUMAN_TOUCH,
    "win_back": lifecycle_pb2.ACTION_WIN_BACK,
    "care": lifecycle_pb2.ACTION_CARE,
    "replenish": lifecycle_pb2.ACTION_REPLENISH,
    "cross_sell": lifecycle_pb2.ACTION_CROSS_SELL,
    "rest": lifecycle_pb2.ACTION_REST,
}


_ACTION_NAMES = {v: k for k, v in _ACTIONS.items()}


def _state_pb(customer_id: str, model: ServedModel, state, why: str) -> lifecycle_pb2.CustomerState:
    reply = lifecycle_pb2.CustomerState(
        customer_id=customer_id, model_version=model.version, personalized=state is not None
    )
    if state is None:
        reply.not_personalized_reason = why
        return reply
    risk = model.lifecycle.risk
    reply.stage = _STAGES[state.stage]
    reply.churn_risk = state.churn_risk
    reply.expected_purchases = state.expected_purchases
    reply.expected_value = state.expected_value
    reply.active_days_30 = state.active_days_30
    reply.interval_days = 0.0 if np.isnan(state.interval_days) else state.interval_days
    reply.days_since_last_purchase = state.days_since_last_purchase
    reply.purchase_days = state.purchase_days
    reply.reasons.extend(state.reasons)
    reply.risk_model = risk.kind
    reply.horizon_days = risk.horizon_days
    return reply


def _timestamp(value: dt.datetime | None) -> Timestamp | None:
    if value is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value)
    return ts


def _purpose(value: int) -> str:
    if value not in _PURPOSES:
        raise InvalidRequest(
            f"purpose must be one of {', '.join(_PURPOSES.values())} (got {value})"
        )
    return _PURPOSES[value]


class ConsentService(consent_pb2_grpc.ConsentServicer):
    def __init__(
        self,
        holder: ModelHolder,
        store: Store,
        default_allow: bool,
        impressions: ImpressionRecorder | None = None,
    ):
        self.holder = holder
        self.store = store
        self.default_allow = default_allow
        self.impressions = impressions

    def _values(self, customer_id: str) -> list:
        stored = self.store.get_consent(customer_id)
        out = []
        for number, purpose in _PURPOSES.items():
            record = stored.get(purpose)
            if record is None:
                out.append(
                    consent_pb2.ConsentValue(
                        purpose=number, granted=self.default_allow, source="default"
                    )
                )
            else:
                out.append(
                    consent_pb2.ConsentValue(
                        purpose=number,
                        granted=record.granted,
                        updated_at=_timestamp(record.updated_at),
                        source=record.source,
                    )
                )
        return out

    @_unary
    def SetConsent(self, request, context):
        customer_id = _id(request.customer_id, "customer_id")
        purpose = _purpose(request.purpose)
        if not request.HasField("granted"):
            raise InvalidRequest("granted is required (true grants, false withdraws)")
        source = _id(request.source, "source")
        change = self.store.set_consent(customer_id, purpose, request.granted, source=source)
        if change.old_granted != change.new_granted:
            self.holder.metrics.consent_changes.labels(purpose, str(request.granted).lower()).inc()
        value = next(v for v in self._values(customer_id) if v.purpose == request.purpose)
        return consent_pb2.SetConsentResponse(
            consent=value, changed=change.old_granted != change.new_granted
        )

    @_unary
    def GetConsent(self, request, context):
        customer_id = _id(request.customer_id, "customer_id")
        return consent_pb2.GetConsentResponse(
            customer_id=customer_id,
            consents=self._values(customer_id),
            erased=bool(self.store.erased([customer_id])),
        )

    @_unary
    def ForgetCustomer(self, request, context):
        customer_id = _id(request.customer_id, "customer_id")
        source = _id(request.source, "source")
        report = self.store.forget(customer_id, source=source)
        self.holder.metrics.erasures.inc()
        self.holder.forget(customer_id)
        logger.info("forgot a customer (source %s)", source)
        return consent_pb2.ForgetCustomerResponse(
            customer_id=customer_id,
            consent_rows_deleted=report.consent_rows,
            events_deleted=report.events,
            already_erased=report.already_erased,
        )

    def ExportCustomerData(self, request, context):
        """The export document's sections as they are read (`export.py`), after the request is
        written to the access log."""
        try:
            customer_id = _id(request.customer_id, "customer_id")
            source = _id(request.source, "source")
            model = self.holder.current if self.holder.loaded else None
            if self.impressions is not None:  # what was shown a moment ago is held too
                self.impressions.flush()
            ctx = ExportContext.create(
                self.store,
                model,
                customer_id,
                default_allow=self.default_allow,
                client=context_value("client"),
                source=source,
            )
            for name, value, paged in export_customer(ctx):
                yield consent_pb2.ExportCustomerDataChunk(
                    section=name, json=json.dumps(value), page=paged
                )
        except (InvalidRequest, NotFound, ModelError, StoreError) as exc:
            context.abort(*_status_of(exc))
        logger.info("exported a customer's data (source %s)", source)


MAX_EVENTS = 1000
EVENT_TYPES = (PURCHASE, RETURN, *BEHAVIORAL_EVENTS)


class EventsService(events_pb2_grpc.EventsServicer):
    def __init__(
        self,
        holder: ModelHolder,
        store: Store,
        default_allow: bool,
        impressions: ImpressionRecorder | None = None,
    ):
        self.holder = holder
        self.store = store
        self.default_allow = default_allow
        self.impressions = impressions

    @_unary
    def RecordEvents(self, request, context):
        if not request.events:
            raise InvalidRequest("events is required (1 to 1000 events)")
        if len(request.events) > MAX_EVENTS:
            raise InvalidRequest(
                f"events has {len(request.events)} entries, more than {MAX_EVENTS}"
            )
        now = dt.datetime.now(dt.UTC).replace(tzinfo=None)
        rows = {name: [] for name in ("customer_id", "product_id", "event_type", "quantity")}
        rows.update(timestamp=[], channel=[], value=[])
        for k, e in enumerate(request.events):
            field = f"events[{k}]"
            rows["customer_id"].append(_id(e.customer_id, f"{field}.customer_id"))
            rows["product_id"].append(_id(e.product_id, f"{field}.product_id"))
            kind = e.event_type.strip().lower() or PURCHASE
            if kind not in EVENT_TYPES:
                raise InvalidRequest(
                    f"{field}.event_type must be one of {', '.join(EVENT_TYPES)} (got {kind!r})"
                )
            rows["event_type"].append(kind)
            quantity = e.quantity if e.HasField("quantity") else 1.0
            if not (quantity > 0 and np.isfinite(quantity)):
                raise InvalidRequest(f"{field}.quantity must be > 0 (got {quantity})")
            rows["quantity"].append(float(quantity))
            if e.HasField("timestamp"):
                try:
                    when = e.timestamp.ToDatetime()
                except (ValueError, OverflowError):
                    raise InvalidRequest(f"{field}.timestamp is out of range") from None
            else:
                when = now
            rows["timestamp"].append(when)
            if len(e.channel) > 32:
                raise InvalidRequest(f"{field}.channel is longer than 32 characters")
            if _CONTROL.search(e.channel):
                raise InvalidRequest(f"{field}.channel contains a control character")
            rows["channel"].append(e.channel or None)
            value = e.value if e.HasField("value") else None
            if value is not None and not (value >= 0 and np.isfinite(value)):
                raise InvalidRequest(f"{field}.value must be >= 0 (got {value})")
            rows["value"].append(value)
        state = self.store.consent_state(rows["customer_id"], self.default_allow)
        ids = pa.array(rows["customer_id"], pa.string())
        erased = erasure_blocks(
            ids,
            pa.array(rows["timestamp"], pa.timestamp("us")),
            state,
            self.store.erased(rows["customer_id"]),
        )
        consented = np.where(
            np.isin(rows["event_type"], BEHAVIORAL_EVENTS),
            state.allowed("behavioral", ids) & state.allowed("personalization", ids),
            state.allowed("personalization", ids),
        )
        allowed = consented & ~erased
        table = pa.table(
            {
                "customer_id": pa.array(rows["customer_id"], pa.string()),
                "product_id": pa.array(rows["product_id"], pa.string()),
                "timestamp": pa.array(rows["timestamp"], pa.timestamp("us")),
                "event_type": pa.array(rows["event_type"], pa.string()),
                "quantity": pa.array(rows["quantity"], pa.float64()),
                "value": pa.array(rows["value"], pa.float64()),
                "channel": pa.array(rows["channel"], pa.string()),
            },
            schema=EVENT_SCHEMA,
        ).filter(pa.array(allowed))
        recorded = self.store.record_events(table) if table.num_rows else 0
        if recorded:
            self.holder.replay.advance(max(table.column("timestamp").to_pylist()))
            self._count_attributed(table)
        unknown: list[str] = []
        if self.holder.loaded:
            products = sorted(set(rows["product_id"]))
            known = self.holder.current.bundle.item_index(np.asarray(products, dtype=str))
            unknown = [p for p, i in zip(products, known, strict=True) if i < 0]
        return events_pb2.RecordEventsResponse(
            recorded=recorded,
            ignored_without_consent=int((~consented & ~erased).sum()),
            ignored_erased=int(erased.sum()),
            unknown_product_ids=unknown,
        )

    def _count_attributed(self, events: pa.Table) -> None:
        """Count the recorded purchases of a shown product (last touch) per experiment arm."""
        purchases = attribution.purchases_of(events)
        if not purchases:
            return
        if self.impressions is not None:  # what was shown just before counts too
            self.impressions.flush()
        windows = attribution.windows_of(self.holder.settings.experiments)
        since = attribution.before(
            min(p.at for p in purchases), attribution.longest_window(windows)
        )
        try:
            shown = self.store.impressions(sorted({p.customer_id for p in purchases}), since=since)
        except StoreError as exc:  # a metric only: the events are stored
            logger.error("attributed purchases not counted: %s", exc)
            return
        for a in attribution.attribute(purchases, shown, windows):
            touch = a.last_touch
            self.holder.metrics.attributed_purchases.labels(touch.experiment, touch.variant).inc()


class _Undecodable:
    """Stands in for a request whose bytes are not a valid message (answered INVALID_ARGUMENT
    instead of grpc's INTERNAL "Exception deserializing request!")."""

    def __init__(self, size: int):
        self.size = size


def _lenient(deserialize: Callable[[bytes], object]) -> Callable[[bytes], object]:
    def parse(data: bytes) -> object:
        try:
            return deserialize(data)
        except DecodeError:
            return _Undecodable(len(data))

    return parse


def new_id() -> str:
    """A new request or attribution id: 32 random hex digits (uuid4's randomness and shape,
    without building a UUID: a tenth of the cost on every call)."""
    return os.urandom(16).hex()


def _request_id(given: str | None) -> str:
    """The caller's `x-request-id` when it is a sane token, else a new one."""
    if given and len(given) <= 64 and given.isprintable() and " " not in given:
        return given
    return new_id()


def _peer_certificate(context) -> bytes | None:
    """The PEM certificate the caller presented; None without one (grpc fills `x509_pem_cert`
    in the call's auth context when the server requires client certificates)."""
    pem = context.auth_context().get("x509_pem_cert")
    return pem[0] if pem else None


def _pushback(context, request_id: str, ms: int) -> None:
    """The trailers of a refused call: its request id and when to retry."""
    context.set_trailing_metadata(
        (("x-request-id", request_id), ("grpc-retry-pushback-ms", str(ms)))
    )


def _with_headers(answers, context, request_id: str):
    """A stream's answers, the initial metadata (the request id) sent with the first one."""
    first = True
    for answer in answers:
        if first:
            context.send_initial_metadata((("x-request-id", request_id),))
            first = False
        yield answer


class CallInterceptor(grpc.ServerInterceptor):
    """Every call to our services passes here once (health and reflection go straight through):
    a request id (the caller's `x-request-id` or a new one, on every log line of the call), the
    token (or client certificate) and role check, the client's rate limit, the open-stream
    limit, undecodable requests → INVALID_ARGUMENT, then the call's metrics and one JSON log line
    with its status, time, client name and hashed customer id.

    The request id goes back in the trailers of every call and in the initial metadata sent
    with the first answer: a call that fails before it answers (refused by the gate, the rate
    limit or admission control; UNAVAILABLE when the store is out) ends trailers-only, which is
    what lets gRPC's retry policy retry it after its `grpc-retry-pushback-ms`: a client retries
    no call once it has received headers."""

    def __init__(
        self,
        metrics: Metrics,
        gate: Gate,
        max_streams: int,
        admission: Admission,
        unary_workers: int = 16,
    ):
        self.metrics = metrics
        self.gate = gate
        self.limits = RateLimits(gate.clients)
        self.max_streams = max_streams
        self._streams = threading.BoundedSemaphore(max_streams)
        self.admission = admission
        self.unary_pool = UnaryExecutor(admission, unary_workers)
        """The worker pool of our unary methods (streams, health and reflection use the
        server's): it refuses, on arrival, calls that would queue too long."""
        metrics.admission_limit.set(admission.max_running)
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._children: dict[tuple, object] = {}

    def _child(self, metric, *labels: str):
        """`metric.labels(*labels)`, looked up once per label set (`labels()` takes a lock and
        builds its key on every use; this is on every call)."""
        child = self._children.get((metric, labels))
        if child is None:
            child = self._children.setdefault((metric, labels), metric.labels(*labels))
        return child

    def use_clients(self, clients) -> None:
        """From the next call on, these clients (SIGHUP): their tokens, certificates, roles and
        rate limits."""
        self.gate = Gate(clients)
        self.limits.use(clients)

    @contextlib.contextmanager
    def _call(
        self, method: str, context, gate: Gate, authorization, request_id: str, customer: str
    ):
        started = time.perf_counter()
        code = grpc.StatusCode.UNKNOWN
        certificate = _peer_certificate(context) if gate.by_certificate else None
        verdict = gate.check(method, authorization, certificate)
        with call_context(request_id=request_id, client=verdict.client):
            try:
                context.set_trailing_metadata((("x-request-id", request_id),))
                if not verdict.allowed:
                    status = (
                        grpc.StatusCode.UNAUTHENTICATED
                        if verdict.problem == "unauthenticated"
                        else grpc.StatusCode.PERMISSION_DENIED
                    )
                    context.abort(status, verdict.message)
                self._limit(context, verdict.client, request_id)
                yield
                code = grpc.StatusCode.OK
            finally:
                code = context.code() or code
                elapsed = time.perf_counter() - started
                self._child(self.metrics.calls, method, code.name).inc()
                self._child(self.metrics.latency, method).observe(elapsed)
                log_call(
                    calls_logger,
                    method,
                    code.name,
                    round(elapsed * 1000, 3),
                    hash_customer_id(customer),
                )

    def _limit(self, context, client: str, request_id: str) -> None:
        """Refuse a call over its client's `rate_per_s` (counted; the pushback in trailers)."""
        bucket = self.limits.limit(client)
        wait_s = self.limits.take(client) if bucket is not None else 0.0
        if wait_s <= 0:
            return
        self.metrics.rate_limited.labels(client).inc()
        pushback = max(math.ceil(wait_s * 1000.0), 1)
        _pushback(context, request_id, pushback)
        context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"client {client!r} is over its rate limit (rate_per_s = {bucket.rate_per_s:g}, "
            f"burst = {bucket.burst}); retry after {pushback} ms",
        )

    def _refuse(self, method: str, context, decision: Decision, request_id: str) -> None:
        """Refuse a call admission control turned away (counted; the pushback in trailers)."""
        self.metrics.refused.labels(method, decision.reason).inc()
        if decision.pushback_ms:
            _pushback(context, request_id, decision.pushback_ms)
        code = (
            grpc.StatusCode.DEADLINE_EXCEEDED
            if decision.reason == "deadline"
            else grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        context.abort(code, decision.message)

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if not method.startswith(f"/{pb.DESCRIPTOR.package}."):
            return continuation(handler_call_details)
        # A method's wrapped handler is made once: the services do not change while the server
        # runs, and what belongs to one call is read from its context when it starts.
        wrapped = self._wrapped.get(method)
        if wrapped is None:
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            wrapped = self._wrapped.setdefault(method, self._wrap(method, handler))
        return wrapped

    def _caller(self, context):
        """(gate, authorization, request id) of a call, from its metadata; the gate of the
        moment the call starts (a SIGHUP later does not change its verdict)."""
        metadata = {k: v for k, v in context.invocation_metadata() or () if k}
        return self.gate, metadata.get("authorization"), _request_id(metadata.get("x-request-id"))

    def _wrap(self, method: str, handler):
        parse = _lenient(handler.request_deserializer)
        message = f"request: not a valid {method.rsplit('/', 1)[-1]} request message"

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary(request, context):
                customer = getattr(request, "customer_id", "")
                gate, authorization, request_id = self._caller(context)
                with self._call(method, context, gate, authorization, request_id, customer):
                    if isinstance(request, _Undecodable):
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                    decision = refused_on_arrival() or self.admission.admit(
                        method, context.time_remaining(), queued_ms()
                    )
                    if not decision.admitted:
                        self._refuse(method, context, decision, request_id)
                    self._child(self.metrics.admitted, method).inc()
                    started = time.perf_counter()
                    try:
                        answer = inner(request, context)
                    finally:
                        self.admission.release(method, started)
                    context.send_initial_metadata((("x-request-id", request_id),))
                    return answer

            unary.experimental_thread_pool = self.unary_pool.pool_for(method)  # type: ignore[attr-defined]
            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:  # StreamAudience: a stream like the others
            inner_out = handler.unary_stream

            def out_stream(request, context):
                customer = getattr(request, "customer_id", "")
                gate, authorization, request_id = self._caller(context)
                with self._call(method, context, gate, authorization, request_id, customer):
                    if isinstance(request, _Undecodable):
                        context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)
                    if not self._streams.acquire(blocking=False):
                        context.abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"too many open streams (serve.max_concurrent_streams = "
                            f"{self.max_streams}); retry when one has finished",
                        )
                    try:
                        yield from _with_headers(inner_out(request, context), context, request_id)
                    finally:
                        self._streams.release()

            return grpc.unary_stream_rpc_method_handler(
                out_stream,
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        inner_stream = handler.stream_stream  # our only other kind of method

        def stream(request_iterator, context):
            gate, authorization, request_id = self._caller(context)
            with self._call(method, context, gate, authorization, request_id, ""):
                if not self._streams.acquire(blocking=False):
                    context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"too many open streams (serve.max_concurrent_streams = "
                        f"{self.max_streams}); retry when one has finished",
                    )
                undecodable: list[int] = []

                def decoded():
                    for k, request in enumerate(request_iterator):
                        if isinstance(request, _Undecodable):
                            undecodable.append(k)
                            return
                        yield request

                try:
                    yield from _with_headers(inner_stream(decoded(), context), context, request_id)
                finally:
                    self._streams.release()
                if undecodable:
                    context.abort(
                        grpc.StatusCode.INVALID_ARGUMENT,
                        f"{message} (stream message {undecodable[0]}); the answers before it "
                        "were sent",
                    )

        return grpc.stream_stream_rpc_method_handler(
            stream,
            request_deserializer=parse,
            response_serializer=handler.response_serializer,
        )


# --- the server --------------------------------------------------------------------------------


@dataclasses.dataclass
class Running:
    """A started server and its parts."""

    server: grpc.Server
    port: int
    holder: ModelHolder
    health: health.HealthServicer
    store: Store
    impressions: ImpressionRecorder
    metrics: Metrics
    metrics_port: int
    """-1 when metrics are off."""
    calls: CallInterceptor | None = None

    def reload_clients(self, config_path: str | None) -> bool:
        """Read `[[serve.clients]]` again from the config (and NEXTBEST_ variables) and use it
        from the next call on (tokens, certificates, roles, rate limits); calls in flight keep
        the verdict they started with. A config that does not load, that leaves a TLS server
        without clients, or that maps a certificate on a server started without
        `tls_client_ca`, is refused (logged) and the old clients stay. Only the clients change:
        other settings need a restart."""
        from nextbest.config import load_settings

        try:
            fresh = load_settings(config_path)
        except ConfigError as exc:
            logger.error("SIGHUP: %s; the clients stay as they were", exc)
            return False
        serve = self.holder.settings.serve
        if not serve.insecure and not fresh.serve.clients:
            logger.error("SIGHUP: the config lists no [[serve.clients]]; the clients stay")
            return False
        mapped = [k for k, c in enumerate(fresh.serve.clients) if c.certificate_sha256]
        if mapped and not serve.tls_client_ca:
            logger.error(
                "SIGHUP: serve.clients[%d].certificate_sha256 needs client certificates, and "
                "this server started without serve.tls_client_ca (a restart is needed); the "
                "clients stay as they were",
                mapped[0],
            )
            return False
        self.calls.use_clients(fresh.serve.clients)
        if self.metrics.dashboard is not None:
            self.metrics.dashboard.gate = self.calls.gate
        logger.info(
            "SIGHUP: %d clients (%s)",
            len(fresh.serve.clients),
            ", ".join(c.name for c in fresh.serve.clients) or "none",
        )
        return True

    def stop(self, grace: float | None = None) -> None:
        """Mark NOT_SERVING, let calls in flight finish for up to `grace` s, stop watching."""
        self.health.enter_graceful_shutdown()
        self.holder.stop()
        self.server.stop(grace).wait()
        if self.calls is not None:
            self.calls.unary_pool.shutdown(wait=False)
        self.holder.join()
        self.impressions.close()
        self.store.close()
        self.metrics.close()


def _read_pem(path: str, key: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"config: serve.{key}: cannot read {path} ({exc.strerror})") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(f"config: serve.{key}: {path} is not a PEM file")
    return data


def credentials(serve: ServeSettings) -> grpc.ServerCredentials | None:
    """TLS credentials (mutual when `tls_client_ca` is set), or None when insecure was chosen;
    ConfigError names what is missing."""
    tls = {k: getattr(serve, k) for k in ("tls_cert", "tls_key", "tls_client_ca")}
    if serve.insecure:
        given = [k for k, v in tls.items() if v]
        if given:
            raise ConfigError(
                f"config: serve.insecure is set together with serve.{given[0]}: choose one"
            )
        return None
    missing = [f"serve.{k}" for k in ("tls_cert", "tls_key") if not tls[k]]
    if not serve.clients:
        missing.append("[[serve.clients]]")
    if missing:
        raise ConfigError(
            f"config: {' and '.join(missing)} required: the server runs with TLS and client "
            "tokens (see README, Operations), or plaintext only when chosen with "
            "serve.insecure = true / --insecure"
        )
    ca = _read_pem(serve.tls_client_ca, "tls_client_ca") if serve.tls_client_ca else None
    return grpc.ssl_server_credentials(
        [(_read_pem(serve.tls_key, "tls_key"), _read_pem(serve.tls_cert, "tls_cert"))],
        root_certificates=ca,
        require_client_auth=ca is not None,
    )


def _security_summary(serve: ServeSettings) -> str:
    by_token = sum(bool(c.token_sha256) for c in serve.clients)
    by_certificate = sum(bool(c.certificate_sha256) for c in serve.clients)
    tokens = f"bearer tokens of {by_token} clients" if by_token else "no tokens"
    if by_certificate:
        tokens += f", certificates of {by_certificate} clients"
    if serve.insecure:
        return f"INSECURE: plaintext, no TLS, {tokens} (serve.insecure)"
    mutual = ", client certificates required" if serve.tls_client_ca else ""
    return f"TLS{mutual}, {tokens}"


def check_experiments(settings: Settings) -> None:
    """Refuse a config whose experiment arms pin a model version that is not published."""
    models = Path(settings.serve.models_dir)
    for k, e in enumerate(settings.experiments):
        for j, v in enumerate(e.variants):
            if v.model_version and not (
                _VERSION.fullmatch(v.model_version) and (models / v.model_version).is_dir()
            ):
                raise ConfigError(
                    f"config: experiments[{k}].variants[{j}].model_version: "
                    f"{v.model_version!r} is not a model in {models}"
                )


def create_server(settings: Settings, *, reuse_port: bool = False) -> Running:
    """Build, bind and start the server; loads CURRENT when there is one (else NOT_SERVING until
    the watcher finds one). `serve.port = 0` binds a free port (see `Running.port`). Consent
    comes from the store at `serve.store`, read on every call. The port is this server's alone
    unless `reuse_port` (one of `serve.processes` processes sharing it, see `processes.py`)."""
    # One BLAS / OpenMP thread per call (see ServedModel): the worker threads are the parallelism.
    threadpool_limits(1)
    check_experiments(settings)
    server_credentials = credentials(settings.serve)
    store = open_store(settings.serve.store)
    default_allow = settings.policy.default_consent == "allow"
    metrics = Metrics()
    holder = ModelHolder(settings, store_consent(store, default_allow), store, metrics)
    health_servicer = health.HealthServicer()

    def mark_serving(model: ServedModel) -> None:
        for name in ("", *SERVICE_NAMES):
            health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)

    for name in ("", *SERVICE_NAMES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    holder.on_loaded = mark_serving
    calls = CallInterceptor(
        metrics,
        Gate(settings.serve.clients),
        settings.serve.max_concurrent_streams,
        Admission(settings.serve.max_running_calls, settings.serve.max_queue_ms),
        settings.serve.max_workers,
    )
    server = grpc.server(
        StampedExecutor(max_workers=settings.serve.max_workers, thread_name_prefix="grpc"),
        interceptors=[calls],
        options=[
            ("grpc.max_receive_message_length", settings.serve.max_message_bytes),
            ("grpc.max_send_message_length", settings.serve.max_message_bytes),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
        maximum_concurrent_rpcs=settings.serve.max_concurrent_calls,
    )
    impressions = ImpressionRecorder(store, metrics=metrics)
    recommender_pb2_grpc.add_RecommenderServicer_to_server(
        RecommenderService(holder, impressions), server
    )
    admin_pb2_grpc.add_AdminServicer_to_server(AdminService(holder), server)
    lifecycle_pb2_grpc.add_LifecycleServicer_to_server(
        LifecycleService(holder, impressions), server
    )
    consent_pb2_grpc.add_ConsentServicer_to_server(
        ConsentService(holder, store, default_allow, impressions), server
    )
    events_pb2_grpc.add_EventsServicer_to_server(
        EventsService(holder, store, default_allow, impressions), server
    )
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    address = f"{settings.serve.host}:{settings.serve.port}"
    try:
        if server_credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, server_credentials)
    except RuntimeError:  # grpcio raises "Failed to bind" where older versions returned 0
        port = 0
    if port == 0:
        raise ModelError(f"cannot listen on {address} (in use or not permitted)")
    holder.check()
    if not holder.loaded:
        logger.warning("no loadable model in %s yet: NOT_SERVING", settings.serve.models_dir)
    metrics_port = -1
    if settings.serve.metrics_port >= 0:
        try:
            metrics_port = metrics.serve_http(
                settings.serve.host, settings.serve.metrics_port, settings
            )
        except OSError as exc:
            server.stop(0)
            raise ModelError(
                f"serve.metrics_port: cannot listen on {settings.serve.host}:"
                f"{settings.serve.metrics_port} ({exc.strerror or exc})"
            ) from None
        logger.info("metrics on http://%s:%d/metrics", settings.serve.host, metrics_port)
    server.start()
    holder.watch(settings.serve.reload_interval_s)
    security = _security_summary(settings.serve)
    (logger.warning if settings.serve.insecure else logger.info)(
        "listening on %s:%d: %s", settings.serve.host, port, security
    )
    return Running(
        server=server,
        port=port,
        holder=holder,
        health=health_servicer,
        store=store,
        impressions=impressions,
        metrics=metrics,
        metrics_port=metrics_port,
        calls=calls,
    )


M_ARENA_MAX = -8
"""glibc's mallopt parameter for the number of malloc arenas (malloc.h)."""


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt, libc.malloc_trim  # noqa: B018 - glibc, not musl
    except (OSError, AttributeError):
        return None
    return libc


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas, as `MALLOC_ARENA_MAX=2` would (unless that is set already).

    Every call allocates arrays as long as the catalog on one of the worker threads; with glibc's
    default of up to 8 arenas per core, freed memory stays spread over many arenas and the
    resident size of a server under steady load kept growing (`make bench-soak`: +55% in 10
    minutes; with two arenas, flat). Returns whether the cap was set."""
    libc = _libc()
    if libc is None or os.environ.get("MALLOC_ARENA_MAX"):
        return False
    return libc.mallopt(M_ARENA_MAX, arenas) == 1


def prepare_process(serve: ServeSettings) -> bool:
    """The process-wide settings of a server process, before it serves: the GIL handed over
    within `serve.switch_interval_ms`, malloc arenas capped (`limit_malloc_arenas`, whose result
    this returns)."""
    sys.setswitchinterval(serve.switch_interval_ms / 1000.0)
    return limit_malloc_arenas()


def trim_malloc() -> None:
    """Give freed heap memory back to the system (after a model swap frees the old model)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (logged: the server then drains its calls)."""
    stop = threading.Event()

    def on_signal(signum, frame) -> None:
        logger.info("%s: draining calls in flight", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return stop


def reload_on_sighup(running: Running, config_path: str | None) -> None:
    """SIGHUP: read the clients (tokens, roles) again (`Running.reload_clients`)."""
    signal.signal(signal.SIGHUP, lambda signum, frame: running.reload_clients(config_path))


def serve(settings: Settings, config_path: str | None = None) -> int:
    """One server process until SIGTERM or SIGINT, then drain calls in flight for up to
    `serve.grace_s` (`processes.serve_processes` runs several); SIGHUP reloads the clients
    from `config_path`."""
    if prepare_process(settings.serve):
        logger.info("glibc malloc arenas capped at 2 (set MALLOC_ARENA_MAX to choose otherwise)")
    running = create_server(settings)
    reload_on_sighup(running, config_path)
    stop = stop_on_signals()
    print(f"nextbest serving on {settings.serve.host}:{running.port}", flush=True)
    stop.wait()
    running.stop(settings.serve.grace_s)
    logger.info("stopped")
    return 0
