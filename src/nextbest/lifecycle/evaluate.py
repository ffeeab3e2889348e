"""Evaluation of churn risk on a time split (`nextbest lifecycle evaluate`) and the BG/NBD
paper's holdout check.

At the cutoff: the risk models are fitted on purchases before it (`fit_risk`, which itself
validates on the period before), then each customer who bought before the cutoff is scored, and
the truth is whether they bought in the `horizon_days` after it. Compared: recency alone (days
since the last purchase), BG/NBD, the learned model, and the model `fit_risk` chose (served).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import numpy as np

from nextbest.lifecycle.risk import auc, churned, fit_risk
from nextbest.lifecycle.stages import STAGES, stage_of
from nextbest.lifecycle.summary import summarise

__all__ = ["evaluate_risk", "calibration", "holdout_check", "StageReport", "stage_report"]

DECILES = 10


def calibration(risk: np.ndarray, truth: np.ndarray, bins: int = DECILES) -> list[dict]:
    """Per decile of predicted risk: customers, mean predicted, actual churn share."""
    order = np.argsort(risk, kind="stable")
    out = []
    for part in np.array_split(order, bins):
        if len(part):
            out.append(
                {
                    "customers": int(len(part)),
                    "predicted": float(risk[part].mean()),
                    "actual": float(truth[part].mean()),
                }
            )
    return out


def evaluate_risk(
    customers: np.ndarray,
    days: np.ndarray,
    values: np.ndarray | None,
    cutoff: float,
    horizon_days: float,
) -> dict:
    """AUC (churn = no purchase within `horizon_days` after `cutoff`) and calibration."""
    at = summarise(customers, days, values, cutoff)
    model = fit_risk(customers, days, values, cutoff, horizon_days, current=at)
    truth = churned(at, summarise(customers, days, values, cutoff + horizon_days))
    scores = {
        "recency": at.recency,
        "bgnbd": model.bgnbd_risk(at),
        "learned": model.learned(at),
    }
    result = {name: auc(score, truth) for name, score in scores.items()}
    served = model.risk(at)
    cal = calibration(served, truth)
    return {
        "customers": int(len(at.customers)),
        "churn_share": float(truth.mean()),
        "auc": result,
        "served": model.kind,
        "served_auc": result[model.kind],
        "validation": model.validation,
        "calibration": cal,
        "calibration_max_gap": max(abs(c["predicted"] - c["actual"]) for c in cal),
        "bgnbd_params": model.bgnbd.as_array().tolist(),
    }


def holdout_check(
    customers: np.ndarray, days: np.ndarray, cutoff: float, holdout_days: float
) -> dict:
    """BG/NBD fitted on purchases before `cutoff`: predicted against actual repeat purchase days
    in `[cutoff, cutoff + holdout_days)`, in aggregate and by calibration-period repeats."""
    from nextbest.lifecycle.bgnbd import fit_bgnbd

    cal = summarise(customers, days, None, cutoff)
    later = summarise(customers, days, None, cutoff + holdout_days)
    actual = later.days[later.rows(cal.customers)] - cal.days
    model = fit_bgnbd(cal.x, cal.t_x, cal.T)
    predicted = model.expected(cal.x, cal.t_x, cal.T, holdout_days)
    groups = []
    for k in range(8):
        sel = cal.x == k if k < 7 else cal.x >= 7
        groups.append(
            {
                "repeats": f"{k}" if k < 7 else "7+",
                "customers": int(sel.sum()),
                "predicted": float(predicted[sel].mean()) if sel.any() else 0.0,
                "actual": float(actual[sel].mean()) if sel.any() else 0.0,
            }
        )
    return {
        "customers": int(len(cal.customers)),
        "params": model.as_array().tolist(),
        "predicted": float(predicted.sum()),
        "actual": float(actual.sum()),
        "by_repeats": groups,
    }


@dataclass(frozen=True)
class StageReport:
    """Lifecycle stages at a cutoff (the evaluation's HTML report)."""

    cutoff: float
    counts: dict[str, int]
    """Customers per stage at the cutoff."""
    transitions: np.ndarray
    """transitions[a, b]: customers in stage a a month (30 days) before the cutoff and in b at
    it; the last row is customers who had not bought yet a month before."""
    cohorts: list[str]
    """First-purchase months (YYYY-MM), oldest first."""
    by_cohort: np.ndarray
    """by_cohort[c, s]: customers of cohort c in stage s at the cutoff."""


def _stages_at(customers, days, values, now: float, settings) -> tuple[np.ndarray, np.ndarray]:
    """(customer ids, stage index) of everyone who bought before `now`, on the rules the
    server uses (`LifecycleModel.stages`)."""
    s = summarise(customers, days, values, now)
    today = float(np.floor(now))
    stage = stage_of(today - s.last, today - s.first, s.interval, s.days, settings)
    return s.customers, stage


def stage_report(
    customers: np.ndarray, days: np.ndarray, values: np.ndarray, cutoff: float, settings
) -> StageReport:
    """Stage counts at `cutoff`, the month's transitions into them, and the stages by monthly
    cohort of the first purchase (purchases as `lifecycle.model.purchases_of` gives them)."""
    ids, now = _stages_at(customers, days, values, cutoff, settings)
    before_ids, before = _stages_at(customers, days, values, cutoff - 30.0, settings)
    n = len(STAGES)
    earlier = np.full(len(ids), n)  # n: not a customer yet
    pos = np.searchsorted(before_ids, ids)
    found = (pos < len(before_ids)) & (before_ids[np.minimum(pos, len(before_ids) - 1)] == ids)
    earlier[found] = before[pos[found]]
    transitions = np.zeros((n + 1, n), dtype=np.int64)
    np.add.at(transitions, (earlier, now), 1)
    first = summarise(customers, days, values, cutoff).first
    months = np.asarray(
        [
            (dt.date(1970, 1, 1) + dt.timedelta(days=int(d))).strftime("%Y-%m")
            for d in np.floor(first)
        ]
    )
    cohorts = sorted(set(months.tolist()))
    index = {m: k for k, m in enumerate(cohorts)}
    by_cohort = np.zeros((len(cohorts), n), dtype=np.int64)
    np.add.at(by_cohort, (np.asarray([index[m] for m in months], dtype=np.int64), now), 1)
    counts = {name: int((now == k).sum()) for k, name in enumerate(STAGES)}
    return StageReport(cutoff, counts, transitions, cohorts, by_cohort)
