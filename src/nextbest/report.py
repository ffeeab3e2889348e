"""The HTML report of `nextbest evaluate --report DIR`: index.html and PNG figures beside it.

    run = evaluate_ranked_at(events, catalog, settings, cutoff, k=10, depth=REPORT_DEPTH)
    write_report(DIR, run, events, k=10, cutoff="2011-11-01", command="nextbest evaluate ...")

What it shows:
- every metric of `evaluation.METRICS` at k = 1..REPORT_DEPTH per model, baselines included, one
  figure per metric with a panel per protocol; the curves come from one ranking of depth
  REPORT_DEPTH per customer and model (`evaluation.metric_curves`), not one evaluation per k;
- catalog coverage at k and the popularity bias of the recommendations (how much of them are the
  best sellers), against the catalog and the customers' own held-out purchases;
- the data set as retention teams look at it: active days per customer in the last 30 days (the
  power-user curve) and monthly cohort retention by first-purchase month.

matplotlib (the `report` extra) draws with the Agg backend, without pyplot's global state.
"""

from __future__ import annotations

import datetime as dt
import html
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nextbest import __version__
from nextbest.data.interactions import DAY_US
from nextbest.errors import NextbestError
from nextbest.evaluation import (
    METRICS,
    PROTOCOLS,
    item_popularity,
    metric_curves,
    popularity_profile,
)
from nextbest.training import RankedEvaluation

__all__ = [
    "REPORT_DEPTH",
    "ACTIVE_WINDOW_DAYS",
    "check_available",
    "active_days_histogram",
    "cohort_retention",
    "write_report",
]

logger = logging.getLogger(__name__)

REPORT_DEPTH = 20
"""The metric curves go from k = 1 to this depth (or to --k when it is larger)."""
ACTIVE_WINDOW_DAYS = 30
FULL_MONTH_DAYS = 28
"""A last month with fewer days of data is marked partial in the cohort heatmap."""
TOP_SHARE = 0.1
"""Popularity bias: the share of recommendations among the top 10% best sellers."""

METRIC_LABELS = {
    "precision": "precision",
    "recall": "recall",
    "ndcg": "NDCG",
    "map": "MAP",
    "hit_rate": "hit rate",
    "coverage": "coverage",
}
METRIC_HELP = {
    "ndcg": "ranking quality: hits near the top count more, 1 = every relevant product first",
    "hit_rate": "share of customers with at least one bought product in their top k",
    "precision": "share of the k recommended products that the customer bought",
    "recall": "share of the customer's bought products found in the top k",
    "map": "mean average precision: like precision, but a hit counts more the higher it ranks",
}
PROTOCOL_TITLES = {
    "next_basket": "next basket (first purchase day after the cutoff)",
    "all": "all purchases within 30 days",
    "new": "new-to-customer purchases within 30 days",
}
MODEL_LABELS = {
    "best sellers": "best sellers",
    "buy again": "buy again",
    "repeat": "repeat model",
    "als": "ALS",
    "bpr": "BPR",
    "cosine": "item-item cosine",
    "bm25": "item-item BM25",
    "blend": "blend (trainer, before the serving rules)",
    "served": "served (RecommendProducts)",
    "tifu-knn": "TIFU-KNN",
}
BASELINES = ("best sellers", "buy again")
# (color, line style, line width): baselines grey and dashed, the served blend thick and black.
MODEL_STYLES = {
    "best sellers": ("#7f7f7f", "--", 1.8),
    "buy again": ("#8c564b", "--", 1.8),
    "repeat": ("#bcbd22", "-.", 1.6),
    "als": ("#1f77b4", "-", 1.6),
    "bpr": ("#9467bd", "-", 1.6),
    "cosine": ("#2ca02c", "-", 1.6),
    "bm25": ("#ff7f0e", "-", 1.6),
    "blend": ("#7f7f7f", "-", 1.6),
    "served": ("#000000", "-", 2.8),
    "tifu-knn": ("#e377c2", "--", 1.8),
}
OTHER_STYLE = ("#17becf", "-", 1.6)


def check_available() -> None:
    """Fail early, with the way out, when matplotlib (the `report` extra) is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise NextbestError(
            "--report needs matplotlib: pip install 'nextbest[report]' (make install does)"
        ) from None


# --- the data set as retention teams see it -------------------------------------------------------


def _purchase_days(events: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(customer code, day since the epoch) of every purchase event."""
    purchases = events.filter(pc.equal(events["event_type"], "purchase"))
    customers = pc.dictionary_encode(purchases["customer_id"]).combine_chunks().indices
    customer = customers.to_numpy(zero_copy_only=False).astype(np.int64)
    micros = pc.cast(purchases["timestamp"], pa.int64()).to_numpy(zero_copy_only=False)
    return customer, np.floor_divide(micros, DAY_US)


@dataclass(frozen=True)
class ActiveDays:
    """Customers by number of days with a purchase in the last `window` days of the data."""

    customers: np.ndarray
    """customers[d - 1]: customers active on exactly d of the days, d = 1..window."""
    first_day: dt.date
    last_day: dt.date


def active_days_histogram(events: pa.Table, window: int = ACTIVE_WINDOW_DAYS) -> ActiveDays:
    """The power-user curve: customers by active days (days with a purchase) among the last
    `window` calendar days of the data, the last day with any purchase included."""
    customer, day = _purchase_days(events)
    last = int(day.max()) if len(day) else 0
    inside = day > last - window
    pairs = np.unique(customer[inside] * (window + 1) + (day[inside] - (last - window)))
    per_customer = np.bincount(pairs // (window + 1))
    counts = np.bincount(per_customer[per_customer > 0], minlength=window + 1)[1:]
    epoch = dt.date(1970, 1, 1)
    return ActiveDays(
        customers=counts,
        first_day=epoch + dt.timedelta(days=last - window + 1),
        last_day=epoch + dt.timedelta(days=last),
    )


@dataclass(frozen=True)
class CohortRetention:
    """Monthly cohorts by first-purchase month."""

    months: list[str]
    """Cohort labels 'YYYY-MM', oldest first."""
    sizes: np.ndarray
    """Customers per cohort."""
    share: np.ndarray
    """share[c, m]: share of cohort c with a purchase m months after its first month (NaN past
    the end of the data)."""
    last_month_days: int
    """Days of the last month that the data covers (up to its last purchase)."""


def cohort_retention(events: pa.Table) -> CohortRetention:
    """Share of each first-purchase-month cohort that buys again 0, 1, 2, ... months later."""
    customer, day = _purchase_days(events)
    month = day.astype("datetime64[D]").astype("datetime64[M]").astype(np.int64)
    n_customers = int(customer.max()) + 1 if len(customer) else 0
    first = np.full(n_customers, np.iinfo(np.int64).max)
    np.minimum.at(first, customer, month)
    lo, hi = (int(month.min()), int(month.max())) if len(month) else (0, 0)
    n = hi - lo + 1
    pairs = np.unique(customer * n + (month - lo))
    who, active = pairs // n, pairs % n + lo
    cohort = first[who] - lo
    counts = np.bincount(cohort * n + (active - first[who]), minlength=n * n).reshape(n, n)
    sizes = np.bincount(first - lo, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = counts / sizes[:, None]
    beyond = np.arange(n)[:, None] + np.arange(n)[None, :] > n - 1
    share[beyond | (sizes[:, None] == 0)] = np.nan
    last_day = int(day.max()) if len(day) else 0
    last_month_start = np.datetime64(hi, "M").astype("datetime64[D]").astype(np.int64)
    return CohortRetention(
        months=[str(np.datetime64(lo + c, "M")) for c in range(n)],
        sizes=sizes,
        share=share,
        last_month_days=last_day - int(last_month_start) + 1,
    )


# --- figures --------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _style(name: str) -> dict:
    color, line, width = MODEL_STYLES.get(name, OTHER_STYLE)
    return {
        "color": color,
        "linestyle": line,
        "linewidth": width,
        "label": MODEL_LABELS.get(name, name),
    }


def _protocol_axes(fig, protocols: list[str]):
    axes = fig.subplots(1, len(protocols), squeeze=False)[0]
    return dict(zip(protocols, axes, strict=True))


def _legend(fig, axes) -> None:
    """One legend for the figure, from every panel's lines (each model once)."""
    seen: dict[str, object] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            seen.setdefault(label, handle)
    fig.legend(seen.values(), seen.keys(), loc="outside right center", frameon=False)


def _save(fig, directory: Path, name: str) -> str:
    fig.savefig(directory / name)
    return name


def _curves_figure(directory, curves, metric: str, k: int, depth: int) -> str:
    protocols = [p for p in PROTOCOLS if p in curves]
    fig = _figure(12, 4.2)
    axes = _protocol_axes(fig, protocols)
    ks = np.arange(1, depth + 1)
    label = "catalog coverage" if metric == "coverage" else METRIC_LABELS[metric]
    for protocol, ax in axes.items():
        for name, values in curves[protocol].items():
            ax.plot(ks, values[metric], **_style(name))
        ax.axvline(k, color="#bbbbbb", linewidth=1, linestyle=":", zorder=0)
        ax.set_title(PROTOCOL_TITLES[protocol])
        ax.set_xlabel("k (products recommended per customer)")
        ax.set_ylabel(f"{label}@k")
        ax.set_xlim(1, depth)
        ax.set_xticks(ks[(ks == 1) | (ks % 5 == 0)])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if not curves[protocol]:
            ax.text(0.5, 0.5, "no customer to evaluate", ha="center", transform=ax.transAxes)
    fig.suptitle(f"{label[0].upper()}{label[1:]} at k = 1..{depth}")
    _legend(fig, axes.values())
    return _save(fig, directory, f"metric-{metric.replace('_', '-')}.png")


def _popularity_figure(directory, run: RankedEvaluation, k: int) -> str:
    """Concentration curves: share of the top-k recommendations among the top x% best sellers."""
    popularity = item_popularity(run.bundle)
    n_items = len(popularity)
    rank_of = np.empty(n_items, dtype=np.int64)
    rank_of[np.lexsort((np.arange(n_items), -popularity))] = np.arange(n_items)
    x = np.arange(1, n_items + 1) / n_items * 100

    def curve(items: np.ndarray) -> np.ndarray:
        counts = np.bincount(rank_of[items], minlength=n_items)
        return np.cumsum(counts) / max(counts.sum(), 1)

    protocols = [p for p in PROTOCOLS if p in run.rankings]
    fig = _figure(12, 4.6)
    axes = _protocol_axes(fig, protocols)
    for protocol, ax in axes.items():
        r = run.rankings[protocol]
        ax.plot(x, x / 100, color="#cccccc", linewidth=1.5, label="catalog (every product once)")
        bought = r.relevance.keys % max(n_items, 1)
        if len(bought):
            ax.plot(
                x,
                curve(bought),
                color="#d62728",
                linestyle=":",
                linewidth=2.2,
                label="held-out purchases",
            )
        for name, ids in r.ids.items():
            top = ids[:, :k]
            ax.plot(x, curve(top[top >= 0]), **_style(name))
        ax.axvline(TOP_SHARE * 100, color="#bbbbbb", linewidth=1, linestyle=":", zorder=0)
        ax.set_xscale("log")
        ax.set_xlim(100 / max(n_items, 1), 100)
        ax.xaxis.set_major_formatter(_percent_formatter())
        ax.yaxis.set_major_formatter(_percent_formatter(scale=100))
        ax.set_ylim(0, 1.02)
        ax.set_title(PROTOCOL_TITLES[protocol])
        ax.set_xlabel("top x% best sellers (log scale)")
        ax.set_ylabel(f"share of top-{k} recommendations")
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(f"Popularity bias: how concentrated the top-{k} recommendations are")
    _legend(fig, axes.values())
    return _save(fig, directory, "popularity.png")


def _percent_formatter(scale: float = 1.0):
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{v * scale:g}%")


def _active_days_figure(directory, active: ActiveDays) -> str:
    from matplotlib.ticker import FuncFormatter

    fig = _figure(10, 4.2)
    ax = fig.subplots()
    days = np.arange(1, len(active.customers) + 1)
    total = max(int(active.customers.sum()), 1)
    ax.bar(days, active.customers, color="#1f77b4", width=0.8)
    for d, c in zip(days, active.customers, strict=True):
        if c:
            share = f"\n{c / total:.0%}" if c / total >= 0.01 else ""
            ax.annotate(
                f"{c:,}{share}",
                (d, c),
                ha="center",
                va="bottom",
                fontsize=7.5,
                xytext=(0, 2),
                textcoords="offset points",
            )
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
    ax.set_ylim(0.7, max(int(active.customers.max()), 1) * 6)
    ax.set_xlabel(f"active days in the last {len(days)} days (days with a purchase)")
    ax.set_ylabel("customers (log scale)")
    ax.set_xticks(days[(days == 1) | (days % 5 == 0)])
    ax.set_xlim(0.4, len(days) + 0.6)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(
        f"Power-user curve: {total:,} customers active {active.first_day} .. {active.last_day}"
    )
    return _save(fig, directory, "activity-last-30-days.png")


def _cohort_figure(directory, cohorts: CohortRetention) -> str:
    import matplotlib as mpl
    from matplotlib.patches import Rectangle

    n = len(cohorts.months)
    fig = _figure(max(7.0, 2.5 + 0.62 * n), max(3.5, 1.4 + 0.36 * n))
    ax = fig.subplots()
    cmap = mpl.colormaps["Blues"].with_extremes(bad="white")
    # Colours span months 1.. (month 0 is 100% by definition and would flatten the rest).
    later = np.ma.masked_invalid(cohorts.share[:, 1:])
    top = float(later.max()) if later.count() and later.max() > 0 else 1.0
    image = ax.imshow(
        np.ma.masked_invalid(cohorts.share), cmap=cmap, vmin=0, vmax=top, aspect="auto"
    )
    partial = cohorts.last_month_days < FULL_MONTH_DAYS
    for c in range(n):
        for m in range(n):
            v = cohorts.share[c, m]
            if not np.isfinite(v):
                continue
            color = "white" if v > 0.55 * top else "black"
            last = partial and c + m == n - 1
            ax.text(
                m,
                c,
                f"{v:.0%}",
                ha="center",
                va="center",
                fontsize=8,
                color=color,
                style="italic" if last else "normal",
            )
            if last:  # the data's last, partial month: shares not comparable with the rest
                ax.add_patch(
                    Rectangle(
                        (m - 0.5, c - 0.5),
                        1,
                        1,
                        fill=False,
                        hatch="///",
                        edgecolor="#888888",
                        linewidth=0,
                    )
                )
    ax.set_xticks(np.arange(n))
    ax.set_xlabel("months since the first purchase")
    ax.set_yticks(np.arange(n))
    ax.set_yticklabels(
        [f"{m}  (n={s:,})" for m, s in zip(cohorts.months, cohorts.sizes, strict=True)]
    )
    ax.set_ylabel("cohort: month of the first purchase")
    bar = fig.colorbar(image, ax=ax, shrink=0.9)
    bar.set_label("share of the cohort active (month 0: 100%)")
    bar.ax.yaxis.set_major_formatter(_percent_formatter(scale=100))
    title = "Monthly cohort retention by first-purchase month"
    if partial:
        title += f"\n(hatched: {cohorts.months[-1]}, only {cohorts.last_month_days} days of data)"
    ax.set_title(title)
    return _save(fig, directory, "cohort-retention.png")


# --- the page -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Figure:
    file: str
    title: str
    caption: str


STAGE_COLOURS = ("#63b3ed", "#2f855a", "#d69e2e", "#dd6b20", "#9b2c2c")


def _stage_figure(directory, stages) -> str:
    """Stacked bars: each first-purchase cohort's customers by stage at the cutoff."""
    from nextbest.lifecycle.stages import STAGES

    n = len(stages.cohorts)
    fig = _figure(max(7.0, 2.5 + 0.45 * n), 4.2)
    ax = fig.subplots()
    totals = np.maximum(stages.by_cohort.sum(axis=1), 1)
    bottom = np.zeros(n)
    for k, name in enumerate(STAGES):
        share = stages.by_cohort[:, k] / totals
        ax.bar(range(n), share, bottom=bottom, color=STAGE_COLOURS[k], label=name, width=0.8)
        bottom += share
    ax.set_xticks(range(n), stages.cohorts, rotation=60, ha="right")
    ax.set_xlabel("cohort: month of the first purchase")
    ax.set_ylabel("share of the cohort at the cutoff")
    ax.yaxis.set_major_formatter(_percent_formatter(100.0))
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set_title("Lifecycle stage at the cutoff by monthly cohort")
    return _save(fig, directory, "lifecycle-stages.png")


def _stage_tables(stages) -> str:
    from nextbest.lifecycle.stages import STAGES

    head = "".join(f"<th>{html.escape(s)}</th>" for s in STAGES)
    counts = "".join(f"<td>{stages.counts[s]:,}</td>" for s in STAGES)
    rows = []
    for k, name in enumerate([*STAGES, "not a customer yet"]):
        cells = "".join(f"<td>{v:,}</td>" for v in stages.transitions[k])
        rows.append(f"<tr><th>{html.escape(name)}</th>{cells}</tr>")
    return (
        f"<p>Customers per stage at the cutoff (the server's stage rules, `[lifecycle]`):</p>"
        f'<table class="stages"><tr>{head}</tr><tr>{counts}</tr></table>'
        "<p>Transitions: rows are the stage 30 days before the cutoff, columns the stage at "
        "it.</p>"
        f'<table class="transitions"><tr><th></th>{head}</tr>{"".join(rows)}</table>'
    )


def _headline_tables(run: RankedEvaluation, k: int, popularity: np.ndarray) -> str:
    parts = []
    metrics = [m for m in METRICS if m != "coverage"]
    for protocol in PROTOCOLS:
        rows = run.results.get(protocol) or {}
        if not rows:
            continue
        users = next(iter(rows.values()))["users"]
        best = {m: max(r[m] for r in rows.values()) for m in metrics}
        head = "".join(f"<th>{METRIC_LABELS[m]}@{k}</th>" for m in METRICS)
        head += "<th>mean popularity percentile</th><th>top-10% best sellers share</th>"
        body = []
        for name, r in rows.items():
            profile = popularity_profile(
                run.rankings[protocol].ids[name][:, :k], popularity, top_share=TOP_SHARE
            )
            cells = "".join(
                f"<td{' class=best' if m in best and r[m] == best[m] else ''}>{r[m]:.4f}</td>"
                for m in METRICS
            )
            cells += f"<td>{profile['mean_percentile']:.1f}</td><td>{profile['top_share']:.1%}</td>"
            label = html.escape(MODEL_LABELS.get(name, name))
            body.append(f"<tr><th scope=row>{label}</th>{cells}</tr>")
        rel = run.rankings[protocol].relevance
        bought = popularity_profile(rel.keys % max(len(popularity), 1), popularity)
        body.append(
            f"<tr class=reference><th scope=row>held-out purchases</th><td colspan={len(METRICS)}>"
            "what these customers bought from the cutoff on (products known to the model)</td>"
            f"<td>{bought['mean_percentile']:.1f}</td><td>{bought['top_share']:.1%}</td></tr>"
        )
        ratio = ""
        baselines = {b: rows[b]["ndcg"] for b in BASELINES if b in rows}
        if "served" in rows and baselines and max(baselines.values()) > 0:
            name = max(baselines, key=baselines.get)
            ratio = (
                f"<p class=ratio>served NDCG@{k} / best baseline ({html.escape(name)}) NDCG@{k} = "
                f"<b>{rows['served']['ndcg'] / baselines[name]:.2f}</b></p>"
            )
        parts.append(
            f"<h3>{PROTOCOL_TITLES[protocol]} ({users:,} customers)</h3>\n"
            f"<table><thead><tr><th>model</th>{head}</tr></thead>\n<tbody>\n"
            + "\n".join(body)
            + f"\n</tbody></table>\n{ratio}"
        )
    return "\n".join(parts)


def _summary(run: RankedEvaluation, events: pa.Table, data: dict, cutoff: str) -> list[tuple]:
    stamps = pc.min_max(events["timestamp"])
    first, last = stamps["min"].as_py(), stamps["max"].as_py()
    n_users, n_items = run.bundle.shape
    p = run.report.params
    cf = str(p.get("cf_model"))
    als = f"{p.get('als_factors')} factors, regularization {p.get('als_regularization')}, alpha "
    als += f"{p.get('als_alpha')}"
    return [
        ("events", data.get("events")),
        ("catalog", data.get("catalog") or "none"),
        (
            "events used",
            f"{events.num_rows:,} ({first:%Y-%m-%d} .. {last:%Y-%m-%d}), "
            f"{len(pc.unique(events['customer_id'])):,} customers",
        ),
        ("cutoff", f"{cutoff}: trained on the events before it, tested on purchases from it on"),
        ("model", f"{n_users:,} customers × {n_items:,} products known before the cutoff"),
        ("test events", f"{run.test_events.num_rows:,} from {cutoff}"),
        (
            "served CF model",
            f"ALS ({als})" if p.get("cf_model") == "als" else MODEL_LABELS.get(cf, cf),
        ),
    ]


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1240px; padding: 0 1rem; color: #222; line-height: 1.4; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
table { border-collapse: collapse; margin: 0.4rem 0; font-size: 0.9rem; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #e4e4e4; text-align: right; }
th[scope=row], thead th:first-child { text-align: left; white-space: nowrap; }
tr.reference th, tr.reference td { color: #666; font-style: italic; }
tr.reference td[colspan] { text-align: left; }
td.best { font-weight: bold; }
dl.summary { display: grid; grid-template-columns: max-content auto; gap: 0.15rem 1rem; }
dl.summary dt { color: #555; }
dl.summary dd { margin: 0; }
pre.command { background: #f4f4f4; padding: 0.6rem; white-space: pre-wrap; word-break: break-all; }
figure { margin: 1.4rem 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eee; }
figcaption { color: #444; font-size: 0.92rem; }
.ratio { margin-top: 0.2rem; }
"""


def write_report(
    directory: str | Path,
    run: RankedEvaluation,
    events: pa.Table,
    *,
    k: int,
    cutoff: str,
    command: str,
    data: dict | None = None,
    lifecycle=None,
) -> Path:
    """Write index.html and its PNG figures into `directory` (created if needed); returns the
    path of index.html. `events` are the events evaluated (after the consent rules), both sides
    of the cutoff; `data` names the input files (`events`, `catalog`); `lifecycle` (the
    LifecycleSettings) adds the stages at the cutoff."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    data = data or {}
    depth = max(REPORT_DEPTH, k)
    n_items = run.bundle.shape[1]
    curves = {
        protocol: {
            name: metric_curves(ids[:, :depth], r.relevance, n_items) for name, ids in r.ids.items()
        }
        for protocol, r in run.rankings.items()
    }
    figures: list[tuple[str, _Figure]] = []
    read_curves = (
        "each line is a model, dashed ones the baselines, the thick black one what is served; "
        f"higher is better; the dotted line marks k = {k}, the k of the table"
    )
    for metric in ("ndcg", "hit_rate", "precision", "recall", "map"):
        name = _curves_figure(directory, curves, metric, k, depth)
        figures.append(
            (
                "quality",
                _Figure(
                    name,
                    f"{METRIC_LABELS[metric]} at k",
                    f"{METRIC_LABELS[metric]}@k ({METRIC_HELP[metric]}) for k = 1..{depth}: "
                    f"{read_curves}.",
                ),
            )
        )
    name = _curves_figure(directory, curves, "coverage", k, depth)
    figures.append(
        (
            "bias",
            _Figure(
                name,
                "catalog coverage at k",
                "Share of the products known to the model that the model recommends to at least "
                "one customer in their top k: low means the same few products for everybody "
                "(best sellers is the floor).",
            ),
        )
    )
    popularity = item_popularity(run.bundle)
    name = _popularity_figure(directory, run, k)
    figures.append(
        (
            "bias",
            _Figure(
                name,
                "popularity bias",
                f"Share of the top-{k} recommendations (y) that are among the top x% best sellers "
                "(x): a curve high on the left recommends mostly best sellers; the grey diagonal "
                "is the catalog itself, the red dotted line what customers actually bought after "
                "the cutoff. The dotted vertical line is the table's top-10% column.",
            ),
        )
    )
    active = active_days_histogram(events)
    name = _active_days_figure(directory, active)
    figures.append(
        (
            "data",
            _Figure(
                name,
                "active days per customer in the last 30 days",
                f"Customers with at least one purchase between {active.first_day} and "
                f"{active.last_day} (the data's last 30 days), by the number of days they bought "
                "on; labels: customers and their share; log scale: a long tail to the right "
                "means many power users.",
            ),
        )
    )
    cohorts = cohort_retention(events)
    partial = (
        f" The hatched cells are the data's last month ({cohorts.months[-1]}, only "
        f"{cohorts.last_month_days} days of data): lower by construction."
        if cohorts.months and cohorts.last_month_days < FULL_MONTH_DAYS
        else ""
    )
    name = _cohort_figure(directory, cohorts)
    figures.append(
        (
            "data",
            _Figure(
                name,
                "monthly cohort retention",
                "Each row is the customers whose first purchase fell in that month; a cell is "
                "the share of them who bought in the month that many months later (month 0 is "
                "100% by definition); read along a row for how a cohort fades, down a column to "
                "compare cohorts; colours span 0 to the highest share after month 0. The first "
                "row also holds everyone who was already a customer when the data starts."
                f"{partial}",
            ),
        )
    )
    stage_html = ""
    if lifecycle is not None:
        from nextbest.config import clock_day
        from nextbest.lifecycle.evaluate import stage_report
        from nextbest.lifecycle.model import purchases_of

        stages = stage_report(*purchases_of(events), clock_day(cutoff), lifecycle)
        stage_html = _stage_tables(stages)
        figures.append(
            (
                "lifecycle",
                _Figure(
                    _stage_figure(directory, stages),
                    "lifecycle stages by cohort",
                    "Each bar is the customers whose first purchase fell in that month, split by "
                    "their stage at the cutoff (new, active, at risk, dormant, lapsed, judged on "
                    "each customer's own purchase rhythm): read along the bars for how older "
                    "cohorts drift to dormant and lapsed.",
                ),
            )
        )
    sections = {
        "quality": f"Ranking quality at k = 1..{depth}",
        "bias": "Coverage and popularity bias",
        "data": "The customers in the data set",
        "lifecycle": "Customer lifecycle at the cutoff",
    }
    body = []
    for key, heading in sections.items():
        if key == "lifecycle" and not stage_html:
            continue
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if key == "lifecycle":
            body.append(stage_html)
        for section, f in figures:
            if section == key:
                body.append(
                    f'<figure><img src="{html.escape(f.file)}" alt="{html.escape(f.title)}">'
                    f"<figcaption>{html.escape(f.caption)}</figcaption></figure>"
                )
    dataset = Path(str(data.get("events") or "events")).resolve().parent.name
    summary = "".join(
        f"<dt>{html.escape(str(term))}</dt><dd>{html.escape(str(value))}</dd>"
        for term, value in _summary(run, events, data, cutoff)
    )
    generated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"nextbest evaluation: {dataset}, cutoff {cutoff}"
    page = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{CSS}</style>
</head>
<body>
<h1>{html.escape(title)}</h1>
<p>Time-split evaluation of what the server serves (the headline), every candidate model, the
trainer's blend and the baselines (nextbest {__version__}, {generated}).</p>
<dl class="summary">{summary}</dl>
<p>Command:</p>
<pre class="command">{html.escape(command)}</pre>
<h2>Headline numbers at k = {k}</h2>
<p>Protocol <i>next basket</i>: the products of the customer's first purchase day after the
cutoff. Protocol <i>all</i>: every product bought within 30 days of the cutoff is relevant, rankings
may repeat purchases. Protocol <i>new</i>: only products the customer never bought before are
relevant, and rankings leave bought products out (the served list is filtered). <i>served</i> is
what RecommendProducts answers on the email channel with the clock at the cutoff. Bold: the
best of each quality column. Popularity percentile: 100 = the best seller, the catalog's mean
is 50; top-10% share: the share of recommendations among the 10% best-selling products (the
catalog's is 10%).</p>
{_headline_tables(run, k, popularity)}
{chr(10).join(body)}
</body>
</html>
"""
    index = directory / "index.html"
    index.write_text(page, encoding="utf-8")
    logger.info("report: %s (%d figures)", index, len(figures))
    return index
