"""make parity-spark: the Spark engine against implicit on one time split, each in its own process.

Runs `nextbest evaluate --json --engine implicit` and then `--engine spark` on the same data and
cutoff, measures each run's wall time and the peak resident memory of its whole process tree
(Python and, for Spark, the JVM it starts; sampled every 0.2 s from /proc), and prints NDCG@10 of
the served blend and of ALS in both protocols, the time of the final ALS fit and the ratios
Spark / implicit. Exits 1 when the blend's ratio falls below 0.95 in either protocol.

    python benchmarks/parity_spark.py --events data/complete-journey/events.parquet \\
        --catalog data/complete-journey/catalog.parquet --cutoff 2017-12-01
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PAGE_KB = os.sysconf("SC_PAGE_SIZE") / 1024
MIN_RATIO = 0.95


def _tree(root: int) -> list[int]:
    """`root` and every process below it."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += children.get(pid, [])
    return out


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * PAGE_KB / 1024
    except (OSError, IndexError, ValueError):
        return 0.0


def measure(cmd: list[str], out_path: Path) -> tuple[float, float]:
    """(wall seconds, peak MiB of the process tree) of one command; stdout to `out_path`."""
    peak = 0.0
    start = time.perf_counter()
    with open(out_path, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, text=True)
        done = threading.Event()

        def sample() -> None:
            nonlocal peak
            while not done.is_set():
                peak = max(peak, sum(_rss_mib(p) for p in _tree(proc.pid)))
                done.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        _, stderr = proc.communicate()
        done.set()
        sampler.join()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-4000:]}")
    return wall, peak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", required=True)
    parser.add_argument("--catalog")
    parser.add_argument("--cutoff", required=True)
    parser.add_argument("--spark-master", default="local[*]")
    parser.add_argument("--config", help="TOML config given to both runs")
    parser.add_argument("--keep", help="keep both runs' JSON output in this directory")
    args = parser.parse_args()
    base = [sys.executable, "-m", "nextbest.cli", "-q", "evaluate", "--json", "--no-progress"]
    base += ["--events", args.events, "--cutoff", args.cutoff, "--default-consent", "allow"]
    if args.catalog:
        base += ["--catalog", args.catalog]
    if args.config:
        base += ["--config", args.config]
    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as scratch:
        tmp = args.keep or scratch
        Path(tmp).mkdir(parents=True, exist_ok=True)
        for engine in ("implicit", "spark"):
            cmd = [*base, "--engine", engine]
            if engine == "spark":
                cmd += ["--spark-master", args.spark_master]
            print(f"running {engine} ...", file=sys.stderr, flush=True)
            wall, peak = measure(cmd, Path(tmp) / f"{engine}.json")
            result = json.loads((Path(tmp) / f"{engine}.json").read_text())
            runs[engine] = {"wall": wall, "peak": peak, **result}
            print(f"  {wall:.0f} s, peak {peak:,.0f} MiB", file=sys.stderr, flush=True)
    imp, spk = runs["implicit"], runs["spark"]
    print(
        f"Machine: {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"cutoff {args.cutoff}, Spark master {args.spark_master}.\n"
    )
    print("| NDCG@10 | implicit | Spark | Spark / implicit |\n|---|---|---|---|")
    ok = True
    for protocol in ("all", "new"):
        for model in ("blend", "als"):
            a = imp["results"][protocol][model]["ndcg"]
            b = spk["results"][protocol][model]["ndcg"]
            ratio = b / a if a else float("nan")
            if model == "blend":
                ok &= ratio >= MIN_RATIO
            name = "**blend** (served)" if model == "blend" else "ALS alone"
            print(f"| {name}, {protocol} | {a:.4f} | {b:.4f} | {ratio:.2f} |")
    fits = spk["params"].get("spark", {}).get("fits", [])
    print("\n| | implicit | Spark |\n|---|---|---|")
    print(
        f"| final ALS fit ({imp['params']['als_factors']} factors, "
        f"{imp['params']['als_iterations']} iterations) | "
        f"{imp['timings']['fit_als_s']:.1f} s | {spk['timings']['fit_als_s']:.1f} s |"
    )
    print(
        f"| all ALS fits (tuning grid + final) | - | {sum(f['seconds'] for f in fits):.0f} s "
        f"({len(fits)} fits) |"
    )
    print(f"| whole `nextbest evaluate` run | {imp['wall']:.0f} s | {spk['wall']:.0f} s |")
    print(
        f"| peak resident memory (process tree, JVM included) | {imp['peak']:,.0f} MiB | "
        f"{spk['peak']:,.0f} MiB |"
    )
    print(
        f"| chosen ALS parameters | {imp['params']['als_factors']}:"
        f"{imp['params']['als_regularization']}:{imp['params']['als_alpha']} | "
        f"{spk['params']['als_factors']}:{spk['params']['als_regularization']}:"
        f"{spk['params']['als_alpha']} |"
    )
    print(
        f"\nparity (blend NDCG@10 >= {MIN_RATIO} of implicit in both protocols): "
        + ("yes" if ok else "NO")
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
