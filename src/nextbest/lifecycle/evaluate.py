"""Evaluation of churn risk on a time split (`nextbest lifecycle evaluate`) and the BG/NBD
paper's holdout check.

At the cutoff: the risk models are fitted on purchases before it (`fit_risk`, which itself
validates on the period before), then each customer who bought before the cutoff is scored, and
the truth is whether they bought in the `horizon_days` after it. Compared: recency alone (days
since the last purchase), BG/NBD, the learned model, and the model `fit_risk` chose (served).
"""

from __future__ import annotations

import numpy as np

from nextbest.lifecycle.risk import auc, churned, fit_risk
from nextbest.lifecycle.summary import summarise

__all__ = ["evaluate_risk", "calibration", "holdout_check"]

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
