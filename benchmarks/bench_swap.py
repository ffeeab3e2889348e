"""A model swap under load (issue #13: "no p99 spike above 2× the steady p99 during a swap"; issue
#16: the soak's refusals around its swap).

`nextbest serve` as shipped (`serve.processes`: one per core) on the bench-serve model, SQLite
store. Its capacity is measured first (a closed loop of 16 callers, benchmarks/openloop.js);
then RecommendProducts at `--load-share` of it (open loop, 4 connections, 5 s deadline) for
`--seconds`, and at `--swap-at` seconds `nextbest models promote` of a second version. Per
5-second window: calls, refusals, p50 and p99 of the answered calls; and the swap's figures
against the steady part before it (the p99 of the windows before the promotion).

`--env NAME=VALUE` (repeatable) sets server settings for a variant, e.g.
`--env NEXTBEST_SERVE__WARM_BEFORE_SWAP_S=0`.

    python benchmarks/bench_swap.py --events data/complete-journey/events.parquet \\
        --catalog data/complete-journey/catalog.parquet [--seconds 90] [--swap-at 30]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_overload import CAPACITY_TASKS, open_loop_node  # noqa: E402
from bench_serve import (  # noqa: E402
    CONFIG,
    ROOT,
    ServerProcess,
    ensure_model,
    fresh_store,
    model_arguments,
    nextbest_cli,
    serve_command,
    train_command,
    wait_serving,
)

WINDOW_S = 5.0


def two_versions(args, config: Path, models_dir: Path) -> list[str]:
    """The model's versions, oldest first, training a second one when there is only one."""
    from nextbest.store.artifacts import list_versions

    ensure_model(args, config, models_dir)
    if len(list_versions(models_dir)) < 2:
        cmd = train_command(config, args.events, args.catalog, models_dir)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return [v["version"] for v in list_versions(models_dir)]


def promote(models_dir: Path, version: str) -> None:
    cmd = [*nextbest_cli(), "models", "promote", version, "--models-dir", str(models_dir)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)


def windows(calls: list[tuple], seconds: float) -> list[dict]:
    out = []
    for w in range(int(np.ceil(seconds / WINDOW_S))):
        lo, hi = w * WINDOW_S, (w + 1) * WINDOW_S
        mine = [(ms, c) for at, ms, c in calls if lo <= at < hi]
        ok = np.asarray([ms for ms, c in mine if c == "OK"])
        out.append(
            {
                "from": lo,
                "calls": len(mine),
                "refused": sum(c == "RESOURCE_EXHAUSTED" for _, c in mine),
                "other": sum(c not in ("OK", "RESOURCE_EXHAUSTED") for _, c in mine),
                "p50": float(np.percentile(ok, 50)) if len(ok) else float("nan"),
                "p99": float(np.percentile(ok, 99)) if len(ok) else float("nan"),
            }
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    model_arguments(parser)
    parser.add_argument("--seconds", type=float, default=90.0)
    parser.add_argument("--swap-at", type=float, default=30.0)
    parser.add_argument("--load-share", type=float, default=0.8)
    parser.add_argument("--capacity-seconds", type=float, default=10.0)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE")
    args = parser.parse_args()

    from nextbest.store.artifacts import load_bundle
    from nextbest.v1 import recommender_pb2 as pb

    work = (ROOT / args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    config = work / "bench.toml"
    config.write_text(CONFIG)
    models_dir = work / "models"
    old, new = two_versions(args, config, models_dir)[-2:]
    promote(models_dir, old)
    known = [str(c) for c in load_bundle(models_dir).user_ids]
    order = [known[i] for i in np.random.default_rng(7).permutation(len(known))]
    requests = [pb.RecommendProductsRequest(customer_id=c) for c in order]
    env = dict(e.split("=", 1) for e in args.env)
    fresh_store(models_dir)
    cmd, _ = serve_command(config, models_dir)
    server = ServerProcess("swap", cmd, work / "swap.log", env)
    try:
        address = server.wait_ready()
        asyncio.run(wait_serving(address))
        time.sleep(15)  # the start's slate warming (a quarter of each process) ends first
        calls, _ = open_loop_node(address, requests, 0, args.capacity_seconds, CAPACITY_TASKS)
        capacity = sum(c[2] == "OK" for c in calls) / args.capacity_seconds
        rate = args.load_share * capacity
        print(f"capacity {capacity:.0f} calls/s; load {rate:.0f}/s; swap {old} → {new}")
        swap_done: dict = {}

        def swap_later() -> None:
            time.sleep(args.swap_at)
            swap_done["start"] = time.monotonic()
            promote(models_dir, new)
            swap_done["promoted"] = time.monotonic()

        t0 = time.monotonic()
        threading.Thread(target=swap_later, daemon=True).start()
        calls, late = open_loop_node(address, requests, rate, args.seconds)
        print(f"generator started its calls {late:.0f} ms late at p99")
    finally:
        server.stop()
        promote(models_dir, old)
    log = (work / "swap.log").read_text()
    served = [line for line in log.splitlines() if f"serving model {new}" in line]
    ranked = [line for line in log.splitlines() if f"slates of model {new} ranked" in line]
    rows = windows(calls, args.seconds)
    steady = [r["p99"] for r in rows if r["from"] + WINDOW_S <= args.swap_at and r["from"] >= 5]
    base = float(np.median(steady)) if steady else float("nan")
    print(
        f"promote took {swap_done['promoted'] - swap_done['start']:.1f} s (started at "
        f"{swap_done['start'] - t0:.1f} s)"
    )
    for line in served + ranked:
        print("  server:", line[-160:])
    print("\n| from s | calls | refused | other | p50 ms | p99 ms | p99 / steady |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['from']:.0f} | {r['calls']} | {r['refused']} | {r['other']} | "
            f"{r['p50']:.1f} | {r['p99']:.1f} | {r['p99'] / base:.2f} |"
        )
    after = [r for r in rows if r["from"] + WINDOW_S > args.swap_at]
    print(
        f"\nsteady p99 {base:.1f} ms; from the swap on: refused "
        f"{sum(r['refused'] for r in after)} of {sum(r['calls'] for r in after)}, worst window "
        f"p99 {max(r['p99'] for r in after):.1f} ms ({max(r['p99'] for r in after) / base:.2f}×)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
