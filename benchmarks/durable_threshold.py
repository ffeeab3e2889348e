"""How often products are bought again, by their repeat rate: the data behind
`serve.durable_repeat_rate` (EVALUATION.md, "How the durable threshold was chosen").

For every (customer, product) pair bought before the cutoff, by a customer who buys anything in
the 30 days after it, the share bought again in those 30 days, for products whose smoothed repeat
rate (`RepeatStats.item_repeat_rate`) is below each threshold, and the share of all such rebuys
that a durable rule at that threshold would hide.

    nextbest evaluate --events E --catalog C --cutoff D --default-consent allow --publish M
    python benchmarks/durable_threshold.py --models-dir M --events E --cutoff D
"""

from __future__ import annotations

import argparse
import datetime as dt

import numpy as np

from nextbest.data.readers import read_events
from nextbest.evaluation import relevance
from nextbest.store.artifacts import load_bundle
from nextbest.training import split_at

THRESHOLDS = (0.02, 0.03, 0.05, 0.08, 0.1, 0.15, 0.2, 0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", required=True, help="a model trained before the cutoff")
    parser.add_argument("--events", required=True)
    parser.add_argument("--cutoff", required=True, help="YYYY-MM-DD")
    args = parser.parse_args()
    cutoff = (dt.date.fromisoformat(args.cutoff) - dt.date(1970, 1, 1)).days * 1.0
    bundle = load_bundle(args.models_dir)
    events, _ = read_events(args.events)
    _, after = split_at(events, cutoff)
    rel = relevance(bundle, after, now_day=cutoff)["all"]
    rs = bundle.repeat
    sub = rs.days_bought[rel.users]
    pos = np.repeat(np.arange(len(rel.users)), np.diff(sub.indptr))
    keys = pos.astype(np.int64) * bundle.shape[1] + sub.indices
    rebought = np.isin(keys, rel.keys)
    rate = rs.item_repeat_rate[sub.indices]
    print(f"{len(keys):,} bought pairs of {len(rel.users):,} customers, {rebought.sum():,} again")
    print("| repeat rate below | pairs | rebought in 30 days | share of rebuys lost | others |")
    print("|---|---|---|---|---|")
    for t in THRESHOLDS:
        low = rate < t
        share = rebought[low].mean() if low.any() else 0.0
        print(
            f"| {t:g} | {low.mean():.1%} | {share:.1%} | "
            f"{rebought[low].sum() / max(rebought.sum(), 1):.2%} | {rebought[~low].mean():.1%} |"
        )


if __name__ == "__main__":
    main()
