"""make bench-serve: the gRPC server under load against bare baselines, measured in the same run.

(a) RecommendProducts QPS and p50/p99 latency at concurrency 1 and 16 against a bare gRPC echo
    server (same grpcio, same thread pool size) that returns a response captured from the real
    server, driven by the same grpc.aio client, one channel, N concurrent tasks.
(b) One StreamRecommendations call over every customer of the model against implicit's bare
    batch `recommend` on the same model, loaded the way the server loads it.

The nextbest server and the echo server are separate processes; this process is the client.
The nextbest server runs `serve.processes` as shipped (one per core); a second one with one
process runs the same cells for comparison (`--no-diagnosis` to skip). As deployed, a third one
runs with TLS, a bearer token and JSON call logs, against an echo server with TLS (`--no-tls`
to skip; certificates and the token are made in the run). The answer path is timed and profiled
in-process without gRPC.
`--write` replaces the `## make bench-serve` section of BENCHMARKS.md (a `### Notes` part written
by hand is kept). The model is trained once into `<work-dir>/models` (ALS only, no
tuning, consent allowed by default) and reused unless `--retrain`.

    python benchmarks/bench_serve.py --events data/complete-journey/events.parquet \\
        --catalog data/complete-journey/catalog.parquet [--seconds 10] [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import datetime as dt
import io
import os
import platform
import pstats
import queue
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CONFIG = """[train]
candidates = ["als"]
tune = false

[policy]
default_consent = "allow"

[serve]
metrics_port = 0
insecure = true
"""
READY = re.compile(r"serving on (\S+):(\d+)\s*$")
SECTION = "## make bench-serve"
UNKNOWN_EVERY = 50
"""Every 50th unary request names a customer the model does not know (best sellers)."""
LIMIT = 10
DATA_NAMES = {"complete-journey": "Complete Journey", "online-retail": "Online Retail"}


# --- the echo server (run as `bench_serve.py --echo-server RESPONSE --workers N`) -------------


def run_echo_server(response_path: str, workers: int, tls: tuple[str, str] | None = None) -> int:
    """A bare grpc server with only Recommender.RecommendProducts: a prebuilt response with the
    request's customer and request ids."""
    from concurrent import futures

    import grpc

    from nextbest.v1 import recommender_pb2, recommender_pb2_grpc

    template = recommender_pb2.RecommendProductsResponse.FromString(
        Path(response_path).read_bytes()
    )

    class Echo(recommender_pb2_grpc.RecommenderServicer):
        def RecommendProducts(self, request, context):
            response = recommender_pb2.RecommendProductsResponse()
            response.CopyFrom(template)
            response.customer_id = request.customer_id
            response.request_id = request.request_id
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"))
    recommender_pb2_grpc.add_RecommenderServicer_to_server(Echo(), server)
    if tls:
        pair = (Path(tls[1]).read_bytes(), Path(tls[0]).read_bytes())
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([pair]))
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"echo serving on 127.0.0.1:{port}", flush=True)
    stop.wait()
    server.stop(1).wait()
    return 0


# --- server processes --------------------------------------------------------------------------


class ServerProcess:
    """A server subprocess that prints `... serving on HOST:PORT` when ready; stderr to a log."""

    def __init__(
        self, name: str, cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ):
        self.name = name
        self.log_path = log_path
        self._log = open(log_path, "w")  # closed in stop()
        self.proc = subprocess.Popen(
            list(cmd),
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._drain, daemon=True).start()
        self.address = ""

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout: float = 180.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise SystemExit(f"{self.name}: not ready after {timeout:.0f} s") from None
            if line is None:
                self.proc.wait()
                tail = self.log_path.read_text()[-3000:]
                raise SystemExit(f"{self.name} exited ({self.proc.returncode}):\n{tail}")
            match = READY.search(line)
            if match:
                self.address = f"{match.group(1)}:{match.group(2)}"
                return self.address

    def stop(self) -> None:
        """SIGTERM, then kill after 20 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def nextbest_cli() -> list[str]:
    exe = Path(sys.executable).parent / "nextbest"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "nextbest.cli"]


def fresh_store(models_dir: Path) -> None:
    """Start a run with an empty store beside the model: impressions recorded by earlier runs
    (a million after a few) would make every call's fatigue read slower from run to run."""
    for path in models_dir.parent.glob("store.db*"):
        path.unlink()


def serve_command(config: Path, models_dir: Path) -> tuple[list[str], str]:
    """`nextbest serve` on the benchmark model, with its own consent store beside it."""
    store = f"sqlite:///{(models_dir.parent / 'store.db').resolve()}"
    cmd = [*nextbest_cli(), "serve", "--config", str(config), "--models-dir", str(models_dir)]
    return [*cmd, "--port", "0", "--store", store], "nextbest serve"


def train_command(
    config: Path, events: str, catalog: str | None, models_dir: Path, content: str | None = None
) -> list[str]:
    """`nextbest train` of a benchmark model (its settings in `config`) into `models_dir`."""
    cmd = [*nextbest_cli(), "train", "--config", str(config), "--events", str(events)]
    if catalog:
        cmd += ["--catalog", str(catalog)]
    if content:
        cmd += ["--content", str(content)]
    return [*cmd, "--models-dir", str(models_dir), "--no-progress"]


def model_arguments(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    """The options of a benchmark on bench-serve's model: its events and catalog, the work
    directory it is trained into once, and `--retrain`."""
    parser.add_argument("--events", required=required, help="events to train the model from")
    parser.add_argument("--catalog")
    parser.add_argument("--work-dir", default="data/bench-serve", help="config, model, logs")
    parser.add_argument("--retrain", action="store_true", help="train even if a model exists")


def ensure_model(args: argparse.Namespace, config: Path, models_dir: Path) -> None:
    if args.retrain and models_dir.exists():
        shutil.rmtree(models_dir)
    if (models_dir / "CURRENT").exists():
        print(f"reusing the model in {models_dir} (--retrain to train again)", flush=True)
        return
    cmd = train_command(config, args.events, args.catalog, models_dir)
    print("training:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)


# --- TLS and tokens: the production configuration ---------------------------------------------

TLS = "-tls"
"""Suffix of the servers run with TLS (the nextbest one also with a bearer token and JSON logs)."""


def write_tls(folder: Path) -> tuple[Path, Path, bytes]:
    """A CA and a server certificate for 127.0.0.1 made here (`cryptography`, the dev extra):
    (server certificate, server key, the CA's PEM for the client)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    now = dt.datetime.now(dt.UTC)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())

    def cert(subject: str, public, *, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(name(subject))
            .issuer_name(name("bench CA"))
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    pem = serialization.Encoding.PEM
    ca_pem = cert("bench CA", ca_key.public_key(), ca=True).public_bytes(pem)
    server_pem = cert("127.0.0.1", key.public_key(), ca=False).public_bytes(pem)
    (folder / "server.pem").write_bytes(server_pem)
    (folder / "server.key").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "server.pem", folder / "server.key", ca_pem


def tls_config(cert: Path, key: Path, token: str) -> str:
    """CONFIG as deployed: TLS, one client with a bearer token, JSON call logs."""
    from nextbest.auth import token_sha256

    return CONFIG.replace("insecure = true", "insecure = false") + (
        f'tls_cert = "{cert}"\ntls_key = "{key}"\nlog_format = "json"\n\n'
        f'[[serve.clients]]\nname = "bench"\ntoken_sha256 = "{token_sha256(token)}"\n'
        'roles = ["recommend"]\n'
    )


Security = tuple[bytes, str | None] | None
"""(the CA's PEM, a bearer token or None) for a TLS channel; None = plaintext."""


CHANNELS = 4
"""Channels (connections) a load cell spreads its tasks over, as several web back ends would:
`SO_REUSEPORT` spreads connections, not calls, over the server processes."""


def channel(address: str, security: Security = None):
    """A grpc.aio channel to `address` on its own connection: plaintext, or TLS with the token
    on every call."""
    import grpc

    own = [("grpc.use_local_subchannel_pool", 1)]
    if security is None:
        return grpc.aio.insecure_channel(address, options=own)
    ca, token = security
    creds = grpc.ssl_channel_credentials(root_certificates=ca)
    if token:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return grpc.aio.secure_channel(address, creds, options=own)


# --- the client --------------------------------------------------------------------------------


async def wait_serving(address: str, timeout: float = 180.0, security: Security = None) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    async with channel(address, security) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit(f"{address}: health not SERVING after {timeout:.0f} s")
            await asyncio.sleep(0.2)


async def capture_response(address: str, customers: Sequence[str]) -> bytes:
    """A real answer with 10 items, each with reasons, a title, a category and a price."""
    import grpc

    from nextbest.v1 import recommender_pb2 as pb
    from nextbest.v1 import recommender_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        for customer in customers:
            reply = await stub.RecommendProducts(pb.RecommendProductsRequest(customer_id=customer))
            full = all(
                i.reasons and i.title and i.category and i.HasField("price") for i in reply.items
            )
            if reply.personalized and len(reply.items) == LIMIT and full:
                return reply.SerializeToString()
    raise SystemExit("no customer got a full personalized answer to capture for the echo server")


async def load_cell(
    address: str,
    requests: Sequence,
    concurrency: int,
    seconds: float,
    warmup: float,
    security: Security = None,
) -> dict:
    """`concurrency` tasks over up to `CHANNELS` channels calling RecommendProducts back to
    back: a warm-up, then `seconds` of measured calls (latency per call at the client)."""
    import grpc

    from nextbest.v1 import recommender_pb2_grpc

    chans = [channel(address, security) for _ in range(min(concurrency, CHANNELS))]
    stubs = [recommender_pb2_grpc.RecommenderStub(ch) for ch in chans]
    try:
        position = 0

        async def run(duration: float, start_at: int) -> tuple[list[float], list, float]:
            nonlocal position
            position = start_at
            latencies: list[float] = []
            errors: list = []
            end = time.perf_counter() + duration

            async def worker(stub) -> None:
                nonlocal position
                while time.perf_counter() < end:
                    request = requests[position % len(requests)]
                    position += 1
                    t0 = time.perf_counter()
                    try:
                        await stub.RecommendProducts(request, timeout=30)
                    except grpc.aio.AioRpcError as exc:
                        errors.append(exc.code())
                        # A refusal by admission control: wait its pushback, as clients do.
                        trailers = dict(exc.trailing_metadata() or ())
                        await asyncio.sleep(int(trailers.get("grpc-retry-pushback-ms", 0)) / 1e3)
                        continue
                    latencies.append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            await asyncio.gather(*(worker(stubs[k % len(stubs)]) for k in range(concurrency)))
            return latencies, errors, time.perf_counter() - t0

        await run(warmup, len(requests) // 2)
        latencies, errors, elapsed = await run(seconds, 0)
    finally:
        for ch in chans:
            await ch.close()
    refused = sum(1 for e in errors if e == grpc.StatusCode.RESOURCE_EXHAUSTED)
    failed = [e for e in errors if e != grpc.StatusCode.RESOURCE_EXHAUSTED]
    if failed:
        raise SystemExit(f"{address}: {len(failed)} failed calls, e.g. {failed[0]}")
    ms = np.asarray(latencies) * 1000.0
    return {
        "refused": refused,
        "calls": len(ms),
        "qps": len(ms) / elapsed,
        "p50": float(np.percentile(ms, 50)),
        "p99": float(np.percentile(ms, 99)),
    }


STREAMS = 2
"""StreamRecommendations calls, each on its own connection, that an audience is split over (as a
campaign batch job with two workers would), so that every server process streams."""


async def stream_one(
    address: str, customers: Sequence[str], security: Security, offset: int
) -> int:
    """One StreamRecommendations call over `customers`; checks every answer, returns how many."""
    from nextbest.v1 import recommender_pb2 as pb
    from nextbest.v1 import recommender_pb2_grpc

    async def requests():
        for k, customer in enumerate(customers):
            yield pb.RecommendProductsRequest(
                customer_id=customer, limit=LIMIT, request_id=str(offset + k)
            )

    async with channel(address, security) as ch:
        stub = recommender_pb2_grpc.RecommenderStub(ch)
        n = 0
        async for reply in stub.StreamRecommendations(requests()):
            if reply.HasField("error") or reply.request_id != str(offset + n) or not reply.items:
                raise SystemExit(f"stream answer {offset + n} is wrong: {reply}")
            n += 1
    if n != len(customers):
        raise SystemExit(f"stream: {n} answers to {len(customers)} requests")
    return n


async def stream_all(address: str, customers: Sequence[str], security: Security = None) -> float:
    """Wall seconds to stream every one of `customers` over `STREAMS` concurrent streams."""
    parts = np.array_split(np.asarray(customers, dtype=object), STREAMS)
    offsets = np.cumsum([0] + [len(p) for p in parts[:-1]])
    t0 = time.perf_counter()
    await asyncio.gather(
        *(
            stream_one(address, list(p), security, int(o))
            for p, o in zip(parts, offsets, strict=True)
        )
    )
    return time.perf_counter() - t0


def bare_recommend(bundle) -> float:
    """Wall seconds of implicit's batch recommend over every customer (BLAS on one thread)."""
    from threadpoolctl import threadpool_limits

    users = np.arange(bundle.shape[0])
    with threadpool_limits(1, "blas"):
        t0 = time.perf_counter()
        ids, _ = bundle.cf.model.recommend(users, bundle.user_items, N=LIMIT)
        elapsed = time.perf_counter() - t0
    assert ids.shape == (len(users), LIMIT)
    return elapsed


# --- the in-process profile --------------------------------------------------------------------


def _label(key: tuple) -> str:
    """`package.module.function` of a pstats key."""
    file, _, func = key
    if file == "~" or file.startswith("<"):
        return func
    path = Path(file)
    parts = path.with_suffix("").parts
    for anchor in ("site-packages", "src"):
        if anchor in parts:
            parts = parts[parts.index(anchor) + 1 :]
            break
    else:
        parts = parts[-1:]
    return ".".join(parts) + "." + func


def profile_service(
    models_dir: Path, config: Path, customers: Sequence[str], top: int
) -> tuple[dict, str]:
    """The server's answer path without gRPC (request validation, `ServedModel.recommend`,
    protobuf out and serialisation) in this process: unary (one customer per call, 500 calls)
    and stream batches (256 customers per pass, every customer). Per mode: ms per customer
    without and with cProfile, and the `top` functions by own time (ms per customer)."""
    from nextbest.config import load_settings
    from nextbest.server import STREAM_BATCH, ModelHolder, _answer_pb, product_query
    from nextbest.service import store_consent
    from nextbest.store.consent_store import open_store
    from nextbest.v1 import recommender_pb2 as pb

    settings = load_settings(config)
    # The consent path of the server: the store, read on every call.
    store = open_store(f"sqlite:///{(models_dir.parent / 'store.db').resolve()}")
    consent = store_consent(store, settings.policy.default_consent == "allow")
    # The server's model holder: consent, recorded events and impressions from the store.
    settings = settings.with_overrides("serve", models_dir=str(models_dir))
    holder = ModelHolder(settings, consent, store)
    holder.load()
    requests = [pb.RecommendProductsRequest(customer_id=c) for c in customers]

    def answer(batch: list) -> None:
        shown = holder.recommend([product_query(r) for r in batch])
        for s, r in zip(shown, batch, strict=True):
            _answer_pb(s, r).SerializeToString()

    def run(part: list, size: int) -> float:
        t0 = time.perf_counter()
        for lo in range(0, len(part), size):
            answer(part[lo : lo + size])
        return (time.perf_counter() - t0) / len(part) * 1000.0

    summary, texts = {}, []
    for mode, size, n in (("unary", 1, 500), ("stream", STREAM_BATCH, len(requests))):
        part = requests[:n]
        answer(part[:size])  # warm caches
        plain = run(part, size)
        prof = cProfile.Profile()
        prof.enable()
        profiled = run(part, size)
        prof.disable()
        stats = pstats.Stats(prof)
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
        summary[mode] = {
            "size": size,
            "customers": len(part),
            "ms": plain,
            "ms_profiled": profiled,
            "calls": stats.total_calls / len(part),
            "top": [(_label(k), v[2] / len(part) * 1000.0) for k, v in rows],
        }
        text = io.StringIO()
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
        texts.append(f"--- {mode}: {len(part)} customers, {plain:.2f} ms per customer")
        texts.append(text.getvalue())
    return summary, "\n".join(texts)


# --- report ------------------------------------------------------------------------------------

DIAG = "nextbest-1p"
LABELS = {
    "echo": "echo",
    "nextbest": "nextbest (`serve.processes` as shipped: one per core)",
    DIAG: "nextbest, one process (`serve.processes = 1`, for comparison)",
    "echo" + TLS: "echo, TLS",
    "nextbest" + TLS: "nextbest, TLS + bearer token + JSON call log (as deployed)",
}


def machine() -> str:
    import grpc
    import implicit

    return (
        f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"grpcio {grpc.__version__}, implicit {implicit.__version__}"
    )


def report(r: dict) -> str:
    a, b, n = r["unary"], r["stream"], r["customers"]
    servers = [s for s in LABELS if (s, r["concurrency"][0]) in a]
    lines = [
        f"{SECTION} ({r['data']}, {n:,} customers, {r['products']:,} products)",
        "",
        "(a) `Recommender.RecommendProducts` (limit 10) through the nextbest server against a bare "
        "gRPC echo server: the same grpcio, the same thread pool size "
        f"(`serve.max_workers` = {r['workers']}), only RecommendProducts, returning a response "
        f"captured from the nextbest server ({LIMIT} items with reasons, titles, categories and "
        "prices) with the request's customer id. Each server is its own process, driven in turn "
        "by the same grpc.aio client (the benchmark process): N tasks spread over "
        f"min(N, {CHANNELS}) channels, each its own connection, calling back to back, "
        f"{r['warmup']:g} s of warm-up then {r['seconds']:g} s measured per cell, "
        "latency per call at the client. Requests cycle through the model's customers in a "
        f"shuffled order, one in {UNKNOWN_EVERY} a customer the model does not know (best "
        "sellers); the same order for every server.",
        "",
        "| server | concurrency | calls answered | refused (admission) | QPS | p50 ms | p99 ms | "
        "QPS ratio to echo |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in r["concurrency"]:
        for server in servers:
            x = a[(server, c)]
            echo = a[("echo" + TLS, c)] if server.endswith(TLS) else a[("echo", c)]
            lines.append(
                f"| {LABELS[server]} | {c} | {x['calls']:,} | {x.get('refused', 0):,} | "
                f"{x['qps']:,.0f} | {x['p50']:.2f} | "
                f"{x['p99']:.2f} | {x['qps'] / echo['qps']:.2f} |"
            )
    lines += [
        "",
        f"(b) Every customer of the model streamed by {STREAMS} concurrent "
        "`Recommender.StreamRecommendations` calls, each on its own connection "
        f"(limit {LIMIT}; every answer checked: no error, request order) against implicit's bare "
        "batch `recommend(np.arange(n_users), user_items, N=10)` on the same model, loaded with "
        "`load_bundle` as the server loads it, in the benchmark process with BLAS on one thread "
        "(faster than two here: implicit's top-k runs on its own threads). Median of "
        f"{r['repeat']} runs of each, alternating.",
        "",
        "| run | customers | wall s | customers/s | throughput ratio |",
        "|---|---|---|---|---|",
        f"| baseline: bare implicit batch recommend | {n:,} | {b['bare']:.2f} | "
        f"{n / b['bare']:,.0f} | 1.00 |",
    ]
    for server in [s for s in servers if not s.startswith("echo")]:
        t = b[server]
        lines.append(
            f"| {LABELS[server]}: StreamRecommendations | {n:,} | {t:.2f} | {n / t:,.0f} | "
            f"{b['bare'] / t:.2f} |"
        )
    lines += [
        "",
        f"Machine: {r['machine']}. Run on {r['date']}; the server was started as "
        f"`{r['serve_how']}`. The client and the servers share these {os.cpu_count()} cores, and "
        "other work may run on the machine: figures are noisy, compare ratios within one run.",
        "",
        "Aims (the nextbest server as configured, first rows):",
    ]
    for c in r["concurrency"]:
        x, echo = a[("nextbest", c)], a[("echo", c)]
        ratio = x["qps"] / echo["qps"]
        lines.append(
            f"- concurrency {c}: QPS ratio {ratio:.2f} (aim ≥ 0.5: "
            f"{'met' if ratio >= 0.5 else 'missed'}), p99 {x['p99']:.2f} ms (aim < 10 ms: "
            f"{'met' if x['p99'] < 10 else 'missed'}; echo server {echo['p99']:.2f} ms)"
        )
    if ("nextbest" + TLS, r["concurrency"][0]) in a:
        for c in r["concurrency"]:
            x, echo = a[("nextbest" + TLS, c)], a[("echo" + TLS, c)]
            lines.append(
                f"- TLS + token, concurrency {c}: QPS ratio to the TLS echo server "
                f"{x['qps'] / echo['qps']:.2f} (aim ≥ 0.5: "
                f"{'met' if x['qps'] / echo['qps'] >= 0.5 else 'missed'}), p99 {x['p99']:.2f} ms "
                f"({x['p99'] / echo['p99']:.1f}× the echo server's {echo['p99']:.2f} ms; aim ≤ 3×)"
            )
    ratio = b["bare"] / b["nextbest"]
    lines += [
        f"- StreamRecommendations: throughput ratio {ratio:.2f} (aim ≥ 0.5: "
        f"{'met' if ratio >= 0.5 else 'missed'})",
        "",
    ]
    prof = r.get("profile")
    if prof:
        u, s = prof["unary"], prof["stream"]
        lines += [
            "Where the time goes: the answer path without gRPC (request validation, "
            "`ServedModel.recommend`, protobuf out and serialisation), timed in the benchmark "
            f"process: {u['ms']:.2f} ms per customer one customer at a time ({u['customers']} "
            f"calls; {1000 / u['ms']:,.0f} per second), {s['ms']:.2f} ms per customer in batches "
            f"of {s['size']} as the stream answers them ({1000 / s['ms']:,.0f} customers/s). "
            f"Python function calls per customer: {u['calls']:,.0f} one at a time, "
            f"{s['calls']:,.0f} in batches. The functions with the most own time under cProfile "
            "(which inflates Python-heavy parts; implicit's compiled top-k counts as its "
            "`recommend`):",
            "",
            "| path | function | own ms per customer | share |",
            "|---|---|---|---|",
        ]
        for mode, x in (("unary", u), (f"batches of {s['size']}", s)):
            for name, ms in x["top"]:
                lines.append(f"| {mode} | `{name}` | {ms:.2f} | {ms / x['ms_profiled']:.0%} |")
        lines.append("")
    return "\n".join(_wrap(line) for line in lines)


def _wrap(line: str, width: int = 100) -> str:
    """Markdown prose wrapped at `width` like the rest of BENCHMARKS.md (tables stay whole)."""
    if not line or line.startswith(("|", "#")):
        return line
    indent = "  " if line.startswith("- ") else ""
    return textwrap.fill(
        line, width, subsequent_indent=indent, break_long_words=False, break_on_hyphens=False
    )


def write_section(path: Path, section: str, title: str = SECTION) -> None:
    """Replace the section of BENCHMARKS.md whose heading starts with `title` (`## make
    bench-serve` by default; appended when missing), keeping a hand-written `### Notes` part of
    the old section."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    start = text.find(title)
    if start < 0:
        before, old, after = text.rstrip("\n") + "\n\n", "", ""
    else:
        nxt = text.find("\n## ", start + len(title))
        end = len(text) if nxt < 0 else nxt + 1
        before, old, after = text[:start], text[start:end], text[end:]
    notes = old[old.index("### Notes") :].rstrip("\n") if "### Notes" in old else ""
    body = section.rstrip("\n") + ("\n\n" + notes if notes else "") + "\n"
    path.write_text(before + body + ("\n" + after if after else ""))


# --- main --------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    model_arguments(parser, required=False)
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per cell")
    parser.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds per cell")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--repeat", type=int, default=3, help="stream and baseline runs")
    parser.add_argument(
        "--no-diagnosis",
        action="store_true",
        help="skip the second nextbest server, with one process (serve.processes = 1)",
    )
    parser.add_argument(
        "--profile", type=int, metavar="TOP", default=0, help="print the full profile (TOP rows)"
    )
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    parser.add_argument("--echo-server", metavar="RESPONSE", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--echo-tls", nargs=2, metavar=("CERT", "KEY"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--no-tls", action="store_true", help="skip the TLS + token servers (plaintext only)"
    )
    args = parser.parse_args()
    if args.echo_server:
        return run_echo_server(args.echo_server, args.workers, args.echo_tls)
    if not args.events:
        parser.error("--events is required")
    # SIGTERM stops the benchmark like Ctrl-C: the `finally` below stops the servers.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    from nextbest.config import load_settings
    from nextbest.store.artifacts import load_bundle
    from nextbest.v1 import recommender_pb2 as pb

    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "bench.toml"
    config.write_text(CONFIG)
    models_dir = work / "models"
    ensure_model(args, config, models_dir)
    fresh_store(models_dir)
    workers = load_settings(config).serve.max_workers

    bundle = load_bundle(models_dir)
    known = [str(c) for c in bundle.user_ids]
    order = [known[i] for i in np.random.default_rng(7).permutation(len(known))]
    mixed = [
        f"bench-unknown-{k}" if k % UNKNOWN_EVERY == UNKNOWN_EVERY - 1 else c
        for k, c in enumerate(order)
    ]
    requests = [pb.RecommendProductsRequest(customer_id=c) for c in mixed]

    names = ["echo", "nextbest"] + ([] if args.no_diagnosis else [DIAG])
    security: dict[str, Security] = {}
    if not args.no_tls:
        from nextbest.auth import new_token

        cert, key, ca = write_tls(work)
        token = new_token()
        tls_toml = work / "bench-tls.toml"
        tls_toml.write_text(tls_config(cert, key, token))
        names += ["echo" + TLS, "nextbest" + TLS]
        security = {"echo" + TLS: (ca, None), "nextbest" + TLS: (ca, token)}
    nextbest_names = [n for n in names if not n.startswith("echo")]
    servers: list[ServerProcess] = []
    try:
        cmd, serve_how = serve_command(config, models_dir)
        addresses = {}
        envs = {DIAG: {"NEXTBEST_SERVE__PROCESSES": "1"}}
        for name in nextbest_names:
            server_cmd = cmd
            if name.endswith(TLS):
                server_cmd, _ = serve_command(tls_toml, models_dir)
            servers.append(ServerProcess(name, server_cmd, work / f"{name}.log", envs.get(name)))
            addresses[name] = servers[-1].wait_ready()
            asyncio.run(wait_serving(addresses[name], security=security.get(name)))
            print(f"{name} ({serve_how}) serving on {addresses[name]}", flush=True)
        response = work / "echo-response.pb"
        response.write_bytes(asyncio.run(capture_response(addresses["nextbest"], order)))
        echo_cmd = [sys.executable, __file__, "--echo-server", str(response)]
        echo_cmd += ["--workers", str(workers)]
        for name in [n for n in names if n.startswith("echo")]:
            extra = ["--echo-tls", str(cert), str(key)] if name.endswith(TLS) else []
            servers.append(ServerProcess(name, [*echo_cmd, *extra], work / f"{name}.log"))
            addresses[name] = servers[-1].wait_ready()

        unary = {}
        for c in args.concurrency:
            for name in names:
                cell = asyncio.run(
                    load_cell(
                        addresses[name],
                        requests,
                        c,
                        args.seconds,
                        args.warmup,
                        security=security.get(name),
                    )
                )
                unary[(name, c)] = cell
                print(
                    f"{name:11} concurrency {c:2}: {cell['calls']:6} calls, {cell['qps']:6.0f} "
                    f"QPS, p50 {cell['p50']:.2f} ms, p99 {cell['p99']:.2f} ms, "
                    f"{cell['refused']} refused",
                    flush=True,
                )
        runs: dict[str, list[float]] = {name: [] for name in ["bare", *nextbest_names]}
        for name in nextbest_names:
            asyncio.run(stream_all(addresses[name], known[:256], security.get(name)))  # warm-up
        for _ in range(args.repeat):
            runs["bare"].append(bare_recommend(bundle))
            for name in nextbest_names:
                runs[name].append(
                    asyncio.run(stream_all(addresses[name], known, security.get(name)))
                )
            print(", ".join(f"{k} {v[-1]:.2f} s" for k, v in runs.items()), flush=True)
    finally:
        for server in servers:
            server.stop()

    summary, profile_text = profile_service(models_dir, config, order, max(args.profile, 6))
    if args.profile:
        print(profile_text)
    results = {
        "unary": unary,
        "stream": {k: float(np.median(v)) for k, v in runs.items()},
        "data": DATA_NAMES.get(Path(args.events).parent.name, args.events),
        "customers": bundle.shape[0],
        "products": bundle.shape[1],
        "workers": workers,
        "concurrency": args.concurrency,
        "seconds": args.seconds,
        "warmup": args.warmup,
        "repeat": args.repeat,
        "machine": machine(),
        "date": dt.date.today().isoformat(),
        "serve_how": serve_how,
        "profile": summary,
    }
    section = report(results)
    print()
    print(section)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", section)
        print(f"updated {ROOT / 'BENCHMARKS.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
