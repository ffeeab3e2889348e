"""Attribution: a purchase of a product that was shown to the customer within the attribution
window before it is attributed to those showings (any touch) and to the latest of them (last
touch). Derived from the stored impressions and events whenever asked, never stored apart: an
erasure, which deletes both, leaves no attribution behind."""

from __future__ import annotations

import bisect
import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from nextbest.store.consent_store import Impression

__all__ = ["Purchase", "Attribution", "attribute", "DEFAULT_DAYS"]

DEFAULT_DAYS = 14.0
"""The window of impressions outside any experiment (and of experiments no longer configured)."""


@dataclass(frozen=True)
class Purchase:
    customer_id: str
    product_id: str
    at: dt.datetime
    """Naive UTC."""
    quantity: float = 1.0
    value: float | None = None
    """What was paid, None when unknown."""


@dataclass(frozen=True)
class Attribution:
    purchase: Purchase
    last_touch: Impression
    """The latest showing of the product before the purchase, within its window."""
    touches: tuple[Impression, ...]
    """Every showing within the window (any touch), oldest first; `last_touch` is the last."""


def before(at: dt.datetime, days: float) -> dt.datetime:
    """`days` before `at`, or the earliest time there is (events may be dated in year 1)."""
    delta = dt.timedelta(days=days)
    return at - delta if at - dt.datetime.min > delta else dt.datetime.min


def longest_window(windows: Mapping[str, float]) -> float:
    """The longest attribution window in days (DEFAULT_DAYS at least): how far back a purchase
    can reach."""
    return max([DEFAULT_DAYS, *windows.values()])


def attribute(
    purchases: Iterable[Purchase],
    impressions: Iterable[Impression],
    windows: Mapping[str, float] | None = None,
) -> list[Attribution]:
    """The attributed purchases, in the order given. `windows` maps an experiment name to its
    attribution days; impressions of other experiments (and outside any) use DEFAULT_DAYS. An
    impression counts when shown at or before the purchase and no more than the window before."""
    windows = windows or {}
    shown: dict[tuple[str, str], list[Impression]] = {}
    for i in impressions:
        shown.setdefault((i.customer_id, i.product_id), []).append(i)
    times: dict[tuple[str, str], list[dt.datetime]] = {}
    for key, rows in shown.items():
        rows.sort(key=lambda i: (i.shown_at, i.attribution_id, i.rank))
        times[key] = [i.shown_at for i in rows]
    longest = longest_window(windows)
    out = []
    for p in purchases:
        key = (p.customer_id, p.product_id)
        rows = shown.get(key)
        if not rows:
            continue
        hi = bisect.bisect_right(times[key], p.at)
        lo = bisect.bisect_left(times[key], before(p.at, longest))
        touches = tuple(
            i
            for i in rows[lo:hi]
            if i.shown_at >= before(p.at, windows.get(i.experiment, DEFAULT_DAYS))
        )
        if touches:
            out.append(Attribution(p, touches[-1], touches))
    return out


def purchases_of(events) -> list[Purchase]:
    """The purchases of an events table (EVENT_SCHEMA)."""
    kinds = events.column("event_type").to_pylist()
    columns = [
        events.column(name).to_pylist()
        for name in ("customer_id", "product_id", "timestamp", "quantity", "value")
    ]
    return [
        Purchase(c, p, t, float(q), v)
        for kind, c, p, t, q, v in zip(kinds, *columns, strict=True)
        if kind == "purchase"
    ]


def windows_of(experiments: Sequence) -> dict[str, float]:
    """Experiment name → attribution days, from the config's experiments."""
    return {e.name: e.attribution_days for e in experiments}
