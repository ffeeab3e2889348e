"""Faults with real processes (SPEC §6): a broken publication under a running `nextbest serve`,
`kill -9` of `nextbest train` while it publishes, `kill -9` of the server right after it
acknowledged writes (SQLite and PostgreSQL), and a PostgreSQL store cut off mid-run behind a TCP
proxy: answers fail closed to non-personal ones, writes are UNAVAILABLE, and personal answers come
back when the store does, without a restart. Every process is the real CLI, every kill is SIGKILL
and the outage is a real cut connection; one in-process test
(`test_any_store_read_failing_for_an_answer_makes_it_non_personal`) replaces one store read at a
time with a function that raises the store's error, to fail each read alone."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import PG_URL, serve_command, served_settings, store_url, train
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from nextbest.service import (
    CONSENT_UNAVAILABLE,
    ContentQuery,
    ProductQuery,
    ServedModel,
    store_consent,
)
from nextbest.store.artifacts import (
    current_version,
    list_versions,
    load_bundle,
    set_current,
    sha256_file,
)
from nextbest.store.consent_store import StoreError, open_store
from nextbest.v1 import consent_pb2 as cpb
from nextbest.v1 import consent_pb2_grpc as crpc
from nextbest.v1 import events_pb2 as epb
from nextbest.v1 import events_pb2_grpc as erpc
from nextbest.v1 import recommender_pb2 as pb
from nextbest.v1 import recommender_pb2_grpc as rpb

SERVING = health_pb2.HealthCheckResponse.SERVING
UNAVAILABLE_REASON = pb.NOT_PERSONALIZED_REASON_CONSENT_UNAVAILABLE
SENSITIVE_PRODUCTS = {"p006", "p007"}  # the "pharmacy" category of the served catalog
WAIT_S = 60.0  # generous: a loaded 2-core machine


def wait_until(check, what: str, timeout: float = WAIT_S, every: float = 0.05, explain=str):
    """Poll `check()` until it returns something truthy; fail naming `what` (and `explain()`)
    after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{explain()}")
        time.sleep(every)


# --- a real `nextbest serve` process -------------------------------------------------------------


class Served:
    """`nextbest serve` as a process, its stdout and stderr read by threads (a full pipe never
    blocks it; the test can wait for a log line)."""

    def __init__(self, folder: Path, store: str):
        self.proc = subprocess.Popen(
            serve_command(folder, store),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [
            threading.Thread(target=self._read, args=(self.proc.stdout, self.out), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, self.err), daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        try:
            line = wait_until(
                lambda: (
                    next((x for x in self.out if x.startswith("nextbest serving on ")), None)
                    or self.proc.poll() is not None
                ),
                "the server to start",
            )
            if line is True:
                self._readers[1].join(10)
                pytest.fail(f"server exited at start ({self.proc.returncode}): {self.stderr()}")
            self.address = line.split()[-1]
            self.metrics_port = int(self.wait_log(r"http://[0-9.]+:(\d+)/metrics").group(1))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _read(pipe, lines: list[str]) -> None:
        for line in pipe:
            lines.append(line.rstrip("\n"))

    def stderr(self) -> str:
        return "\n".join(self.err)

    def wait_log(self, pattern: str, since: int = 0, timeout: float = WAIT_S) -> re.Match:
        """The first stderr line from line `since` on that matches `pattern`."""
        regex = re.compile(pattern)

        def find():
            for line in self.err[since:]:
                if m := regex.search(line):
                    return m
            return None

        return wait_until(
            find,
            f"a server log line matching {pattern!r}",
            timeout,
            explain=lambda: "server stderr, last lines:\n" + "\n".join(self.err[-20:]),
        )

    def metric(self, name: str, **labels: str) -> float:
        """The sum of the samples of `name` with these labels, from the /metrics endpoint."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(
            s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(timeout=30) == -signal.SIGKILL

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for reader in self._readers:
            reader.join(10)
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def serving():
    """Start servers with `serving(folder, store)`; every one is killed at the end."""
    started: list[Served] = []

    def start(folder: Path, store: str) -> Served:
        server = Served(folder, store)
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def health(channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status


def recommend(ch: grpc.Channel, customer_id: str, **fields) -> pb.RecommendProductsResponse:
    return rpb.RecommenderStub(ch).RecommendProducts(
        pb.RecommendProductsRequest(customer_id=customer_id, **fields), timeout=30
    )


# --- 1. a broken or partial publication under a running server ----------------------------------


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _edit_manifest(directory: Path, **changes) -> None:
    manifest = json.loads((directory / "manifest.json").read_text())
    for key, value in changes.items():
        if key == "files":
            manifest["files"].update(value)
        else:
            manifest[key] = value
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _truncated_npz(d: Path) -> None:
    """A partial copy: cf.npz cut in half, the manifest as published."""
    _truncate(d / "cf.npz")


def _truncated_npz_checksummed(d: Path) -> None:
    """items.npz cut in half and a manifest that says so: the bytes must fail to load, not the
    checksum."""
    _truncate(d / "items.npz")
    _edit_manifest(d, files={"items.npz": sha256_file(d / "items.npz")})


def _truncated_parquet_checksummed(d: Path) -> None:
    _truncate(d / "catalog.parquet")
    _edit_manifest(d, files={"catalog.parquet": sha256_file(d / "catalog.parquet")})


def _no_manifest(d: Path) -> None:
    """Copied without its last file (the manifest is written last)."""
    (d / "manifest.json").unlink()


def _half_a_manifest(d: Path) -> None:
    _truncate(d / "manifest.json")


def _wrong_format(d: Path) -> None:
    _edit_manifest(d, format=99)


def _missing_directory(d: Path) -> None:
    shutil.rmtree(d)


BROKEN = {
    "truncated-npz": _truncated_npz,
    "truncated-npz-checksummed": _truncated_npz_checksummed,
    "truncated-parquet-checksummed": _truncated_parquet_checksummed,
    "no-manifest": _no_manifest,
    "half-a-manifest": _half_a_manifest,
    "wrong-format": _wrong_format,
    "missing-directory": _missing_directory,
}


def test_a_broken_publication_is_refused_and_a_good_one_picked_up(own, serving):
    models = own / "models"
    good = current_version(models)
    server = serving(own, store_url(own))
    failures = "nextbest_model_reload_failures_total"
    with grpc.insecure_channel(server.address) as channel:
        assert recommend(channel, "c004").model_version == good
        before = server.metric(failures)
        refused = [f"29990101T0000{k:02d}000Z-{kind}" for k, kind in enumerate(BROKEN, 1)]
        for k, (version, breaker) in enumerate(zip(refused, BROKEN.values(), strict=True), 1):
            shutil.copytree(models / good, models / version)
            _edit_manifest(models / version, version=version)  # a copy under its own name
            breaker(models / version)
            mark = len(server.err)
            set_current(models, version)  # atomically, as a publisher does
            line = server.wait_log(rf"refused.*{re.escape(version)}", since=mark).string
            assert good in line, line  # and says what is still served
            assert server.metric(failures) == before + k, version
            resp = recommend(channel, "c004")
            assert resp.model_version == good and resp.personalized, version
            assert health(channel) == SERVING, version
        # Refused once each, not retried every watcher round (0.2 s): let a few rounds pass.
        time.sleep(1.0)
        for version in refused:
            assert sum(version in x and "refused" in x for x in server.err) == 1, version
        assert server.metric(failures) == before + len(BROKEN)
        assert "Traceback" not in server.stderr()

        new = train(own, models)  # a good publication by the real trainer
        assert new not in (good, *refused)
        wait_until(lambda: recommend(channel, "c004").model_version == new, f"model {new}")
        assert recommend(channel, "c004").personalized
        assert health(channel) == SERVING
        assert server.metric("nextbest_model_info", version=new) == 1.0
        assert server.metric(failures) == before + len(BROKEN)


# --- 2. kill -9 of the trainer while it trains and publishes -------------------------------------


def _train_cmd(folder: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "nextbest.cli",
        "train",
        "--config",
        str(folder / "nextbest.toml"),
        "--events",
        str(folder / "events.parquet"),
        "--catalog",
        str(folder / "catalog.csv"),
        "--content",
        str(folder / "content.csv"),
        "--models-dir",
        str(folder / "models"),
    ]


def _kill_trainer(folder: Path, moment: str) -> tuple[bool, bool, str]:
    """Run the real trainer and SIGKILL it at `moment`: `reading` (it has read the events),
    `fitting` (the first ALS fit is done), `staging` (its `.tmp-<version>-<pid>` directory
    exists) or `renamed` (a new version directory exists; CURRENT may or may not have moved).
    Returns (killed — False when it finished first —, its staging directory was left behind,
    what it printed)."""
    models = folder / "models"
    before = {p.name for p in models.iterdir()}
    proc = subprocess.Popen(
        _train_cmd(folder),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # each line as soon as it is printed
    )
    lines: queue.Queue = queue.Queue()
    output: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()

    def wait_line(text: str) -> bool:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            if line is None:
                return False
            if text in line:
                return True
        pytest.fail(f"trainer printed no line with {text!r}")

    def spin(found) -> None:
        """Busy-poll the models directory (the window is milliseconds) and kill on `found`."""
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if found(os.listdir(models)):
                os.kill(proc.pid, signal.SIGKILL)
                return

    try:
        trigger = {
            "reading": "events.parquet: read",
            "fitting": "validation NDCG",
            "staging": "content snapshot",  # printed just before publish() starts
            "renamed": "content snapshot",
        }[moment]
        if wait_line(trigger):
            if moment in ("reading", "fitting"):
                os.kill(proc.pid, signal.SIGKILL)
            elif moment == "staging":
                mine = f"-{proc.pid}"
                spin(lambda names: any(n.startswith(".tmp-") and n.endswith(mine) for n in names))
            else:
                spin(lambda names: any(not n.startswith(".") for n in set(names) - before))
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(10)
        proc.stdout.close()
    staged = any(p.name.endswith(f"-{proc.pid}") for p in models.glob(".tmp-*"))
    return proc.returncode == -signal.SIGKILL, staged, "".join(output[-20:])


def test_kill_9_of_the_trainer_never_leaves_current_on_a_broken_model(own, serving):
    models = own / "models"
    versions = {current_version(models)}
    killed_while_staging = 0
    # Staging last: each publication first removes the staging directories of dead trainers.
    plan = ["reading", "fitting", "renamed", "staging"]
    attempts = {"staging": 0}
    log: list[tuple] = []
    while plan:
        moment = plan.pop(0)
        killed, staged, output = _kill_trainer(own, moment)
        current = current_version(models)
        # CURRENT names a complete version that loads, whatever the moment of the kill.
        bundle = load_bundle(models, current)
        assert bundle.version == current and bundle.shape[0] > 0, moment
        if moment in ("reading", "fitting"):
            assert killed and not staged, (moment, output)
            assert current in versions, moment  # nothing published
        elif moment == "staging":
            attempts["staging"] += 1
            killed_while_staging += killed and staged
            assert killed or not staged, output
            if killed and staged:
                assert current in versions  # the staged version was never pointed at
            elif attempts["staging"] < 5:
                plan.append("staging")  # finished or renamed before the kill: try again
        versions.add(current)
        log.append((moment, killed, staged, current))
        # No half-written version is visible (the rename is atomic), and every version loads.
        visible = [d for d in models.iterdir() if d.is_dir() and not d.name.startswith(".")]
        assert all((d / "manifest.json").is_file() for d in visible), moment
        assert len(list_versions(models)) == len(visible)
        for v in list_versions(models):
            load_bundle(models, v["version"])
    print("trainer kills (moment, killed, staging left, CURRENT):", *log, sep="\n  ")
    assert killed_while_staging >= 1, "never caught the trainer with its staging directory"
    stale = list(models.glob(".tmp-*"))
    assert stale  # the dead trainer's staging directory is still there...

    server = serving(own, store_url(own))
    with grpc.insecure_channel(server.address) as channel:
        assert health(channel) == SERVING
        resp = recommend(channel, "c004")
        assert resp.model_version == current_version(models) and resp.personalized

        new = train(own, models)  # ...until the next successful publication removes it
        assert not list(models.glob(".tmp-*"))
        assert current_version(models) == new and load_bundle(models).version == new
        wait_until(lambda: recommend(channel, "c004").model_version == new, f"model {new}")


# --- 3. acknowledged writes survive kill -9 of the server ---------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"])
def store_of(request, own):
    if request.param == "sqlite":
        return store_url(own)
    return f"{PG_URL}?schema={request.getfixturevalue('pg_schema')}"


def test_acknowledged_writes_survive_kill_9_of_the_server(own, store_of, serving):
    newcomer = "newcomer-after-kill"  # unknown to the model: personal from recorded purchases
    withdrawn = [f"c{k:03d}" for k in range(10, 20)]
    server = serving(own, store_of)
    with grpc.insecure_channel(server.address) as channel:
        assert recommend(channel, withdrawn[0]).personalized
        assert not recommend(channel, newcomer).personalized
        consent = crpc.ConsentStub(channel)
        for customer in withdrawn:
            ack = consent.SetConsent(
                cpb.SetConsentRequest(
                    customer_id=customer,
                    purpose=cpb.PURPOSE_PERSONALIZATION,
                    granted=False,
                    source="kill-test",
                ),
                timeout=30,
            )
            assert ack.changed
        forgot = consent.ForgetCustomer(
            cpb.ForgetCustomerRequest(customer_id="c021", source="kill-test"), timeout=30
        )
        assert not forgot.already_erased
        recorded = erpc.EventsStub(channel).RecordEvents(
            epb.RecordEventsRequest(
                events=[
                    epb.Event(customer_id=newcomer, product_id="p002", event_type="purchase"),
                    epb.Event(customer_id=newcomer, product_id="p004", event_type="purchase"),
                ]
            ),
            timeout=30,
        )
        assert recorded.recorded == 2
        server.kill9()  # at once after the last acknowledgement

    store = open_store(store_of)
    try:
        for customer in withdrawn:
            record = store.get_consent(customer)["personalization"]
            assert not record.granted and record.source == "kill-test", customer
        assert "c021" in store.tombstones()
        events = store.events([newcomer])
        assert sorted(events["product_id"].to_pylist()) == ["p002", "p004"]
    finally:
        store.close()

    again = serving(own, store_of)
    with grpc.insecure_channel(again.address) as channel:
        consent = crpc.ConsentStub(channel)
        for customer in withdrawn:
            got = consent.GetConsent(cpb.GetConsentRequest(customer_id=customer), timeout=30)
            value = next(v for v in got.consents if v.purpose == cpb.PURPOSE_PERSONALIZATION)
            assert not value.granted and value.source == "kill-test", customer
            resp = recommend(channel, customer)
            assert resp.not_personalized_reason == pb.NOT_PERSONALIZED_REASON_NO_CONSENT
        assert consent.GetConsent(cpb.GetConsentRequest(customer_id="c021"), timeout=30).erased
        assert recommend(channel, "c021").not_personalized_reason == (
            pb.NOT_PERSONALIZED_REASON_ERASED
        )
        resp = recommend(channel, newcomer)
        assert resp.personalized  # folded in from the two recorded purchases
        assert {"p002", "p004"}.isdisjoint(i.product_id for i in resp.items)


# --- 4. the store unreachable: fail closed, then recover ----------------------------------------


class StoreProxy:
    """A TCP proxy 127.0.0.1:<port> → `target` in threads; `cut()` closes the listener and every
    forwarded connection (the store is gone: connections refused), `restore()` listens again on
    the same port."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.port = 0
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._acceptor: threading.Thread | None = None

    def start(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.settimeout(0.05)
        self.port = listener.getsockname()[1]
        self._stop.clear()
        self._acceptor = threading.Thread(target=self._accept, args=(listener,), daemon=True)
        self._acceptor.start()

    restore = start

    def _accept(self, listener: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                try:
                    client, _ = listener.accept()
                except TimeoutError:
                    continue
                try:
                    upstream = socket.create_connection(self.target, timeout=10)
                except OSError:
                    client.close()
                    continue
                client.settimeout(None)
                upstream.settimeout(None)
                with self._lock:
                    self._sockets |= {client, upstream}
                for a, b in ((client, upstream), (upstream, client)):
                    pump = threading.Thread(target=self._pump, args=(a, b), daemon=True)
                    pump.start()
                    self._threads.append(pump)
        finally:
            listener.close()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                self._close(s)

    def _close(self, s: socket.socket) -> None:
        with self._lock:
            if s not in self._sockets:
                return
            self._sockets.discard(s)
        try:
            s.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        s.close()

    def cut(self) -> None:
        self._stop.set()
        self._acceptor.join(10)  # the listener is closed: new connections are refused
        with self._lock:
            open_sockets = list(self._sockets)
        for s in open_sockets:
            self._close(s)
        for pump in self._threads:
            pump.join(10)
        self._threads = []

    def close(self) -> None:
        if not self._stop.is_set():
            self.cut()


@pytest.fixture
def proxied_store(pg_schema):
    pg = urllib.parse.urlsplit(PG_URL)
    proxy = StoreProxy((pg.hostname or "127.0.0.1", pg.port or 5432))
    proxy.start()
    user = f"{pg.username}@" if pg.username else ""
    through = pg._replace(netloc=f"{user}127.0.0.1:{proxy.port}", query=f"schema={pg_schema}")
    yield proxy, through.geturl()
    proxy.close()


def _code(call, request) -> tuple[grpc.StatusCode, str, float]:
    started = time.perf_counter()
    try:
        call(request, timeout=30)
    except grpc.RpcError as exc:
        return exc.code(), exc.details(), time.perf_counter() - started
    return grpc.StatusCode.OK, "", time.perf_counter() - started


def test_store_outage_fails_closed_and_recovers_without_a_restart(
    own, proxied_store, serving, monkeypatch
):
    proxy, url = proxied_store
    # Twelve calls side by side below, each waiting on the store: admission control would refuse
    # some (tests/test_admission.py covers that); here they must all run.
    monkeypatch.setenv("NEXTBEST_SERVE__MAX_RUNNING_CALLS", "16")
    server = serving(own, url)
    customers = [f"c{k:03d}" for k in range(2, 40)]
    content = pb.ScoreContentRequest(
        customer_id="c004",
        candidates=[
            pb.ContentCandidate(content_id="guide-pantry"),
            pb.ContentCandidate(content_id="guide-pharmacy"),
        ],
    )
    web = {"limit": 40, "channel": pb.CHANNEL_WEB}  # least exposed: sensitive items shown
    similar = pb.SimilarProductsRequest(product_ids=["p004"], customer_id="c004", limit=40)
    with grpc.insecure_channel(server.address) as channel:
        stub = rpb.RecommenderStub(channel)
        consent = crpc.ConsentStub(channel)
        events = erpc.EventsStub(channel)
        # Calls side by side fill the store's connection pool: idle connections that all die
        # with the cut, and must not be reused once the store is back.
        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(lambda c: recommend(channel, c, **web), customers * 2))
        assert all(a.personalized for a in answers)
        shows_sensitive = [
            a.customer_id
            for a in answers
            if any(i.product_id in SENSITIVE_PRODUCTS for i in a.items)
        ]
        assert shows_sensitive  # with consent (the default allows), some see pharmacy products
        assert stub.ScoreContent(content, timeout=30).personalized
        items = stub.SimilarProducts(similar, timeout=30).items
        assert SENSITIVE_PRODUCTS & {i.product_id for i in items}
        mark = len(server.err)

        proxy.cut()
        timings: dict[str, float] = {}
        # Answers: non-personal, saying why, never sensitive, never an error.
        for customer in [*shows_sensitive[:3], "c004"]:
            started = time.perf_counter()
            resp = recommend(channel, customer, **web)
            timings.setdefault("RecommendProducts", time.perf_counter() - started)
            assert not resp.personalized, customer
            assert resp.not_personalized_reason == UNAVAILABLE_REASON, customer
            assert any("consent store could not be read" in d for d in resp.decisions)
            assert resp.items and not SENSITIVE_PRODUCTS & {i.product_id for i in resp.items}
        started = time.perf_counter()
        scored = stub.ScoreContent(content, timeout=30)
        timings["ScoreContent"] = time.perf_counter() - started
        assert not scored.personalized and scored.not_personalized_reason == UNAVAILABLE_REASON
        relevance = {s.content_id: s.relevance for s in scored.items}
        assert relevance["guide-pharmacy"] == 0.0 and relevance["guide-pantry"] > 0
        started = time.perf_counter()
        streamed = list(
            stub.StreamRecommendations(
                iter(pb.RecommendProductsRequest(customer_id=c) for c in customers[:20]),
                timeout=60,
            )
        )
        timings["StreamRecommendations (20)"] = time.perf_counter() - started
        assert [r.customer_id for r in streamed] == customers[:20]
        assert all(not r.HasField("error") for r in streamed)
        assert all(
            not r.personalized and r.not_personalized_reason == UNAVAILABLE_REASON for r in streamed
        )
        items = stub.SimilarProducts(similar, timeout=30).items
        assert items and not SENSITIVE_PRODUCTS & {i.product_id for i in items}
        # Writes and consent reads: UNAVAILABLE with a clear message, never INTERNAL or UNKNOWN.
        writes = {
            "SetConsent": (
                consent.SetConsent,
                cpb.SetConsentRequest(
                    customer_id="c004",
                    purpose=cpb.PURPOSE_SENSITIVE,
                    granted=False,
                    source="outage-test",
                ),
            ),
            "GetConsent": (consent.GetConsent, cpb.GetConsentRequest(customer_id="c004")),
            "ForgetCustomer": (
                consent.ForgetCustomer,
                cpb.ForgetCustomerRequest(customer_id="c005", source="outage-test"),
            ),
            "RecordEvents": (
                events.RecordEvents,
                epb.RecordEventsRequest(events=[epb.Event(customer_id="c004", product_id="p002")]),
            ),
        }
        for name, (call, request) in writes.items():
            code, details, took = _code(call, request)
            timings[name] = took
            assert code == grpc.StatusCode.UNAVAILABLE, (name, code, details)
            assert details.startswith("consent store unavailable"), (name, details)
        # A model published meanwhile waits for the store (its tombstones are read at load):
        # one log line, the old model keeps serving, the new one loads once the store is back.
        models = own / "models"
        served = recommend(channel, "c004").model_version
        waiting = "29990101T000000000Z-published-in-outage"
        shutil.copytree(models / served, models / waiting)
        _edit_manifest(models / waiting, version=waiting)
        set_current(models, waiting)
        server.wait_log(rf"model {waiting} not loaded yet: the store cannot be read", since=mark)
        time.sleep(0.6)  # a few watcher rounds: one line, not one per round
        assert sum(waiting in x for x in server.err[mark:]) == 1
        assert recommend(channel, "c004").model_version == served
        # Health stays SERVING: the server answers every Recommender call (non-personal); a
        # NOT_SERVING would take every replica sharing this store out of a load balancer.
        assert health(channel) == SERVING
        assert server.metric("nextbest_non_personal_answers_total", reason=CONSENT_UNAVAILABLE) >= (
            4 + 20
        )
        logged = server.wait_log(r"consent store unreadable", since=mark).string
        outage_lines = [x for x in server.err[mark:] if "consent store" in x]
        assert not any(re.search(r"\bc0\d\d\b", x) for x in outage_lines), outage_lines
        # No wall-clock bound here (a loaded machine is slow): a write that hung instead of
        # failing closed would end DEADLINE_EXCEEDED at its 30 s deadline, not UNAVAILABLE.
        print(f"store cut: {logged}\nanswer times: {timings}")

        proxy.restore()
        # The very first call after the store is back is personal again, without a restart.
        back = recommend(channel, "c004")
        assert back.personalized, (back.not_personalized_reason, server.stderr()[-2000:])
        assert stub.ScoreContent(content, timeout=30).personalized
        name, (call, request) = next(iter(writes.items()))
        assert _code(call, request)[0] == grpc.StatusCode.OK, name
        assert all(
            r.personalized
            for r in stub.StreamRecommendations(
                iter(pb.RecommendProductsRequest(customer_id=c) for c in customers[:20]),
                timeout=60,
            )
        )
        server.wait_log(r"consent store readable again", since=mark)
        wait_until(
            lambda: recommend(channel, "c004").model_version == waiting,
            "the new model",
            explain=lambda: "\n".join(x for x in server.err[mark:] if '"call"' not in x)[-3000:],
        )
        assert health(channel) == SERVING
    store = open_store(url)
    try:
        assert not store.get_consent("c004")["sensitive"].granted  # the write after the restore
        assert "c005" not in store.tombstones()  # the refused erasure left nothing
    finally:
        store.close()


def test_the_store_replaces_pooled_connections_the_database_closed(pg_schema):
    """As after a PostgreSQL restart or failover: every pooled connection is terminated by the
    server while idle; the next call must succeed on a new one, not fail on a dead one."""
    import psycopg

    name = f"nextbest-faults-{uuid.uuid4().hex[:8]}"
    store = open_store(f"{PG_URL}?schema={pg_schema}&application_name={name}")
    try:
        with ThreadPoolExecutor(6) as pool:  # several idle connections in the pool
            list(pool.map(lambda k: store.events([f"c{k:03d}"]), range(30)))
        with psycopg.connect(PG_URL, autocommit=True) as admin:
            sessions = "FROM pg_stat_activity WHERE application_name = %s"
            killed = admin.execute(f"SELECT pg_terminate_backend(pid) {sessions}", (name,))
            assert len(killed.fetchall()) >= 2
            wait_until(
                lambda: admin.execute(f"SELECT count(*) {sessions}", (name,)).fetchone()[0] == 0,
                "the terminated sessions to end",
            )
        for k in range(8):  # each of these would take a dead connection without the check
            store.set_consent(f"c{k:03d}", "sensitive", False, source="restart-test")
            assert not store.get_consent(f"c{k:03d}")["sensitive"].granted
    finally:
        store.close()


# --- the fail-closed rule without a server --------------------------------------------------------


def _failing(*args, **kwargs):
    raise StoreError("postgresql://store: server closed the connection unexpectedly")


@pytest.mark.parametrize("broken", [None, "consent", "events", "impressions"])
def test_any_store_read_failing_for_an_answer_makes_it_non_personal(workdir, broken):
    """Each store read of the answer path failing alone (consent readable, the events or the
    impressions read failing included) makes the answer non-personal; None: all readable."""
    settings = served_settings(workdir, workdir / "models").with_overrides(
        "policy",
        fatigue_demotion=0.5,  # fatigue on: the impressions are read
    )
    store = open_store(store_url(workdir))
    try:
        sources = {
            "consent": store_consent(store, default_allow=True),
            "events": store.events,
            "impressions": store.unanswered_impressions,
        }
        if broken:
            sources[broken] = _failing
        model = ServedModel(
            load_bundle(workdir / "models"),
            settings,
            sources["consent"],
            events=sources["events"],
            impressions=sources["impressions"],
        )
        queries = [ProductQuery(customer_id=c, limit=20) for c in ("c002", "c004", "nobody")]
        answers = model.recommend(queries)
        content = model.score_content("c004", [ContentQuery(content_id="guide-home")])
        similar, _ = model.similar(["p004"], 40, customer_id="c004")
        shows_sensitive = bool(SENSITIVE_PRODUCTS & {i.product_id for i in similar})
        if broken is None:
            assert [a.personalized for a in answers] == [True, True, False]
            assert content.personalized and shows_sensitive
            return
        assert [a.not_personalized_reason for a in answers] == [CONSENT_UNAVAILABLE] * 3
        assert all(not a.personalized and a.items for a in answers)
        assert not any(
            model.sensitivity[model.bundle.item_index(np.asarray([i.product_id]))[0]] > 0
            for a in answers
            for i in a.items
        )
        # ScoreContent and SimilarProducts read consent only.
        assert content.personalized == shows_sensitive == (broken != "consent")
        if broken == "consent":
            assert content.not_personalized_reason == CONSENT_UNAVAILABLE
    finally:
        store.close()
