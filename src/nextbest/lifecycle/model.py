"""The lifecycle part of a model: each customer's purchase summary at training time and the
churn-risk model, and the customer state computed from them at serving time.

The trainer fits it (`fit_lifecycle`) on the same consent-gated purchases as the rest of the
model and publishes it as plain arrays (`to_arrays`). The server turns one customer's row plus
the purchases recorded since training into a `CustomerState` at its clock (`state`), so a
purchase recorded through Events moves a dormant customer to active on the next call.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nextbest.config import LifecycleSettings
from nextbest.data.interactions import to_days
from nextbest.lifecycle.risk import RiskModel, fit_risk
from nextbest.lifecycle.stages import STAGES, stage_of, stage_reason
from nextbest.lifecycle.summary import Summary, summarise

__all__ = ["CustomerState", "LifecycleModel", "fit_lifecycle", "purchases_of"]

logger = logging.getLogger(__name__)

SUMMARY_FIELDS = ("first", "last", "days", "value", "recent_30", "recent_90", "gap_cv")


def purchases_of(events: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(customer ids, time as float days since the epoch, value or NaN) of the purchase events
    (the summaries count whole days)."""
    purchases = events.filter(pc.equal(events["event_type"], "purchase"))
    customers = purchases["customer_id"].to_numpy(zero_copy_only=False).astype(str)
    days = to_days(purchases["timestamp"])
    if "value" in purchases.column_names:
        values = purchases["value"].to_numpy(zero_copy_only=False).astype(float)
    else:
        values = np.full(len(days), np.nan)
    return customers, days, values


@dataclass(frozen=True)
class CustomerState:
    """One customer's lifecycle state at the server's clock."""

    stage: str
    churn_risk: float
    expected_purchases: float
    expected_value: float
    active_days_30: int
    interval_days: float
    """The customer's mean days between purchase days (NaN with one purchase day)."""
    days_since_last_purchase: int
    purchase_days: int
    reasons: tuple[str, ...]


@dataclass(frozen=True)
class LifecycleModel:
    """Per-customer summaries (rows aligned with the model's customers; `days` 0 = no
    purchase) as of day `now`, the churn-risk model and the settings it was fitted with."""

    summary: Summary
    risk: RiskModel
    settings: LifecycleSettings

    def to_arrays(self) -> dict[str, np.ndarray]:
        s = self.summary
        out = {f"summary_{name}": getattr(s, name) for name in SUMMARY_FIELDS}
        out["summary_now"] = np.array([s.now])
        out.update({f"risk_{k}": v for k, v in self.risk.to_arrays().items()})
        return out

    def manifest(self) -> dict:
        return {
            "risk_model": self.risk.kind,
            "risk_validation_auc": self.risk.validation,
            "horizon_days": self.risk.horizon_days,
            "settings": dataclasses.asdict(self.settings),
            "stages": self.stage_counts(self.summary.now),
        }

    def stage_counts(self, now_day: float) -> dict[str, int]:
        """Customers per stage at `now_day` (the operator's dashboard)."""
        stages = self.stages(now_day)
        return {name: int((stages == k).sum()) for k, name in enumerate(STAGES)}

    @classmethod
    def from_arrays(
        cls, customers: np.ndarray, arrays, manifest: dict, settings: LifecycleSettings
    ) -> LifecycleModel:
        fields = {name: np.asarray(arrays[f"summary_{name}"], float) for name in SUMMARY_FIELDS}
        summary = Summary(customers=customers, now=float(arrays["summary_now"][0]), **fields)
        risk = RiskModel.from_arrays(
            manifest["risk_model"],
            {k[len("risk_") :]: v for k, v in arrays.items() if k.startswith("risk_")},
            manifest.get("risk_validation_auc", {}),
        )
        trained = LifecycleSettings(**manifest.get("settings", {}))
        if trained.horizon_days != settings.horizon_days:
            logger.warning(
                "lifecycle.horizon_days is %g but the model's risk was fitted for %g days: "
                "serving the model's",
                settings.horizon_days,
                trained.horizon_days,
            )
        return cls(summary=summary, risk=risk, settings=settings)

    def state(self, row: int, recorded_days: np.ndarray, recorded_values: np.ndarray, now_day):
        """The state of the customer at model row `row` (-1: not in the model) with the
        purchases recorded since training (days after the model's newest event), at `now_day`;
        None when there is no purchase. "Today" is `now_day`, or the newest recorded purchase
        if later."""
        s = self.summary
        today = float(np.floor(now_day))
        later = np.floor(np.asarray(recorded_days, dtype=float))
        later_values = np.asarray(recorded_values, dtype=float)
        # A recorded purchase shows time has moved on past a frozen (model) clock.
        today = max(today, float(later.max())) if len(later) else today
        if row >= 0 and s.days[row] > 0:
            first, last, days = s.first[row], s.last[row], s.days[row]
            value, gap_cv = s.value[row], s.gap_cv[row]
            history_30 = s.recent_30[row] if s.now - today >= -30 else 0.0
            history_90 = s.recent_90[row] if s.now - today >= -90 else 0.0
        else:
            first, last, days, value, gap_cv = np.inf, -np.inf, 0.0, 0.0, 0.0
            history_30 = history_90 = 0.0
        new_days = np.unique(later[later > last]) if len(later) else later
        if days == 0 and not len(new_days):
            return None
        first = min(first, float(new_days.min())) if len(new_days) else first
        last = max(last, float(new_days.max())) if len(new_days) else last
        days += len(new_days)
        value = float(value) + float(np.nansum(later_values))
        one = Summary(
            customers=np.array(["x"]),
            now=today + 1.0,
            first=np.array([first]),
            last=np.array([last]),
            days=np.array([days]),
            value=np.array([value]),
            recent_30=np.array([history_30 + np.sum(new_days >= today - 29)]),
            recent_90=np.array([history_90 + np.sum(new_days >= today - 89)]),
            gap_cv=np.array([gap_cv]),
        )
        recency = today - last
        age = today - first
        interval = float(one.interval[0])
        stage = STAGES[
            int(
                stage_of(
                    np.array([recency]), np.array([age]), one.interval, one.days, self.settings
                )[0]
            )
        ]
        risk = float(self.risk.risk(one)[0])
        expected = float(self.risk.expected_purchases(one)[0])
        per_day = value / days if days else 0.0
        h = self.risk.horizon_days
        reasons = (
            stage_reason(stage, recency, age, interval, int(days), self.settings),
            f"churn risk {risk:.0%}: P(no purchase in the next {h:g} days), "
            f"{'learned model' if self.risk.kind == 'learned' else 'BG/NBD'}",
            f"expected {expected:.1f} purchase days in {h:g} days",
        )
        return CustomerState(
            stage=stage,
            churn_risk=risk,
            expected_purchases=expected,
            expected_value=float(expected * per_day),
            active_days_30=int(one.recent_30[0]),
            interval_days=interval,
            days_since_last_purchase=int(recency),
            purchase_days=int(days),
            reasons=reasons,
        )

    def stages(self, now_day: float) -> np.ndarray:
        """Stage index of every model row at `now_day` (-1 for rows without a purchase), from the
        training summaries alone (no recorded events): for audiences and reports."""
        s = self.summary
        today = float(np.floor(now_day))
        out = stage_of(today - s.last, today - s.first, s.interval, s.days, self.settings)
        return np.where(s.days > 0, out, -1)


def fit_lifecycle(
    events: pa.Table, user_ids: np.ndarray, reference_day: float, settings: LifecycleSettings
) -> LifecycleModel | None:
    """Summaries of the model's customers and the churn-risk model, from `events` (already
    consent-gated) up to the model's newest day; None (logged) when the data cannot fit risk."""
    customers, days, values = purchases_of(events)
    now = float(np.floor(reference_day)) + 1.0
    full = summarise(customers, days, values, now)
    try:
        risk = fit_risk(customers, days, values, now, settings.horizon_days, current=full)
    except ValueError as exc:
        logger.warning("no lifecycle state in this model: %s", exc)
        return None
    rows = full.rows(np.asarray(user_ids).astype(str))
    have = rows >= 0
    pick = np.maximum(rows, 0)

    def aligned(values: np.ndarray) -> np.ndarray:
        return np.where(have, values[pick], 0.0) if len(values) else np.zeros(len(rows))

    summary = Summary(
        customers=np.asarray(user_ids).astype(str),
        now=now,
        **{name: aligned(getattr(full, name)) for name in SUMMARY_FIELDS},
    )
    logger.info(
        "lifecycle: churn risk by the %s model (validation AUC %s)",
        risk.kind,
        ", ".join(f"{k} {v:.3f}" for k, v in risk.validation.items()),
    )
    return LifecycleModel(summary=summary, risk=risk, settings=settings)
