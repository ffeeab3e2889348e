"""`serve.processes`: several server processes on one port, through the real `nextbest serve`.

Calls on separate connections reach both processes; the supervisor's /metrics sums them; a newly
published model reaches every process; a killed process is replaced; SIGTERM drains them all and
nothing is left running.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from conftest import serve_command, store_url, train

from nextbest.client import Client
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb

PROCESSES = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Supervised:
    """`nextbest serve` with `serve.processes = 2`; its stderr (JSON logs) read in a thread."""

    def __init__(self, folder: Path, port: int = 0):
        self.metrics_port = free_port()
        env = {**os.environ, "NEXTBEST_SERVE__PROCESSES": str(PROCESSES)}
        cmd = serve_command(folder, store_url(folder)) + ["--metrics-port", str(self.metrics_port)]
        cmd += ["--port", str(port)]  # the last --port wins (serve_command's is 0)
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self.lines: list[dict] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        line = self.proc.stdout.readline()
        if not line.startswith("nextbest serving on "):
            self.close()
            pytest.fail(f"server did not start: {line!r} {self.lines[-3:]}")
        self.address = line.split()[-1]

    def _read(self) -> None:
        for raw in self.proc.stderr:
            try:
                self.lines.append(json.loads(raw))
            except json.JSONDecodeError:
                self.lines.append({"msg": raw.rstrip()})

    def call(self, customer: str = "c003") -> pb.RecommendProductsResponse:
        """One call on a connection of its own (not shared through grpc's subchannel pool)."""
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(self.address, options=options) as channel:
            return rpb.RecommenderStub(channel).RecommendProducts(
                pb.RecommendProductsRequest(customer_id=customer), timeout=10
            )

    def call_pids(self) -> list[int]:
        return [x["pid"] for x in list(self.lines) if x.get("msg") == "call"]

    def metric(self, name: str, **labels: str) -> float:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        text = urllib.request.urlopen(url, timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.index("}")]))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(15)  # EOF once the children (which share the pipe) are gone too
        self.proc.stdout.close()
        self.proc.stderr.close()


def wait_for(condition, timeout: float = 30.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie that no one has reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def test_processes_share_one_port_metrics_swap_restart_and_drain(own):
    server = Supervised(own)
    try:
        calls = 40
        for _ in range(calls):
            assert server.call().personalized
        wait_for(lambda: len(server.call_pids()) >= calls, 10, "the call log lines")
        pids = set(server.call_pids())
        assert len(pids) == PROCESSES, pids  # the kernel spread the connections over both
        assert server.proc.pid not in pids  # the supervisor answers nothing itself
        method = "/nextbest.v1.Recommender/RecommendProducts"
        assert server.metric("nextbest_rpc_calls_total", method=method, code="OK") == calls

        # A model published while serving reaches every process (each watches CURRENT).
        old = server.call().model_version
        new = train(own, own / "models")
        assert new != old
        wait_for(
            lambda: all(server.call().model_version == new for _ in range(10)), 60, "the new model"
        )
        wait_for(lambda: server.metric("nextbest_model_info", version=new) == 1.0, 10, "metric")

        # A process that dies is replaced; the other one answers meanwhile. A connection made at
        # the moment of death can be reset (UNAVAILABLE): the client's retry policy covers it.
        victim = sorted(pids)[0]
        os.kill(victim, signal.SIGKILL)
        with Client(server.address, attempts=5) as client:
            assert all(client.recommend("c003").personalized for _ in range(20))
        wait_for(
            lambda: any("starting another" in x.get("msg", "") for x in list(server.lines)),
            10,
            "the restart",
        )
        before = len(server.call_pids())
        wait_for(
            lambda: (
                server.call().personalized and len(set(server.call_pids()[before:]) - pids) == 1
            ),
            60,
            "the replacement to answer",
        )
        children = set(server.call_pids()) - {victim}
        assert len(children) == PROCESSES

        # SIGTERM drains every process, and nothing is left running.
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=30) == 0
        wait_for(lambda: not any(alive(p) for p in children), 10, "the children to exit")
    finally:
        server.close()


def test_a_killed_supervisor_takes_its_processes_with_it(own):
    server = Supervised(own)
    try:
        for _ in range(20):
            server.call()
        wait_for(lambda: len(set(server.call_pids())) == PROCESSES, 10, "both processes")
        children = set(server.call_pids())
        os.kill(server.proc.pid, signal.SIGKILL)
        wait_for(lambda: not any(alive(p) for p in children), 10, "the orphans to die")
    finally:
        server.close()


def test_a_killed_supervisor_starts_again_on_its_port_at_once(own):
    """A replica restarted right after kill -9, on the port its clients know: the connections
    that were open when it died linger in TIME_WAIT on that port (closed from the server's side)
    and must not keep the new server from listening."""
    server = Supervised(own)
    port = int(server.address.rsplit(":", 1)[1])
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [grpc.insecure_channel(server.address, options=options) for _ in range(4)]
    again = None
    try:
        for channel in channels:  # connections open at the kill
            rpb.RecommenderStub(channel).RecommendProducts(
                pb.RecommendProductsRequest(customer_id="c003"), timeout=10
            )
        os.kill(server.proc.pid, signal.SIGKILL)
        server.close()
        again = Supervised(own, port)
        assert again.address == server.address
        assert again.call().items
    finally:
        for channel in channels:
            channel.close()
        server.close()
        if again is not None:
            again.close()


def test_bad_process_count_is_a_one_line_error():
    done = subprocess.run(
        [sys.executable, "-m", "nextbest.cli", "serve"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NEXTBEST_SERVE__PROCESSES": "-2"},
    )
    assert done.returncode == 2
    assert "serve.processes must be >= 0" in done.stderr
    assert "Traceback" not in done.stderr


def client_config(folder: Path, name: str, token: str) -> None:
    """The folder's config with one client holding `token` (plaintext, tokens still needed)."""
    from nextbest.auth import token_sha256

    base = (folder / "nextbest.toml").read_text().split("[[serve.clients]]")[0]
    (folder / "nextbest.toml").write_text(
        base
        + f'[[serve.clients]]\nname = "{name}"\ntoken_sha256 = "{token_sha256(token)}"\n'
        + 'roles = ["recommend"]\n'
    )


def test_sighup_rotates_tokens_in_every_process_without_dropping_a_call(own):
    from nextbest.auth import new_token

    old, new = new_token(), new_token()
    client_config(own, "web-old", old)
    server = Supervised(own)

    def call(token: str, customer: str = "c003"):
        options = [("grpc.use_local_subchannel_pool", 1)]
        with grpc.insecure_channel(server.address, options=options) as channel:
            return rpb.RecommenderStub(channel).RecommendProducts(
                pb.RecommendProductsRequest(customer_id=customer),
                metadata=(("authorization", f"Bearer {token}"),),
                timeout=10,
            )

    def refused(token: str) -> bool:
        try:
            call(token)
        except grpc.RpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    try:
        assert all(call(old).personalized for _ in range(10))
        assert refused(new)
        # A stream opened with the old token before the rotation...
        options = [("grpc.use_local_subchannel_pool", 1)]
        channel = grpc.insecure_channel(server.address, options=options)
        slow = threading.Event()

        def requests():
            for k in range(30):
                yield pb.RecommendProductsRequest(customer_id=f"c{k % 40 + 2:03d}")
                if k == 5:
                    slow.wait(10)

        stream = rpb.RecommenderStub(channel).StreamRecommendations(
            requests(), metadata=(("authorization", f"Bearer {old}"),), timeout=60
        )
        first = next(stream)
        client_config(own, "web-new", new)
        server.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: (
                sum("SIGHUP: 1 clients (web-new)" in x.get("msg", "") for x in server.lines)
                == PROCESSES
            ),
            20,
            "every process to reload",
        )
        # ...finishes after it: calls in flight keep the verdict they started with.
        slow.set()
        assert len([first, *stream]) == 30
        channel.close()
        for _ in range(10):  # fresh connections reach both processes
            assert refused(old)
            assert call(new).personalized
        # A config that does not load changes nothing.
        (own / "nextbest.toml").write_text("[serve\\nbroken")
        server.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: (
                sum("the clients stay as they were" in x.get("msg", "") for x in server.lines)
                == PROCESSES
            ),
            20,
            "the refusal",
        )
        assert call(new).personalized
    finally:
        server.close()
