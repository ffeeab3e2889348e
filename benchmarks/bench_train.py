"""make bench-train: end-to-end `nextbest train` against reading the file plus a bare implicit ALS
fit on the same matrix, measured in the same run, each in its own process (wall time, peak RSS).

    python benchmarks/bench_train.py --events data/complete-journey/events.parquet \\
        --catalog data/complete-journey/catalog.parquet
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASELINE = """
import sys
import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from threadpoolctl import threadpool_limits

events = pq.read_table(sys.argv[1], columns=["customer_id", "product_id"])
users = pc.dictionary_encode(events["customer_id"]).combine_chunks()
items = pc.dictionary_encode(events["product_id"]).combine_chunks()
matrix = sp.csr_matrix(
    (np.ones(events.num_rows, dtype=np.float32),
     (users.indices.to_numpy(), items.indices.to_numpy())),
    shape=(len(users.dictionary), len(items.dictionary)),
)
matrix.sum_duplicates()
matrix.data = np.log1p(matrix.data)
with threadpool_limits(1, "blas"):
    model = AlternatingLeastSquares(factors=int(sys.argv[2]), iterations=int(sys.argv[3]),
                                    regularization=0.05, alpha=10.0, random_state=42)
    model.fit(matrix, show_progress=False)
print(matrix.shape, matrix.nnz)
"""


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak resident MiB) of one child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    stderr = proc.stderr.read().decode()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr}")
    return wall, usage.ru_maxrss / 1024.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", required=True)
    parser.add_argument("--catalog")
    parser.add_argument("--factors", type=int, default=64)
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the median is kept")
    args = parser.parse_args()
    nextbest = [sys.executable, "-m", "nextbest.cli", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        als_only = Path(tmp) / "als-only.toml"
        als_only.write_text(
            f'[train]\ncandidates = ["als"]\ntune = false\nals_factors = {args.factors}\n'
            f"als_iterations = {args.iterations}\n"
        )
        inputs = ["--events", args.events, "--default-consent", "allow", "--no-progress"]
        if args.catalog:
            inputs += ["--catalog", args.catalog]
        runs = {
            "baseline: read + bare implicit ALS fit": [
                sys.executable,
                "-c",
                BASELINE,
                args.events,
                str(args.factors),
                str(args.iterations),
            ],
            "nextbest train (ALS only, no tuning)": [
                *nextbest,
                "train",
                *inputs,
                "--config",
                str(als_only),
                "--models-dir",
                str(Path(tmp) / "m1"),
            ],
            "nextbest train (defaults: tuning, all candidates)": [
                *nextbest,
                "train",
                *inputs,
                "--models-dir",
                str(Path(tmp) / "m2"),
            ],
        }
        results = {}
        for name, cmd in runs.items():
            n = 1 if "defaults" in name else args.repeat
            samples = sorted(measure(cmd) for _ in range(n))
            results[name] = samples[len(samples) // 2]
            print(f"{name}: {results[name][0]:.1f} s, {results[name][1]:.0f} MiB peak", flush=True)
    base_t, base_m = results["baseline: read + bare implicit ALS fit"]
    print()
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    )
    print(f"events: {args.events}, ALS {args.factors} factors, {args.iterations} iterations")
    print("| run | wall s | peak MiB | time ratio | memory ratio |")
    print("|---|---|---|---|---|")
    for name, (t, m) in results.items():
        print(f"| {name} | {t:.1f} | {m:.0f} | {t / base_t:.2f} | {m / base_m:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
