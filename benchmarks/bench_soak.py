"""make bench-soak: a real `nextbest serve` under steady mixed traffic for five minutes (issue #5).

Two model versions are trained up front into `<work-dir>/models` (ALS only, no tuning), both on
every event with different seeds (a retrain of the same size, so that resident memory before and
after the swap compares). The server starts on the older one, as a subprocess, plaintext
(`serve.insecure`), with a fresh SQLite store; this process is its client. It sends an open-loop
schedule of calls at a fixed rate (the n-th operation is sent at n / rate seconds whether or not
earlier calls have returned):

- RecommendProducts on the email, web and app channels, one customer in ten unknown to the model
  (best sellers: a non-personal answer is an OK answer);
- ScoreContent (guides of the model's content snapshot and an inline candidate);
- SimilarProducts;
- Events.RecordEvents (purchases and views, known and unknown customers);
- Consent.SetConsent: one of a set of customers grants or withdraws personalization, behavioral or
  sensitive consent, then a RecommendProducts call checks the change acted (no personalization
  after a withdrawal, no sensitive product without sensitive consent);
- Admin.GetModelInfo;
- twice a minute, at fixed seconds, one StreamRecommendations call of a few hundred customers;
- once, half way, `nextbest models promote <newer version>`; the server's watcher loads it and
  GetModelInfo is polled until it names the new version; answers sent after that must come from
  it.

Per minute: calls, failed calls (any status other than OK, a stream answer with `error` set),
p50 / p99 latency of the unary calls at the client, how late the client sent (the schedule
held?), the server's CPU share and, sampled every 5 s from /proc, its resident memory (VmRSS),
threads and open files; from the server's access log, its own p99. The figures: failed calls
(aim 0), the p99 of the last minute against the first, resident memory growth from the end of
minute 1 to the end (aim < 10%). `--write` replaces the `## make bench-soak` section of
BENCHMARKS.md (a `### Notes` part written by hand is kept); the samples go to
`<work-dir>/samples.json`, the server's log to `<work-dir>/server.log`. Exits 1 when a call
failed, an answer was wrong, the swap did not happen or the server died. For diagnosis:
`--no-swap`, `--server-env MALLOC_ARENA_MAX=2` (the server's environment).

    python benchmarks/bench_soak.py --events data/complete-journey/events.parquet \\
        --catalog data/complete-journey/catalog.parquet \\
        --content data/complete-journey/content.parquet [--minutes 5] [--rate 50] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
# Shared server handling and report helpers; the sensitive categories of the privacy audit.
from audit_privacy import (  # noqa: E402
    SENSITIVE_CATEGORIES,
    SENSITIVE_DEPARTMENTS,
    sensitive_products,
    toml_list,
)
from bench_serve import (  # noqa: E402
    DATA_NAMES,
    ServerProcess,
    _wrap,
    machine,
    nextbest_cli,
    serve_command,
    train_command,
    wait_serving,
    write_section,
)

SECTION = "## make bench-soak"
SEEDS = (42, 43)
"""Both versions are trained on every event, with these seeds: a retrain of the same size, so
that the server's resident memory before and after the swap compares (a newer model trained on
more events is larger, and its size would read as growth)."""
MIX = {
    "RecommendProducts": 0.60,
    "ScoreContent": 0.13,
    "SimilarProducts": 0.06,
    "RecordEvents": 0.12,
    "SetConsent": 0.06,
    "GetModelInfo": 0.03,
}
"""Shares of the scheduled operations (a SetConsent operation is two calls: the change and a
RecommendProducts check)."""
CHANNELS = ("CHANNEL_EMAIL", "CHANNEL_WEB", "CHANNEL_APP")
UNKNOWN_SHARE = 0.1
"""RecommendProducts / ScoreContent calls for customers the model does not know."""
UNKNOWN_CUSTOMERS = 300
"""Distinct unknown customer ids (some get recorded purchases: personal answers by fold-in)."""
CONSENT_CUSTOMERS = 300
"""Customers whose consent changes, in turn (each changes about every two minutes at 50/s)."""
STREAM_AT = (20.0, 50.0)
"""Seconds within each minute at which a StreamRecommendations call starts."""
STREAM_CUSTOMERS = 300
TIMEOUT = 10.0
"""Deadline of every call: a hang shows as DEADLINE_EXCEEDED, a failed call."""
SAMPLE_EVERY = 5.0
"""Seconds between samples of the server's /proc status."""


def config_text(store: Path) -> str:
    return f"""# Written by benchmarks/bench_soak.py (make bench-soak).
[train]
candidates = ["als"]
tune = false

[policy]
default_consent = "allow"
sensitive_categories = {toml_list(SENSITIVE_CATEGORIES)}
sensitive_departments = {toml_list(SENSITIVE_DEPARTMENTS)}

[serve]
metrics_port = 0
insecure = true
store = "sqlite:///{store}"
"""


# --- the two model versions --------------------------------------------------------------------


def ensure_versions(
    args: argparse.Namespace, config: Path, models_dir: Path
) -> tuple[str, str, bool]:
    """The older and the newer version in `models_dir` and whether they were trained now:
    reused when exactly two are there (and not `--retrain`), else trained (on every event, one
    version per seed of `SEEDS`)."""
    from nextbest.store.artifacts import list_versions

    if models_dir.exists():
        versions = sorted(v["version"] for v in list_versions(models_dir))
        if len(versions) == 2 and not args.retrain:
            print(f"reusing the versions in {models_dir} (--retrain to train again)", flush=True)
            return versions[0], versions[1], False
        shutil.rmtree(models_dir)
    for seed in SEEDS:
        cmd = train_command(config, str(args.events), args.catalog, models_dir, args.content)
        print(f"training with train.seed = {seed}:", " ".join(cmd), flush=True)
        t0 = time.perf_counter()
        env = {**os.environ, "NEXTBEST_TRAIN__SEED": str(seed)}
        subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL, env=env)
        print(f"  {time.perf_counter() - t0:.1f} s", flush=True)
    versions = sorted(v["version"] for v in list_versions(models_dir))
    assert len(versions) == 2, versions
    return versions[0], versions[1], True


def promote(models_dir: Path, version: str) -> None:
    cmd = [*nextbest_cli(), "models", "promote", version, "--models-dir", str(models_dir)]
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


# --- the schedule ------------------------------------------------------------------------------


@dataclass
class Inputs:
    known: list[str]
    """Customers both versions know."""
    consent: list[str]
    """Customers whose consent changes (known to both versions)."""
    products: list[str]
    """Products both versions know."""
    content: list[str]
    """Content ids of the snapshot."""
    sensitive: set[str]


@dataclass
class Op:
    at: float
    kind: str
    args: dict = field(default_factory=dict)


def schedule(inputs: Inputs, rate: float, seconds: float, seed: int = 5) -> list[Op]:
    """The operations in send order: `rate` per second of the `MIX`, plus the streams."""
    rng = np.random.default_rng(seed)
    kinds = list(MIX)
    shares = np.asarray([MIX[k] for k in kinds])
    n = int(rate * seconds)
    picks = rng.choice(len(kinds), size=n, p=shares / shares.sum())
    ops: list[Op] = []
    turn = 0

    def customer(unknown_share: float = UNKNOWN_SHARE) -> str:
        if rng.random() < unknown_share:
            return f"soak-unknown-{rng.integers(UNKNOWN_CUSTOMERS)}"
        return inputs.known[rng.integers(len(inputs.known))]

    def products(k: int) -> list[str]:
        return [inputs.products[i] for i in rng.choice(len(inputs.products), k, replace=False)]

    for i, pick in enumerate(picks):
        kind, at = kinds[pick], i / rate
        if kind == "RecommendProducts":
            args = {
                "customer": customer(),
                "channel": CHANNELS[rng.integers(3)],
                "limit": int(rng.choice([5, 10, 20])),
            }
        elif kind == "ScoreContent":
            guides = rng.choice(len(inputs.content), 5, replace=False)
            args = {
                "customer": customer(),
                "channel": CHANNELS[rng.integers(3)],
                "content": [inputs.content[g] for g in guides],
                "inline": products(3),
            }
        elif kind == "SimilarProducts":
            args = {"products": products(int(rng.integers(1, 4)))}
        elif kind == "RecordEvents":
            args = {
                "customer": customer(0.3),
                "events": [
                    ("purchase" if rng.random() < 0.4 else "view", p)
                    for p in products(int(rng.integers(1, 6)))
                ],
                "channel": ("web", "app", "store")[rng.integers(3)],
            }
        elif kind == "SetConsent":
            args = {
                "customer": inputs.consent[turn % len(inputs.consent)],
                "purpose": str(
                    rng.choice(["personalization", "sensitive", "behavioral"], p=[0.4, 0.4, 0.2])
                ),
                "channel": CHANNELS[rng.integers(3)],
            }
            turn += 1
        else:
            args = {}
        ops.append(Op(at, kind, args))
    k = 0
    for minute in range(int(np.ceil(seconds / 60))):
        for second in STREAM_AT:
            at = minute * 60 + second
            if at < seconds:
                lo = (k * STREAM_CUSTOMERS) % len(inputs.known)
                batch = (inputs.known * 2)[lo : lo + STREAM_CUSTOMERS - 10]
                batch += [f"soak-unknown-{j}" for j in range(k * 10, k * 10 + 10)]
                ops.append(Op(at, "StreamRecommendations", {"customers": batch}))
                k += 1
    return sorted(ops, key=lambda op: op.at)


# --- the client --------------------------------------------------------------------------------


@dataclass
class Call:
    kind: str
    at: float
    """Scheduled send time (seconds from the start)."""
    sent: float
    """Actual send time."""
    ms: float
    code: str
    """OK or the gRPC status name; a stream answer with `error` set counts as its code."""
    personalized: bool | None = None
    version: str = ""


@dataclass
class Run:
    calls: list[Call] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)
    """Answers that break a rule the call checks (consent, model version), with what broke."""
    samples: list[dict] = field(default_factory=list)
    streams: list[dict] = field(default_factory=list)
    swap: dict = field(default_factory=dict)
    t0_wall: float = 0.0
    """Wall clock (epoch seconds) of the schedule's start, to place the server's log lines."""
    consent_changes: Counter = field(default_factory=Counter)
    events: Counter = field(default_factory=Counter)


class Client:
    """Stubs on one grpc.aio channel; each `kind` method sends one scheduled operation."""

    def __init__(self, channel, inputs: Inputs, run: Run, t0: float):
        from nextbest.v1 import (
            admin_pb2_grpc,
            consent_pb2_grpc,
            events_pb2_grpc,
            recommender_pb2_grpc,
        )

        self.recommender = recommender_pb2_grpc.RecommenderStub(channel)
        self.consent = consent_pb2_grpc.ConsentStub(channel)
        self.events = events_pb2_grpc.EventsStub(channel)
        self.admin = admin_pb2_grpc.AdminStub(channel)
        self.inputs = inputs
        self.run = run
        self.t0 = t0
        self.granted: dict[tuple[str, str], bool] = {}
        """Consent the client set; unset = the default (allow)."""

    def now(self) -> float:
        return time.perf_counter() - self.t0

    async def call(self, kind: str, at: float, method, request) -> tuple[object, Call]:
        import grpc

        sent = self.now()
        try:
            reply = await method(request, timeout=TIMEOUT)
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            reply, code = None, exc.code().name
        record = Call(kind, at, sent, (self.now() - sent) * 1000.0, code)
        self.run.calls.append(record)
        return reply, record

    async def recommend(self, at: float, customer: str, channel: str, limit: int):
        from nextbest.v1 import recommender_pb2 as pb

        request = pb.RecommendProductsRequest(
            customer_id=customer, channel=pb.Channel.Value(channel), limit=limit
        )
        reply, record = await self.call(
            "RecommendProducts", at, self.recommender.RecommendProducts, request
        )
        if reply is not None:
            record.personalized = reply.personalized
            record.version = reply.model_version
        return reply

    async def op(self, op: Op) -> None:
        from nextbest.v1 import admin_pb2, events_pb2
        from nextbest.v1 import recommender_pb2 as pb

        a = op.args
        if op.kind == "RecommendProducts":
            await self.recommend(op.at, a["customer"], a["channel"], a["limit"])
        elif op.kind == "ScoreContent":
            candidates = [pb.ContentCandidate(content_id=c) for c in a["content"]]
            candidates.append(
                pb.ContentCandidate(content_id="inline", title="inline", product_ids=a["inline"])
            )
            request = pb.ScoreContentRequest(
                customer_id=a["customer"],
                candidates=candidates,
                channel=pb.Channel.Value(a["channel"]),
            )
            reply, record = await self.call(op.kind, op.at, self.recommender.ScoreContent, request)
            if reply is not None:
                record.personalized = reply.personalized
                record.version = reply.model_version
                if len(reply.items) != len(candidates):
                    self.run.wrong.append(f"ScoreContent: {len(reply.items)} of {len(candidates)}")
        elif op.kind == "SimilarProducts":
            request = pb.SimilarProductsRequest(product_ids=a["products"])
            await self.call(op.kind, op.at, self.recommender.SimilarProducts, request)
        elif op.kind == "RecordEvents":
            request = events_pb2.RecordEventsRequest(
                events=[
                    events_pb2.Event(
                        customer_id=a["customer"],
                        product_id=product,
                        event_type=kind,
                        channel=a["channel"],
                    )
                    for kind, product in a["events"]
                ]
            )
            reply, _ = await self.call(op.kind, op.at, self.events.RecordEvents, request)
            if reply is not None:
                self.run.events["recorded"] += reply.recorded
                self.run.events["ignored without consent"] += reply.ignored_without_consent
                self.run.events["ignored erased"] += reply.ignored_erased
        elif op.kind == "SetConsent":
            await self.set_consent(op)
        elif op.kind == "GetModelInfo":
            await self.call(
                op.kind, op.at, self.admin.GetModelInfo, admin_pb2.GetModelInfoRequest()
            )
        elif op.kind == "StreamRecommendations":
            await self.stream(op)
        else:
            raise ValueError(op.kind)

    async def set_consent(self, op: Op) -> None:
        """Flip one purpose, then check the customer's next answer follows it."""
        from nextbest.v1 import consent_pb2

        customer, purpose = op.args["customer"], op.args["purpose"]
        granted = not self.granted.get((customer, purpose), True)
        request = consent_pb2.SetConsentRequest(
            customer_id=customer,
            purpose=consent_pb2.Purpose.Value(f"PURPOSE_{purpose.upper()}"),
            granted=granted,
            source="bench-soak",
        )
        reply, _ = await self.call("SetConsent", op.at, self.consent.SetConsent, request)
        if reply is None:
            return
        self.granted[(customer, purpose)] = granted
        self.run.consent_changes[f"{purpose} {'granted' if granted else 'withdrawn'}"] += 1
        if not reply.changed:
            self.run.wrong.append(f"SetConsent {customer} {purpose}={granted}: changed = false")
        answer = await self.recommend(op.at, customer, op.args["channel"], 20)
        if answer is None:
            return
        personal = self.granted.get((customer, "personalization"), True)
        sensitive = self.granted.get((customer, "sensitive"), True)
        if answer.personalized != personal:
            self.run.wrong.append(
                f"{customer} after {purpose}={granted}: personalized = {answer.personalized} "
                f"with personalization consent {personal} ({list(answer.decisions)})"
            )
        shown = {item.product_id for item in answer.items} & self.inputs.sensitive
        if shown and not sensitive:
            self.run.wrong.append(
                f"{customer} after {purpose}={granted}: sensitive {sorted(shown)} shown without "
                "sensitive consent"
            )

    async def stream(self, op: Op) -> None:
        from nextbest.v1 import recommender_pb2 as pb

        customers = op.args["customers"]

        async def requests():
            for k, customer in enumerate(customers):
                channel = pb.Channel.Value(CHANNELS[k % 3])
                yield pb.RecommendProductsRequest(
                    customer_id=customer, channel=channel, request_id=str(k)
                )

        import grpc

        sent = self.now()
        answers, errors, personal, code, versions = 0, 0, 0, "OK", Counter()
        try:
            call = self.recommender.StreamRecommendations(requests(), timeout=60)
            async for reply in call:
                if reply.HasField("error"):
                    errors += 1
                    code = f"stream error {reply.error.code}"
                elif reply.request_id != str(answers) or not reply.items:
                    self.run.wrong.append(f"stream answer {answers}: {reply}")
                answers += 1
                personal += reply.personalized
                versions[reply.model_version] += 1
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        ms = (self.now() - sent) * 1000.0
        if code == "OK" and answers != len(customers):
            code = f"stream: {answers} answers to {len(customers)} requests"
        version = versions.most_common(1)[0][0] if versions else ""
        self.run.calls.append(Call(op.kind, op.at, sent, ms, code, None, version))
        self.run.streams.append(
            {
                "at": op.at,
                "customers": len(customers),
                "answers": answers,
                "errors": errors,
                "personalized": personal,
                "s": ms / 1000.0,
                "code": code,
                "versions": dict(versions),
            }
        )


def proc_sample(pid: int, store: Path) -> dict:
    """VmRSS (MiB), threads, open files and CPU seconds of a process, from /proc; the CPU
    seconds of this process (the client) and of the whole machine (busy, all cores); the load
    average; the sizes of the SQLite store and its write-ahead log (MiB)."""
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    values = dict(line.split(":", 1) for line in status if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    machine = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    own = os.times()
    return {
        "rss": int(values["VmRSS"].split()[0]) / 1024.0,
        "hwm": int(values["VmHWM"].split()[0]) / 1024.0,
        "anon": int(values["RssAnon"].split()[0]) / 1024.0,
        "file": int(values["RssFile"].split()[0]) / 1024.0,
        "threads": int(values["Threads"]),
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
        "cpu": (int(stat[11]) + int(stat[12])) / tick,
        "client_cpu": own.user + own.system,
        "machine_cpu": (sum(machine) - machine[3] - machine[4]) / tick,
        "load": float(Path("/proc/loadavg").read_text().split()[0]),
        "store": _size(store),
        "wal": _size(store.with_name(store.name + "-wal")),
    }


def _size(path: Path) -> float:
    try:
        return path.stat().st_size / 2**20
    except FileNotFoundError:
        return 0.0


async def soak(
    address: str,
    pid: int,
    inputs: Inputs,
    ops: list[Op],
    seconds: float,
    models_dir: Path,
    versions: tuple[str, str],
    swap_at: float | None,
    store: Path,
) -> Run:
    import grpc

    from nextbest.v1 import admin_pb2

    run = Run()
    loop = asyncio.get_running_loop()
    async with grpc.aio.insecure_channel(address) as channel:
        t0, run.t0_wall = time.perf_counter(), time.time()
        client = Client(channel, inputs, run, t0)
        pending: set[asyncio.Task] = set()

        def launch(coro) -> None:
            task = asyncio.ensure_future(coro)
            pending.add(task)
            task.add_done_callback(pending.discard)

        async def sampler() -> None:
            k = 0
            while True:
                delay = t0 + k * SAMPLE_EVERY - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                run.samples.append({"t": client.now(), **proc_sample(pid, store)})
                k += 1

        async def swap() -> None:
            """Promote the newer version at `swap_at`; poll GetModelInfo until it is served."""
            if swap_at is None:
                return
            await asyncio.sleep(max(t0 + swap_at - time.perf_counter(), 0))
            run.swap["promote_at"] = client.now()
            await loop.run_in_executor(None, promote, models_dir, versions[1])
            run.swap["promoted_at"] = client.now()
            while client.now() - run.swap["promoted_at"] < 60:
                reply, _ = await client.call(
                    "GetModelInfo",
                    client.now(),
                    client.admin.GetModelInfo,
                    admin_pb2.GetModelInfoRequest(),
                )
                if reply is not None and reply.version == versions[1]:
                    run.swap["served_at"] = client.now()
                    run.swap["loaded_at"] = reply.loaded_at
                    return
                await asyncio.sleep(0.25)

        sampling = asyncio.ensure_future(sampler())
        swapping = asyncio.ensure_future(swap())
        for op in ops:
            delay = t0 + op.at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            launch(client.op(op))
        await asyncio.sleep(max(t0 + seconds - time.perf_counter(), 0))
        await swapping
        while pending:
            await asyncio.gather(*list(pending))
        sampling.cancel()
        run.samples.append({"t": client.now(), **proc_sample(pid, store)})
    return run


# --- figures and report ------------------------------------------------------------------------


def _counts(calls: list[Call], ms: np.ndarray) -> dict:
    """Calls, failures, non-personal answers and the latency percentiles of `ms`."""
    return {
        "calls": len(calls),
        "failed": sum(c.code != "OK" for c in calls),
        "non_personal": sum(c.personalized is False for c in calls),
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
        "max": float(ms.max()),
    }


def figures(
    run: Run, minutes: int, versions: tuple[str, str], server_ms: list[list[float]]
) -> dict:
    by_minute: dict[int, list[Call]] = defaultdict(list)
    for c in run.calls:
        by_minute[min(int(c.at // 60), minutes - 1)].append(c)
    samples = run.samples

    def sample_at(t: float) -> dict:
        return min(samples, key=lambda s: abs(s["t"] - t))

    rows = []
    for m in range(minutes):
        calls = by_minute[m]
        unary = np.asarray([c.ms for c in calls if c.kind != "StreamRecommendations"])
        lag = np.asarray([(c.sent - c.at) * 1000.0 for c in calls])
        start, end = sample_at(m * 60), sample_at((m + 1) * 60)
        if m == minutes - 1:
            end = samples[-1]
        span = max(end["t"] - start["t"], 1e-9)
        inside = [s for s in samples if m * 60 <= s["t"] <= (m + 1) * 60] or [end]
        rows.append(
            {
                "minute": m + 1,
                **_counts(calls, unary),
                "server_p99": float(np.percentile(server_ms[m], 99)) if server_ms[m] else 0.0,
                "lag_p99": float(np.percentile(lag, 99)),
                "cpu": (end["cpu"] - start["cpu"]) / span,
                "other": (
                    (end["machine_cpu"] - start["machine_cpu"])
                    - (end["cpu"] - start["cpu"])
                    - (end["client_cpu"] - start["client_cpu"])
                )
                / span,
                "load": end["load"],
                "rss": end["rss"],
                "rss_max": max(s["rss"] for s in inside),
                "threads": end["threads"],
                "fds": end["fds"],
            }
        )
    kinds = []
    for kind in [*MIX, "StreamRecommendations"]:
        calls = [c for c in run.calls if c.kind == kind]
        if calls:
            kinds.append({"kind": kind, **_counts(calls, np.asarray([c.ms for c in calls]))})
    failures = Counter(f"{c.kind} {c.code}" for c in run.calls if c.code != "OK")
    # The swap: answers by version, and old answers to calls sent once the new one was served.
    served_at = run.swap.get("served_at")
    by_version = Counter(
        c.version for c in run.calls if c.version and c.kind != "StreamRecommendations"
    )
    for s in run.streams:
        by_version.update(s["versions"])
    stale = [
        c
        for c in run.calls
        if served_at is not None and c.version == versions[0] and c.sent > served_at
    ]
    for c in stale:
        run.wrong.append(f"{c.kind} sent {c.sent - served_at:.2f} s after the swap: old version")
    first, last = rows[0], rows[-1]
    one = sample_at(60) if minutes > 1 else samples[-1]
    return {
        "rows": rows,
        "kinds": kinds,
        "failures": failures,
        "calls": len(run.calls),
        "failed": sum(failures.values()),
        "by_version": by_version,
        "p99_drift": last["p99"] / first["p99"],
        "rss_start": samples[0]["rss"],
        "rss_minute_1": one["rss"],
        "rss_end": samples[-1]["rss"],
        "rss_growth": samples[-1]["rss"] / one["rss"] - 1.0,
        "rss_peak": max(s["hwm"] for s in samples),
        "anon_minute_1": one["anon"],
        "anon_end": samples[-1]["anon"],
        "store_end": samples[-1]["store"],
        "wal_max": max(s["wal"] for s in samples),
        "swap_rss": swap_memory(run),
    }


def swap_memory(run: Run) -> tuple[float, float, float] | None:
    """VmRSS (MiB) at the last sample before the promotion, the highest until 30 s after the
    new version was served, and the sample 30 s after it."""
    if "served_at" not in run.swap:
        return None
    before = [s for s in run.samples if s["t"] <= run.swap["promote_at"]]
    end = run.swap["served_at"] + 30
    during = [s for s in run.samples if run.swap["promote_at"] <= s["t"] <= end]
    after = min(run.samples, key=lambda s: abs(s["t"] - end))
    if not before or not during:
        return None
    return before[-1]["rss"], max(s["rss"] for s in during), after["rss"]


def table(f: dict) -> list[str]:
    lines = [
        "| minute | calls | failed | non-personal answers | p50 ms | p99 ms | max ms | "
        "p99 ms in the server | sent late p99 ms | server CPU | other CPU | VmRSS MiB (end) | "
        "threads | open files |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in f["rows"]:
        lines.append(
            f"| {r['minute']} | {r['calls']:,} | {r['failed']} | {r['non_personal']:,} | "
            f"{r['p50']:.2f} | {r['p99']:.2f} | {r['max']:.0f} | {r['server_p99']:.2f} | "
            f"{r['lag_p99']:.1f} | "
            f"{r['cpu']:.0%} | {max(r['other'], 0):.0%} | {r['rss']:,.0f} | {r['threads']} | "
            f"{r['fds']} |"
        )
    return lines


def kinds_table(f: dict) -> list[str]:
    lines = [
        "| call | calls | failed | non-personal answers | p50 ms | p99 ms | max ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for k in f["kinds"]:
        lines.append(
            f"| {k['kind']} | {k['calls']:,} | {k['failed']} | {k['non_personal']:,} | "
            f"{k['p50']:.2f} | {k['p99']:.2f} | {k['max']:.0f} |"
        )
    return lines


def report(r: dict) -> str:
    f, run, older, newer = r["figures"], r["run"], *r["versions"]
    swap, streams, minutes = run.swap, run.streams, r["minutes"]
    stream_s = np.asarray([s["s"] for s in streams]) if streams else np.zeros(1)
    first, last = f["rows"][0], f["rows"][-1]
    codes = r["log"]["codes"]
    if "served_at" in swap:
        swapped = (
            f"at {swap['promote_at']:.1f} s `nextbest models promote {newer}` (done at "
            f"{swap['promoted_at']:.1f} s), and GetModelInfo named the new version at "
            f"{swap['served_at']:.1f} s (the server's watcher checks `CURRENT` every 2 s)"
        )
        if f["swap_rss"]:
            before, peak, after = f["swap_rss"]
            swapped += (
                f"; VmRSS {before:,.0f} MiB before the promotion, {peak:,.0f} MiB at most while "
                f"both versions were loaded, {after:,.0f} MiB 30 s after the swap"
            )
        swapped += "."
    elif "promote_at" in swap:
        swapped = f"at {swap['promote_at']:.1f} s promoted, but the server never served it."
    else:
        swapped = "no swap in this run (`--no-swap`)."
    lines = [
        f"{SECTION} ({r['data']}, {r['customers']:,} customers, {r['products']:,} products)",
        "",
        f"{minutes} minute{'s' * (minutes > 1)} of mixed traffic at a steady {r['rate']:g} "
        f"operations/s ({f['calls'] / (minutes * 60):.1f} calls/s with the consent checks), open "
        f"loop: the n-th operation is sent at n / {r['rate']:g} s, whatever earlier calls are "
        "doing. One `nextbest serve` process, a subprocess of the benchmark, runs plaintext "
        "(`serve.insecure = true`: no TLS, no tokens), with `metrics_port = 0`, fatigue on, "
        "consent allowed by default, the sensitive categories of `make audit-privacy` and a "
        "fresh SQLite store. The benchmark process is its only client: one grpc.aio channel, "
        f"every call with a {TIMEOUT:g} s deadline. Operations: "
        + ", ".join(f"{k} {v:.0%}" for k, v in MIX.items())
        + ". RecommendProducts goes to the email, web and app channels in turn, "
        f"{UNKNOWN_SHARE:.0%} of it for customers the model does not know; ScoreContent scores 5 "
        "snapshot guides and an inline candidate; RecordEvents sends 1 to 5 purchases (40%) or "
        "views, 30% of them for unknown customers; a SetConsent operation grants or withdraws "
        f"personalization, sensitive or behavioral consent of one of {CONSENT_CUSTOMERS} "
        "customers in turn, then a RecommendProducts call checks that the answer follows it. "
        f"At {' and '.join(f'{s:g}' for s in STREAM_AT)} s of every minute one "
        f"StreamRecommendations call asks for {STREAM_CUSTOMERS} customers "
        f"({STREAM_CUSTOMERS - 10} known, 10 unknown).",
        "",
        f"Model swap: two versions trained up front into the benchmark's own models directory "
        f"(ALS only, no tuning; `{older}` and `{newer}` both on every event, with train.seed "
        f"{SEEDS[0]} and {SEEDS[1]}: the same size, so memory before and after the swap compares); "
        f"the server started on the older one; {swapped} "
        "Answers by version: "
        + ", ".join(f"`{v}` {n:,}" for v, n in sorted(f["by_version"].items()))
        + " (stream answers counted one by one).",
        "",
        "Failed = any status other than OK, and stream answers with `error` set; non-personal "
        "answers (unknown customers, withdrawn consent) are OK answers. p50 / p99 / max: "
        "latency of the unary calls at the client; `p99 ms in the server`: the same calls' "
        "time inside the server, from its access log; `sent late`: how far behind the schedule "
        "the client sent. CPU in CPU seconds per second (these "
        f"{os.cpu_count()} cores = {os.cpu_count() * 100}%): the server's, and `other` = the "
        "whole machine's less the server's and the client's (other work on the machine). "
        f"VmRSS, threads and open files of the server from /proc every {SAMPLE_EVERY:g} s.",
        "",
        *table(f),
        "",
        *kinds_table(f),
        "",
        f"Streams: {len(streams)} calls of {STREAM_CUSTOMERS} customers, wall "
        f"{np.median(stream_s):.2f} s median, {stream_s.max():.2f} s max; "
        f"{sum(s['errors'] for s in streams)} answers with `error`. Consent changes: "
        + ", ".join(f"{k} {n}" for k, n in sorted(run.consent_changes.items()))
        + ", each checked by the next answer. Events: "
        + ", ".join(f"{k} {n:,}" for k, n in run.events.items())
        + f". The store ended at {f['store_end']:.1f} MiB (write-ahead log at most "
        f"{f['wal_max']:.1f} MiB). The server's access log: "
        + ", ".join(f"{k} {n:,}" for k, n in codes.most_common())
        + ".",
        "",
        f"Machine: {r['machine']}. Run on {r['date']} as `{r['command']}`, "
        f"{r['wall'] / 60:.1f} min in all ("
        + (f"training {r['train_s']:.0f} s" if r["trained"] else "the versions of an earlier run")
        + "); the server was started "
        f"as `{r['serve_how']}`. The client and the server share these {os.cpu_count()} cores. "
        "Complete Journey as in `make bench-serve` (the same model size and answer path, so the "
        "latencies compare); its two ALS-only versions train in 15 to 25 s each, small next to "
        "the five minutes.",
        "",
        "Figures (the first minute is the baseline):",
        f"- failed calls: {f['failed']} of {f['calls']:,} (aim 0: "
        f"{'met' if f['failed'] == 0 else 'missed'})"
        + (
            ": " + ", ".join(f"{k} {n}" for k, n in f["failures"].most_common())
            if f["failed"]
            else ""
        ),
        f"- p99 drift, last minute against the first: {last['p99']:.2f} / {first['p99']:.2f} ms "
        f"= {f['p99_drift']:.2f} at the client, {last['server_p99']:.2f} / "
        f"{first['server_p99']:.2f} ms in the server; other work on the machine "
        f"{max(first['other'], 0):.0%} in the first minute, {max(last['other'], 0):.0%} in the "
        "last",
        f"- resident memory from the end of minute 1 to the end: {f['rss_minute_1']:,.0f} → "
        f"{f['rss_end']:,.0f} MiB, {f['rss_growth']:+.1%} (aim < 10%: "
        f"{'met' if f['rss_growth'] < 0.10 else 'missed'}; anonymous memory "
        f"{f['anon_minute_1']:,.0f} → {f['anon_end']:,.0f} MiB); {f['rss_start']:,.0f} MiB when "
        f"the load started, peak (VmHWM) {f['rss_peak']:,.0f} MiB",
        "- model swap: "
        + (
            "served"
            if "served_at" in swap
            else "none"
            if "promote_at" not in swap
            else "NOT served"
        )
        + f"; wrong answers (consent not followed, old version after the swap): {len(run.wrong)}",
        "- the server's log, warnings and errors: "
        + (
            "; ".join(
                f"{level} {msg!r} ×{n}" for (level, msg), n in r["log"]["notable"].most_common()
            )
            or "none"
        ),
        "",
    ]
    return "\n".join(_wrap(line) for line in lines)


def read_log(log: Path, t0_wall: float, minutes: int) -> dict:
    """The server's JSON log: warnings and errors as (level, message) → count (lines that are not
    JSON as ("text", line)); from its access log (`nextbest.calls`), the status codes of the
    calls and, per minute of the schedule, the unary calls' time inside the server (ms)."""
    notable: Counter = Counter()
    codes: Counter = Counter()
    server_ms: list[list[float]] = [[] for _ in range(minutes)]
    for line in log.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            notable[("text", line[:200])] += 1
            continue
        if record.get("level") in ("WARNING", "ERROR", "CRITICAL"):
            notable[(record["level"], str(record.get("msg", ""))[:200])] += 1
        if record.get("msg") != "call" or "ms" not in record:
            continue
        codes[str(record.get("code"))] += 1
        if str(record.get("method", "")).endswith("/StreamRecommendations"):
            continue
        at = dt.datetime.fromisoformat(record["ts"]).timestamp() - t0_wall
        server_ms[min(max(int(at // 60), 0), minutes - 1)].append(float(record["ms"]))
    return {"notable": notable, "codes": codes, "server_ms": server_ms}


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", required=True, help="events file of the two model versions")
    parser.add_argument("--catalog", required=True)
    parser.add_argument("--content", required=True, help="content file (the model's snapshot)")
    parser.add_argument("--work-dir", default="data/bench-soak", help="config, models, store, logs")
    parser.add_argument("--retrain", action="store_true", help="train even if versions exist")
    parser.add_argument("--minutes", type=int, default=5, help="minutes of traffic (default 5)")
    parser.add_argument("--rate", type=float, default=50.0, help="operations per second")
    parser.add_argument(
        "--no-swap", action="store_true", help="no model swap (to tell its memory from the rest)"
    )
    parser.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="environment of the server (diagnosis, e.g. MALLOC_ARENA_MAX=2); repeatable",
    )
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    server_env = dict(item.split("=", 1) for item in args.server_env)
    if args.minutes < 1:
        parser.error("--minutes must be >= 1")
    # SIGTERM stops the benchmark like Ctrl-C: the `finally` below stops the server.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    started = time.perf_counter()

    from nextbest.store.artifacts import load_bundle

    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    store = work / "store.db"
    for path in work.glob("store.db*"):
        path.unlink()  # a fresh store every run: its growth is part of what is measured
    config = work / "bench.toml"
    config.write_text(config_text(store))
    models_dir = work / "models"
    *versions, trained = ensure_versions(args, config, models_dir)
    versions = tuple(versions)
    train_s = time.perf_counter() - started
    promote(models_dir, versions[0])

    old, new = load_bundle(models_dir, versions[0]), load_bundle(models_dir, versions[1])
    rng = np.random.default_rng(11)
    known = sorted(set(map(str, old.user_ids)) & set(map(str, new.user_ids)))
    known = [known[i] for i in rng.permutation(len(known))]
    inputs = Inputs(
        known=known,
        consent=known[:CONSENT_CUSTOMERS],
        products=sorted(set(map(str, old.item_ids)) & set(map(str, new.item_ids))),
        content=pq.read_table(args.content, columns=["content_id"])["content_id"].to_pylist(),
        sensitive=set(sensitive_products(pq.read_table(args.catalog), config).tolist()),
    )
    shape = new.shape
    del old, new
    seconds = args.minutes * 60.0
    ops = schedule(inputs, args.rate, seconds)
    print(
        f"{len(ops):,} operations over {seconds:.0f} s ({args.rate:g}/s and "
        f"{sum(op.kind == 'StreamRecommendations' for op in ops)} streams); "
        f"versions {versions[0]} (served first) and {versions[1]} (promoted at "
        f"{seconds / 2:.0f} s)",
        flush=True,
    )

    cmd, serve_how = serve_command(config, models_dir)
    log = work / "server.log"
    server = ServerProcess("nextbest", cmd, log, server_env)
    if server_env:
        serve_how = " ".join(f"{k}={v}" for k, v in server_env.items()) + " " + serve_how
    try:
        address = server.wait_ready()
        asyncio.run(wait_serving(address))
        print(f"nextbest serve (pid {server.proc.pid}) on {address}; log {log}", flush=True)
        swap_at = None if args.no_swap else seconds / 2
        run = asyncio.run(
            soak(
                address, server.proc.pid, inputs, ops, seconds, models_dir, versions, swap_at, store
            )
        )
        alive = server.proc.poll() is None
    finally:
        server.stop()
    if not alive:
        print(f"the server died during the run (exit {server.proc.returncode}); log {log}")

    server_log = read_log(log, run.t0_wall, args.minutes)
    f = figures(run, args.minutes, versions, server_log["server_ms"])
    results = {
        "figures": f,
        "run": run,
        "versions": versions,
        "minutes": args.minutes,
        "rate": args.rate,
        "data": DATA_NAMES.get(Path(args.events).parent.name, args.events),
        "customers": shape[0],
        "products": shape[1],
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "command": "make bench-soak"
        if (args.minutes, args.rate) == (5, 50.0)
        else f"benchmarks/bench_soak.py --minutes {args.minutes} --rate {args.rate:g}",
        "serve_how": serve_how,
        "train_s": train_s,
        "trained": trained,
        "wall": time.perf_counter() - started,
        "log": server_log,
    }
    section = report(results)
    print()
    print(section)
    for line in run.wrong[:20]:
        print("wrong:", line)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", section, SECTION)
        print(f"updated {ROOT / 'BENCHMARKS.md'}")
    (work / "samples.json").write_text(
        json.dumps({"samples": run.samples, "minutes": f["rows"], "swap": run.swap}, indent=1)
    )
    unswapped = not args.no_swap and "served_at" not in run.swap
    return 1 if f["failed"] or run.wrong or unswapped or not alive else 0


if __name__ == "__main__":
    sys.exit(main())
