"""`nextbest.client.Client` against real servers: the served model (plaintext, and TLS with a
token), and a small scripted server that fails on purpose to show what is retried."""

from __future__ import annotations

from concurrent import futures
from pathlib import Path

import grpc
import pytest
from conftest import answer_only
from test_security import TOKENS, Pki, secure_settings

from nextbest.client import Client
from nextbest.server import create_server
from nextbest.v1 import events_pb2, events_pb2_grpc
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb


@pytest.fixture(scope="module")
def folder(module_own) -> Path:
    return module_own


def test_client_calls_every_service(running):
    with Client(f"127.0.0.1:{running.port}") as nb:
        nb.wait_until_serving(timeout=30)
        answer = nb.recommend("c002", limit=5, channel="web", request_id="r1")
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            direct = rpb.RecommenderStub(ch).RecommendProducts(
                pb.RecommendProductsRequest(
                    customer_id="c002", limit=5, channel=pb.CHANNEL_WEB, request_id="r1"
                ),
                timeout=10,
            )
        assert answer_only(answer) == answer_only(direct) and len(answer.items) == 5

        customers = [f"c{k:03d}" for k in range(40)] + ["", "never-seen"]
        streamed = list(nb.stream(iter(customers), limit=3))
        assert [a.customer_id for a in streamed] == customers
        assert streamed[40].error.message.startswith("customer_id is required")
        assert not streamed[41].personalized and len(streamed[41].items) == 3

        assert nb.similar(["p001"], limit=3).items
        scored = nb.score_content(
            "c002", ["guide-pantry", pb.ContentCandidate(product_ids=["p001"])]
        )
        assert len(scored.items) == 2

        changed = nb.set_consent("c950", "behavioral", True, source="client-test")
        assert changed.changed and changed.consent.granted
        assert nb.get_consent("c950").customer_id == "c950"
        recorded = nb.record_events([events_pb2.Event(customer_id="c002", product_id="p001")])
        assert recorded.recorded == 1
        assert nb.model_info().version == nb.reload().model.version
        assert nb.forget("c951", source="client-test").customer_id == "c951"


def test_client_errors_are_grpc_errors_with_the_field(running):
    with Client(f"127.0.0.1:{running.port}") as nb:
        with pytest.raises(grpc.RpcError) as bad:
            nb.recommend("c002", limit=500)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert bad.value.details().startswith("limit must be within 1..100")
        with pytest.raises(ValueError, match="channel must be one of email, web, app"):
            nb.recommend("c002", channel="fax")
        with pytest.raises(ValueError, match="purpose must be one of"):
            nb.set_consent("c002", "marketing", True, source="x")


def test_client_with_tls_and_a_token(folder, tmp_path):
    pki = Pki(tmp_path)
    running = create_server(secure_settings(folder, pki))
    try:
        address = f"127.0.0.1:{running.port}"
        with Client(address, ca=pki.ca, token=TOKENS["recommend"]) as nb:
            assert nb.serving()
            assert nb.recommend("c002").items
        with Client(address, ca=pki.ca) as anonymous:
            with pytest.raises(grpc.RpcError) as refused:
                anonymous.recommend("c002")
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        running.stop(0)


class Flaky(rpb.RecommenderServicer, events_pb2_grpc.EventsServicer):
    """Answers UNAVAILABLE `failures` times per method, then OK; INVALID_ARGUMENT for limit 0."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls: dict[str, int] = {}

    def _count(self, name: str, context) -> None:
        self.calls[name] = self.calls.get(name, 0) + 1
        if self.calls[name] <= self.failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "store unavailable (scripted)")

    def RecommendProducts(self, request, context):
        if request.HasField("limit") and request.limit == 0:
            self.calls["invalid"] = self.calls.get("invalid", 0) + 1
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "limit must be within 1..100")
        self._count("recommend", context)
        return pb.RecommendProductsResponse(customer_id=request.customer_id)

    def RecordEvents(self, request, context):
        self._count("events", context)
        return events_pb2.RecordEventsResponse(recorded=len(request.events))


@pytest.fixture
def flaky():
    servicer = Flaky(failures=2)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    rpb.add_RecommenderServicer_to_server(servicer, server)
    events_pb2_grpc.add_EventsServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(0)


def test_client_retries_unavailable_only_and_never_events(flaky):
    servicer, address = flaky
    with Client(address, attempts=4) as nb:
        assert nb.recommend("c002").customer_id == "c002"  # two UNAVAILABLE, then answered
        assert servicer.calls["recommend"] == 3
        with pytest.raises(grpc.RpcError) as invalid:
            nb.recommend("c002", limit=0)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert servicer.calls["invalid"] == 1  # not retried
        with pytest.raises(grpc.RpcError) as lost:
            nb.record_events([events_pb2.Event(customer_id="c002", product_id="p001")])
        assert lost.value.code() == grpc.StatusCode.UNAVAILABLE
        assert servicer.calls["events"] == 1  # a purchase is never sent twice
    with Client(address, attempts=1) as once:
        servicer.calls.clear()
        with pytest.raises(grpc.RpcError):
            once.recommend("c003")
        assert servicer.calls["recommend"] == 1


def test_readme_python_examples_run_against_a_real_server(running, capsys):
    """README's "one example per RPC" block, run as written against the served model."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("### Calling it: one example per RPC") :]
    start = section.index("```python\n") + len("```python\n")
    code = section[start : section.index("\n```", start)]
    assert 'address = "127.0.0.1:50051"' in code
    exec(code.replace("127.0.0.1:50051", f"127.0.0.1:{running.port}"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("True [('p")  # a personalized answer
    assert out[3].startswith("unknown-customer False")
    assert len(out) == 10, out
