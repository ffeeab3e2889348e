"""Per-customer purchase summaries at a point in time: the inputs of stages, risk and value.

Everything is computed from purchase *days* (several purchases on one day count once, as
transactions in the BG/NBD literature), vectorised over (customer, day) pairs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Summary", "summarise", "purchase_days"]


@dataclass(frozen=True)
class Summary:
    """One entry per customer (the order of `customers`), as of day `now` (exclusive)."""

    customers: np.ndarray
    """Customer ids (str)."""
    now: float
    """Days since 1970-01-01 of the point in time."""
    first: np.ndarray
    """Day of the first purchase."""
    last: np.ndarray
    """Day of the last purchase."""
    days: np.ndarray
    """Purchase days (≥ 1)."""
    value: np.ndarray
    """Summed purchase value (0 where unknown)."""
    recent_30: np.ndarray
    """Purchase days in the last 30 days (the power-user curve)."""
    recent_90: np.ndarray
    """Purchase days in the last 90 days."""
    gap_cv: np.ndarray
    """Coefficient of variation of the gaps between purchase days (0 with fewer than 2 gaps)."""

    @property
    def x(self) -> np.ndarray:
        """Repeat purchase days (BG/NBD's x)."""
        return self.days - 1

    @property
    def t_x(self) -> np.ndarray:
        return self.last - self.first

    @property
    def T(self) -> np.ndarray:
        return self.now - self.first

    @property
    def recency(self) -> np.ndarray:
        """Days since the last purchase."""
        return self.now - self.last

    @property
    def interval(self) -> np.ndarray:
        """The customer's own mean days between purchase days (NaN with one purchase day)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.x > 0, self.t_x / np.maximum(self.x, 1), np.nan)

    def rows(self, customer_ids: np.ndarray) -> np.ndarray:
        """Positions of `customer_ids` in this summary (-1 where absent)."""
        order = np.argsort(self.customers)
        ids = np.asarray(customer_ids, dtype=self.customers.dtype)
        at = np.searchsorted(self.customers[order], ids)
        at = np.minimum(at, max(len(order) - 1, 0))
        found = len(order) > 0
        hit = found & (self.customers[order][at] == ids) if found else np.zeros(len(ids), bool)
        return np.where(hit, order[at], -1)


def purchase_days(customers: np.ndarray, days: np.ndarray, values: np.ndarray):
    """Unique (customer code, day) pairs with their summed value, sorted by customer then day."""
    codes, ids = _codes(customers)
    day = np.floor(days).astype(np.int64)
    key = codes.astype(np.int64) * (1 << 32) + (day - day.min() if len(day) else day)
    order = np.argsort(key, kind="stable")
    key, day, values, codes = key[order], day[order], values[order], codes[order]
    new = np.r_[True, key[1:] != key[:-1]] if len(key) else np.zeros(0, bool)
    start = np.flatnonzero(new)
    summed = np.add.reduceat(values, start) if len(start) else np.zeros(0)
    return ids, codes[start], day[start], summed


def _codes(customers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ids, codes = np.unique(np.asarray(customers).astype(str), return_inverse=True)
    return codes, ids


def summarise(
    customers: np.ndarray, days: np.ndarray, values: np.ndarray | None, now: float
) -> Summary:
    """The summary at `now` of purchases (customer id, day as float days since the epoch, value)
    strictly before `now`; customers without such a purchase are left out."""
    days = np.asarray(days, dtype=float)
    before = days < now
    values = np.zeros(len(days)) if values is None else np.nan_to_num(np.asarray(values, float))
    ids, code, day, value = purchase_days(
        np.asarray(customers)[before], days[before], values[before]
    )
    n = len(ids)
    first = np.full(n, np.inf)
    np.minimum.at(first, code, day)
    last = np.full(n, -np.inf)
    np.maximum.at(last, code, day)
    count = np.bincount(code, minlength=n)
    total = np.bincount(code, weights=value, minlength=n)
    recent_30 = np.bincount(code, weights=(day >= now - 30), minlength=n)
    recent_90 = np.bincount(code, weights=(day >= now - 90), minlength=n)
    # Gaps between consecutive purchase days of one customer (rows are sorted by customer, day).
    same = np.r_[False, code[1:] == code[:-1]] if len(code) else np.zeros(0, bool)
    gaps = np.diff(day, prepend=day[:1]).astype(float)
    g_code = code[same]
    g = gaps[same]
    g_n = np.bincount(g_code, minlength=n)
    g_sum = np.bincount(g_code, weights=g, minlength=n)
    g_sq = np.bincount(g_code, weights=g * g, minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = g_sum / g_n
        var = np.maximum(g_sq / g_n - mean * mean, 0.0)
        cv = np.where(g_n >= 2, np.sqrt(var) / np.maximum(mean, 1e-9), 0.0)
    return Summary(
        customers=ids,
        now=float(now),
        first=first,
        last=last,
        days=count.astype(float),
        value=total,
        recent_30=recent_30,
        recent_90=recent_90,
        gap_cv=cv,
    )
