"""make bench-scale: how the train → publish → serve chain grows with the retailer's size.

For each size (customers; products and events per customer fixed by the options) on a synthetic
retailer from `benchmarks/synth.py`:
- `nextbest train` with ALS only and no tuning: wall time and peak RSS of the process;
- `nextbest serve`: seconds from start to the first personal answer, RSS then;
- RecommendProducts at concurrency 1 and 16 (p50, p99, QPS; bench-serve's client);
- one StreamRecommendations call over a sample of the audience (customers per second).

    python benchmarks/bench_scale.py --sizes 10000 100000 1000000 --products 100000 \\
        --events-per-customer 50 [--work-dir data/bench-scale] [--write]

`--write` replaces the `## make bench-scale` section of BENCHMARKS.md. Data and models of each
size are kept in the work dir and reused (`--fresh` to rebuild).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_serve import CONFIG as SERVE_CONFIG  # noqa: E402
from bench_serve import (  # noqa: E402
    LIMIT,
    ServerProcess,
    load_cell,
    machine,
    nextbest_cli,
    stream_all,
    write_section,
)

SECTION = "## make bench-scale"
# bench-serve's benchmark config, without the metrics port and the model watcher.
CONFIG = SERVE_CONFIG.replace("metrics_port = 0", "metrics_port = -1") + "reload_interval_s = 0\n"
STREAM_SAMPLE = 20_000
"""Customers streamed per size (the whole audience below this)."""


def timed(cmd: list[str], log: Path) -> tuple[float, float]:
    """Run `cmd` to completion under GNU time: (wall seconds, its peak RSS in GiB)."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(
            ["/usr/bin/time", "-f", "peak_kib=%M", *cmd],
            stdout=fh,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}); see {log}")
    peak = [ln for ln in log.read_text().splitlines() if ln.startswith("peak_kib=")]
    return elapsed, int(peak[-1].split("=")[1]) / 2**20


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def first_answer(address: str, customer: str, timeout: float = 1800.0) -> None:
    import grpc

    from nextbest.v1 import recommender_pb2 as pb
    from nextbest.v1 import recommender_pb2_grpc

    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = recommender_pb2_grpc.RecommenderStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = await stub.RecommendProducts(
                    pb.RecommendProductsRequest(customer_id=customer), timeout=10
                )
                if reply.personalized:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{address}: no personal answer after {timeout:.0f} s")


def measure(size: int, args: argparse.Namespace, work: Path) -> dict:
    from nextbest.v1 import recommender_pb2 as pb

    folder = work / f"{size}"
    if args.fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "nextbest.toml").write_text(CONFIG)
    r: dict = {"customers": size}
    if not (folder / "events.parquet").exists():
        cmd = [sys.executable, str(ROOT / "benchmarks" / "synth.py"), "--customers", str(size)]
        cmd += ["--products", str(args.products), "--out", str(folder)]
        cmd += ["--events-per-customer", str(args.events_per_customer)]
        subprocess.run(cmd, check=True, cwd=ROOT)
    models = folder / "models"
    if args.fresh or not (models / "CURRENT").exists():
        shutil.rmtree(models, ignore_errors=True)
        cmd = [*nextbest_cli(), "train", "--config", str(folder / "nextbest.toml")]
        cmd += ["--events", str(folder / "events.parquet"), "--models-dir", str(models)]
        cmd += ["--catalog", str(folder / "catalog.parquet"), "--no-progress"]
        cmd += ["--store", f"sqlite:///{folder / 'train-store.db'}"]
        r["train_s"], r["train_peak_gib"] = timed(cmd, folder / "train.log")
    import pyarrow.parquet as pq

    r["events"] = pq.ParquetFile(folder / "events.parquet").metadata.num_rows
    store = folder / "serve-store.db"
    store.unlink(missing_ok=True)
    cmd = [*nextbest_cli(), "serve", "--config", str(folder / "nextbest.toml")]
    cmd += ["--models-dir", str(models), "--port", "0", "--store", f"sqlite:///{store}"]
    t0 = time.perf_counter()
    server = ServerProcess("nextbest", cmd, folder / "serve.log")
    try:
        address = server.wait_ready(timeout=1800)
        asyncio.run(first_answer(address, "c0"))
        r["ready_s"] = time.perf_counter() - t0
        r["rss_mib"] = rss_mib(server.proc.pid)
        rng = np.random.default_rng(7)
        customers = [f"c{c}" for c in rng.permutation(size)[: min(size, 50_000)]]
        requests = [pb.RecommendProductsRequest(customer_id=c, limit=LIMIT) for c in customers]
        for concurrency in (1, 16):
            cell = asyncio.run(load_cell(address, requests, concurrency, args.seconds, 2.0))
            r[f"c{concurrency}"] = cell
        sample = customers[:STREAM_SAMPLE]
        r["stream_per_s"] = len(sample) / asyncio.run(stream_all(address, sample))
        r["rss_after_mib"] = rss_mib(server.proc.pid)
    finally:
        server.stop()
    return r


def report(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"{SECTION} (synthetic retailer: {args.products:,} products, "
        f"{args.events_per_customer:g} events per customer on average)",
        "",
        "`benchmarks/synth.py` data (Zipf popularity inside categories, per-customer activity, "
        "staples bought again at their own rhythms); `nextbest train` with ALS only and no tuning; "
        "`nextbest serve` plaintext on one process; RecommendProducts through bench-serve's "
        f"grpc.aio client ({args.seconds:g} s per cell); one stream over up to "
        f"{STREAM_SAMPLE:,} customers.",
        "",
        "| customers | events | train s | train peak GiB | first answer s | RSS MiB at start / "
        "after load | c=1 p50 / p99 ms | c=16 QPS, p99 ms | stream customers/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        train = f"{r['train_s']:.0f} | {r['train_peak_gib']:.1f}" if "train_s" in r else "– | –"
        lines.append(
            f"| {r['customers']:,} | {r['events']:,} | {train} | {r['ready_s']:.1f} | "
            f"{r['rss_mib']:.0f} / {r['rss_after_mib']:.0f} | "
            f"{r['c1']['p50']:.2f} / {r['c1']['p99']:.2f} | "
            f"{r['c16']['qps']:.0f}, {r['c16']['p99']:.1f} | {r['stream_per_s']:,.0f} |"
        )
    lines += ["", f"Machine: {machine()}. Run on {dt.date.today().isoformat()}.", ""]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--events-per-customer", type=float, default=50.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--work-dir", default="data/bench-scale")
    parser.add_argument("--fresh", action="store_true", help="rebuild data and models")
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if any(s < 100 for s in args.sizes):
        parser.error("--sizes: each size must be >= 100 customers")
    work = (ROOT / args.work_dir).resolve()
    rows = []
    for size in args.sizes:
        print(f"--- {size:,} customers", flush=True)
        rows.append(measure(size, args, work))
        print(report(rows, args), flush=True)
    text = report(rows, args)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", text, SECTION)
    return 0


if __name__ == "__main__":
    sys.exit(main())
