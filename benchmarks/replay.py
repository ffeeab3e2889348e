"""Real history through the live server (`make replay`): train on Complete Journey up to a cutoff,
serve it with an A/B experiment (the served model against a best-seller control holdout), then
walk day by day through the real purchases after the cutoff. Before each shopping day, every
household that shops on it asks for its recommendations on the web channel, as a site would;
then that day's real purchases are sent through Events.RecordEvents. At the end it prints
`nextbest experiments report`.

What it can tell: whether assignment, impressions, recorded-purchase exclusion, fatigue and
attribution work together on real behaviour, and how well each arm's answers *predict* what
households bought. What it cannot: the purchases did not react to what was shown (they happened
in 2017), so attributed purchases measure prediction, not causal lift.

    python benchmarks/replay.py --events data/complete-journey/events.parquet \\
        --catalog data/complete-journey/catalog.parquet --work-dir data/replay
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from bench_serve import ServerProcess, nextbest_cli  # noqa: E402 - shared server handling

CONFIG = """\
# Written by benchmarks/replay.py: the served model against a best-seller holdout.
[policy]
default_consent = "allow"

[serve]
insecure = true
processes = 1
clock = "replay"

[[experiments]]
name = "replay"
share = 1.0
attribution_days = {attribution_days}

[[experiments.variants]]
name = "served"
share = 0.5

[[experiments.variants]]
name = "control"
share = 0.5
control = true
"""


def _ts(day: str) -> pa.Scalar:
    return pa.scalar(dt.datetime.fromisoformat(day), pa.timestamp("us"))


def split(events: pa.Table, cutoff: str, until: str, households: int) -> tuple[pa.Table, pa.Table]:
    """(training events before the cutoff, purchases from the cutoff to `until`); with
    `households` > 0 only that many households (the first by id) are replayed."""
    train = events.filter(pc.less(events["timestamp"], _ts(cutoff)))
    later = events.filter(
        pc.and_(
            pc.greater_equal(events["timestamp"], _ts(cutoff)),
            pc.less(events["timestamp"], _ts(until)),
        )
    )
    later = later.filter(pc.equal(later["event_type"], "purchase"))
    if households > 0:
        ids = sorted(set(later["customer_id"].to_pylist()))[:households]
        later = later.filter(pc.is_in(later["customer_id"], pa.array(ids)))
    return train, later.sort_by([("timestamp", "ascending")])


def days_of(purchases: pa.Table) -> dict[dt.date, dict[str, list[dict]]]:
    """Shopping day → household → its purchases that day, in time order."""
    out: dict[dt.date, dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in purchases.to_pylist():
        out[row["timestamp"].date()][row["customer_id"]].append(row)
    return dict(sorted(out.items()))


def replay(address: str, days: dict, report_every: int = 7) -> dict[str, int]:
    import grpc
    from google.protobuf.timestamp_pb2 import Timestamp

    from nextbest.v1 import events_pb2, events_pb2_grpc, recommender_pb2_grpc
    from nextbest.v1 import recommender_pb2 as pb

    channel = grpc.insecure_channel(address)
    recommender = recommender_pb2_grpc.RecommenderStub(channel)
    events = events_pb2_grpc.EventsStub(channel)
    counts = {"calls": 0, "failed": 0, "recorded": 0, "answers_in_experiment": 0}

    def ask(customer_id: str):
        request = pb.RecommendProductsRequest(
            customer_id=customer_id, limit=10, channel=pb.CHANNEL_WEB
        )
        for attempt in range(3):  # RESOURCE_EXHAUSTED carries a pushback: honoured
            try:
                return recommender.RecommendProducts(request, timeout=30)
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or attempt == 2:
                    return exc
                time.sleep(0.05)
        return None

    def event(row: dict):
        at = Timestamp()
        at.FromDatetime(row["timestamp"])
        e = events_pb2.Event(
            customer_id=row["customer_id"],
            product_id=row["product_id"],
            event_type="purchase",
            quantity=row["quantity"],
            timestamp=at,
            channel=row["channel"] or "",
        )
        if row["value"] is not None:
            e.value = row["value"]
        return e

    t0 = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        for k, (day, households) in enumerate(days.items()):
            for answer in pool.map(ask, sorted(households)):
                counts["calls"] += 1
                if isinstance(answer, grpc.RpcError) or answer is None:
                    counts["failed"] += 1
                elif answer.HasField("experiment"):
                    counts["answers_in_experiment"] += 1
            rows = [r for h in sorted(households) for r in households[h]]
            for start in range(0, len(rows), 1000):
                batch = [event(r) for r in rows[start : start + 1000]]
                counts["calls"] += 1
                try:
                    reply = events.RecordEvents(
                        events_pb2.RecordEventsRequest(events=batch), timeout=60
                    )
                    counts["recorded"] += reply.recorded
                except grpc.RpcError as exc:
                    counts["failed"] += 1
                    print(f"  RecordEvents failed: {exc.code().name} {exc.details()}")
            if (k + 1) % report_every == 0 or k + 1 == len(days):
                print(
                    f"  {day}: {counts['calls']:,} calls, {counts['failed']} failed, "
                    f"{counts['recorded']:,} purchases recorded "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
    channel.close()
    return counts


def independent_count(store_path: Path, experiment: str, days: float) -> dict[str, dict]:
    """Per variant: households, impressions and last-touch attributed purchases, counted by
    plain SQL over the stored rows (not by the report's code)."""
    import sqlite3

    window = int(days * 86400 * 1_000_000)  # SQLite keeps times as microseconds
    with sqlite3.connect(store_path) as conn:
        shown = conn.execute(
            "SELECT variant, COUNT(DISTINCT customer_id), COUNT(*) FROM nextbest_impressions "
            "WHERE experiment = ? GROUP BY variant",
            (experiment,),
        ).fetchall()
        attributed = conn.execute(
            "WITH touch AS (SELECT e.id, i.variant, ROW_NUMBER() OVER (PARTITION BY e.id "
            "ORDER BY i.shown_at DESC) AS k FROM nextbest_events e JOIN nextbest_impressions i "
            "ON i.customer_id = e.customer_id AND i.product_id = e.product_id "
            'AND i.shown_at <= e."timestamp" AND i.shown_at >= e."timestamp" - ? '
            "WHERE e.event_type = 'purchase' AND i.experiment = ?) "
            "SELECT variant, COUNT(*) FROM touch WHERE k = 1 GROUP BY variant",
            (window, experiment),
        ).fetchall()
    out = {v: {"customers": c, "impressions": n, "attributed_purchases": 0} for v, c, n in shown}
    for variant, n in attributed:
        out[variant]["attributed_purchases"] = n
    return out


def check_report(report: dict, counted: dict[str, dict]) -> list[str]:
    """Where the report and the independent count differ (empty: they agree)."""
    [experiment] = report["experiments"]
    problems = []
    for arm in experiment["arms"]:
        for key, value in counted.get(arm["variant"], {}).items():
            if arm[key] != value:
                problems.append(f"{arm['variant']}.{key}: report {arm[key]}, counted {value}")
    return problems


def dashboard(metrics_port: int, work: Path, report: dict) -> list[str]:
    """Fetch /dashboard.json and /dashboard from the live server; their experiments must be the
    report's. A screenshot when Chromium is there."""
    import os
    import urllib.request

    base = f"http://127.0.0.1:{metrics_port}"
    with urllib.request.urlopen(base + "/dashboard.json", timeout=120) as reply:
        figures = json.loads(reply.read())
    with urllib.request.urlopen(base + "/dashboard", timeout=120) as reply:
        (work / "dashboard.html").write_bytes(reply.read())
    chromium = shutil.which("chromium")
    if chromium:
        sandbox = ["--no-sandbox"] if os.geteuid() == 0 else []
        subprocess.run(
            [chromium, "--headless", "--disable-gpu", *sandbox,
             f"--user-data-dir={work / 'chromium'}", f"--screenshot={work / 'dashboard.png'}",
             "--window-size=1200,1500", base + "/dashboard"],
            capture_output=True, timeout=120,
        )  # fmt: skip
    return [] if figures["experiments"] == report["experiments"] else ["dashboard != report"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", required=True)
    ap.add_argument("--catalog", required=True)
    ap.add_argument("--cutoff", default="2017-12-01")
    ap.add_argument("--until", default="2018-01-01", help="replay purchases before this day")
    ap.add_argument("--households", type=int, default=0, help="replay only this many (0 = all)")
    ap.add_argument("--attribution-days", type=float, default=7.0)
    ap.add_argument("--work-dir", default="data/replay")
    ap.add_argument("--reuse-model", action="store_true", help="keep a model trained before")
    args = ap.parse_args()

    work = Path(args.work_dir).resolve()
    models, store_path = work / "models", work / "store.db"
    work.mkdir(parents=True, exist_ok=True)
    for path in work.glob("store.db*"):
        path.unlink()
    store = f"sqlite:///{store_path}"
    config = work / "replay.toml"
    config.write_text(CONFIG.format(attribution_days=args.attribution_days))
    train, later = split(pq.read_table(args.events), args.cutoff, args.until, args.households)
    days = days_of(later)
    households = len({h for d in days.values() for h in d})
    print(
        f"replay {args.cutoff} .. {args.until}: {later.num_rows:,} purchases of {households:,} "
        f"households on {len(days)} days; training on {train.num_rows:,} events before",
        flush=True,
    )
    cli = nextbest_cli()
    if not (args.reuse_model and (models / "CURRENT").exists()):
        shutil.rmtree(models, ignore_errors=True)
        pq.write_table(train, work / "train.parquet")
        t0 = time.perf_counter()
        subprocess.run(
            [*cli, "train", "--events", str(work / "train.parquet"), "--catalog", args.catalog,
             "--models-dir", str(models), "--store", store, "--default-consent", "allow"],
            check=True, cwd=ROOT, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        print(f"trained in {time.perf_counter() - t0:.0f} s", flush=True)
    metrics_port = free_port()
    server = ServerProcess(
        "nextbest serve",
        [*cli, "serve", "--config", str(config), "--models-dir", str(models), "--port", "0",
         "--metrics-port", str(metrics_port), "--store", store],
        work / "server.log",
    )  # fmt: skip
    try:
        address = server.wait_ready()
        counts = replay(address, days)
        time.sleep(1.0)  # the last impressions are written every 0.5 s
        report = json.loads(report_of(cli, config, store, work))
        problems = dashboard(metrics_port, work, report)
    finally:
        server.stop()
    print(
        f"{counts['calls']:,} calls, {counts['failed']} failed; "
        f"{counts['answers_in_experiment']:,} answers in the experiment; "
        f"{counts['recorded']:,} purchases recorded",
        flush=True,
    )
    report = json.loads(report_of(cli, config, store, work))  # after the server wrote all
    (work / "report.json").write_text(json.dumps(report, indent=2))
    (work / "counts.json").write_text(json.dumps(counts))
    print(
        subprocess.run(
            [*cli, "experiments", "report", "--config", str(config), "--store", store],
            check=True,
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout  # fmt: skip
    )
    problems += check_report(report, independent_count(store_path, "replay", args.attribution_days))
    print(
        "the report equals an independent SQL count of the stored impressions and purchases; "
        "the live /dashboard shows the same experiment figures"
        if not problems
        else "MISMATCH: " + "; ".join(problems)
    )
    return 1 if counts["failed"] or problems else 0


def report_of(cli: list[str], config: Path, store: str, work: Path) -> str:
    return subprocess.run(
        [*cli, "experiments", "report", "--config", str(config), "--store", store, "--json",
         "--html", str(work / "report.html")],
        check=True, cwd=ROOT, capture_output=True, text=True,
    ).stdout  # fmt: skip


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
