"""A small typed client of the nextbest gRPC server (the client side; `server.py` is the server).

    from nextbest.client import Client

    with Client("nextbest.internal:50051", ca="ca.pem", token=os.environ["NEXTBEST_TOKEN"]) as nb:
        nb.wait_until_serving()
        answer = nb.recommend("12347", limit=5, channel="web")
        for answer in nb.stream(["12347", "14911"], limit=10):  # campaign audiences
            ...

Every call has a deadline (`timeout`, 10 s unless given). Calls that fail with UNAVAILABLE (no
server listening yet, a replica draining, the store out for a write) or RESOURCE_EXHAUSTED (the
server's admission control; after its `grpc-retry-pushback-ms`) are retried by gRPC's own retry
policy with exponential backoff, up to `attempts` times; no other status is retried, and
RecordEvents is never retried (a lost answer must not record a purchase twice). Answers are the
protobuf messages of `nextbest.v1`, documented in protos/.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

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

__all__ = ["Client", "CHANNELS", "PURPOSES"]

pb = recommender_pb2
CHANNELS = {"email": pb.CHANNEL_EMAIL, "web": pb.CHANNEL_WEB, "app": pb.CHANNEL_APP}
PURPOSES = {
    "personalization": consent_pb2.PURPOSE_PERSONALIZATION,
    "behavioral": consent_pb2.PURPOSE_BEHAVIORAL,
    "sensitive": consent_pb2.PURPOSE_SENSITIVE,
}
RETRIED_SERVICES = (
    "nextbest.v1.Recommender",
    "nextbest.v1.Consent",
    "nextbest.v1.Admin",
    "nextbest.v1.Lifecycle",
)


def _service_config(attempts: int) -> str:
    """gRPC retry policy: UNAVAILABLE and RESOURCE_EXHAUSTED, for every service but Events."""
    policy = {
        "maxAttempts": attempts,
        "initialBackoff": "0.1s",
        "maxBackoff": "2s",
        "backoffMultiplier": 2,
        # RESOURCE_EXHAUSTED: refused by admission control, retried after the server's
        # `grpc-retry-pushback-ms` (gRPC's retry honours it).
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    return json.dumps(
        {
            "methodConfig": [
                {"name": [{"service": s} for s in RETRIED_SERVICES], "retryPolicy": policy}
            ]
        }
    )


def _read(value: str | Path | bytes | None) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return Path(value).read_bytes()


class Client:
    """One channel to one server (or load balancer). `ca` turns TLS on (a PEM file or bytes;
    `tls=True` with no `ca` uses the system roots); `cert` and `key` add a client certificate
    for mutual TLS; `token` is sent as `authorization: Bearer <token>` on every call."""

    def __init__(
        self,
        address: str,
        *,
        token: str | None = None,
        tls: bool | None = None,
        ca: str | Path | bytes | None = None,
        cert: str | Path | bytes | None = None,
        key: str | Path | bytes | None = None,
        timeout: float = 10.0,
        attempts: int = 4,
    ):
        if not 1 <= attempts <= 5:
            raise ValueError("attempts must be within 1..5 (gRPC caps attempts at 5; 1 = none)")
        options: list[tuple[str, object]] = [("grpc.enable_retries", int(attempts > 1))]
        if attempts > 1:
            options.append(("grpc.service_config", _service_config(attempts)))
        if tls or ca is not None or cert is not None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read(ca), private_key=_read(key), certificate_chain=_read(cert)
            )
            self.channel = grpc.secure_channel(address, creds, options=options)
        else:
            self.channel = grpc.insecure_channel(address, options=options)
        self.timeout = timeout
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.recommender = recommender_pb2_grpc.RecommenderStub(self.channel)
        self.consent = consent_pb2_grpc.ConsentStub(self.channel)
        self.events = events_pb2_grpc.EventsStub(self.channel)
        self.admin = admin_pb2_grpc.AdminStub(self.channel)
        self.lifecycle = lifecycle_pb2_grpc.LifecycleStub(self.channel)
        self.health = health_pb2_grpc.HealthStub(self.channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.channel.close()

    def _call(self, method, request, timeout: float | None):
        return method(request, timeout=timeout or self.timeout, metadata=self._metadata)

    # --- health ------------------------------------------------------------------------------

    def serving(self, timeout: float | None = None) -> bool:
        """Whether the server answers health checks with SERVING (a model is loaded)."""
        try:
            status = self.health.Check(
                health_pb2.HealthCheckRequest(), timeout=timeout or self.timeout
            ).status
        except grpc.RpcError:
            return False
        return status == health_pb2.HealthCheckResponse.SERVING

    def wait_until_serving(self, timeout: float = 60.0) -> None:
        """Poll health until SERVING; TimeoutError after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not self.serving(timeout=2.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"server not SERVING after {timeout:.0f} s")
            time.sleep(0.2)

    # --- Recommender ---------------------------------------------------------------------------

    @staticmethod
    def product_request(
        customer_id: str,
        *,
        limit: int | None = None,
        channel: str = "email",
        include_categories: Iterable[str] = (),
        exclude_categories: Iterable[str] = (),
        exclude_product_ids: Iterable[str] = (),
        include_purchased: bool = False,
        request_id: str = "",
    ) -> pb.RecommendProductsRequest:
        """A RecommendProducts request; `channel` is email, web or app."""
        if channel not in CHANNELS:
            raise ValueError(f"channel must be one of {', '.join(CHANNELS)} (got {channel!r})")
        request = pb.RecommendProductsRequest(
            customer_id=customer_id,
            channel=CHANNELS[channel],
            include_categories=list(include_categories),
            exclude_categories=list(exclude_categories),
            exclude_product_ids=list(exclude_product_ids),
            include_purchased=include_purchased,
            request_id=request_id,
        )
        if limit is not None:
            request.limit = limit
        return request

    def recommend(
        self, customer_id: str, *, timeout: float | None = None, **fields
    ) -> pb.RecommendProductsResponse:
        """Next best products for one customer (fields as in `product_request`)."""
        request = self.product_request(customer_id, **fields)
        return self._call(self.recommender.RecommendProducts, request, timeout)

    def stream(
        self,
        requests: Iterable[str | pb.RecommendProductsRequest],
        *,
        timeout: float | None = None,
        **fields,
    ) -> Iterator[pb.RecommendProductsResponse]:
        """Answers for many customers over one StreamRecommendations call, in request order.
        `requests` are customer ids (with `fields` for all) or requests; it is consumed lazily,
        so a campaign of millions streams with flow control. A request the server refuses comes
        back with `error` set; the stream goes on. No deadline unless `timeout` is given."""

        def messages() -> Iterator[pb.RecommendProductsRequest]:
            for r in requests:
                yield (
                    r
                    if isinstance(r, pb.RecommendProductsRequest)
                    else (self.product_request(r, **fields))
                )

        return self.recommender.StreamRecommendations(
            messages(), timeout=timeout, metadata=self._metadata
        )

    def similar(
        self,
        product_ids: Iterable[str],
        *,
        limit: int | None = None,
        customer_id: str = "",
        timeout: float | None = None,
    ) -> pb.SimilarProductsResponse:
        """Products similar to one or several products."""
        request = pb.SimilarProductsRequest(product_ids=list(product_ids), customer_id=customer_id)
        if limit is not None:
            request.limit = limit
        return self._call(self.recommender.SimilarProducts, request, timeout)

    def score_content(
        self,
        customer_id: str,
        candidates: Iterable[str | pb.ContentCandidate],
        *,
        channel: str = "email",
        timeout: float | None = None,
    ) -> pb.ScoreContentResponse:
        """Relevance of each candidate: content ids of the model's snapshot, or inline
        `ContentCandidate(title=…, product_ids=[…], categories=[…])`."""
        request = pb.ScoreContentRequest(
            customer_id=customer_id,
            candidates=[
                c if isinstance(c, pb.ContentCandidate) else pb.ContentCandidate(content_id=c)
                for c in candidates
            ],
            channel=CHANNELS[channel],
        )
        return self._call(self.recommender.ScoreContent, request, timeout)

    def explain(
        self, customer_id: str, product_id: str, *, timeout: float | None = None, **fields
    ) -> pb.ExplainRecommendationResponse:
        """Why `product_id` is, or is not, in the answer `recommend(customer_id, **fields)`
        gives now (fields as in `product_request`, without request_id)."""
        query = self.product_request(customer_id, **fields)
        request = pb.ExplainRecommendationRequest(
            customer_id=customer_id,
            product_id=product_id,
            channel=query.channel,
            include_categories=query.include_categories,
            exclude_categories=query.exclude_categories,
            exclude_product_ids=query.exclude_product_ids,
            include_purchased=query.include_purchased,
        )
        if query.HasField("limit"):
            request.limit = query.limit
        return self._call(self.recommender.ExplainRecommendation, request, timeout)

    # --- Consent and Events --------------------------------------------------------------------

    def set_consent(
        self, customer_id: str, purpose: str, granted: bool, *, source: str, timeout=None
    ) -> consent_pb2.SetConsentResponse:
        """Grant or withdraw one purpose (personalization, behavioral, sensitive)."""
        if purpose not in PURPOSES:
            raise ValueError(f"purpose must be one of {', '.join(PURPOSES)} (got {purpose!r})")
        request = consent_pb2.SetConsentRequest(
            customer_id=customer_id, purpose=PURPOSES[purpose], granted=granted, source=source
        )
        return self._call(self.consent.SetConsent, request, timeout)

    def get_consent(self, customer_id: str, *, timeout=None) -> consent_pb2.GetConsentResponse:
        request = consent_pb2.GetConsentRequest(customer_id=customer_id)
        return self._call(self.consent.GetConsent, request, timeout)

    def forget(
        self, customer_id: str, *, source: str, timeout=None
    ) -> consent_pb2.ForgetCustomerResponse:
        """Erase a customer (consent, events, factors) and leave a tombstone."""
        request = consent_pb2.ForgetCustomerRequest(customer_id=customer_id, source=source)
        return self._call(self.consent.ForgetCustomer, request, timeout)

    def export(self, customer_id: str, *, source: str, timeout: float | None = 60.0) -> dict:
        """Everything the service holds about the customer: the JSON document of
        `src/nextbest/schemas/customer-export.v1.schema.json`, assembled from the streamed
        sections (ExportCustomerData; the server logs the request: who asked, when)."""
        request = consent_pb2.ExportCustomerDataRequest(customer_id=customer_id, source=source)
        document: dict = {}
        chunks = self.consent.ExportCustomerData(request, timeout=timeout, metadata=self._metadata)
        for chunk in chunks:
            value = json.loads(chunk.json)
            if chunk.section == "export":
                document.update(value)
            elif chunk.page:
                document.setdefault(chunk.section, []).extend(value)
            else:
                document[chunk.section] = value
        return document

    def record_events(
        self, events: Iterable[events_pb2.Event], *, timeout=None
    ) -> events_pb2.RecordEventsResponse:
        """Record purchases, returns, views… (`events_pb2.Event`); never retried."""
        request = events_pb2.RecordEventsRequest(events=list(events))
        return self._call(self.events.RecordEvents, request, timeout)

    # --- Admin ---------------------------------------------------------------------------------

    def customer_state(self, customer_id: str, *, timeout=None) -> lifecycle_pb2.CustomerState:
        """Lifecycle stage, churn risk and expected value of one customer (consent-gated)."""
        request = lifecycle_pb2.GetCustomerStateRequest(customer_id=customer_id)
        return self._call(self.lifecycle.GetCustomerState, request, timeout)

    def next_best_action(
        self, customer_id: str, *, channel: str = "email", limit: int | None = None, timeout=None
    ) -> lifecycle_pb2.NextBestActionResponse:
        """The one action to take next for the customer, with its products or content."""
        request = lifecycle_pb2.NextBestActionRequest(
            customer_id=customer_id, channel=CHANNELS[channel]
        )
        if limit is not None:
            request.limit = limit
        return self._call(self.lifecycle.NextBestAction, request, timeout)

    def audience(
        self,
        *,
        stage: str = "",
        action: str = "",
        channel: str = "email",
        limit: int | None = None,
        max_customers: int = 0,
        timeout: float | None = None,
    ) -> Iterator[lifecycle_pb2.AudienceMember]:
        """Every customer of a stage (`new`, `active`, `at_risk`, `dormant`, `lapsed`) or action
        (`welcome`, `win_back`, `human_touch`, ...) audience, streamed with flow control. No
        deadline unless `timeout` is given."""
        request = lifecycle_pb2.StreamAudienceRequest(
            channel=CHANNELS[channel], max_customers=max_customers
        )
        if stage:
            request.stage = lifecycle_pb2.Stage.Value(f"STAGE_{stage.upper()}")
        if action:
            request.action = lifecycle_pb2.Action.Value(f"ACTION_{action.upper()}")
        if limit is not None:
            request.limit = limit
        return self.lifecycle.StreamAudience(request, timeout=timeout, metadata=self._metadata)

    def model_info(self, *, timeout=None) -> admin_pb2.ModelInfo:
        return self._call(self.admin.GetModelInfo, admin_pb2.GetModelInfoRequest(), timeout)

    def reload(self, version: str = "", *, timeout=None) -> admin_pb2.ReloadModelResponse:
        """Load `version` (default: CURRENT) now."""
        request = admin_pb2.ReloadModelRequest(version=version)
        return self._call(self.admin.ReloadModel, request, timeout)
