"""The `nextbest` command line: the only place that wires config, files and modules together."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nextbest import __version__
from nextbest.config import CONSENT_DEFAULTS, ROLES, Settings, load_settings
from nextbest.data.readers import (
    PURPOSES,
    read_consent,
    read_customer_ids,
    write_table,
)
from nextbest.errors import ConfigError, DataError, NextbestError
from nextbest.evaluation import METRICS, PROTOCOLS

__all__ = ["main", "build_parser"]

logger = logging.getLogger("nextbest")
DAY = dt.timedelta(days=1)


def _parse_date(text: str) -> float:
    """'YYYY-MM-DD' (or ISO datetime) → days since the epoch (UTC)."""
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a date (YYYY-MM-DD): {text!r}") from None
    if when.tzinfo is not None:
        when = when.astimezone(dt.UTC).replace(tzinfo=None)
    return (when - dt.datetime(1970, 1, 1)) / DAY


def _date_arg(text: str) -> tuple[str, float]:
    """(the text as given, days since the epoch)."""
    return text, _parse_date(text)


def _number_in(kind: type, low: float, high: float | None, what: str):
    """An argparse type: a `kind` number within [low, high] (no upper bound when None)."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" if high is None else f"within {low}..{high}"
            raise argparse.ArgumentTypeError(f"must be {bounds}: {text!r}")
        return value

    return parse


_share = _number_in(float, 0.0, 1.0, "a number")
_port = _number_in(int, 0, 65535, "a port number")
_positive_int = _number_in(int, 1, None, "an integer")


# --- shared input handling -----------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(getattr(args, "config", None))
    if getattr(args, "default_consent", None):
        settings = settings.with_overrides("policy", default_consent=args.default_consent)
    if getattr(args, "max_reject_share", None) is not None:
        settings = settings.with_overrides("data", max_reject_share=args.max_reject_share)
    engine = {
        "engine": getattr(args, "engine", None),
        "spark_master": getattr(args, "spark_master", None),
    }
    if any(v is not None for v in engine.values()):
        settings = settings.with_overrides("train", **{k: v for k, v in engine.items() if v})
    return settings


def _check_engine(settings: Settings) -> None:
    """With train.engine = spark: a one-line error now when pyspark or Java is missing, before
    any data is read (pyspark is imported only on this path)."""
    if settings.train.engine == "spark":
        from nextbest.spark_engine import check_available

        check_available()


def _inputs(args: argparse.Namespace, settings: Settings):
    """The training inputs named on the command line, read and gated (`training.inputs`)."""
    from nextbest.training.inputs import InputFiles, read_inputs

    files = InputFiles(
        events=args.events,
        catalog=args.catalog,
        consent=args.consent,
        erased=args.erased,
        store=getattr(args, "store", None),
        content=getattr(args, "content", None),
        rejects=args.rejects,
    )
    return read_inputs(files, settings)


PROTOCOL_TITLES = {
    "next_basket": "next basket: the first purchase day after the cutoff",
    "all": "all purchases within 30 days of the cutoff",
    "new": "new-to-customer purchases within 30 days",
}
BASELINES = ("buy again", "best sellers")


def best_baseline(rows: dict) -> tuple[str, float]:
    """The better of buy again and best sellers by NDCG (TIFU-KNN is reported beside them)."""
    found = {b: rows[b]["ndcg"] for b in BASELINES if b in rows}
    if not found:
        return "", 0.0
    name = max(found, key=found.get)
    return name, found[name]


def _print_table(results: dict, k: int, out=sys.stdout) -> None:
    for protocol in PROTOCOLS:
        rows = results.get(protocol, {})
        if not rows:
            continue
        title = PROTOCOL_TITLES[protocol]
        print(f"\n{title} (k={k}, customers={next(iter(rows.values()))['users']:,})", file=out)
        header = f"{'model':<14}" + "".join(f"{m:>11}" for m in METRICS)
        print(header, file=out)
        print("-" * len(header), file=out)
        for name, m in rows.items():
            print(f"{name:<14}" + "".join(f"{m[x]:>11.4f}" for x in METRICS), file=out)
        name, base = best_baseline(rows)
        for model in ("served", "blend"):
            if model in rows and base > 0:
                line = (
                    f"{model} NDCG / best baseline ({name}) NDCG = {rows[model]['ndcg'] / base:.2f}"
                )
                if "tifu-knn" in rows and rows["tifu-knn"]["ndcg"] > 0:
                    line += f"; / TIFU-KNN = {rows[model]['ndcg'] / rows['tifu-knn']['ndcg']:.2f}"
                print(line, file=out)


def _progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


# --- commands -------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace) -> int:
    from nextbest.data.adapters import prepare

    report = prepare(args.dataset, args.source, args.out)
    print(report.summary())
    out = Path(args.out)
    print(
        f"wrote {out / 'events.parquet'}, {out / 'catalog.parquet'} and {out / 'content.parquet'} "
        "(the content is generated: one guide per category, not from the data set)"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from nextbest.store.artifacts import publish
    from nextbest.training import train

    settings = _settings(args)
    _check_engine(settings)
    inputs = _inputs(args, settings)
    events, catalog, content, meta = inputs.events, inputs.catalog, inputs.content, inputs.meta
    bundle, report, _ = train(events, catalog, settings, progress=_progress(args), content=content)
    if report.validation:
        print(
            f"validation window: last {settings.train.validation_days} days of the data "
            "(the blend was fitted there: its figures are optimistic; see `nextbest evaluate`)"
        )
        _print_table(report.validation, settings.train.k)
    if report.lifecycle:
        auc = report.lifecycle["risk_validation_auc"]
        print(
            f"churn risk ({report.lifecycle['horizon_days']:g} days): served by the "
            f"{report.lifecycle['risk_model']} model; validation AUC "
            + ", ".join(f"{k} {v:.3f}" for k, v in auc.items())
        )
    else:
        print("lifecycle: none in this model (too little history to fit churn risk)")
    manifest = _manifest(meta, report)
    c = report.counts
    print(
        f"content snapshot: {c['content_items']:,} items linking {c['content_product_links']:,} "
        f"product ids, {c['content_links_unknown_to_model']:,} of them unknown to the model (kept)"
        if args.content
        else "content snapshot: empty (no --content)"
    )
    version = publish(bundle, args.models_dir, manifest, promote=args.promote)
    if args.promote:
        print(f"published model {version} to {args.models_dir} (CURRENT → {version})")
    else:
        print(
            f"published model {version} to {args.models_dir}; CURRENT unchanged (go live with "
            f"`nextbest models promote {version} --models-dir {args.models_dir}`)"
        )
    return 0


def _manifest(meta: dict, report) -> dict:
    """What a published version records of its training run."""
    return {
        **meta,
        "params": report.params,
        "metrics": {"validation": report.validation, "als_grid": report.als_grid},
        "timings": report.timings,
        "counts": report.counts,
        "libraries": _library_versions(),
    }


def _library_versions() -> dict[str, str]:
    from importlib.metadata import version

    libraries = ("implicit", "numpy", "scipy", "pyarrow", "scikit-learn", "threadpoolctl")
    return {
        "nextbest": __version__,
        "python": sys.version.split()[0],
        **{name: version(name) for name in libraries},
    }


def cmd_lifecycle_evaluate(args: argparse.Namespace) -> int:
    from nextbest.config import clock_day
    from nextbest.data.readers import read_events
    from nextbest.lifecycle.evaluate import evaluate_risk, holdout_check
    from nextbest.lifecycle.model import purchases_of

    settings = _settings(args)
    cutoff = clock_day(args.cutoff)
    if cutoff is None:
        raise ConfigError(f"--cutoff: {args.cutoff!r} is not a date YYYY-MM-DD")
    if args.holdout_days < 0:
        raise ConfigError("--holdout-days: must be >= 0")
    events, _ = read_events(args.events)
    customers, days, values = purchases_of(events)
    if not len(days) or days.min() >= cutoff or days.max() < cutoff:
        raise DataError(f"{args.events}: --cutoff {args.cutoff} is not inside the purchases")
    horizon = settings.lifecycle.horizon_days
    try:
        result = evaluate_risk(customers, days, values, cutoff, horizon)
    except ValueError as exc:
        raise DataError(f"{args.events}: {exc}") from None
    if args.holdout_days:
        result["holdout"] = holdout_check(customers, days, cutoff, args.holdout_days)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    a = result["auc"]
    print(
        f"churn = no purchase in the {horizon:g} days after {args.cutoff}: "
        f"{result['customers']:,} customers, {result['churn_share']:.1%} churned"
    )
    print(f"{'model':10} {'AUC':>7} {'/ recency':>10}")
    for name in ("recency", "bgnbd", "learned"):
        print(f"{name:10} {a[name]:7.4f} {a[name] / a['recency']:10.3f}")
    print(
        f"served: {result['served']} (chosen on validation: "
        + ", ".join(f"{k} {v:.4f}" for k, v in result["validation"].items())
        + ")"
    )
    gap = result["calibration_max_gap"]
    print(f"calibration of the served model by decile (largest gap {gap:.3f}):")
    for k, c in enumerate(result["calibration"], 1):
        print(f"  {k:2}: predicted {c['predicted']:.3f}  actual {c['actual']:.3f}")
    if "holdout" in result:
        h = result["holdout"]
        print(
            f"BG/NBD holdout ({args.holdout_days:g} days): predicted {h['predicted']:,.0f} repeat "
            f"purchase days, actual {h['actual']:,.0f} ({h['predicted'] / h['actual'] - 1:+.1%})"
        )
        for g in h["by_repeats"]:
            print(
                f"  {g['repeats']:>3} repeats: {g['customers']:6,} customers, predicted "
                f"{g['predicted']:.3f}, actual {g['actual']:.3f} per customer"
            )
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from nextbest.training import evaluate_ranked_at

    if args.export_served and not str(args.export_served).lower().endswith(".csv"):
        raise DataError(f"{args.export_served}: --export-served must be a .csv file")
    if args.report:
        from nextbest.report import REPORT_DEPTH, check_available, write_report

        check_available()  # before the training, not after it
    settings = _settings(args)
    _check_engine(settings)
    inputs = _inputs(args, settings)
    events, catalog, meta = inputs.events, inputs.catalog, inputs.meta
    depth = args.k
    if args.report:
        # One ranking of depth max(k, 20) per customer and model: the table's metrics at k and
        # the report's curves at k = 1..20 both come from it.
        depth = max(args.k, REPORT_DEPTH)
    run = evaluate_ranked_at(
        events, catalog, settings, args.cutoff[1], k=args.k, depth=depth, progress=_progress(args)
    )
    results, report = run.results, run.report
    if args.json:
        json.dump(
            {
                "cutoff": args.cutoff[0],
                "k": args.k,
                "results": results,
                "durable_share": run.durable_share,
                "win_back": run.win_back,
                "params": report.params,
                "als_grid": report.als_grid,
                "timings": report.timings,
                "data": meta["data"],
            },
            sys.stdout,
            indent=2,
            default=float,
        )
        print()
    else:
        print(
            f"cutoff {args.cutoff[0]}: trained on events before it, tested on purchases after; "
            "served = what RecommendProducts answers (email channel, clock at the cutoff), "
            "blend = the trainer's ranking before the serving rules"
        )
        _print_table(results, args.k)
        print(
            f"\ndurable rule: {run.durable_share:.2%} of the served top {args.k} items are "
            "durables the customer bought before (the rule says 0)"
        )
        if run.win_back:
            w = run.win_back
            best = max(w["buy_again"]["ndcg"], w["best_sellers"]["ndcg"])
            print(
                f"win-back: {w['win_back']['users']:,} customers dormant at the cutoff came back; "
                f"NDCG@{args.k} of their return basket: win-back {w['win_back']['ndcg']:.4f}, "
                f"buy again {w['buy_again']['ndcg']:.4f}, best sellers "
                f"{w['best_sellers']['ndcg']:.4f} (win-back / best baseline "
                f"{w['win_back']['ndcg'] / best if best else float('nan'):.2f})"
            )
    if args.export_served:
        _export_served(run, args.export_served)
    if args.publish:
        from nextbest.store.artifacts import publish

        manifest = _manifest(meta, report)
        manifest["evaluation"] = {"cutoff": args.cutoff[0], "results": results}
        version = publish(run.bundle, args.publish, manifest)
        print(
            f"published the model trained before {args.cutoff[0]} as {version} to {args.publish} "
            f'(CURRENT → {version}; serve it with serve.clock = "{args.cutoff[0][:10]}" to see '
            "the evaluated answers)",
            file=sys.stderr,
        )
    if args.report:
        import shlex

        index = write_report(
            args.report,
            run,
            events,
            k=args.k,
            cutoff=args.cutoff[0],
            command=shlex.join(["nextbest", *sys.argv[1:]]),
            data=meta["data"],
            lifecycle=settings.lifecycle,
        )
        print(f"report: {index}", file=sys.stderr if args.json else sys.stdout)
    return 0


def _export_served(run, path: str) -> None:
    """Write the served list of every evaluated customer (CSV: customer_id, rank, product_id)."""
    ids = run.served_ids
    users = np.repeat(run.served_users, ids.shape[1])
    rank = np.tile(np.arange(1, ids.shape[1] + 1), len(run.served_users))
    flat = ids.ravel()
    ok = flat >= 0
    table = pa.table(
        {
            "customer_id": pa.array(run.bundle.user_ids[users[ok]].astype(str), pa.string()),
            "rank": pa.array(rank[ok], pa.int32()),
            "product_id": pa.array(run.bundle.item_ids[flat[ok]].astype(str), pa.string()),
        }
    )
    write_table(table, path)
    print(f"served lists: {table.num_rows:,} rows to {path}", file=sys.stderr)


def cmd_recommend(args: argparse.Namespace) -> int:
    from nextbest.policy import consent_state
    from nextbest.service import ProductQuery, ServedModel, fixed_consent
    from nextbest.store.artifacts import load_bundle

    settings = _settings(args)
    if not str(args.output).lower().endswith(".csv"):
        raise DataError(f"{args.output}: --output must be a .csv file")
    bundle = load_bundle(args.models_dir)
    customers, report = read_customer_ids(args.customers)
    logger.info("%s", report.summary())
    ids = pc.unique(customers).to_pylist()
    consent = None
    if args.consent:
        consent, c_report = read_consent(
            args.consent, max_reject_share=settings.data.max_reject_share
        )
        logger.info("%s", c_report.summary())
    # The server's answer path (email channel), so that the export and every channel agree.
    served = ServedModel(
        bundle, settings, fixed_consent(consent_state(consent, settings.policy)), as_of=args.as_of
    )
    rows: dict[str, list] = {"customer_id": [], "rank": [], "product_id": [], "score": []}
    personalized = 0
    for start in range(0, len(ids), 1024):
        queries = [ProductQuery(customer_id=c, limit=args.limit) for c in ids[start : start + 1024]]
        for answer in served.recommend(queries):
            personalized += answer.personalized
            for rank, item in enumerate(answer.items, 1):
                rows["customer_id"].append(answer.customer_id)
                rows["rank"].append(rank)
                rows["product_id"].append(item.product_id)
                rows["score"].append(round(item.score, 6))
    table = pa.table(
        {
            "customer_id": pa.array(rows["customer_id"], pa.string()),
            "rank": pa.array(rows["rank"], pa.int32()),
            "product_id": pa.array(rows["product_id"], pa.string()),
            "score": pa.array(rows["score"], pa.float64()),
        }
    )
    write_table(table, args.output)
    print(
        f"wrote {table.num_rows:,} rows for {len(ids):,} customers to {args.output} "
        f"({personalized:,} personalized, model {bundle.version})"
    )
    return 0


def cmd_audience(args: argparse.Namespace) -> int:
    from nextbest.service import MAX_LIMIT, ServedModel
    from nextbest.store.artifacts import load_bundle
    from nextbest.store.consent_store import open_store

    settings = _settings(args)
    out = str(args.output).lower()
    if not (out.endswith(".csv") or out.endswith(".parquet")):
        raise DataError(f"{args.output}: --output must be a .csv or .parquet file")
    if not 1 <= args.limit <= MAX_LIMIT:
        raise ConfigError(f"--limit: must be within 1..{MAX_LIMIT}")
    if args.max_customers < 0:
        raise ConfigError("--max-customers: must be >= 0")
    store = open_store(args.store or settings.serve.store)
    try:
        # What a server on this store answers: the same consent, tombstones, events, impressions.
        served = ServedModel.on_store(
            load_bundle(args.models_dir or settings.serve.models_dir),
            settings,
            store,
            erased=store.tombstones(),
        )
        columns: dict[str, list] = {
            k: []
            for k in (
                "customer_id", "stage", "churn_risk", "expected_value", "action",
                "product_ids", "content_ids", "reasons",
            )
        }  # fmt: skip
        for a in served.audience(
            stage=args.stage or "",
            action=args.action or "",
            channel=args.channel,
            limit=args.limit,
            max_customers=args.max_customers,
        ):
            columns["customer_id"].append(a.customer_id)
            columns["stage"].append(a.state.stage)
            columns["churn_risk"].append(round(a.state.churn_risk, 6))
            columns["expected_value"].append(round(a.state.expected_value, 6))
            columns["action"].append(a.action)
            columns["product_ids"].append("|".join(i.product_id for i in a.items))
            columns["content_ids"].append("|".join(c.content_id for c in a.content))
            columns["reasons"].append(" / ".join(a.reasons))
    finally:
        store.close()
    table = pa.table(
        {
            k: pa.array(v, pa.float64() if k in ("churn_risk", "expected_value") else pa.string())
            for k, v in columns.items()
        }
    )
    write_table(table, args.output)
    audience = f"stage {args.stage}" if args.stage else f"action {args.action}"
    print(f"wrote {table.num_rows:,} customers of the {audience} audience to {args.output}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from nextbest.store import artifacts

    if args.action == "list":
        versions = artifacts.list_versions(args.models_dir)
        if not versions:
            print(f"no model versions in {args.models_dir}")
        for v in versions:
            mark = "*" if v["current"] else " "
            print(
                f"{mark} {v['version']}  {v['created_at']}  {v['cf_model']}  "
                f"{v['customers']:,} customers  {v['products']:,} products"
            )
    elif args.action == "promote":
        if not args.version:
            raise NextbestError("models promote needs a VERSION")
        artifacts.promote(args.models_dir, args.version)
        print(f"CURRENT → {args.version}")
    else:
        version = artifacts.rollback(args.models_dir)
        print(f"rolled back: CURRENT → {version}")
    return 0


# --- parser ---------------------------------------------------------------------------------------


def _add_inputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--events", required=True, help="events file (CSV or Parquet, SPEC §2)")
    p.add_argument(
        "--catalog", help="catalog file; events on products missing from it are rejected"
    )
    p.add_argument("--consent", help="consent file (customer_id, purpose, granted, updated_at)")
    p.add_argument("--erased", help="file with a customer_id column: erased customers (tombstones)")
    p.add_argument(
        "--store",
        help="consent and event store URL (sqlite:///file.db, postgresql://...; default "
        "serve.store when it exists): its recorded events are learned from, its consent records "
        "win over --consent, and its erased customers (tombstones) are excluded like --erased",
    )
    p.add_argument("--config", help="TOML config file")
    p.add_argument(
        "--rejects",
        help="write rejected event rows here (.csv or .parquet); catalog, consent (and for "
        "train content) rejects go beside it as <name>-catalog / <name>-consent / <name>-content",
    )
    p.add_argument(
        "--max-reject-share",
        type=_share,
        help="fail when a file's rejected share passes this (default data.max_reject_share)",
    )
    _add_consent_default(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_engine(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--engine",
        choices=("implicit", "spark"),
        help="what fits ALS: implicit on this machine or Apache Spark MLlib (needs the `spark` "
        "extra and Java 17+; default train.engine, implicit)",
    )
    p.add_argument(
        "--spark-master",
        metavar="URL",
        help="Spark master with --engine spark: local[*], spark://host:7077, yarn, k8s://... "
        "(default train.spark_master, local[*])",
    )


def _add_consent_default(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--default-consent",
        choices=CONSENT_DEFAULTS,
        help="what a missing consent record means (overrides policy.default_consent; "
        "the default is deny)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nextbest", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nextbest {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="turn a public data set into events and catalog Parquet")
    p.add_argument("dataset", choices=("online-retail", "complete-journey", "lgsr", "cdnow"))
    p.add_argument("--source", required=True, help="the data set's folder in ../shared/data")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train, validate and publish a model version")
    _add_inputs(p)
    p.add_argument(
        "--content",
        help="content file (content_id, title, kind, product_ids, categories, ...): the model's "
        "content snapshot (empty without it)",
    )
    p.add_argument("--models-dir", required=True, help="where model versions and CURRENT live")
    p.add_argument(
        "--no-promote",
        dest="promote",
        action="store_false",
        help="publish the version without moving CURRENT (promote it after a check)",
    )
    _add_engine(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="time-split evaluation of every model and the blend")
    _add_inputs(p)
    p.add_argument("--cutoff", required=True, type=_date_arg, help="train before, test after")
    p.add_argument("--k", type=_positive_int, default=10, help="metrics at k (default 10)")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.add_argument(
        "--export-served",
        metavar="FILE.csv",
        help="also write what the serving path answered every evaluated customer (customer_id, "
        "rank, product_id; 50 products each, before the protocols cut or filter them)",
    )
    p.add_argument(
        "--publish",
        metavar="MODELS_DIR",
        help="also publish the model trained before the cutoff there (CURRENT moves to it)",
    )
    p.add_argument(
        "--report",
        metavar="DIR",
        help="also write an HTML report with plots to DIR/index.html (metrics at k = 1..20, "
        "coverage, popularity bias, customer activity; needs the `report` extra, matplotlib)",
    )
    _add_engine(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("lifecycle", help="evaluate churn risk and BG/NBD on a time split")
    life = p.add_subparsers(dest="lifecycle_command", required=True)
    q = life.add_parser("evaluate", help="churn-risk AUC and calibration at a cutoff")
    q.add_argument("--events", required=True, help="events file (purchases are used)")
    q.add_argument("--cutoff", required=True, help="YYYY-MM-DD: scored on the horizon after it")
    q.add_argument("--config", help="nextbest.toml ([lifecycle] horizon_days)")
    q.add_argument(
        "--holdout-days",
        type=float,
        default=0.0,
        help="also BG/NBD's predicted against actual repeat purchase days in this many days",
    )
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.set_defaults(func=cmd_lifecycle_evaluate)

    p = sub.add_parser("audience", help="export a stage or action audience (as StreamAudience)")
    p.add_argument("--models-dir", default=None, help="models directory (default serve.models_dir)")
    p.add_argument("--store", help="consent and event store URL (default serve.store)")
    p.add_argument("--config", help="nextbest.toml")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--stage", choices=("new", "active", "at_risk", "dormant", "lapsed"))
    who.add_argument(
        "--action",
        choices=("welcome", "human_touch", "win_back", "care", "replenish", "cross_sell", "rest"),
    )
    p.add_argument("--channel", choices=("email", "web", "app"), default="email")
    p.add_argument("--limit", type=int, default=10, help="products per customer (1..100)")
    p.add_argument("--max-customers", type=int, default=0, help="0 = the whole audience")
    p.add_argument("--output", required=True, help="FILE.csv or FILE.parquet")
    p.set_defaults(func=cmd_audience)

    p = sub.add_parser("recommend", help="batch export of the served ranking (email channel)")
    p.add_argument("--models-dir", required=True)
    p.add_argument("--customers", required=True, help="file with a customer_id column")
    p.add_argument("--limit", type=_positive_int, default=10, help="products per customer")
    p.add_argument("--output", required=True, help="CSV: customer_id,rank,product_id,score")
    p.add_argument("--consent", help="consent file; missing records follow the default consent")
    p.add_argument("--config", help="TOML config file")
    p.add_argument(
        "--as-of",
        type=_parse_date,
        help="date the repurchase timing is judged at (default: the model's last event)",
    )
    _add_consent_default(p)
    p.set_defaults(func=cmd_recommend)

    p = sub.add_parser("serve", help="run the gRPC server on the CURRENT model until SIGTERM")
    p.add_argument("--config", help="TOML config file ([serve] section)")
    p.add_argument("--models-dir", help="model versions and CURRENT (default serve.models_dir)")
    p.add_argument("--host", help="address to listen on (default serve.host)")
    p.add_argument("--port", type=_port, help="port; 0 = any free port (default serve.port)")
    p.add_argument("--store", help="consent store URL (default serve.store)")
    p.add_argument(
        "--metrics-port",
        type=_number_in(int, -1, 65535, "a port number"),
        help="Prometheus /metrics port; 0 = any free port, -1 = off (default serve.metrics_port)",
    )
    p.add_argument(
        "--insecure",
        action="store_true",
        default=None,
        help="plaintext without TLS and, unless serve.clients are listed, without tokens "
        "(local demos and tests; logged as INSECURE)",
    )
    _add_consent_default(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("token", help="make a client token and its [[serve.clients]] entry")
    p.add_argument("--name", required=True, help="the client's name (shown in logs)")
    p.add_argument("--roles", required=True, help="comma-separated: recommend, consent, admin")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser(
        "certificate",
        help="the [[serve.clients]] entry of a client certificate (mutual TLS, no token)",
    )
    p.add_argument("certificate", help="the client's PEM certificate")
    p.add_argument("--name", required=True, help="the client's name (shown in logs)")
    p.add_argument("--roles", required=True, help="comma-separated: recommend, consent, admin")
    p.set_defaults(func=cmd_certificate)

    p = sub.add_parser(
        "consent", help="import, show, export or forget customers' consent and data in the store"
    )
    p.add_argument("action", choices=("import", "get", "audit", "forget", "export"))
    p.add_argument(
        "target", help="import: a consent file; get / audit / forget / export: a customer id"
    )
    p.add_argument(
        "--output",
        help="export: the JSON file to write (everything held about the customer, "
        "src/nextbest/schemas/customer-export.v1.schema.json)",
    )
    p.add_argument("--models-dir", help="export: the served models (default serve.models_dir)")
    p.add_argument("--store", help="consent store URL (default serve.store)")
    p.add_argument("--config", help="TOML config file")
    p.add_argument(
        "--source", default="cli", help="who or what makes the change (audit trail; default cli)"
    )
    _add_consent_default(p)
    p.set_defaults(func=cmd_consent)

    p = sub.add_parser("experiments", help="the A/B experiments: lift over the control")
    exp = p.add_subparsers(dest="experiments_command", required=True)
    q = exp.add_parser("report", help="per variant: customers, attributed purchases, lift, SRM")
    q.add_argument("--config", help="nextbest.toml with the [[experiments]]")
    q.add_argument("--store", help="store URL (default serve.store)")
    q.add_argument("--json", action="store_true", help="print the report as JSON")
    q.add_argument("--html", metavar="FILE", help="also write the report as an HTML page")
    q.add_argument(
        "--events",
        metavar="FILE",
        help="also attribute the purchases of this events file (the next training data); one "
        "also recorded through Events counts once",
    )
    q.set_defaults(func=cmd_experiments_report)

    p = sub.add_parser("models", help="list, promote or roll back model versions")
    p.add_argument("action", choices=("list", "promote", "rollback"))
    p.add_argument("version", nargs="?", help="the version to promote")
    p.add_argument("--models-dir", default="models")
    p.set_defaults(func=cmd_models)
    return parser


def cmd_experiments_report(args: argparse.Namespace) -> int:
    from nextbest.experiments.html import experiments_section
    from nextbest.experiments.report import report_json, report_lines, store_report
    from nextbest.store.consent_store import open_store

    settings = _settings(args)
    more = []
    if args.events:
        from nextbest.data.readers import read_events
        from nextbest.experiments.attribution import purchases_of

        more = purchases_of(read_events(args.events)[0])
    with open_store(args.store or settings.serve.store) as store:
        reports = store_report(settings, store, more)
    if args.html:
        page = (
            "<!doctype html><html><head><meta charset='utf-8'><title>nextbest experiments"
            f"</title></head><body>{experiments_section(reports)}</body></html>"
        )
        try:
            Path(args.html).write_text(page)
        except OSError as exc:
            raise DataError(f"{args.html}: cannot write the report: {exc.strerror}") from None
    if args.json:
        print(json.dumps(report_json(reports), indent=2))
    else:
        print("\n".join(report_lines(reports)))
    return 0


def _roles(text: str) -> list[str]:
    roles = [r.strip() for r in text.split(",") if r.strip()]
    bad = [r for r in roles if r not in ROLES]
    if not roles or bad:
        raise ConfigError(
            f"--roles: {', '.join(bad) or 'none given'}; use some of {', '.join(ROLES)}"
        )
    return roles


def cmd_token(args: argparse.Namespace) -> int:
    from nextbest.auth import new_token, token_sha256

    roles = _roles(args.roles)
    token = new_token()
    print(f"# The client's bearer token (shown once; the server keeps only its hash):\n{token}\n")
    print("# Add to the server's config file:")
    print(f"[[serve.clients]]\nname = {json.dumps(args.name)}")
    print(f'token_sha256 = "{token_sha256(token)}"\nroles = {json.dumps(roles)}')
    return 0


def cmd_certificate(args: argparse.Namespace) -> int:
    from nextbest.auth import certificate_sha256

    roles = _roles(args.roles)
    try:
        fingerprint = certificate_sha256(Path(args.certificate).read_bytes())
    except OSError as exc:
        raise DataError(f"{args.certificate}: cannot read: {exc.strerror}") from None
    except ValueError:
        raise DataError(f"{args.certificate}: not a PEM certificate") from None
    print("# Add to the server's config file (needs serve.tls_client_ca, the CA that signed it):")
    print(f"[[serve.clients]]\nname = {json.dumps(args.name)}")
    print(f'certificate_sha256 = "{fingerprint}"\nroles = {json.dumps(roles)}')
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from nextbest.logs import configure_logging, set_hash_key
    from nextbest.processes import process_count, serve_processes
    from nextbest.server import check_experiments, serve

    settings = _settings(args)
    given = {
        "models_dir": args.models_dir,
        "host": args.host,
        "port": args.port,
        "store": args.store,
        "metrics_port": args.metrics_port,
        "insecure": args.insecure,
    }
    settings = settings.with_overrides("serve", **{k: v for k, v in given.items() if v is not None})
    configure_logging(settings.serve.log_format, logging.getLogger().level)
    set_hash_key(settings.serve.log_hash_key)
    check_experiments(settings)
    count = process_count(settings)
    config = getattr(args, "config", None)
    if count > 1:  # a supervisor of `count` server processes on one port
        return serve_processes(settings, count, logging.getLogger().level, config)
    return serve(settings, config)


def cmd_consent(args: argparse.Namespace) -> int:
    from nextbest.store.consent_store import open_store

    settings = _settings(args)
    store = open_store(args.store or settings.serve.store)
    try:
        if args.action == "import":
            table, report = read_consent(
                args.target, max_reject_share=settings.data.max_reject_share
            )
            logger.info("%s", report.summary())
            counts = store.import_consent(table, source=args.source)
            print(
                f"{args.target}: {report.rows_kept:,} records: {counts['applied']:,} applied, "
                f"{counts['unchanged']:,} unchanged, {counts['older']:,} older than the store's"
            )
        elif args.action == "get":
            stored = store.get_consent(args.target)
            default = settings.policy.default_consent == "allow"
            erased = " (erased: history before the erasure is never used)"
            print(f"customer {args.target}{erased if store.erased([args.target]) else ''}")
            for purpose in PURPOSES:
                r = stored.get(purpose)
                if r is None:
                    print(f"  {purpose:<16} {'granted' if default else 'denied':<8} (default)")
                else:
                    state = "granted" if r.granted else "denied"
                    print(f"  {purpose:<16} {state:<8} {r.updated_at.isoformat()} by {r.source}")
        elif args.action == "audit":
            trail = store.audit(args.target)
            print(f"customer {args.target}: {len(trail)} consent changes")
            for r in trail:

                def state(v):
                    return "-" if v is None else ("granted" if v else "denied")

                print(
                    f"  {r.changed_at.isoformat()}  {r.purpose:<16} {state(r.old_granted):>7} -> "
                    f"{state(r.new_granted):<7} by {r.source}"
                )
        elif args.action == "export":
            _export(args, settings, store)
        else:
            done = store.forget(args.target, source=args.source)
            print(
                f"forgot customer {args.target}: {done.consent_rows} consent records, "
                f"{done.events} events and {done.audit_rows} audit rows deleted"
                + (" (already erased before)" if done.already_erased else "")
                + "; the tombstone excludes them from every later `nextbest train --store`"
            )
    finally:
        store.close()
    return 0


def _export(args: argparse.Namespace, settings: Settings, store) -> None:
    """`nextbest consent export`: what a server on this store and model would export."""
    from nextbest.export import ExportContext, assemble, export_customer, to_json
    from nextbest.service import ServedModel
    from nextbest.store.artifacts import load_bundle

    if not args.output or not str(args.output).lower().endswith(".json"):
        raise ConfigError("--output: export needs a .json file to write")
    default_allow = settings.policy.default_consent == "allow"
    models_dir = args.models_dir or settings.serve.models_dir
    model = None
    if Path(models_dir, "CURRENT").exists():
        model = ServedModel.on_store(
            load_bundle(models_dir), settings, store, erased=store.tombstones()
        )
    ctx = ExportContext.create(
        store, model, args.target, default_allow=default_allow, client="cli", source=args.source
    )
    document = assemble(export_customer(ctx))
    Path(args.output).write_text(to_json(document))
    held = [k for k, v in document.items() if isinstance(v, list)]
    counts = ", ".join(f"{len(document[k])} {k.replace('_', ' ')}" for k in held)
    print(f"exported customer {args.target} to {args.output}: {counts or 'the tombstone only'}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except NextbestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
