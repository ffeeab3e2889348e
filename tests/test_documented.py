"""Documented behaviours of README "Limits", "Metrics" and "Logs", through real servers, each on
its own copy of the store: `serve.max_concurrent_calls`, stream flow control, the withheld /
consent-change / erasure metrics and `serve.log_format = "text"`. (Health NOT_SERVING while
draining: tests/test_serve_process.py; tokens of several roles: tests/test_security.py.)"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time

import grpc
import pytest
from conftest import serve_command, served_settings, store_url
from test_admission import metric

from nextbest.server import create_server
from nextbest.v1 import consent_pb2, consent_pb2_grpc
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb


def start(own, policy=None, **serve):
    settings = served_settings(own, own / "models").with_overrides("serve", **serve)
    if policy:
        settings = settings.with_overrides("policy", **policy)
    return create_server(settings)


class HeldStream:
    """A StreamRecommendations call that stays open (one request answered, then the client waits
    before sending more) until `release()`."""

    def __init__(self, stub):
        self.release_event = threading.Event()
        self.answers = []
        self.first = threading.Event()

        def requests():
            yield pb.RecommendProductsRequest(customer_id="c003", limit=2)
            self.release_event.wait(30)

        def read():
            for answer in stub.StreamRecommendations(requests(), timeout=60):
                self.answers.append(answer)
                self.first.set()

        self.thread = threading.Thread(target=read, daemon=True)
        self.thread.start()

    def release(self) -> None:
        self.release_event.set()
        self.thread.join(30)


def test_one_call_beyond_max_concurrent_calls_is_resource_exhausted(own):
    running = start(own, max_concurrent_calls=2, max_concurrent_streams=4)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = rpb.RecommenderStub(channel)
            request = pb.RecommendProductsRequest(customer_id="c004")
            assert stub.RecommendProducts(request, timeout=10).items  # one at a time: fine
            held = [HeldStream(stub), HeldStream(stub)]
            assert all(h.first.wait(30) for h in held)  # two calls running: the limit
            with pytest.raises(grpc.RpcError) as refused:
                stub.RecommendProducts(request, timeout=10)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            for h in held:
                h.release()
            assert [len(h.answers) for h in held] == [1, 1]
            assert stub.RecommendProducts(request, timeout=10).items  # room again
    finally:
        running.stop(0)


PAD = [f"not-a-product-{k:03d}-" + "x" * 110 for k in range(250)]
"""250 ids of 128 characters: a request of about 32 KB, so that what the transport buffers is
a few hundred requests at most, next to the server's read-ahead of STREAM_BUFFER (1,024)."""
READ_AHEAD_BOUND = 1024 + 256 + 512
"""STREAM_BUFFER (1,024 queued requests) + STREAM_BATCH (256 being answered) + 512 for what
HTTP/2 buffers on the way (measured: about 130 of these requests)."""


def test_a_stream_stops_pulling_requests_while_the_client_reads_no_answer(running):
    """Flow control: a client that sends an endless stream and reads nothing makes the server
    stop reading after its bounded read-ahead, so the client's sender stops being pulled. With
    unlimited read-ahead (a queue without a bound) the count runs to the cap here."""
    pulled = 0
    cap = 2 * READ_AHEAD_BOUND
    finish = threading.Event()

    def requests():
        nonlocal pulled
        while not finish.is_set() and pulled < cap:
            pulled += 1
            yield pb.RecommendProductsRequest(
                customer_id=f"c{pulled % 80:03d}",
                limit=100,
                request_id=str(pulled),
                exclude_product_ids=PAD,
            )

    # No BDP probing on the client: its receive window stays at 64 KB, so the answers it does
    # not read hold the server's answering after a few dozen.
    options = [("grpc.http2.bdp_probe", 0)]
    with grpc.insecure_channel(f"127.0.0.1:{running.port}", options=options) as channel:
        call = rpb.RecommenderStub(channel).StreamRecommendations(requests(), timeout=120)
        counts = [0]
        while pulled < cap and not (len(counts) > 8 and counts[-1] == counts[-9]):
            time.sleep(0.25)  # until the count stands still for 2 s (or reaches the cap)
            counts.append(pulled)
        held = pulled
        assert 256 < held <= READ_AHEAD_BOUND, counts
        # Reading resumes the stream: every request pulled is answered, in order.
        finish.set()
        ids = [answer.request_id for answer in call]
        assert ids == [str(k) for k in range(1, pulled + 1)]
        assert pulled >= held


def test_withheld_consent_change_and_erasure_metrics(own):
    running = start(own, policy={"min_value": 0.2}, metrics_port=0)
    try:
        port = running.metrics_port
        assert port > 0
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = rpb.RecommenderStub(channel)
            withheld = 0
            for c in ("c002", "c003", "c004", "c006"):
                answer = stub.RecommendProducts(
                    pb.RecommendProductsRequest(customer_id=c, limit=10), timeout=10
                )
                withheld += answer.withheld
            assert withheld > 0, "min_value 0.2 withholds some items of these customers"
            assert metric(port, "nextbest_withheld_items_total") == withheld
            consent = consent_pb2_grpc.ConsentStub(channel)

            def set_consent(customer: str, purpose: int, granted: bool) -> bool:
                return consent.SetConsent(
                    consent_pb2.SetConsentRequest(
                        customer_id=customer, purpose=purpose, granted=granted, source="metrics"
                    ),
                    timeout=10,
                ).changed

            sensitive, behavioral = consent_pb2.PURPOSE_SENSITIVE, consent_pb2.PURPOSE_BEHAVIORAL
            assert set_consent("c010", sensitive, False)
            assert not set_consent("c010", sensitive, False)  # the same value: no change
            assert set_consent("c011", sensitive, False)
            assert set_consent("c010", behavioral, True)
            changes = "nextbest_consent_changes_total"
            assert metric(port, changes, purpose="sensitive", granted="false") == 2
            assert metric(port, changes, purpose="behavioral", granted="true") == 1
            assert metric(port, changes, purpose="sensitive", granted="true") == 0
            assert metric(port, changes) == 3
            assert metric(port, "nextbest_erasures_total") == 0
            consent.ForgetCustomer(
                consent_pb2.ForgetCustomerRequest(customer_id="c012", source="metrics"),
                timeout=10,
            )
            assert metric(port, "nextbest_erasures_total") == 1
    finally:
        running.stop(0)


def test_text_logs_are_plain_lines(own):
    env_text = {"NEXTBEST_SERVE__LOG_FORMAT": "text"}
    proc = subprocess.Popen(
        serve_command(own, store_url(own)) + ["--metrics-port", "-1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env_text},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("nextbest serving on "), line
        with grpc.insecure_channel(line.split()[-1]) as channel:
            stub = rpb.RecommenderStub(channel)
            stub.RecommendProducts(pb.RecommendProductsRequest(customer_id="c004"), timeout=10)
            with pytest.raises(grpc.RpcError):
                stub.RecommendProducts(pb.RecommendProductsRequest(customer_id=""), timeout=10)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        lines = proc.stderr.read().splitlines()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert lines, "the server logged nothing"
    for text in lines:
        assert re.match(r"^(DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ", text), text
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    assert sum(text == "INFO nextbest.calls: call" for text in lines) == 2
    assert any(
        text.startswith("WARNING nextbest.server: listening on 127.0.0.1:") for text in lines
    )
    assert "INFO nextbest.server: SIGTERM: draining calls in flight" in lines
    assert not any("c004" in text for text in lines)  # no customer id, in text lines either
