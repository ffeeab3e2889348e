"""The BG/NBD model (Fader, Hardie & Lee 2005, "Counting your customers the easy way"), with
scipy: the closed-form likelihood, P(alive) and the conditional expectation of equation (10).

Per customer: `x` repeat purchases (purchase days after the first), `t_x` the time of the last
one and `T` the time since the first, all in days. Parameters (r, alpha) of the gamma
heterogeneity of the purchase rate, (a, b) of the beta heterogeneity of the dropout probability.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import optimize, special

__all__ = ["BGNBD", "fit_bgnbd"]


@dataclass(frozen=True)
class BGNBD:
    """Fitted parameters (purchase rates per day)."""

    r: float
    alpha: float
    a: float
    b: float

    def as_array(self) -> np.ndarray:
        return np.array([self.r, self.alpha, self.a, self.b])

    def p_alive(self, x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> np.ndarray:
        """P(still a customer at T | x, t_x, T): 1 for x = 0 (no purchase to drop out after)."""
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        x = np.asarray(x, dtype=float)
        log_ratio = (r + x) * (np.log(alpha + T) - np.log(alpha + t_x))
        odds = np.where(
            x > 0, a / np.maximum(b + x - 1, 1e-12) * np.exp(np.minimum(log_ratio, 700)), 0.0
        )
        return 1.0 / (1.0 + odds)

    def p_no_purchase(self, x, t_x, T, horizon: float) -> np.ndarray:
        """P(no purchase in (T, T + horizon]): dropped out, or alive and the next purchase comes
        later (given alive, the wait is exponential with the gamma posterior of the rate)."""
        x = np.asarray(x, dtype=float)
        stay_quiet = np.exp(
            (self.r + x) * (np.log(self.alpha + T) - np.log(self.alpha + T + horizon))
        )
        return 1.0 - self.p_alive(x, t_x, T) * (1.0 - stay_quiet)

    def expected(self, x, t_x, T, horizon: float) -> np.ndarray:
        """E[purchases in (T, T + horizon] | x, t_x, T] (the paper's equation 10)."""
        r, alpha, a, b = self.r, self.alpha, self.a, self.b
        x = np.asarray(x, dtype=float)
        z = horizon / (alpha + T + horizon)
        hyp = special.hyp2f1(r + x, b + x, a + b + x - 1, z)
        lead = (a + b + x - 1) / (a - 1)
        body = 1.0 - np.exp((r + x) * (np.log(alpha + T) - np.log(alpha + T + horizon))) * hyp
        log_ratio = (r + x) * (np.log(alpha + T) - np.log(alpha + t_x))
        odds = np.where(
            x > 0, a / np.maximum(b + x - 1, 1e-12) * np.exp(np.minimum(log_ratio, 700)), 0.0
        )
        return lead * body / (1.0 + odds)


def _log_likelihood(params: np.ndarray, x, t_x, T, weight) -> float:
    r, alpha, a, b = np.exp(params)
    a1 = special.gammaln(r + x) - special.gammaln(r) + r * np.log(alpha)
    a2 = (
        special.gammaln(a + b)
        + special.gammaln(b + x)
        - special.gammaln(b)
        - special.gammaln(a + b + x)
    )
    a3 = -(r + x) * np.log(alpha + T)
    with np.errstate(divide="ignore"):
        a4 = np.where(
            x > 0,
            np.log(a) - np.log(np.maximum(b + x - 1, 1e-12)) - (r + x) * np.log(alpha + t_x),
            -np.inf,
        )
    return float(np.sum(weight * (a1 + a2 + np.logaddexp(a3, a4))))


def fit_bgnbd(x: np.ndarray, t_x: np.ndarray, T: np.ndarray) -> BGNBD:
    """Maximum likelihood over customers (identical (x, t_x, T) rows pooled)."""
    rows = np.column_stack([x, t_x, T]).astype(float)
    unique, weight = np.unique(rows, axis=0, return_counts=True)
    ux, ut, uT = unique.T
    scale = max(float(np.mean(T)), 1.0)  # fit in units of the mean age: a well-scaled problem
    result = optimize.minimize(
        lambda p: -_log_likelihood(p, ux, ut / scale, uT / scale, weight),
        x0=np.log([1.0, 1.0, 1.0, 1.0]),
        method="L-BFGS-B",
        bounds=[(-8.0, 8.0)] * 4,
    )
    r, alpha, a, b = np.exp(result.x)
    return BGNBD(r=float(r), alpha=float(alpha * scale), a=float(a), b=float(b))
