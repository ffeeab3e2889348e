"""Admission control through a real server: a call whose deadline cannot be met is refused
before any work; beyond the running slots and the queue bound, calls are refused at once with a
retry pushback, counted in the metrics; the client's retry policy honours the pushback."""

from __future__ import annotations

import threading
import time
import urllib.request

import grpc
import pytest
from conftest import served_settings

from nextbest.admission import Admission, UnaryExecutor, refused_on_arrival
from nextbest.client import Client
from nextbest.server import create_server
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb

METHOD = "/nextbest.v1.Recommender/RecommendProducts"


def test_admission_unit():
    a = Admission(max_running=1, max_queue_ms=20)
    first = a.admit("m", None)
    assert first.admitted
    t0 = time.perf_counter()
    second = a.admit("m", None)  # the one slot is taken: waits 20 ms, then refused
    assert not second.admitted and second.reason == "overloaded" and second.pushback_ms == 20
    assert 0.015 < time.perf_counter() - t0 < 1.0
    a.release("m", time.perf_counter() - 0.010)  # a 10 ms call
    assert 9.0 < a.service_ms("m") < 50.0
    assert not a.admit("m", 0.001).admitted  # 1 ms left, calls take ~10 ms
    assert a.admit("m", 5.0).admitted


def test_calls_that_would_queue_too_long_are_refused_on_arrival():
    a = Admission(max_running=1, max_queue_ms=25)
    assert a.on_arrival("m") is None  # a free slot: nothing to wait for
    a.admit("m", None)
    a.release("m", time.perf_counter() - 0.010)  # calls of m take about 10 ms
    assert a.admit("m", None).admitted  # the one slot is taken from here on
    pool = UnaryExecutor(a, max_workers=1)
    m = pool.pool_for("m")
    blocked = threading.Event()
    try:
        first = m.submit(blocked.wait, 10)  # holds the one worker thread (never gets a slot)
        time.sleep(0.05)
        # Behind one queued call of m a call waits ~10 ms, behind two ~20 ms: both within
        # max_queue_ms (25), they queue; behind three (~30 ms) it is refused at once, by the
        # refusing pool, while the worker is still busy.
        queued = [m.submit(refused_on_arrival) for _ in range(2)]
        late = m.submit(refused_on_arrival).result(timeout=5)
        assert not first.done()
        assert late is not None and late.reason == "overloaded" and late.pushback_ms >= 30
        assert "queued ahead of this one need about 30 ms" in late.message
        blocked.set()
        assert [f.result(timeout=5) for f in queued] == [None, None]  # ran as usual
        assert refused_on_arrival() is None  # nothing outside a refusing job
        first.result(timeout=5)
        # Every call left the queue's reckoning (two ended without asking for a slot): a call
        # arriving now waits for nothing but the slot.
        assert a.on_arrival("m") is None
        # One very slow call (a model reload) counts as max_queue_ms at most: a call arriving
        # behind a single queued one is not turned away for it.
        a.observe("reload", 60_000.0)
        assert a.estimate_ms("reload") == 25.0
    finally:
        blocked.set()
        pool.shutdown()


def metric(port: int, name: str, **labels: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + "{", name + " ")) and all(
            f'{k}="{v}"' in line for k, v in labels.items()
        ):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def tight(own):
    """A server that computes one call at a time and queues none for long."""
    settings = served_settings(own, own / "models").with_overrides(
        "serve", max_running_calls=1, max_queue_ms=5.0, max_workers=16
    )
    running = create_server(settings)
    yield running
    running.stop(0)


def test_a_call_with_too_little_time_left_is_refused_before_any_work(tight):
    # The case: 1 ms left. A warm answer of this small model takes well under a
    # millisecond (and gRPC keeps deadlines to the millisecond), so a call with 1 ms left could
    # be answered in time here, and would be. The server is told its calls of the method take
    # 50 ms, as on a loaded server with a large catalog: then 1 ms cannot be enough.
    with grpc.insecure_channel(f"127.0.0.1:{tight.port}") as ch:
        stub = rpb.RecommenderStub(ch)
        stub.RecommendProducts(pb.RecommendProductsRequest(customer_id="c003"), timeout=10)
        for _ in range(50):
            tight.calls.admission.observe(METHOD, 50.0)
        answered = metric(tight.metrics_port, "nextbest_admitted_calls_total", method=METHOD)
        with pytest.raises(grpc.RpcError) as info:
            stub.RecommendProducts(pb.RecommendProductsRequest(customer_id="c003"), timeout=0.001)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # Refused by the check (or by gRPC itself when the millisecond ran out on the way): either
    # way the model was not asked.
    assert metric(tight.metrics_port, "nextbest_admitted_calls_total", method=METHOD) == answered
    refused = metric(tight.metrics_port, "nextbest_refused_calls_total", reason="deadline")
    assert refused in (0.0, 1.0)


def test_overload_is_refused_at_once_with_a_pushback(tight):
    codes: list = []
    pushbacks: list = []
    waits: list = []

    start = threading.Barrier(24)

    def call() -> None:
        with grpc.insecure_channel(
            f"127.0.0.1:{tight.port}", options=[("grpc.enable_retries", 0)]
        ) as ch:
            stub = rpb.RecommenderStub(ch)
            grpc.channel_ready_future(ch).result(timeout=10)
            start.wait()  # all at once: a warm call takes under a millisecond here
            for _ in range(5):
                t0 = time.perf_counter()
                try:
                    stub.RecommendProducts(
                        pb.RecommendProductsRequest(customer_id="c003"), timeout=10
                    )
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
                    waits.append(time.perf_counter() - t0)
                    trailers = dict(exc.trailing_metadata() or ())
                    pushbacks.append(trailers.get("grpc-retry-pushback-ms"))

    threads = [threading.Thread(target=call) for _ in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    refused = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert refused > 0 and codes.count(grpc.StatusCode.OK) > 0, codes
    assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
    assert pushbacks and all(int(p) >= 5 for p in pushbacks)  # at least max_queue_ms
    assert max(waits) < 2.0  # refused quickly, not after queueing behind everyone
    got = metric(tight.metrics_port, "nextbest_refused_calls_total", method=METHOD)
    assert got == refused
    assert metric(tight.metrics_port, "nextbest_admission_limit") == 1.0


class Refusing(rpb.RecommenderServicer):
    """Refuses the first call as admission control does (pushback 300 ms), then answers."""

    def __init__(self):
        self.times: list[float] = []

    def RecommendProducts(self, request, context):
        self.times.append(time.perf_counter())
        if len(self.times) == 1:
            context.set_trailing_metadata((("grpc-retry-pushback-ms", "300"),))
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "server busy (scripted)")
        return pb.RecommendProductsResponse(customer_id=request.customer_id, personalized=True)


def test_the_client_retries_a_refusal_after_its_pushback():
    from concurrent import futures

    servicer = Refusing()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    rpb.add_RecommenderServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", attempts=3) as nb:
            assert nb.recommend("c003").personalized
        assert len(servicer.times) == 2
        assert servicer.times[1] - servicer.times[0] >= 0.29  # waited for the pushback
    finally:
        server.stop(0)


def test_the_client_retries_the_real_servers_refusals(tight):
    """The server sends no headers before it lets a call in, so a refusal ends trailers-only and
    gRPC's retry policy may retry it (a client retries no call that has received headers)."""
    with Client(f"127.0.0.1:{tight.port}", attempts=5) as nb:
        request = pb.RecommendProductsRequest(customer_id="c003")
        calls = [nb.recommender.RecommendProducts.future(request, timeout=30) for _ in range(64)]
        failed = sum(c.exception() is not None for c in calls)
    refused = metric(tight.metrics_port, "nextbest_refused_calls_total", method=METHOD)
    assert refused > 0  # one slot and 64 calls at once: some were refused...
    assert failed < refused  # ...and retried after their pushback (before: every one failed)


def test_answers_and_refusals_carry_the_request_id(tight):
    with grpc.insecure_channel(
        f"127.0.0.1:{tight.port}", options=[("grpc.enable_retries", 0)]
    ) as ch:
        unary = ch.unary_unary(METHOD, request_serializer=lambda m: m.SerializeToString())
        request = pb.RecommendProductsRequest(customer_id="c003")
        calls = [
            unary.future(request, metadata=(("x-request-id", f"req-{k}"),), timeout=30)
            for k in range(24)
        ]
        for k, c in enumerate(calls):
            c.exception()
            if c.code() == grpc.StatusCode.OK:
                assert ("x-request-id", f"req-{k}") in c.initial_metadata()
            else:  # refused before any work: no headers, the id in the trailers
                assert c.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert not c.initial_metadata()
                assert ("x-request-id", f"req-{k}") in c.trailing_metadata()


def test_a_server_process_hands_the_gil_over_quickly():
    import sys

    from nextbest.config import load_settings
    from nextbest.server import prepare_process

    before = sys.getswitchinterval()
    try:
        prepare_process(load_settings(None, environ={}).serve)
        assert sys.getswitchinterval() == pytest.approx(0.0005)  # serve.switch_interval_ms
    finally:
        sys.setswitchinterval(before)
