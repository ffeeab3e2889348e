"""The experiment report: per arm, the customers shown something, impressions, attributed
purchases and value per customer, conversion and retention, and the lift over the control with
a bootstrap confidence interval; per experiment, a sample-ratio-mismatch check."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

from nextbest.config import Experiment
from nextbest.experiments.attribution import Purchase, attribute, windows_of
from nextbest.store.consent_store import Impression

__all__ = ["ArmReport", "ExperimentReport", "experiment_report", "report_json", "SRM_P"]

SRM_P = 0.001
"""A sample ratio mismatch is flagged below this chi-square p-value (the usual threshold: a
real mismatch shows at any size, and a false alarm costs a re-check)."""
RESAMPLES = 2000
"""Bootstrap resamples of the customers per arm."""


@dataclass(frozen=True)
class Lift:
    """The arm's mean over the control's, less 1, with a 95% bootstrap interval."""

    value: float | None
    low: float | None
    high: float | None

    @property
    def significant(self) -> bool:
        return self.low is not None and (self.low > 0 or self.high < 0)  # type: ignore[operator]


@dataclass(frozen=True)
class ArmReport:
    experiment: str
    variant: str
    control: bool
    share: float
    """The configured share (0 for an arm no longer in the config)."""
    customers: int
    """Customers shown at least one product in this arm."""
    impressions: int
    attributed_purchases: int
    """Purchases attributed to this arm's impressions, last touch."""
    any_touch_purchases: int
    """Purchases with at least one of this arm's impressions in their window."""
    attributed_value: float
    """Known value of the last-touch purchases."""
    purchases_per_customer: float
    value_per_customer: float
    conversion: float
    """Share of the customers with an attributed purchase."""
    repeat_rate: float
    """Share of the customers with purchases on two or more days after their first impression."""
    churn_rate: float | None
    """Share of the customers observed for a whole horizon after their first impression who did
    not buy in it (None when nobody was observed that long)."""
    churn_observed: int
    purchases_lift: Lift
    value_lift: Lift


@dataclass(frozen=True)
class ExperimentReport:
    name: str
    attribution_days: float
    control: str
    arms: tuple[ArmReport, ...]
    srm_p: float | None
    """Chi-square p-value of the customers per arm against the configured shares."""

    @property
    def sample_ratio_mismatch(self) -> bool:
        return self.srm_p is not None and self.srm_p < SRM_P


def _lift(arm: np.ndarray, control: np.ndarray, rng: np.random.Generator) -> Lift:
    if len(arm) == 0 or len(control) == 0 or control.mean() <= 0:
        return Lift(None, None, None)
    value = float(arm.mean() / control.mean() - 1.0)
    lifts = np.empty(RESAMPLES)
    for k in range(0, RESAMPLES, 100):  # 100 resamples at a time bounds the memory
        n = min(100, RESAMPLES - k)
        a = arm[rng.integers(0, len(arm), (n, len(arm)))].mean(axis=1)
        c = control[rng.integers(0, len(control), (n, len(control)))].mean(axis=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            lifts[k : k + n] = a / c - 1.0
    lifts = lifts[np.isfinite(lifts)]
    low, high = np.percentile(lifts, [2.5, 97.5]) if len(lifts) else (np.nan, np.nan)
    return Lift(value, float(low), float(high))


def experiment_report(
    experiments: Sequence[Experiment],
    impressions: Sequence[Impression],
    purchases: Sequence[Purchase],
    *,
    horizon_days: float = 90.0,
    seed: int = 0,
) -> list[ExperimentReport]:
    """The report of each configured experiment (and of experiments found only in the stored
    impressions, with shares 0), from the stored impressions and purchases."""
    windows = windows_of(experiments)
    configured = {e.name: e for e in experiments}
    arms: dict[str, dict[str, list[Impression]]] = defaultdict(lambda: defaultdict(list))
    for i in impressions:
        if i.experiment:
            arms[i.experiment][i.variant].append(i)
    attributed = attribute(purchases, [i for i in impressions if i.experiment], windows)
    bought_days: dict[str, set[dt.date]] = defaultdict(set)
    bought_at: dict[str, list[dt.datetime]] = defaultdict(list)
    for p in purchases:
        bought_days[p.customer_id].add(p.at.date())
        bought_at[p.customer_id].append(p.at)
    times = [p.at for p in purchases] + [i.shown_at for i in impressions]
    observed_until = max(times) if times else None
    horizon = dt.timedelta(days=horizon_days)
    rng = np.random.default_rng(seed)
    out = []
    for name in [*configured, *sorted(set(arms) - set(configured))]:
        e = configured.get(name)
        variants = [v.name for v in e.variants] if e else []
        variants += sorted(set(arms[name]) - set(variants))
        shares = {v.name: v.share for v in e.variants} if e else {}
        control = next((v.name for v in e.variants if v.control), "") if e else ""
        per_arm = {}
        for variant in variants:
            shown = arms[name].get(variant, [])
            first: dict[str, dt.datetime] = {}
            for i in shown:
                if i.customer_id not in first or i.shown_at < first[i.customer_id]:
                    first[i.customer_id] = i.shown_at
            customers = sorted(first)
            index = {c: k for k, c in enumerate(customers)}
            count, value = np.zeros(len(customers)), np.zeros(len(customers))
            any_touch = 0
            for a in attributed:
                if any(t.experiment == name and t.variant == variant for t in a.touches):
                    any_touch += 1
                t = a.last_touch
                if t.experiment == name and t.variant == variant:
                    k = index[a.purchase.customer_id]
                    count[k] += 1
                    value[k] += a.purchase.value or 0.0
            repeat = sum(
                len({d for d in bought_days[c] if d >= first[c].date()}) >= 2 for c in customers
            )
            watched = [
                c
                for c in customers
                if observed_until is not None and first[c] + horizon <= observed_until
            ]
            churned = sum(
                not any(first[c] < t <= first[c] + horizon for t in bought_at[c]) for c in watched
            )
            per_arm[variant] = (customers, shown, count, value, any_touch, repeat, watched, churned)
        ctrl = per_arm.get(control)
        reports = []
        for variant in variants:
            customers, shown, count, value, any_touch, repeat, watched, churned = per_arm[variant]
            n = max(len(customers), 1)
            none = Lift(None, None, None)
            is_control = variant == control
            compared = not is_control and ctrl is not None
            reports.append(
                ArmReport(
                    experiment=name,
                    variant=variant,
                    control=is_control,
                    share=shares.get(variant, 0.0),
                    customers=len(customers),
                    impressions=len(shown),
                    attributed_purchases=int(count.sum()),
                    any_touch_purchases=any_touch,
                    attributed_value=float(value.sum()),
                    purchases_per_customer=float(count.sum() / n),
                    value_per_customer=float(value.sum() / n),
                    conversion=float((count > 0).sum() / n),
                    repeat_rate=float(repeat / n),
                    churn_rate=churned / len(watched) if watched else None,
                    churn_observed=len(watched),
                    purchases_lift=_lift(count, ctrl[2], rng) if compared else none,
                    value_lift=_lift(value, ctrl[3], rng) if compared else none,
                )
            )
        expected = [r for r in reports if r.share > 0]
        total = sum(r.customers for r in expected)
        srm_p = None
        if len(expected) >= 2 and total > 0:
            weights = np.asarray([r.share for r in expected])
            observed = np.asarray([r.customers for r in expected], dtype=float)
            srm_p = float(stats.chisquare(observed, weights / weights.sum() * total).pvalue)
        out.append(
            ExperimentReport(
                name=name,
                attribution_days=windows.get(name, 0.0),
                control=control,
                arms=tuple(reports),
                srm_p=srm_p,
            )
        )
    return out


def report_json(reports: Sequence[ExperimentReport]) -> dict:
    """The report as plain JSON-able data (`nextbest experiments report --json`)."""

    def arm(a: ArmReport) -> dict:
        data = dataclasses.asdict(a)
        for key in ("purchases_lift", "value_lift"):
            lift = getattr(a, key)
            data[key] = {**dataclasses.asdict(lift), "significant": lift.significant}
        return data

    return {
        "version": 1,
        "experiments": [
            {
                "name": r.name,
                "attribution_days": r.attribution_days,
                "control": r.control,
                "srm_p": r.srm_p,
                "sample_ratio_mismatch": r.sample_ratio_mismatch,
                "arms": [arm(a) for a in r.arms],
            }
            for r in reports
        ],
    }


def store_report(settings, store, more: Sequence[Purchase] = ()) -> list[ExperimentReport]:
    """The report of `settings.experiments` from everything the store holds (impressions and
    recorded purchases), plus the purchases `more` (of a training data file, say); a purchase
    in both (same customer, product and time) counts once."""
    from nextbest.experiments.attribution import purchases_of

    recorded = purchases_of(store.events())
    seen = {(p.customer_id, p.product_id, p.at) for p in recorded}
    extra = [p for p in more if (p.customer_id, p.product_id, p.at) not in seen]
    return experiment_report(
        settings.experiments,
        store.impressions(),
        [*recorded, *extra],
        horizon_days=settings.lifecycle.horizon_days,
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x:+.1%}"


def report_lines(reports: Sequence[ExperimentReport]) -> list[str]:
    """The report as a plain-text table."""
    lines = []
    for r in reports:
        srm = "n/a" if r.srm_p is None else f"p = {r.srm_p:.3g}"
        flag = "  SAMPLE RATIO MISMATCH: check assignment" if r.sample_ratio_mismatch else ""
        lines.append(
            f"experiment {r.name} (attribution {r.attribution_days:g} days, control "
            f"{r.control or 'none'}, sample ratio {srm}){flag}"
        )
        lines.append(
            f"  {'variant':<14}{'share':>6}{'customers':>10}{'shown':>9}{'purch/cust':>11}"
            f"{'value/cust':>11}{'conv':>7}{'repeat':>7}{'churn':>7}  lift (95% CI)"
        )
        for a in r.arms:
            lift = a.purchases_lift
            ci = (
                f"{_pct(lift.value)} [{_pct(lift.low)}, {_pct(lift.high)}]"
                + (" significant" if lift.significant else "")
                if lift.value is not None
                else ("control" if a.control else "n/a")
            )
            churn = "n/a" if a.churn_rate is None else f"{a.churn_rate:.2f}"
            lines.append(
                f"  {a.variant:<14}{a.share:>6.2f}{a.customers:>10}{a.impressions:>9}"
                f"{a.purchases_per_customer:>11.3f}{a.value_per_customer:>11.2f}"
                f"{a.conversion:>7.2f}{a.repeat_rate:>7.2f}{churn:>7}  {ci}"
            )
    return lines or ["no experiments configured or recorded"]


def from_json(experiments: Sequence[dict]) -> list[ExperimentReport]:
    """`report_json(...)["experiments"]` back into reports (the dashboard renders the JSON)."""
    out = []
    for e in experiments:
        arms = []
        for a in e["arms"]:
            fields = {k: v for k, v in a.items() if k not in ("purchases_lift", "value_lift")}
            lifts = {
                k: Lift(a[k]["value"], a[k]["low"], a[k]["high"])
                for k in ("purchases_lift", "value_lift")
            }
            arms.append(ArmReport(**fields, **lifts))
        out.append(
            ExperimentReport(
                name=e["name"],
                attribution_days=e["attribution_days"],
                control=e["control"],
                arms=tuple(arms),
                srm_p=e["srm_p"],
            )
        )
    return out
