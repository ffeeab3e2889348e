"""make bench-overload: RecommendProducts at 3× capacity, then back to normal, with and without
admission control, measured in one run.

For each server configuration (the shipped one, and the same server with admission control
turned off: `serve.max_running_calls` 256 and `serve.max_queue_ms` 60000, as before it existed):
1. capacity: closed loop, 16 tasks over 4 connections, `--capacity-seconds` (QPS_cap), of the
   server without admission control (a server that refuses would measure the client's waits);
2. normal load: open loop at 80% of that capacity for `--normal-seconds`: the p99;
3. overload: open loop at 3× that capacity for `--overload-seconds`;
4. recovery: 80% again for `--recovery-seconds`.
Open loop: calls start on a fixed schedule whatever the answers (a 5 s deadline each), spread
over 4 connections, as many web servers calling at once would. Reported: during the overload the
p99 of OK (admitted) calls, the share refused and how fast refusals come back; after it, the
first second from which each 1-second window's p99 stays within 1.5× the normal p99 with no
refusal (recovery). The model and the servers are those of `bench_serve.py` (Complete Journey,
ALS only), plaintext. The open-loop client is `benchmarks/openloop.js` (grpc-js, examples/node's
pinned packages; `--load node`, the default), a process of its own, or this process (grpc.aio,
`--load python`). Either shares the 2 cores with the server: at high rates its own scheduling
delays count in the latencies, for both configurations alike; the report gives how late the
Node.js generator started its calls (p99).

    python benchmarks/bench_overload.py --events data/complete-journey/events.parquet \\
        --catalog data/complete-journey/catalog.parquet [--write]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import (  # noqa: E402
    CHANNELS,
    CONFIG,
    ROOT,
    ServerProcess,
    channel,
    ensure_model,
    fresh_store,
    load_cell,
    machine,
    model_arguments,
    serve_command,
    wait_serving,
    write_section,
)

SECTION = "## make bench-overload"
DEADLINE_S = 5.0
OFF = {"NEXTBEST_SERVE__MAX_RUNNING_CALLS": "256", "NEXTBEST_SERVE__MAX_QUEUE_MS": "60000"}


async def open_loop(address: str, requests, rate: float, seconds: float) -> list[tuple]:
    """Calls started at `rate` per second for `seconds`: (start s, latency ms, status name)."""
    import grpc

    from nextbest.v1 import recommender_pb2_grpc

    chans = [channel(address) for _ in range(CHANNELS)]
    stubs = [recommender_pb2_grpc.RecommenderStub(ch) for ch in chans]
    out: list[tuple] = []
    t0 = time.perf_counter()

    async def one(k: int, at: float) -> None:
        started = time.perf_counter()
        try:
            await stubs[k % len(stubs)].RecommendProducts(
                requests[k % len(requests)], timeout=DEADLINE_S
            )
            code = "OK"
        except grpc.aio.AioRpcError as exc:
            code = exc.code().name
        out.append((at, (time.perf_counter() - started) * 1000.0, code))

    tasks = []
    n = int(rate * seconds)
    for k in range(n):
        at = k / rate
        delay = t0 + at - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(k, at)))
    await asyncio.gather(*tasks)
    for ch in chans:
        await ch.close()
    return out


OPENLOOP = Path(__file__).resolve().parent / "openloop.js"
CAPACITY_TASKS = 16
"""Callers of the closed loop that measures the capacity."""


def open_loop_node(
    address: str, requests, rate: float, seconds: float, concurrency: int = 0
) -> tuple[list, float]:
    """`open_loop` by the Node.js generator (its own process): the calls, and how late it
    started them (p99 ms); with `concurrency`, a closed loop of that many callers instead."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as ids:
        ids.write("\n".join(r.customer_id for r in requests))
    try:
        cmd = ["node", str(OPENLOOP), "--address", address, "--customers", ids.name]
        pace = ["--concurrency", str(concurrency)] if concurrency else ["--rate", f"{rate:.3f}"]
        cmd += [*pace, "--seconds", f"{seconds:g}", "--channels", str(CHANNELS)]
        cmd += ["--deadline", f"{DEADLINE_S:g}"]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise SystemExit(f"openloop.js failed ({done.returncode}): {done.stderr.strip()}")
        result = json.loads(done.stdout)
    finally:
        Path(ids.name).unlink(missing_ok=True)
    return [tuple(c) for c in result["calls"]], float(result["late_ms_p99"])


def load(args, address: str, requests, rate: float, seconds: float) -> tuple[list, float]:
    """The calls of one open-loop phase by the chosen generator (lateness nan for Python's)."""
    if args.load == "node":
        return open_loop_node(address, requests, rate, seconds)
    return asyncio.run(open_loop(address, requests, rate, seconds)), float("nan")


def summary(calls: list[tuple]) -> dict:
    ok = np.asarray([ms for _, ms, c in calls if c == "OK"])
    refused = np.asarray([ms for _, ms, c in calls if c == "RESOURCE_EXHAUSTED"])
    other = [c for _, _, c in calls if c not in ("OK", "RESOURCE_EXHAUSTED")]
    return {
        "calls": len(calls),
        "ok": len(ok),
        "refused": len(refused),
        "other": len(other),
        "other_codes": sorted(set(other)),
        "p99_ok": float(np.percentile(ok, 99)) if len(ok) else float("nan"),
        "p50_ok": float(np.percentile(ok, 50)) if len(ok) else float("nan"),
        "p99_refused": float(np.percentile(refused, 99)) if len(refused) else float("nan"),
    }


def recovery_s(calls: list[tuple], normal_p99: float) -> float:
    """Seconds after the overload until every later 1-second window has p99 ≤ 1.5× normal and
    no refusal (nan if never)."""
    windows = int(max((at for at, _, _ in calls), default=0)) + 1
    good = []
    for w in range(windows):
        mine = [(ms, c) for at, ms, c in calls if w <= at < w + 1]
        ok = [ms for ms, c in mine if c == "OK"]
        good.append(
            bool(mine) and len(ok) == len(mine) and float(np.percentile(ok, 99)) <= 1.5 * normal_p99
        )
    for w in range(windows):
        if all(good[w:]):
            return float(w)
    return float("nan")


def run_config(name, cmd, env, work, requests, rates, args) -> dict:
    server = ServerProcess(name, cmd, work / f"overload-{name}.log", env)
    try:
        address = server.wait_ready()
        asyncio.run(wait_serving(address))
        if args.load == "node":
            calls, _ = open_loop_node(address, requests, 0, args.capacity_seconds, CAPACITY_TASKS)
            cap = {"qps": sum(c[2] == "OK" for c in calls) / args.capacity_seconds}
        else:
            cap = asyncio.run(
                load_cell(address, requests, CAPACITY_TASKS, args.capacity_seconds, 2.0)
            )
        normal_rate, over_rate = rates or (0.8 * cap["qps"], 3.0 * cap["qps"])
        normal_calls, _ = load(args, address, requests, normal_rate, args.normal_seconds)
        normal = summary(normal_calls)
        over_calls, late_ms = load(args, address, requests, over_rate, args.overload_seconds)
        over = summary(over_calls)
        over["late_ms_p99"] = late_ms
        after, _ = load(args, address, requests, normal_rate, args.recovery_seconds)
        print(f"{name}: capacity {cap['qps']:.0f}/s; normal {normal}; overload {over}", flush=True)
        return {
            "capacity": cap,
            "rates": (normal_rate, over_rate),
            "normal": normal,
            "overload": over,
            "after": summary(after),
            "recovery_s": recovery_s(after, normal["p99_ok"]),
        }
    finally:
        server.stop()


def report(r: dict) -> str:
    on, off = r["shipped"], r["off"]
    normal_rate, over_rate = on["rates"]
    lines = [
        f"{SECTION} (Complete Journey, {r['customers']:,} customers)",
        "",
        f"RecommendProducts, open loop ({r['load']}) over {CHANNELS} connections, 5 s deadline: "
        f"{r['normal_seconds']:g} s at 80% of the capacity measured without admission control "
        f"({normal_rate:,.0f}/s), {r['overload_seconds']:g} s at 3× ({over_rate:,.0f}/s), then "
        f"{r['recovery_seconds']:g} s at 80% again. Capacity: closed loop, 16 tasks. Same rates "
        "for both servers.",
        "",
        "| server | closed-loop QPS | p99 at 80% ms | overload: OK/s | OK p50 ms | OK p99 ms | "
        "refused | refusal p99 ms | other errors | recovery s | generator late p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, x in (
        ("as shipped (admission control)", on),
        ("admission control off (before)", off),
    ):
        o = x["overload"]
        lines.append(
            f"| {label} | {x['capacity']['qps']:,.0f} | {x['normal']['p99_ok']:.1f} | "
            f"{o['ok'] / r['overload_seconds']:,.0f} | {o['p50_ok']:.1f} | {o['p99_ok']:.1f} | "
            f"{o['refused']:,} of {o['calls']:,} | {o['p99_refused']:.1f} | "
            f"{o['other']:,} {', '.join(o['other_codes'])} | {x['recovery_s']:g} | "
            f"{o['late_ms_p99']:.1f} |"
        )
    o = on["overload"]
    ratio = o["p99_ok"] / on["normal"]["p99_ok"]
    lines += [
        "",
        f"Machine: {r['machine']}. Run on {r['date']}.",
        "",
        "Aims (issue #16), the shipped server:",
        f"- p99 of admitted calls at 3× ≤ 3× the p99 at 80%: {ratio:.1f}× "
        f"({'met' if ratio <= 3 else 'missed'})",
        f"- refusals at p99 under 5 ms: {o['p99_refused']:.1f} ms "
        f"({'met' if o['p99_refused'] < 5 else 'missed'})",
        f"- steady state within 5 s after the overload: {on['recovery_s']:g} s "
        f"({'met' if on['recovery_s'] <= 5 else 'missed'})",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    model_arguments(parser)
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--normal-seconds", type=float, default=20.0)
    parser.add_argument("--overload-seconds", type=float, default=60.0)
    parser.add_argument("--recovery-seconds", type=float, default=20.0)
    parser.add_argument(
        "--load",
        choices=("node", "python"),
        default="node",
        help="open-loop generator: benchmarks/openloop.js (default) or this process (grpc.aio)",
    )
    parser.add_argument("--write", action="store_true", help="update BENCHMARKS.md")
    args = parser.parse_args()
    if args.load == "node" and shutil.which("node") is None:
        parser.error("--load node needs Node.js 20+ (node on PATH); or --load python")

    from nextbest.store.artifacts import load_bundle
    from nextbest.v1 import recommender_pb2 as pb

    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "bench.toml"
    config.write_text(CONFIG)
    models_dir = work / "models"
    ensure_model(args, config, models_dir)
    bundle = load_bundle(models_dir)
    known = [str(c) for c in bundle.user_ids]
    order = [known[i] for i in np.random.default_rng(7).permutation(len(known))]
    requests = [pb.RecommendProductsRequest(customer_id=c) for c in order]
    cmd, _ = serve_command(config, models_dir)
    # Capacity from the server without admission control (a closed loop against a server that
    # refuses measures the client's pushback waits, not the server); the same rates for both.
    fresh_store(models_dir)
    off = run_config("off", cmd, OFF, work, requests, None, args)
    fresh_store(models_dir)  # the same empty store for the second server
    shipped = run_config("shipped", cmd, None, work, requests, off["rates"], args)
    results = {
        "shipped": shipped,
        "off": off,
        "customers": bundle.shape[0],
        "normal_seconds": args.normal_seconds,
        "overload_seconds": args.overload_seconds,
        "recovery_seconds": args.recovery_seconds,
        "load": "benchmarks/openloop.js, grpc-js" if args.load == "node" else "grpc.aio, here",
        "machine": machine(),
        "date": dt.date.today().isoformat(),
    }
    section = report(results)
    print(section)
    if args.write:
        write_section(ROOT / "BENCHMARKS.md", section, SECTION)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
