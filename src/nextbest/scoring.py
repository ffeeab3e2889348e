"""Ranking with a model bundle: the blend of repeat-purchase and CF scores, and best sellers.

The served ranking scores each candidate (the customer's own products, the CF model's top products
and the recent best sellers) with a linear blend of FEATURES, learned on a validation window by the
trainer, and returns the top N by that score turned into a probability in (0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nextbest.bundle import FEATURES, ModelBundle

__all__ = [
    "Candidates",
    "candidate_features",
    "blend_scores",
    "top_n",
    "rank_blend",
    "best_sellers_for",
    "POPULAR_POOL",
]

POPULAR_POOL = 50
"""Recent best sellers offered to the blend for every customer."""
UNKNOWN_INTERVAL_DAYS = 365.0


@dataclass(frozen=True)
class Candidates:
    """Candidate pairs for a batch of users, grouped by user position (ascending)."""

    pos: np.ndarray
    """Position of the user in the batch."""
    item: np.ndarray
    features: np.ndarray
    """(n_candidates, len(FEATURES))."""

    @property
    def bought(self) -> np.ndarray:
        return self.features[:, FEATURES.index("repeat")] > 0


def _pair_lookup(matrix, users: np.ndarray, pos: np.ndarray, item: np.ndarray):
    """Values of `matrix[users[pos], item]` for a CSR matrix, 0 where absent, and found mask."""
    sub = matrix[users]
    n_items = matrix.shape[1]
    row_of = np.repeat(np.arange(sub.shape[0], dtype=np.int64), np.diff(sub.indptr))
    keys = row_of * n_items + sub.indices
    want = pos.astype(np.int64) * n_items + item
    at = np.searchsorted(keys, want)
    at_c = np.minimum(at, max(len(keys) - 1, 0))
    found = (len(keys) > 0) & (keys[at_c] == want) if len(keys) else np.zeros(len(want), bool)
    values = np.where(found, sub.data[at_c] if len(keys) else 0.0, 0.0)
    return values, found


def candidate_features(
    bundle: ModelBundle, users: np.ndarray, *, now_day: float, pool: int
) -> Candidates:
    """Candidates and their FEATURES for the user indices `users` (all known to the model).

    Features (all 0 for products the customer never bought, except cf_new and log_popularity):
    repeat (1 if bought before), log_days_bought, log_recency_weighted (frequency decayed to now),
    log_age (days since last purchase), timeliness (−|log((age+1)/(interval+1))|, 0 when the
    purchase is as old as the product's usual repurchase interval), repeat_rate (share of the
    product's buyers who buy it again), cf_new / cf_old (CF score over the user's best candidate
    score, for new / bought products), log_popularity (recent distinct buyers).
    """
    users = np.asarray(users, dtype=np.int64)
    n = len(users)
    n_items = bundle.shape[1]
    rs = bundle.repeat
    ids, _ = bundle.cf.recommend(
        users, bundle.user_items[users], N=pool, filter_already_liked_items=True
    )
    cf_pos = np.repeat(np.arange(n), ids.shape[1])
    cf_item = ids.ravel()
    ok = cf_item >= 0
    own = rs.days_bought[users]
    own_pos = np.repeat(np.arange(n), np.diff(own.indptr))
    popular = bundle.recent_best_sellers[:POPULAR_POOL]
    pop_pos = np.repeat(np.arange(n), len(popular))
    pop_item = np.tile(popular, n)
    key = np.concatenate(
        [
            own_pos.astype(np.int64) * n_items + own.indices,
            cf_pos[ok].astype(np.int64) * n_items + cf_item[ok],
            pop_pos.astype(np.int64) * n_items + pop_item,
        ]
    )
    key = np.unique(key)
    pos = key // n_items
    item = key % n_items

    days, bought = _pair_lookup(rs.days_bought, users, pos, item)
    last, _ = _pair_lookup(rs.last_day, users, pos, item)
    rw, _ = _pair_lookup(rs.recency_weighted, users, pos, item)
    rep = bought.astype(np.float64)
    elapsed = max(now_day - bundle.reference_day, 0.0)
    half_life = float(bundle.manifest.get("params", {}).get("repeat_half_life_days", 90.0))
    rw = rw * np.power(0.5, elapsed / half_life)
    age = np.where(bought, np.maximum(now_day - last, 0.0), 0.0)
    interval = np.where(
        np.isfinite(bundle.item_repurchase_days[item]),
        bundle.item_repurchase_days[item],
        rs.item_interval_days[item],
    )
    interval = np.where(np.isfinite(interval), interval, UNKNOWN_INTERVAL_DAYS)
    timeliness = -np.abs(np.log((age + 1.0) / (interval + 1.0)))

    cf = bundle.cf.pair_scores(users[pos], item, bundle.user_items)
    starts = np.flatnonzero(np.r_[True, pos[1:] != pos[:-1]])
    top = np.maximum.reduceat(cf, starts)
    top_per = np.repeat(np.where(top > 0, top, 1.0), np.diff(np.r_[starts, len(pos)]))
    cfn = cf / top_per

    features = np.column_stack(
        [
            rep,
            np.log1p(days) * rep,
            np.log1p(rw) * rep,
            np.log1p(age) * rep,
            timeliness * rep,
            rs.item_repeat_rate[item] * rep,
            cfn * (1.0 - rep),
            cfn * rep,
            np.log1p(rs.item_recent_buyers[item]),
        ]
    )
    return Candidates(pos=pos, item=item.astype(np.int64), features=features)


def blend_scores(bundle: ModelBundle, features: np.ndarray) -> np.ndarray:
    """The blend's probability for each candidate row (logistic of the linear blend)."""
    z = features @ bundle.blend_weights + bundle.blend_intercept
    return 1.0 / (1.0 + np.exp(-z))


def top_n(
    pos: np.ndarray, item: np.ndarray, score: np.ndarray, n_users: int, N: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per user position, the N best items by score (ties: lower item index first).

    Returns `(ids, scores)` of shape (n_users, N), padded with -1 / -inf.
    """
    order = np.lexsort((item, -score, pos))
    pos, item, score = pos[order], item[order], score[order]
    starts = np.searchsorted(pos, np.arange(n_users))
    rank = np.arange(len(pos)) - starts[pos]
    keep = rank < N
    ids = np.full((n_users, N), -1, dtype=np.int64)
    scores = np.full((n_users, N), -np.inf)
    ids[pos[keep], rank[keep]] = item[keep]
    scores[pos[keep], rank[keep]] = score[keep]
    return ids, scores


def rank_blend(
    bundle: ModelBundle,
    users: np.ndarray,
    *,
    N: int,
    now_day: float,
    pool: int,
    allow: callable | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The blend's top N for known user indices; `allow(candidates) -> bool mask` filters first."""
    cands = candidate_features(bundle, users, now_day=now_day, pool=pool)
    score = blend_scores(bundle, cands.features)
    keep = np.ones(len(score), dtype=bool) if allow is None else allow(cands)
    return top_n(cands.pos[keep], cands.item[keep], score[keep], len(users), N)


def best_sellers_for(
    bundle: ModelBundle, n_users: int, N: int, exclude: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Best sellers as `(ids, scores)` for `n_users` rows; `exclude` is a bool mask over items."""
    order = bundle.best_sellers
    if exclude is not None:
        order = order[~exclude[order]]
    order = order[:N]
    buyers = bundle.repeat.item_buyers[order]
    score = buyers / max(buyers.max(), 1.0) if len(buyers) else buyers
    ids = np.full((n_users, N), -1, dtype=np.int64)
    scores = np.full((n_users, N), -np.inf)
    ids[:, : len(order)] = order
    scores[:, : len(order)] = score
    return ids, scores
