"""From an events table to the arrays the models learn from, all vectorised with numpy.

- `Interactions`: events coded to user and item indices (returns already netted out).
- `cf_matrix`: the user×item CSR of the CF models: event-type weights × recency decay.
- `repeat_matrices`: per (customer, product) purchase-day counts, last purchase day and a
  recency-weighted frequency, on the same sparsity pattern, plus per-product repurchase statistics.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

__all__ = [
    "DAY_US",
    "Interactions",
    "RepeatStats",
    "to_days",
    "build_interactions",
    "cf_matrix",
    "repeat_stats",
]

DAY_US = 86_400_000_000


def _unique(values: np.ndarray) -> np.ndarray:
    """Sorted unique values by sort and compare (faster here than np.unique's hash path)."""
    ordered = np.sort(values)
    return ordered[np.r_[True, ordered[1:] != ordered[:-1]]] if len(ordered) else ordered


def to_days(ts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Timestamps as float days since the epoch."""
    return pc.cast(ts, pa.int64()).to_numpy(zero_copy_only=False).astype(np.float64) / DAY_US


@dataclass(frozen=True, kw_only=True)
class Interactions:
    """Events coded to indices. `user_ids[u]`, `item_ids[i]` give the original ids."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    user: np.ndarray
    """int32 user index per event."""
    item: np.ndarray
    """int32 item index per event."""
    day: np.ndarray
    """float64 days since the epoch per event."""
    weight: np.ndarray
    """float64 interaction weight per event (event-type weight × share not returned)."""
    is_purchase: np.ndarray
    """bool per event: a purchase (the repeat-purchase model only counts those)."""

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.user_ids), len(self.item_ids)

    @property
    def last_day(self) -> float:
        return float(self.day.max()) if len(self.day) else 0.0


def _codes(values: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(sorted unique ids as a numpy unicode array, int32 index of each value)."""
    enc = (
        pc.dictionary_encode(values).combine_chunks()
        if isinstance(values, pa.ChunkedArray)
        else pc.dictionary_encode(values)
    )
    dictionary = enc.dictionary.to_numpy(zero_copy_only=False).astype(str)
    order = np.argsort(dictionary, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    codes = rank[enc.indices.to_numpy(zero_copy_only=False)].astype(np.int32)
    return dictionary[order], codes


def build_interactions(events: pa.Table, event_weights: dict[str, float]) -> Interactions:
    """Code events to indices, net returns against purchases and weight event types.

    Returns cancel purchases per (customer, product): a pair whose returned quantity reaches its
    purchased quantity disappears; a partly returned pair keeps its purchases at the share kept.
    Event types without a weight (or weight 0) are dropped.
    """
    etype = events.column("event_type")
    is_return = pc.equal(etype, "return").to_numpy(zero_copy_only=False)
    type_weight = np.zeros(events.num_rows)
    for name, w in event_weights.items():
        type_weight[pc.equal(etype, name).to_numpy(zero_copy_only=False)] = w
    keep = (type_weight > 0) | is_return
    events = events.filter(pa.array(keep))
    is_return, type_weight = is_return[keep], type_weight[keep]
    user_ids, user = _codes(events.column("customer_id"))
    item_ids, item = _codes(events.column("product_id"))
    n_items = len(item_ids)
    qty = events.column("quantity").to_numpy(zero_copy_only=False).astype(np.float64)
    is_purchase = pc.equal(events.column("event_type"), "purchase").to_numpy(zero_copy_only=False)
    pair = user.astype(np.int64) * n_items + item
    uniq, inv = np.unique(pair, return_inverse=True)
    bought = np.bincount(inv, weights=np.where(is_purchase, qty, 0.0), minlength=len(uniq))
    returned = np.bincount(inv, weights=np.where(is_return, qty, 0.0), minlength=len(uniq))
    with np.errstate(divide="ignore", invalid="ignore"):
        kept_share = np.where(bought > 0, np.clip(1.0 - returned / bought, 0.0, 1.0), 1.0)
    share = kept_share[inv]
    # A fully returned pair loses its purchases; other signals (views, carts) stay.
    keep = ~is_return & ~(is_purchase & (share <= 0))
    weight = (type_weight * np.where(is_purchase, share, 1.0))[keep]
    user, item = user[keep], item[keep]
    # Re-code so that customers and products left with no events vanish from the id maps.
    used_u = np.unique(user)
    used_i = np.unique(item)
    remap_u = np.full(len(user_ids), -1, np.int32)
    remap_u[used_u] = np.arange(len(used_u), dtype=np.int32)
    remap_i = np.full(len(item_ids), -1, np.int32)
    remap_i[used_i] = np.arange(len(used_i), dtype=np.int32)
    return Interactions(
        user_ids=user_ids[used_u],
        item_ids=item_ids[used_i],
        user=remap_u[user],
        item=remap_i[item],
        day=to_days(events.column("timestamp"))[keep],
        weight=weight,
        is_purchase=is_purchase[keep],
    )


def cf_matrix(inter: Interactions, *, half_life_days: float, reference_day: float) -> sp.csr_matrix:
    """User×item float32 CSR: Σ weight × 0.5^(age / half-life), summed per pair."""
    age = np.maximum(reference_day - inter.day, 0.0)
    values = inter.weight * np.power(0.5, age / half_life_days)
    m = sp.csr_matrix((values, (inter.user, inter.item)), shape=inter.shape, dtype=np.float64)
    m.sum_duplicates()
    m.sort_indices()
    return m.astype(np.float32)


@dataclass(frozen=True, kw_only=True)
class RepeatStats:
    """Purchase-repeat statistics. The three matrices share one sparsity pattern (bought pairs)."""

    days_bought: sp.csr_matrix
    """Number of distinct days on which the customer bought the product."""
    last_day: sp.csr_matrix
    """Day (since the epoch) of the customer's last purchase of the product."""
    first_day: sp.csr_matrix
    """Day (since the epoch) of the customer's first purchase of the product."""
    recency_weighted: sp.csr_matrix
    """Σ over purchase days of 0.5^(age / repeat half-life), at the reference day."""
    item_repeat_rate: np.ndarray
    """Per product: smoothed share of its buyers who bought it on two or more days."""
    item_interval_days: np.ndarray
    """Per product: median days between a customer's purchases (NaN when never repeated)."""
    item_buyers: np.ndarray
    """Per product: distinct buyers."""
    item_recent_buyers: np.ndarray
    """Per product: distinct buyers in the last 30 days before the reference day."""
    user_days: np.ndarray
    """Per customer: distinct days with a purchase."""
    user_days_plain: np.ndarray | None = None
    """Per customer: distinct days with a purchase of a product that is not sensitive (what
    customers without sensitive consent are scored with); None = as user_days."""
    item_prev_buyers: np.ndarray
    """Per product: distinct buyers in the 30 days before those last 30 (with
    item_recent_buyers: the product's trend)."""
    season_days: sp.csr_matrix
    """Same pattern (float32): purchase days of the pair in the 30 days that began one year
    before the reference day (the coming month, last year); all 0 when the history does not
    reach back that far (`season_covered`)."""
    item_season_buyers: np.ndarray
    """Per product: distinct buyers in that same window (the coming month, last year)."""
    season_covered: bool
    """Whether the purchases reach back to the start of the season window."""


SEASON_LAG_DAYS = 365.0
"""The season window starts this many days before the reference day ..."""
SEASON_WINDOW_DAYS = 30.0
"""... and lasts this long: the month a model serves, one year earlier."""


def repeat_stats(
    inter: Interactions, *, half_life_days: float, reference_day: float, prior_weight: float = 5.0
) -> RepeatStats:
    """Compute `RepeatStats` from purchase events (one purchase day per customer, product, day)."""
    n_users, n_items = inter.shape
    p = inter.is_purchase
    day_int = np.floor(inter.day[p]).astype(np.int64)
    key = (inter.user[p].astype(np.int64) * n_items + inter.item[p]) * 100_000 + day_int
    uniq = _unique(key)
    pair = uniq // 100_000
    day = (uniq % 100_000).astype(np.float64)
    pairs, start, counts = np.unique(pair, return_index=True, return_counts=True)
    rows = (pairs // n_items).astype(np.int32)
    cols = (pairs % n_items).astype(np.int32)
    last = np.maximum.reduceat(day, start) + 0.5  # purchases happen within their day
    first = np.minimum.reduceat(day, start) + 0.5
    decay = np.power(0.5, np.maximum(reference_day - (day + 0.5), 0.0) / half_life_days)
    rw = np.add.reduceat(decay, start)

    def csr(values: np.ndarray) -> sp.csr_matrix:
        m = sp.csr_matrix((values, (rows, cols)), shape=(n_users, n_items), dtype=np.float64)
        m.sort_indices()
        return m

    buyers = np.bincount(cols, minlength=n_items).astype(np.float64)
    repeaters = np.bincount(cols, weights=(counts >= 2).astype(np.float64), minlength=n_items)
    global_rate = repeaters.sum() / max(buyers.sum(), 1.0)
    repeat_rate = (repeaters + prior_weight * global_rate) / (buyers + prior_weight)
    # Median over repeating customers of their mean gap between purchase days.
    multi = counts >= 2
    gaps = (last[multi] - first[multi]) / (counts[multi] - 1)
    interval = np.full(n_items, np.nan)
    if multi.any():
        order = np.lexsort((gaps, cols[multi]))
        g_cols, g_vals = cols[multi][order], gaps[order]
        ids, g_start, g_count = np.unique(g_cols, return_index=True, return_counts=True)
        lo = g_start + (g_count - 1) // 2
        hi = g_start + g_count // 2
        interval[ids] = (g_vals[lo] + g_vals[hi]) / 2.0
    recent = last >= reference_day - 30.0
    recent_buyers = np.bincount(cols[recent], minlength=n_items).astype(np.float64)

    def days_within(lo: float, hi: float) -> np.ndarray:
        """Per bought pair: its purchase days in [lo, hi)."""
        inside = ((day + 0.5 >= lo) & (day + 0.5 < hi)).astype(np.float64)
        return np.add.reduceat(inside, start) if len(start) else np.zeros(0)

    def buyers_of(pair_days: np.ndarray) -> np.ndarray:
        return np.bincount(cols[pair_days > 0], minlength=n_items).astype(np.float64)

    prev = days_within(reference_day - 60.0, reference_day - 30.0)
    season_start = reference_day - SEASON_LAG_DAYS
    covered = bool(len(day)) and float(day.min()) <= season_start
    season = days_within(season_start, season_start + SEASON_WINDOW_DAYS) * covered
    return RepeatStats(
        days_bought=csr(counts.astype(np.float64)),
        last_day=csr(last),
        first_day=csr(first),
        recency_weighted=csr(rw),
        item_repeat_rate=repeat_rate,
        item_interval_days=interval,
        item_buyers=buyers,
        item_recent_buyers=recent_buyers,
        user_days=purchase_days(inter),
        item_prev_buyers=buyers_of(prev),
        season_days=csr(season).astype(np.float32),
        item_season_buyers=buyers_of(season),
        season_covered=covered,
    )


def purchase_days(inter: Interactions, items: np.ndarray | None = None) -> np.ndarray:
    """Per customer: distinct days with a purchase (of the products where `items`, a bool mask
    over products, is true; all products when None)."""
    p = inter.is_purchase
    if items is not None:
        p = p & items[inter.item]
    day_int = np.floor(inter.day[p]).astype(np.int64)
    return np.bincount(
        _unique(inter.user[p].astype(np.int64) * 100_000 + day_int) // 100_000,
        minlength=inter.shape[0],
    ).astype(np.float64)
