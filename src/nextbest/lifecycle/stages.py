"""Lifecycle stages judged on each customer's own rhythm, with the reasons said in words.

A customer with a rhythm (at least `rhythm_days` purchase days) is `at_risk` once the days since
the last purchase pass `at_risk_intervals` times their own mean interval, `dormant` past
`dormant_intervals` and `lapsed` past `lapsed_intervals` (never earlier than the floors below:
a daily shopper is not dormant after a week). A customer without a rhythm yet is judged on the
fixed `at_risk_days`, `dormant_days` (SPEC §1: 60–90 days) and `lapsed_days`. A customer whose
first purchase is less than `new_days` old is `new`.
"""

from __future__ import annotations

import numpy as np

from nextbest.config import LifecycleSettings

__all__ = ["STAGES", "FLOORS", "stage_of", "stage_reason"]

STAGES = ("new", "active", "at_risk", "dormant", "lapsed")
FLOORS = (7.0, 14.0, 28.0)
"""Fewest days since the last purchase for at_risk, dormant and lapsed with a rhythm."""


def thresholds(interval: np.ndarray, purchase_days: np.ndarray, s: LifecycleSettings):
    """(at_risk, dormant, lapsed) day thresholds per customer, and whether it has a rhythm."""
    rhythm = (purchase_days >= s.rhythm_days) & np.isfinite(interval)
    safe = np.where(rhythm, interval, 0.0)
    ratios = (s.at_risk_intervals, s.dormant_intervals, s.lapsed_intervals)
    fixed = (s.at_risk_days, s.dormant_days, s.lapsed_days)
    at_risk, dormant, lapsed = (
        np.where(rhythm, np.maximum(ratio * safe, floor), days)
        for ratio, days, floor in zip(ratios, fixed, FLOORS, strict=True)
    )
    return at_risk, dormant, lapsed, rhythm


def stage_of(
    recency: np.ndarray,
    age: np.ndarray,
    interval: np.ndarray,
    purchase_days: np.ndarray,
    s: LifecycleSettings,
) -> np.ndarray:
    """Stage index into STAGES per customer (`recency`, `age`: days since the last and the first
    purchase)."""
    at_risk, dormant, lapsed, _ = thresholds(interval, purchase_days, s)
    stage = np.full(len(recency), STAGES.index("active"))
    stage[recency > at_risk] = STAGES.index("at_risk")
    stage[recency > dormant] = STAGES.index("dormant")
    stage[recency > lapsed] = STAGES.index("lapsed")
    stage[(age < s.new_days) & (recency <= at_risk)] = STAGES.index("new")
    return stage


def stage_reason(
    stage: str,
    recency: float,
    age: float,
    interval: float,
    purchase_days: int,
    s: LifecycleSettings,
) -> str:
    """Why the customer is in `stage`, in words."""
    limits = thresholds(np.array([interval]), np.array([purchase_days]), s)
    at_risk, dormant, lapsed = (float(v[0]) for v in limits[:3])
    rhythm = bool(limits[3][0])
    last = f"last purchase {_days(recency)}"
    if stage == "new":
        return f"first purchase {_days(age)} ({purchase_days} purchase days so far)"
    if rhythm:
        habit = f"usually buys every {interval:.0f} days; {last}"
    else:
        count = "one purchase day" if purchase_days == 1 else f"{purchase_days} purchase days"
        habit = f"{count}, no rhythm yet; {last}"
    bound = {
        "active": f"at risk after {at_risk:.0f} days",
        "at_risk": f"dormant after {dormant:.0f} days",
        "dormant": f"lapsed after {lapsed:.0f} days",
        "lapsed": f"lapsed after {lapsed:.0f} days",
    }[stage]
    return f"{habit} ({bound})"


def _days(n: float) -> str:
    n = int(round(n))
    return "today" if n == 0 else ("1 day ago" if n == 1 else f"{n} days ago")
