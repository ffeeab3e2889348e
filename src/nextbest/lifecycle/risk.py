"""Churn risk: the probability of no purchase in the next `horizon` days.

Two models, fitted on a time split and compared on held-out customers; the better one (AUC) is
served:
- `learned`: a logistic regression on recency, frequency, monetary value, regularity and trend
  (plain arrays on disk: standardisation and coefficients, no pickle);
- `bgnbd`: the BG/NBD model's P(no purchase in the horizon) (`bgnbd.py`).

The learned model is fitted on (features at `now − horizon`, whether the customer bought in
`[now − horizon, now)`), so that it is applied at `now` to the next `horizon` days.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from nextbest.lifecycle.bgnbd import BGNBD, fit_bgnbd
from nextbest.lifecycle.summary import Summary, summarise

__all__ = ["FEATURES", "RiskModel", "features", "fit_risk", "churned", "auc"]

FEATURES = (
    "log_recency",
    "log_frequency",
    "log_age",
    "log_recency_over_interval",
    "single_purchase",
    "gap_cv",
    "log_trend",
    "log_value_per_day",
    "log_active_30",
)


def features(s: Summary) -> np.ndarray:
    """The learned model's inputs, one row per customer of `s` (order of FEATURES)."""
    recency = s.recency
    interval = s.interval
    typical = np.nanmedian(interval) if np.isfinite(interval).any() else 30.0
    interval = np.where(np.isfinite(interval), interval, typical)
    window = np.minimum(90.0, np.maximum(s.T, 1.0))
    expected_90 = s.days * window / np.maximum(s.T, 1.0)
    return np.column_stack(
        [
            np.log1p(recency),
            np.log1p(s.x),
            np.log1p(s.T),
            np.log((recency + 1.0) / (interval + 1.0)),
            (s.x == 0).astype(float),
            s.gap_cv,
            np.log((s.recent_90 + 1.0) / (expected_90 + 1.0)),
            np.log1p(np.maximum(s.value, 0.0) / s.days),
            np.log1p(s.recent_30),
        ]
    )


def churned(before: Summary, after: Summary) -> np.ndarray:
    """For each customer of `before`: no purchase day between its `now` and `after.now`."""
    rows = after.rows(before.customers)
    later = np.where(rows >= 0, after.days[np.maximum(rows, 0)], before.days)
    return later <= before.days


def auc(score: np.ndarray, label: np.ndarray) -> float:
    """Area under the ROC curve of `score` for the positive `label` (ties count half)."""
    from scipy.stats import rankdata

    label = np.asarray(label, bool)
    n_pos, n_neg = int(label.sum()), int((~label).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[label].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


@dataclass(frozen=True)
class RiskModel:
    """The served churn-risk model and how both candidates did on validation."""

    kind: str
    """`learned` or `bgnbd`: whichever had the higher validation AUC."""
    horizon_days: float
    bgnbd: BGNBD
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: float
    validation: dict = field(default_factory=dict)
    """AUC of each candidate (and recency only) on the held-out customers."""

    def learned(self, s: Summary) -> np.ndarray:
        z = ((features(s) - self.mean) / self.scale) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def bgnbd_risk(self, s: Summary) -> np.ndarray:
        return self.bgnbd.p_no_purchase(s.x, s.t_x, s.T, self.horizon_days)

    def risk(self, s: Summary) -> np.ndarray:
        """P(no purchase in the next `horizon_days`) for each customer of `s`."""
        return self.learned(s) if self.kind == "learned" else self.bgnbd_risk(s)

    def expected_purchases(self, s: Summary) -> np.ndarray:
        """Expected purchase days in the horizon (BG/NBD's conditional expectation)."""
        return self.bgnbd.expected(s.x, s.t_x, s.T, self.horizon_days)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "bgnbd": self.bgnbd.as_array(),
            "mean": self.mean,
            "scale": self.scale,
            "coef": self.coef,
            "intercept": np.array([self.intercept]),
            "horizon_days": np.array([self.horizon_days]),
        }

    @classmethod
    def from_arrays(cls, kind: str, arrays, validation: dict | None = None) -> RiskModel:
        r, alpha, a, b = (float(v) for v in arrays["bgnbd"])
        return cls(
            kind=kind,
            horizon_days=float(arrays["horizon_days"][0]),
            bgnbd=BGNBD(r=r, alpha=alpha, a=a, b=b),
            mean=np.asarray(arrays["mean"], float),
            scale=np.asarray(arrays["scale"], float),
            coef=np.asarray(arrays["coef"], float),
            intercept=float(arrays["intercept"][0]),
            validation=validation or {},
        )


def _logistic(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    from sklearn.linear_model import LogisticRegression

    mean = x.mean(axis=0)
    scale = np.where(x.std(axis=0) > 1e-9, x.std(axis=0), 1.0)
    model = LogisticRegression(C=1.0, max_iter=1000)
    model.fit((x - mean) / scale, y)
    return mean, scale, model.coef_[0].astype(float), float(model.intercept_[0])


def fit_risk(
    customers: np.ndarray,
    days: np.ndarray,
    values: np.ndarray | None,
    now: float,
    horizon_days: float,
    *,
    holdout_share: float = 0.3,
    seed: int = 0,
    current: Summary | None = None,
) -> RiskModel:
    """Fit both candidates on purchases before `now` and keep the better on validation.

    The time split: summaries at `now − horizon_days`, labels from `[now − horizon, now)`. A
    `holdout_share` of those customers (keyed hash, stable) validates; then the learned model is
    refitted on all of them and BG/NBD on everything before `now`. `current`: the summary at
    `now` when the caller has it already."""
    start = now - horizon_days
    past = summarise(customers, days, values, start)
    if len(past.customers) < 20:
        raise ValueError(
            f"lifecycle: {len(past.customers)} customers bought before {horizon_days:g} days "
            "ahead of the data's end: too few to fit churn risk (lifecycle.horizon_days)"
        )
    if current is None:
        current = summarise(customers, days, values, now)
    label = churned(past, current)
    x = features(past)
    held = np.random.default_rng(seed).random(len(label)) < holdout_share
    validation: dict[str, float] = {}
    if label[~held].all() or not label[~held].any():
        raise ValueError("lifecycle: every customer churned, or none did, in the validation split")
    mean, scale, coef, intercept = _logistic(x[~held], label[~held])
    candidate = fit_bgnbd(past.x[~held], past.t_x[~held], past.T[~held])
    z = ((x[held] - mean) / scale) @ coef + intercept
    validation["learned"] = auc(z, label[held])
    validation["bgnbd"] = auc(
        candidate.p_no_purchase(past.x[held], past.t_x[held], past.T[held], horizon_days),
        label[held],
    )
    validation["recency"] = auc(past.recency[held], label[held])
    kind = "learned" if validation["learned"] >= validation["bgnbd"] else "bgnbd"
    mean, scale, coef, intercept = _logistic(x, label)
    bg = fit_bgnbd(current.x, current.t_x, current.T)
    return RiskModel(
        kind=kind,
        horizon_days=float(horizon_days),
        bgnbd=bg,
        mean=mean,
        scale=scale,
        coef=coef,
        intercept=intercept,
        validation=validation,
    )
