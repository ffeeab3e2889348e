"""Ranking with a model bundle: the blend of repeat-purchase and CF scores, and best sellers.

The served ranking scores each candidate (the customer's own products, the CF model's top products
and the recent best sellers) with a linear blend of FEATURES, learned on a validation window by the
trainer, and returns the top N by that score turned into a probability in (0, 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from nextbest.bundle import FEATURES, ModelBundle
from nextbest.cf import FACTOR_KINDS

__all__ = [
    "Candidates",
    "candidate_features",
    "blend_scores",
    "top_n",
    "rank_blend",
    "best_sellers_for",
    "POPULAR_POOL",
    "item_interval",
    "timeliness",
    "is_durable",
    "discovery_slots",
    "with_discovery",
    "Recommendations",
    "recommend_for",
    "cf_candidates_for",
    "CANDIDATE_RULES",
    "removed_by",
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


def item_interval(bundle: ModelBundle, items: np.ndarray) -> np.ndarray:
    """Repurchase interval in days per item: the catalog's `repurchase_days` when given, else the
    median interval learned from purchases; NaN when neither exists."""
    catalog = bundle.item_repurchase_days[items]
    return np.where(np.isfinite(catalog), catalog, bundle.repeat.item_interval_days[items])


def timeliness(age: np.ndarray, interval: np.ndarray) -> np.ndarray:
    """−|log((age+1)/(interval+1))|: 0 when the last purchase is exactly one interval old, more
    negative the earlier or later it is."""
    return -np.abs(np.log((age + 1.0) / (interval + 1.0)))


def rows_of(matrix: sp.csr_matrix, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`(indptr, at)` of the rows `users` of a CSR matrix: row k's entries are
    `matrix.indices[at[indptr[k]:indptr[k+1]]]` (and `.data`). Plain numpy: for the few rows of
    a served call this is several times faster than scipy's row indexing."""
    starts = matrix.indptr[users].astype(np.int64)
    lengths = matrix.indptr[users + 1] - starts
    indptr = np.zeros(len(users) + 1, dtype=np.int64)
    np.cumsum(lengths, out=indptr[1:])
    at = np.repeat(starts - indptr[:-1], lengths) + np.arange(indptr[-1], dtype=np.int64)
    return indptr, at


def take_rows(matrix: sp.csr_matrix, users: np.ndarray) -> sp.csr_matrix:
    """`matrix[users]` for a CSR matrix, through `rows_of`."""
    indptr, at = rows_of(matrix, users)
    return sp.csr_matrix(
        (matrix.data[at], matrix.indices[at], indptr), shape=(len(users), matrix.shape[1])
    )


def _pair_index(matrix, users: np.ndarray, pos: np.ndarray, item: np.ndarray):
    """Index into `matrix.data` of each pair (users[pos], item) of a CSR matrix with sorted
    indices, and a found mask (index 0 where absent). Matrices that share the sparsity pattern
    (the RepeatStats ones) share these indices too."""
    indptr, at = rows_of(matrix, users)
    n_items = matrix.shape[1]
    row_of = np.repeat(np.arange(len(users), dtype=np.int64), np.diff(indptr))
    keys = row_of * n_items + matrix.indices[at]
    want = pos.astype(np.int64) * n_items + item
    if len(keys) == 0:
        return np.zeros(len(want), dtype=np.int64), np.zeros(len(want), dtype=bool)
    found_at = np.minimum(np.searchsorted(keys, want), len(keys) - 1)
    found = keys[found_at] == want
    return np.where(found, at[found_at], 0), found


def _pair_lookup(matrix, users: np.ndarray, pos: np.ndarray, item: np.ndarray):
    """Values of `matrix[users[pos], item]` for a CSR matrix, 0 where absent, and found mask."""
    index, found = _pair_index(matrix, users, pos, item)
    values = np.where(found, matrix.data[index], 0.0) if len(matrix.data) else np.zeros(len(pos))
    return values, found


def candidate_features(
    bundle: ModelBundle,
    users: np.ndarray,
    *,
    now_day: float,
    pool: int,
    cf_candidates: np.ndarray | None = None,
    user_scores: dict[int, np.ndarray] | None = None,
    plain: np.ndarray | None = None,
) -> Candidates:
    """Candidates and their FEATURES for the user indices `users` (all known to the model).

    Features (all 0 for products the customer never bought, except cf_new and log_popularity):
    repeat (1 if bought before), log_days_bought, log_recency_weighted (frequency decayed to now),
    log_age (days since last purchase), timeliness (−|log((age+1)/(interval+1))|, 0 when the
    purchase is as old as the product's usual repurchase interval), repeat_rate (share of the
    product's buyers who buy it again), cf_new / cf_old (CF score over the user's best candidate
    score, for new / bought products), log_popularity (recent distinct buyers), log_share (share of
    the customer's shopping days with the product), own_timeliness (timeliness against the
    customer's own interval for the product, when bought on two or more days), log_season_days
    (purchase days of the pair in the coming month one year earlier), log_season_popularity (the
    product's distinct buyers then; both 0 when the history is shorter than a year) and
    log_prev_popularity (distinct buyers in the 30 days before the last 30: with log_popularity,
    the product's trend).

    `cf_candidates` (one row of CF product indices per user, -1 padded), when given, replaces the
    CF model's top `pool` new products (see `cf_candidates_for`, which computes them).
    `user_scores` (batch position → the CF score of every item) replaces the model's CF
    candidates and scores of some users: those of their history without what may not be used
    (`CFModel.history_scores`).
    `plain` (bool per user, customers without sensitive consent): no sensitive candidates, and
    only days with a non-sensitive purchase count in log_share.
    """
    users = np.asarray(users, dtype=np.int64)
    n = len(users)
    n_items = bundle.shape[1]
    rs = bundle.repeat
    if cf_candidates is None:
        ids, _ = bundle.cf.recommend(
            users,
            take_rows(bundle.user_items, users),
            N=pool,
            filter_already_liked_items=True,
            items=bundle.cf_pool_items,
        )
    else:
        ids = cf_candidates
    if user_scores:
        ids = ids.copy()
        outside = None
        pool_items = bundle.cf_pool_items
        if pool_items is not None and bundle.cf.kind in FACTOR_KINDS:
            outside = np.ones(n_items, dtype=bool)
            outside[pool_items] = False
        for j, given in user_scores.items():
            scores = np.array(given, dtype=np.float64)
            if outside is not None:
                scores[outside] = -np.inf
            u = users[j]
            scores[
                bundle.user_items.indices[
                    bundle.user_items.indptr[u] : bundle.user_items.indptr[u + 1]
                ]
            ] = -np.inf
            k = min(ids.shape[1], int(np.isfinite(scores).sum()))
            top = np.argpartition(-scores, k - 1)[:k] if k else np.zeros(0, np.int64)
            ids[j] = -1
            ids[j, :k] = top[np.argsort(-scores[top], kind="stable")]
    cf_pos = np.repeat(np.arange(n), ids.shape[1])
    cf_item = ids.ravel()
    ok = cf_item >= 0
    own_ptr, own_at = rows_of(rs.days_bought, users)
    own_pos = np.repeat(np.arange(n), np.diff(own_ptr))
    popular = bundle.recent_best_sellers[:POPULAR_POOL]
    pop_pos = np.repeat(np.arange(n), len(popular))
    pop_item = np.tile(popular, n)
    key = np.concatenate(
        [
            own_pos.astype(np.int64) * n_items + rs.days_bought.indices[own_at],
            cf_pos[ok].astype(np.int64) * n_items + cf_item[ok],
            pop_pos.astype(np.int64) * n_items + pop_item,
        ]
    )
    key.sort()  # unique by sorting: much faster than np.unique's hashing for these sizes
    key = key[np.r_[True, key[1:] != key[:-1]]] if len(key) else key
    pos = key // n_items
    item = key % n_items
    if plain is not None and plain.any():
        # Sensitive products are not even candidates: nothing about them may shape the others'
        # features (the per-customer CF normalisation takes the best candidate's score).
        keep = ~(plain[pos] & bundle.item_sensitive[item])
        pos, item = pos[keep], item[keep]
    if not len(pos):
        empty = np.zeros(0, dtype=np.int64)
        return Candidates(pos=empty, item=empty, features=np.zeros((0, len(FEATURES))))

    # One search serves the five repeat matrices: they share one sparsity pattern.
    index, bought = _pair_index(rs.days_bought, users, pos, item)
    days, last, first, rw, season = (
        np.where(bought, m.data[index], 0.0) if len(m.data) else np.zeros(len(pos))
        for m in (rs.days_bought, rs.last_day, rs.first_day, rs.recency_weighted, rs.season_days)
    )
    rep = bought.astype(np.float64)
    elapsed = max(now_day - bundle.reference_day, 0.0)
    half_life = float(bundle.manifest.get("params", {}).get("repeat_half_life_days", 90.0))
    rw = rw * np.power(0.5, elapsed / half_life)
    age = np.where(bought, np.maximum(now_day - last, 0.0), 0.0)
    interval = item_interval(bundle, item)
    interval = np.where(np.isfinite(interval), interval, UNKNOWN_INTERVAL_DAYS)
    item_timeliness = timeliness(age, interval)
    repeated = days >= 2
    own_interval = np.where(repeated, (last - first) / np.maximum(days - 1.0, 1.0), 0.0)
    own_timeliness = np.where(repeated, timeliness(age, own_interval), 0.0)
    shop_days = rs.user_days[users[pos]]
    if plain is not None and plain.any() and rs.user_days_plain is not None:
        shop_days = np.where(plain[pos], rs.user_days_plain[users[pos]], shop_days)
    share = days / np.maximum(shop_days, 1.0)

    cf = bundle.cf.pair_scores(users[pos], item, bundle.user_items)
    for j, scores in (user_scores or {}).items():
        mine = pos == j
        cf[mine] = scores[item[mine]]
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
            item_timeliness * rep,
            rs.item_repeat_rate[item] * rep,
            cfn * (1.0 - rep),
            cfn * rep,
            np.log1p(rs.item_recent_buyers[item]),
            np.log(np.maximum(share, 1e-3)) * rep,
            own_timeliness,
            np.log1p(rs.item_prev_buyers[item]),
            np.log1p(season) * rep,
            np.log1p(rs.item_season_buyers[item]),
        ]
    )
    return Candidates(pos=pos, item=item.astype(np.int64), features=features)


def cf_candidates_for(bundle: ModelBundle, pool: int, batch: int = 1024) -> np.ndarray:
    """The CF model's top `pool` new products of every user (n_users, pool), -1 padded: what
    `candidate_features` would compute per call, computed once in batches."""
    n_users = bundle.shape[0]
    out = np.full((n_users, min(pool, bundle.shape[1])), -1, dtype=np.int32)
    for lo in range(0, n_users, batch):
        users = np.arange(lo, min(lo + batch, n_users))
        ids, _ = bundle.cf.recommend(
            users,
            take_rows(bundle.user_items, users),
            N=pool,
            filter_already_liked_items=True,
            items=bundle.cf_pool_items,
        )
        out[users, : ids.shape[1]] = ids
    return out


def blend_scores(bundle: ModelBundle, features: np.ndarray) -> np.ndarray:
    """The blend's probability for each candidate row (logistic of the linear blend)."""
    z = features @ bundle.blend_weights + bundle.blend_intercept
    return 1.0 / (1.0 + np.exp(-z))


def top_n(
    pos: np.ndarray,
    item: np.ndarray,
    score: np.ndarray,
    n_users: int,
    N: int,
    *,
    reserve: np.ndarray | None = None,
    reserved: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per user position, the N best items by score (ties: lower item index first).

    With `reserve` (a bool per candidate) and `reserved` > 0: the `reserved` best reserved
    candidates of each user are chosen first (as many as there are), the rest of the N by score
    from the other candidates; the N are then ordered by score (`with_discovery` for one user).
    Returns `(ids, scores)` of shape (n_users, N), padded with -1 / -inf.
    """
    order = np.lexsort((item, -score, pos))
    pos, item, score = pos[order], item[order], score[order]
    starts = np.searchsorted(pos, np.arange(n_users))
    if reserve is not None and reserved > 0:
        reserve = reserve[order]
        # Rank of each reserved candidate among its user's reserved ones (score order).
        r_count = np.cumsum(reserve) - reserve
        r_rank = r_count - np.r_[0, np.cumsum(reserve)][starts][pos]
        first = reserve & (r_rank < reserved)
        taken = np.bincount(pos[first], minlength=n_users)
        rest = ~first
        o_count = np.cumsum(rest) - rest
        o_rank = o_count - np.r_[0, np.cumsum(rest)][starts][pos]
        chosen = first | (rest & (o_rank < N - taken[pos]))
        pos, item, score = pos[chosen], item[chosen], score[chosen]
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
    cf_candidates: np.ndarray | None = None,
    user_scores: dict[int, np.ndarray] | None = None,
    plain: np.ndarray | None = None,
    reserved_new: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """The blend's top N for known user indices; `allow(candidates) -> bool mask` filters first;
    the `reserved_new` best products new to the customer are among the N (`top_n`)."""
    cands = candidate_features(
        bundle,
        users,
        now_day=now_day,
        pool=pool,
        cf_candidates=cf_candidates,
        user_scores=user_scores,
        plain=plain,
    )
    score = blend_scores(bundle, cands.features)
    keep = np.ones(len(score), dtype=bool) if allow is None else allow(cands)
    return top_n(
        cands.pos[keep],
        cands.item[keep],
        score[keep],
        len(users),
        N,
        reserve=~cands.bought[keep],
        reserved=reserved_new,
    )


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


@dataclass(frozen=True)
class Recommendations:
    """Top-N per requested customer, in request order."""

    ids: np.ndarray
    """(n, N) item indices, -1 padded."""
    scores: np.ndarray
    """(n, N) scores in (0, 1], never increasing along a row; -inf padded."""
    personalized: np.ndarray
    """(n,) bool."""
    reasons: list[str]
    """Per customer: '' when personalized, else why not (no_consent, unknown_customer)."""
    popular: np.ndarray
    """(n, N) bool: the item is a best seller (a non-personal answer or a fill-in)."""
    users: np.ndarray
    """(n,) the model's user index of each customer, -1 when unknown."""


def discovery_slots(n: int, share: float) -> int:
    """Places of an answer of `n` products kept for products new to the customer."""
    return int(np.ceil(n * share - 1e-9))


def with_discovery(fresh: np.ndarray, n: int, slots: int) -> np.ndarray:
    """Which of one customer's candidates, in rank order, make an answer of `n`: the first
    `slots` of those `fresh` (new to the customer; all there are when fewer), the rest from the
    top of the others. A bool mask; the order stays the rank order. (`top_n` with `reserve` is
    the same rule for many customers at once.)"""
    take = fresh & (np.cumsum(fresh) <= slots)
    others = ~take
    return take | (others & (np.cumsum(others) <= n - take.sum()))


def is_durable(bundle: ModelBundle, items: np.ndarray, *, durable_repeat_rate: float) -> np.ndarray:
    """Products whose buyers almost never buy them again: smoothed repeat rate below
    `durable_repeat_rate` and no repurchase interval in the catalog. A customer who bought one is
    not offered it again (unless the request asks for bought products)."""
    catalog_interval = np.isfinite(bundle.item_repurchase_days[items])
    return (bundle.repeat.item_repeat_rate[items] < durable_repeat_rate) & ~catalog_interval


CANDIDATE_RULES = ("unavailable", "sensitivity", "filter", "durable_bought")
"""The rules that remove a candidate before the blend ranks (`removed_by`), in the order an
explanation names them."""


def removed_by(
    bundle: ModelBundle,
    items: np.ndarray,
    bought: np.ndarray,
    *,
    sensitive_ok: np.ndarray,
    allowed: np.ndarray,
    include_purchased: np.ndarray,
    durable_repeat_rate: float,
) -> dict[str, np.ndarray]:
    """Per candidate (item, whether the customer bought it, and per candidate: the customer's
    sensitive consent, the request's item mask, include_purchased): rule → removed, for each of
    CANDIDATE_RULES. The served ranking keeps the candidates no rule removes; an explanation
    names the first rule that removed a product."""
    durable = is_durable(bundle, items, durable_repeat_rate=durable_repeat_rate)
    return {
        "unavailable": ~bundle.item_available[items],
        "sensitivity": bundle.item_sensitive[items] & ~sensitive_ok,
        "filter": ~allowed,
        "durable_bought": bought & durable & ~include_purchased,
    }


def recommend_for(
    bundle: ModelBundle,
    customer_ids: np.ndarray,
    *,
    N: int,
    now_day: float,
    personalization_ok: np.ndarray,
    sensitive_ok: np.ndarray,
    durable_repeat_rate: float,
    discovery_share: float = 0.0,
    pool: int,
    item_masks: list[np.ndarray | None] | None = None,
    include_purchased: np.ndarray | None = None,
    cf_candidates: np.ndarray | None = None,
    user_scores: dict[int, np.ndarray] | None = None,
) -> Recommendations:
    """The ranking stage for a batch of customers, the same for every channel (the privacy rule
    then values it per channel: `ServedModel._privacy_rule`).

    Customers without personalization consent or unknown to the model get best sellers. For the
    others: the blend's probability of a purchase soon over the candidates (own products, best
    sellers, CF), without unavailable products, without sensitive products unless
    `sensitive_ok`, without durables already bought (`is_durable`) unless `include_purchased` is
    set for the customer, filled up with best sellers. At least `discovery_share` of the N are
    products new to the customer when there are such candidates (`discovery_slots`).
    `item_masks[r]`, when given, is a bool mask over items: only those may be returned to
    customer r (category filters, excluded products). `cf_candidates`: the CF candidates of
    every user of the model, precomputed by `cf_candidates_for` (else computed per call).
    `user_scores` (request row → the CF score of every item) replaces some customers' CF
    candidates and scores (`candidate_features`).
    """
    n = len(customer_ids)
    masks = item_masks if item_masks is not None else [None] * n
    with_purchased = np.zeros(n, bool) if include_purchased is None else include_purchased
    users = bundle.user_index(customer_ids)
    personal = (users >= 0) & personalization_ok
    reasons = [
        "" if p else ("no_consent" if not ok else "unknown_customer")
        for p, ok in zip(personal, personalization_ok, strict=True)
    ]
    ids = np.full((n, N), -1, dtype=np.int64)
    scores = np.full((n, N), -np.inf)
    popular = np.zeros((n, N), dtype=bool)
    blocked = ~bundle.item_available
    # Non-personal answers never show sensitive products: nothing says the customer wants them.
    non_personal_block = blocked | bundle.item_sensitive
    plain = [r for r in np.flatnonzero(~personal) if masks[r] is None]
    if plain:
        ids[plain], scores[plain] = best_sellers_for(bundle, len(plain), N, non_personal_block)
    for r in np.flatnonzero(~personal):
        if masks[r] is not None:
            ids[r : r + 1], scores[r : r + 1] = best_sellers_for(
                bundle, 1, N, non_personal_block | ~masks[r]
            )
    popular[~personal] = True
    rows = np.flatnonzero(personal)
    if len(rows):
        sens_ok = sensitive_ok[rows]
        keep_bought = with_purchased[rows]
        row_masks = [(j, masks[r]) for j, r in enumerate(rows) if masks[r] is not None]

        def allow(c: Candidates) -> np.ndarray:
            allowed = np.ones(len(c.item), dtype=bool)
            for j, mask in row_masks:
                mine = c.pos == j
                allowed[mine] = mask[c.item[mine]]
            rules = removed_by(
                bundle,
                c.item,
                c.bought,
                sensitive_ok=sens_ok[c.pos],
                allowed=allowed,
                include_purchased=keep_bought[c.pos],
                durable_repeat_rate=durable_repeat_rate,
            )
            return ~np.logical_or.reduce(list(rules.values()))

        p_ids, p_scores = rank_blend(
            bundle,
            users[rows],
            N=N,
            now_day=now_day,
            pool=pool,
            allow=allow,
            cf_candidates=None if cf_candidates is None else cf_candidates[users[rows]],
            user_scores={j: user_scores[r] for j, r in enumerate(rows) if r in (user_scores or {})},
            plain=~sens_ok,
            reserved_new=discovery_slots(N, discovery_share),
        )
        p_popular = np.zeros_like(p_ids, dtype=bool)
        # Fill short lists with best sellers the customer may see and has not been given.
        short = np.flatnonzero((p_ids < 0).any(axis=1))
        for r in short:
            have = p_ids[r][p_ids[r] >= 0]
            exclude = blocked.copy()
            if not sens_ok[r]:
                exclude |= bundle.item_sensitive
            if masks[rows[r]] is not None:
                exclude |= ~masks[rows[r]]
            exclude[have] = True
            days = bundle.repeat.days_bought
            u = users[rows[r]]
            bought = days.indices[days.indptr[u] : days.indptr[u + 1]]
            exclude[bought] = True
            f_ids, _ = best_sellers_for(bundle, 1, N - len(have), exclude)
            f_ids = f_ids[0][f_ids[0] >= 0]
            low = p_scores[r][p_ids[r] >= 0].min() if len(have) else 1.0
            fill = slice(len(have), len(have) + len(f_ids))
            p_ids[r, fill] = f_ids
            p_scores[r, fill] = low * (
                1.0 - (np.arange(1, len(f_ids) + 1) / (len(f_ids) + 1)) * 1e-3
            )
            p_popular[r, fill] = True
        ids[rows], scores[rows], popular[rows] = p_ids, p_scores, p_popular
    popular &= ids >= 0
    return Recommendations(
        ids=ids,
        scores=scores,
        personalized=personal,
        reasons=reasons,
        popular=popular,
        users=users,
    )
