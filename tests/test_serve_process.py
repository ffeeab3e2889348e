"""`nextbest serve` as a real process: start-up, SIGTERM drains calls in flight, bad arguments."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import store_url
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def start_server(workdir: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nextbest.cli",
            "serve",
            "--config",
            str(workdir / "nextbest.toml"),
            "--models-dir",
            str(workdir / "models"),
            "--port",
            "0",
            "--store",
            store_url(workdir),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = proc.stdout.readline()
    if not line.startswith("nextbest serving on "):
        stop(proc)
        pytest.fail(f"server did not start: {line!r}")
    return proc, line.split()[-1]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def test_sigterm_drains_a_stream_in_flight(own):
    # Its own copy of the store: the impressions this server records must not reach the
    # session's store (they made tests/test_events.py's fatigue test fail when run after it).
    proc, address = start_server(own)
    sent = threading.Event()

    def slow_requests():
        for k in range(60):
            yield pb.RecommendProductsRequest(customer_id=f"c{k % 80:03d}", request_id=str(k))
            if k == 10:
                sent.set()
            time.sleep(0.02)

    health_seen = []  # (status, time) of each health update

    def watch_health(channel):
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest())
        try:
            for update in watch:
                health_seen.append((update.status, time.monotonic()))
                if update.status == NOT_SERVING:
                    watch.cancel()  # an open watch would hold the drain for serve.grace_s
        except grpc.RpcError:
            pass  # cancelled

    try:
        with grpc.insecure_channel(address) as channel:
            stub = rpb.RecommenderStub(channel)
            watcher = threading.Thread(target=watch_health, args=(channel,), daemon=True)
            watcher.start()
            responses = stub.StreamRecommendations(slow_requests(), timeout=30)
            assert sent.wait(10)
            proc.send_signal(signal.SIGTERM)
            got = []
            for r in responses:
                got.append(r.request_id)
                last_answer = time.monotonic()
            assert got == [str(k) for k in range(60)]
            # Health went NOT_SERVING while the stream was still being answered (draining).
            watcher.join(30)
            statuses = [status for status, _ in health_seen]
            assert statuses[:1] == [SERVING] and NOT_SERVING in statuses, statuses
            went_down = next(t for status, t in health_seen if status == NOT_SERVING)
            assert went_down < last_answer
            # Once drained the server is gone: new calls are refused, never half-answered.
            with pytest.raises(grpc.RpcError) as info:
                for _ in range(50):
                    stub.RecommendProducts(
                        pb.RecommendProductsRequest(customer_id="c001"), timeout=2
                    )
                    time.sleep(0.1)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert proc.wait(timeout=20) == 0
        assert "SIGTERM: draining calls in flight" in proc.stderr.read()
    finally:
        stop(proc)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--port", "70000"], "--port: must be within 0..65535"),
        (["--port", "http"], "--port: not a port number"),
        (["--config", "/nonexistent/nextbest.toml"], "config: file /nonexistent/nextbest.toml"),
        (["--default-consent", "maybe"], "--default-consent: invalid choice"),
    ],
)
def test_serve_bad_arguments_are_one_line_errors(args, message):
    done = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_consent_import_refuses_an_unreadable_consent_file(tmp_path):
    bad = tmp_path / "consent.csv"
    bad.write_text("customer_id,purpose\nc1,sensitive\n")
    store = f"sqlite:///{tmp_path / 'store.db'}"
    done = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "consent", "import", str(bad), "--store", store],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"error: {bad}: missing required column 'granted'" in done.stderr
    assert "Traceback" not in done.stderr
