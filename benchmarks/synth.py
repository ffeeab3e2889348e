"""A synthetic retailer at a chosen size, for scale benchmarks (never for quality figures).

    python benchmarks/synth.py --customers 200000 --products 30000 --events-per-customer 50 \\
        --out data/synth-200k

writes `events.parquet` and `catalog.parquet` (SPEC §2) into --out:
- products in departments and categories; popularity is Zipf-like inside each category and
  across categories; prices log-normal per category;
- customers with their own activity (log-normal number of purchase days) over `--days` days, a
  few favourite categories each;
- repeat purchases: each customer has a staple set bought again at per-product rhythms (7 to 60
  days, with jitter); the other purchases are new draws from the popularity in the customer's
  categories.
Everything is drawn with numpy in whole-array steps (no per-event Python), so 50M events take
minutes, not hours. The same seed gives the same files.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DAY_US = 86_400_000_000
START = np.datetime64("2024-01-01T00:00:00", "us").astype(np.int64)


def catalog(n_products: int, rng: np.random.Generator) -> tuple[pa.Table, np.ndarray]:
    """The catalog, and each product's category index."""
    n_categories = max(n_products // 250, 4)
    n_departments = max(n_categories // 8, 2)
    # Category sizes vary (Zipf-like weights), every category has at least one product.
    weights = 1.0 / np.arange(1, n_categories + 1) ** 0.6
    category = np.sort(rng.choice(n_categories, n_products, p=weights / weights.sum()))
    category[:n_categories] = np.arange(n_categories)
    category = np.sort(category)
    department = category % n_departments
    base_price = np.exp(rng.normal(1.5, 0.8, n_categories))
    price = np.round(base_price[category] * np.exp(rng.normal(0, 0.3, n_products)), 2)
    ids = np.char.add("p", np.arange(n_products).astype(str))
    table = pa.table(
        {
            "product_id": pa.array(ids, pa.string()),
            "title": pa.array(np.char.add("Product ", np.arange(n_products).astype(str))),
            "category": pa.array(np.char.add("cat", category.astype(str))),
            "department": pa.array(np.char.add("dep", department.astype(str))),
            "price": pa.array(price),
        }
    )
    return table, category


def events(
    n_customers: int,
    category: np.ndarray,
    per_customer: float,
    days: int,
    rng: np.random.Generator,
) -> pa.Table:
    n_products = len(category)
    n_categories = int(category.max()) + 1
    # Popularity: Zipf over products within category, categories Zipf too.
    within = np.empty(n_products)
    starts = np.searchsorted(category, np.arange(n_categories))
    sizes = np.diff(np.r_[starts, n_products])
    rank = np.arange(n_products) - np.repeat(starts, sizes)
    within = 1.0 / (rank + 1.0) ** 1.1
    cat_weight = 1.0 / np.arange(1, n_categories + 1) ** 0.8
    popularity = within / np.add.reduceat(within, starts)[category] * cat_weight[category]
    popularity /= popularity.sum()
    # Events per customer: log-normal activity with the requested mean.
    sigma = 0.9
    counts = rng.lognormal(np.log(per_customer) - sigma**2 / 2, sigma, n_customers)
    counts = np.maximum(np.round(counts), 1).astype(np.int64)
    total = int(counts.sum())
    customer = np.repeat(np.arange(n_customers, dtype=np.int64), counts)
    # Half the events (on average) are repeats of a staple set of up to 8 products per customer.
    n_staples = np.minimum(np.maximum(counts // 6, 1), 8)
    staple_start = np.r_[0, np.cumsum(n_staples)[:-1]]
    staples = rng.choice(n_products, int(n_staples.sum()), p=popularity)
    rhythm = rng.uniform(7, 60, len(staples))
    first = rng.uniform(0, days, n_customers)
    is_repeat = rng.random(total) < 0.5
    pick = staple_start[customer] + (rng.random(total) * n_staples[customer]).astype(np.int64)
    product = np.where(is_repeat, staples[pick], 0)
    fresh = ~is_repeat
    product[fresh] = rng.choice(n_products, int(fresh.sum()), p=popularity)
    # Times: repeats at the staple's rhythm from the customer's first day, with jitter; other
    # purchases uniform over the customer's active period.
    order = np.arange(total) - np.repeat(np.r_[0, np.cumsum(counts)[:-1]], counts)
    repeat_day = first[customer] + order * rhythm[pick] / 4 + rng.normal(0, 2, total)
    other_day = rng.uniform(first[customer], days)
    day = np.where(is_repeat, repeat_day % days, other_day)
    stamp = START + (day * DAY_US).astype(np.int64)
    return pa.table(
        {
            "customer_id": pa.array(np.char.add("c", customer.astype(str)), pa.string()),
            "product_id": pa.array(np.char.add("p", product.astype(str)), pa.string()),
            "timestamp": pa.array(stamp, pa.timestamp("us")),
            "event_type": pa.array(np.full(total, "purchase")),
            "quantity": pa.array(np.ones(total)),
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--products", type=int, default=10_000)
    parser.add_argument("--events-per-customer", type=float, default=50.0)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    for name in ("customers", "products", "days"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.events_per_customer <= 0:
        parser.error("--events-per-customer must be > 0")
    clock = time.perf_counter()
    rng = np.random.default_rng(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table, category = catalog(args.products, rng)
    pq.write_table(table, out / "catalog.parquet")
    ev = events(args.customers, category, args.events_per_customer, args.days, rng)
    pq.write_table(ev, out / "events.parquet", row_group_size=1_000_000)
    print(
        f"wrote {ev.num_rows:,} events of {args.customers:,} customers on {args.products:,} "
        f"products to {out} in {time.perf_counter() - clock:.0f} s"
    )


if __name__ == "__main__":
    main()
