"""TIFU-KNN (Hu et al., SIGIR 2020) in numpy / scipy: temporal item-frequency customer vectors
and a user-KNN blend of them.

- `TifuParams`: k, basket decay r_b, group decay r_g, alpha, groups m (published defaults).
- `customer_vectors`: the (n_users, n_items) CSR of TIFU customer vectors from purchase events.
- `tifu_scores`: alpha · own vector + (1 − alpha) · mean of the k nearest other customers' vectors.
- `tifu_top_n`: the N best items per customer from those scores, computed block by block.

Definitions (those of the authors' reference code, `temporal_decay_sum_history` and
`group_history_list` in HaojiHu/TIFUKNN `tifuknn.py`, also ported as-is to Cornac's `TIFUKNN`):

1. A basket is one customer's purchases on one day (`floor(day)`), a 0/1 item vector; a
   customer's n baskets are numbered j = 0 … n−1, oldest first.
2. Basket j gets the within-group weight r_b^(n−1−j): the decay counts back from the newest
   basket of the *whole history*, not from the last basket of its group. The paper's formula
   writes the decay inside a group (r_b^(x−j) for the x baskets of a group), but the authors' code,
   which produced the published numbers, and our literature notes use the whole-history count.
   We follow the code. Changing to per-group counting would change only the exponent in
   `_basket_weights`.
3. Groups: n ≥ m → m groups of consecutive baskets. With base = n // m and extra = n % m, the
   first m − extra groups hold base baskets and the last extra groups hold base + 1. n < m → n
   groups of one basket each. A group vector is the mean of its weighted basket vectors.
4. Customer vector = Σ_i r_g^(m−1−i) · group_i / (number of groups), i = 0 … groups−1. As in the
   reference code, the exponent uses m even when the customer has fewer than m groups, so
   with 3 baskets and m = 7 the newest basket is weighted r_g^4 / 3.
5. Neighbours: squared Euclidean distance ||a||² + ||b||² − 2a·b between customer vectors,
   computed with sparse products for blocks of customers. The customer itself and customers
   with no purchases are never neighbours. k is capped at the number of other customers with
   purchases. Distance ties are broken by lower customer index. The neighbour part is the plain
   (unweighted) mean of the k neighbours' vectors.
6. A customer with no purchases has a zero vector and a zero score row, so no neighbours
   stand in for a missing history (Cornac's `score` returns zeros for an empty history too).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np
import scipy.sparse as sp

from nextbest.data.interactions import Interactions

__all__ = ["TifuParams", "customer_vectors", "tifu_scores", "tifu_top_n"]


def _is_int(value: object) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


@dataclass(frozen=True)
class TifuParams:
    """TIFU-KNN hyper-parameters (defaults: the paper's published settings)."""

    k: int = 300
    """Number of nearest neighbours (≥ 1)."""
    basket_decay: float = 0.9
    """r_b in (0, 1]: weight r_b^(n−1−j) of basket j of n (whole-history count)."""
    group_decay: float = 0.7
    """r_g in (0, 1]: weight r_g^(m−1−i) of group i."""
    alpha: float = 0.7
    """In [0, 1]: share of the customer's own vector in the score."""
    groups: int = 7
    """m ≥ 1: number of groups the baskets are split into."""

    def __post_init__(self) -> None:
        if not _is_int(self.k) or self.k < 1:
            raise ValueError(f"k must be an integer >= 1, got {self.k!r}")
        if not _is_int(self.groups) or self.groups < 1:
            raise ValueError(f"groups must be an integer >= 1, got {self.groups!r}")
        for name in ("basket_decay", "group_decay"):
            value = getattr(self, name)
            if not _is_real(value) or not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if not _is_real(self.alpha) or not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha!r}")


def _basket_weights(j: np.ndarray, n: np.ndarray, params: TifuParams) -> np.ndarray:
    """Weight of basket j (0-based, oldest first) of a history of n baskets in the vector."""
    m = params.groups
    base = n // m
    extra = n % m
    cut = base * (m - extra)  # baskets in the first m − extra groups (base baskets each)
    long_group = np.where(j < cut, j // np.maximum(base, 1), (m - extra) + (j - cut) // (base + 1))
    long_size = np.where(j < cut, base, base + 1)
    short = n < m
    group = np.where(short, j, long_group)
    size = np.where(short, 1, long_size)
    n_groups = np.where(short, n, m)
    within = np.power(params.basket_decay, (n - 1 - j).astype(np.float64))
    across = np.power(params.group_decay, (m - 1 - group).astype(np.float64))
    return within * across / size / n_groups


def customer_vectors(
    inter: Interactions, params: TifuParams, *, before_day: float | None = None
) -> sp.csr_matrix:
    """(n_users, n_items) float64 CSR of TIFU customer vectors from purchase events.

    A basket is one customer's purchases on one day (`floor(day)`, 0/1 per item). Events on or
    after `before_day` are ignored when it is given. Customers without purchases get empty rows.
    """
    n_users, n_items = inter.shape
    keep = np.asarray(inter.is_purchase, dtype=bool)
    if before_day is not None:
        keep = keep & (inter.day < before_day)
    user = inter.user[keep].astype(np.int64)
    item = inter.item[keep].astype(np.int64)
    day = np.floor(inter.day[keep]).astype(np.int64)
    order = np.lexsort((item, day, user))
    user, day, item = user[order], day[order], item[order]
    if len(user):
        first = np.r_[True, (user[1:] != user[:-1]) | (day[1:] != day[:-1])]
        new = first | np.r_[True, item[1:] != item[:-1]]
        user, day, item, first = user[new], day[new], item[new], first[new]
    else:
        first = np.zeros(0, dtype=bool)
    basket = np.cumsum(first) - 1  # basket number of each (customer, day, item)
    basket_user = user[first]
    n_baskets = np.bincount(basket_user, minlength=n_users)
    offset = np.cumsum(n_baskets) - n_baskets
    j = np.arange(len(basket_user)) - offset[basket_user]
    weights = _basket_weights(j, n_baskets[basket_user], params)
    vectors = sp.csr_matrix(
        (weights[basket], (user, item)), shape=(n_users, n_items), dtype=np.float64
    )
    vectors.sum_duplicates()
    vectors.eliminate_zeros()  # r_b^(n−1−j) can underflow for very long histories
    vectors.sort_indices()
    return vectors


def _check_users(users: np.ndarray, n_users: int) -> np.ndarray:
    users = np.asarray(users)
    if users.ndim != 1 or (len(users) and not np.issubdtype(users.dtype, np.integer)):
        raise ValueError("users must be a 1-D array of user indices")
    users = users.astype(np.int64)
    if len(users) and (users.min() < 0 or users.max() >= n_users):
        raise ValueError(f"users must be indices in [0, {n_users})")
    return users


def _nearest(dist: np.ndarray, k: int) -> np.ndarray:
    """Per row the column indices of the k smallest values (ties: lower index), unordered."""
    part = np.argpartition(dist, k - 1, axis=1)[:, :k]
    chosen = np.take_along_axis(dist, part, axis=1)
    kth = chosen.max(axis=1, keepdims=True)
    # Rows where values equal to the k-th straddle the cut: redo those with a stable sort.
    split = (dist == kth).sum(axis=1) > (chosen == kth).sum(axis=1)
    if split.any():
        part[split] = np.argsort(dist[split], axis=1, kind="stable")[:, :k]
    return part


_DENSE_CELLS = 1 << 24
"""Most score cells (float64) held densely at once: 128 MiB; the rows per chunk follow."""


def _score_chunks(
    vectors: sp.csr_matrix, users: np.ndarray, params: TifuParams, block: int
) -> Iterator[tuple[slice, np.ndarray, np.ndarray]]:
    """Yield (positions in `users`, those users, dense float64 scores) chunk by chunk.

    The neighbour search runs on blocks of `block` users (a block × n_users distance array).
    Scores are dense (the k neighbours' items cover much of the catalogue), built for at most
    `_DENSE_CELLS` cells at once.
    """
    if not _is_int(block) or block < 1:
        raise ValueError(f"block must be an integer >= 1, got {block!r}")
    vectors = sp.csr_matrix(vectors, dtype=np.float64)
    vectors.sort_indices()
    n_users, n_items = vectors.shape
    users = _check_users(users, n_users)
    has = np.diff(vectors.indptr) > 0
    sq = np.asarray(vectors.multiply(vectors).sum(axis=1)).ravel()
    k = min(params.k, int(has.sum()) - 1)
    use_neighbours = params.alpha < 1.0 and k >= 1
    vectors_t = vectors.T.tocsr() if use_neighbours else None
    chunk = max(1, min(block, _DENSE_CELLS // max(n_items, 1)))
    for start in range(0, len(users), block):
        ub = users[start : start + block]
        select = None
        if use_neighbours:
            own = vectors[ub]
            dist = sq[ub][:, None] + sq[None, :] - 2.0 * (own @ vectors_t).toarray()
            dist[:, ~has] = np.inf
            dist[np.arange(len(ub)), ub] = np.inf
            rows = np.flatnonzero(has[ub])
            nbr = _nearest(dist[rows], k)
            del dist
            select = sp.csr_matrix(
                (np.full(nbr.size, (1.0 - params.alpha) / k), (np.repeat(rows, k), nbr.ravel())),
                shape=(len(ub), n_users),
            )
        for c in range(0, len(ub), chunk):
            uc = ub[c : c + chunk]
            if select is None:
                dense = np.zeros((len(uc), n_items))
            else:
                dense = np.asarray(select[c : c + chunk].toarray() @ vectors)
            own = vectors[uc].tocoo()
            dense[own.row, own.col] += params.alpha * own.data
            yield slice(start + c, start + c + len(uc)), uc, dense


def tifu_scores(
    vectors: sp.csr_matrix, users: np.ndarray, params: TifuParams, *, block: int = 512
) -> sp.csr_matrix:
    """(len(users), n_items) CSR of TIFU-KNN scores for the customers `users`.

    score = alpha · own vector + (1 − alpha) · mean of the k nearest other customers' vectors
    (Euclidean distance; the customer itself and customers without purchases excluded). All the
    requested rows are kept (and the rows are dense in practice): for every customer of a real
    catalogue use `tifu_top_n`, which holds one chunk at a time.
    """
    parts = [sp.csr_matrix(d) for _, _, d in _score_chunks(vectors, users, params, block)]
    if not parts:
        return sp.csr_matrix((0, vectors.shape[1]), dtype=np.float64)
    return sp.vstack(parts, format="csr")


def _top_columns(scores: np.ndarray, n: int) -> np.ndarray:
    """Per row the columns of the n largest values, best first, ties: lower column first."""
    n_cols = scores.shape[1]
    if n >= n_cols:
        return np.lexsort((np.broadcast_to(np.arange(n_cols), scores.shape), -scores), axis=1)
    part = np.argpartition(scores, n_cols - n, axis=1)[:, n_cols - n :]
    chosen = np.take_along_axis(scores, part, axis=1)
    kth = chosen.min(axis=1, keepdims=True)
    # Values equal to the n-th best straddling the cut (and worth returning): stable sort.
    split = (kth[:, 0] > 0) & ((scores == kth).sum(axis=1) > (chosen == kth).sum(axis=1))
    if split.any():
        part[split] = np.argsort(-scores[split], axis=1, kind="stable")[:, :n]
        chosen = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -chosen), axis=1)
    return np.take_along_axis(part, order, axis=1)


def tifu_top_n(
    vectors: sp.csr_matrix,
    users: np.ndarray,
    N: int,
    params: TifuParams,
    *,
    exclude: sp.csr_matrix | None = None,
    block: int = 512,
) -> tuple[np.ndarray, np.ndarray]:
    """The N best items per customer in `users` by TIFU-KNN score, best first.

    Returns `(ids, scores)` of shape (len(users), N): int64 item indices padded with -1 and
    float64 scores padded with -inf. Items with score 0 are never returned; ties go to the lower
    item index. `exclude` is an (n_users, n_items) sparse matrix in the row order of `vectors`
    whose nonzero entries (e.g. items already bought, for a "new products" list) are removed.
    Memory: one block × n_users distance array and one dense chunk of scores at a time.
    """
    if not _is_int(N) or N < 0:
        raise ValueError(f"N must be an integer >= 0, got {N!r}")
    if exclude is not None:
        if exclude.shape != vectors.shape:
            raise ValueError(
                f"exclude must have the shape of vectors {vectors.shape}, got {exclude.shape}"
            )
        exclude = sp.csr_matrix(exclude)
        exclude.eliminate_zeros()
    n = len(np.asarray(users))
    ids = np.full((n, N), -1, dtype=np.int64)
    top = np.full((n, N), -np.inf)
    n_top = min(N, vectors.shape[1])
    if n_top == 0:
        _check_users(users, vectors.shape[0])
        return ids, top
    for pos, uc, dense in _score_chunks(vectors, users, params, block):
        if exclude is not None:
            ex = exclude[uc].tocoo()
            dense[ex.row, ex.col] = 0.0
        cols = _top_columns(dense, n_top)
        vals = np.take_along_axis(dense, cols, axis=1)
        good = vals > 0
        ids[pos, :n_top] = np.where(good, cols, -1)
        top[pos, :n_top] = np.where(good, vals, -np.inf)
    return ids, top
