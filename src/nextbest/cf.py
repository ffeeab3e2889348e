"""Collaborative-filtering models from `implicit`, rebuilt from plain arrays.

`CFModel` wraps a fitted implicit model with the vocabulary of implicit (`recommend`, `N`,
`filter_already_liked_items`) and adds `pair_scores` (the model's score of given customer/product
pairs) and `arrays()` / `from_arrays()` for saving without pickle. Fitting lives in `training.py`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from implicit.cpu.bpr import BayesianPersonalizedRanking
from implicit.nearest_neighbours import ItemItemRecommender, NearestNeighboursScorer
from threadpoolctl import threadpool_limits

__all__ = ["CF_KINDS", "FACTOR_KINDS", "ITEM_ITEM_KINDS", "CFModel"]

FACTOR_KINDS = ("als", "bpr")
ITEM_ITEM_KINDS = ("cosine", "bm25")
CF_KINDS = FACTOR_KINDS + ITEM_ITEM_KINDS
BPR_FOLD_IN_STEPS = 100
"""Gradient steps of `CFModel.history_scores` for BPR."""
BPR_FOLD_IN_NEGATIVES = 4
"""Products the customer did not buy sampled per bought product, per step."""


@dataclass
class CFModel:
    """A fitted CF model of one kind (`als`, `bpr`, `cosine`, `bm25`)."""

    kind: str
    model: object
    """The implicit recommender (factors or item similarity set)."""
    _unit: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def n_items(self) -> int:
        if self.kind in FACTOR_KINDS:
            return self.model.item_factors.shape[0]
        return self.model.similarity.shape[0]

    def recommend(
        self,
        users: np.ndarray,
        user_items: sp.csr_matrix,
        *,
        N: int,
        filter_already_liked_items: bool,
        items: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-N `(ids, scores)` of shape (len(users), N); missing slots are id -1, score -inf.

        `user_items` holds the rows of `users` (one row per requested user, in order).
        `items` (sorted item indices), when given, limits a factor model's top N to them.
        """
        n = min(N, self.n_items)
        limit = {}
        if items is not None and self.kind in FACTOR_KINDS and len(items) < self.n_items:
            limit = {"items": items}
            n = min(n, len(items))
        ids, scores = self.model.recommend(
            users,
            user_items,
            N=n,
            filter_already_liked_items=filter_already_liked_items,
            **limit,
        )
        ids = np.asarray(ids).reshape(len(users), -1)
        scores = np.asarray(scores, dtype=np.float64).reshape(len(users), -1)
        # implicit marks filtered items with the lowest float32 score instead of dropping them.
        bad = (ids < 0) | ~np.isfinite(scores) | (scores <= np.finfo(np.float32).min / 2)
        if self.kind in ITEM_ITEM_KINDS:
            bad |= scores <= 0  # padding of item-item models when fewer neighbours exist
        ids = np.where(bad, -1, ids)
        scores = np.where(bad, -np.inf, scores)
        return ids, scores

    def pair_scores(
        self, users: np.ndarray, items: np.ndarray, user_items: sp.csr_matrix
    ) -> np.ndarray:
        """Score of each (users[j], items[j]); `user_items` is the full user×item matrix."""
        if len(users) == 0:
            return np.zeros(0)
        if self.kind in FACTOR_KINDS:
            uf = np.asarray(self.model.user_factors)
            itf = np.asarray(self.model.item_factors)
            out = np.empty(len(users))
            for lo in range(0, len(users), 32768):  # chunks keep the gathered rows in cache
                hi = lo + 32768
                out[lo:hi] = np.einsum("ij,ij->i", uf[users[lo:hi]], itf[items[lo:hi]])
            return out
        # item-item: score(u, i) = Σ_j user_items[u, j] · similarity[j, i], per user chunk.
        sim = self.model.similarity.tocsc()
        out = np.zeros(len(users))
        order = np.argsort(users, kind="stable")
        su, si = users[order], items[order]
        uniq, start = np.unique(su, return_index=True)
        bounds = np.append(start, len(su))
        for c in range(0, len(uniq), 256):
            chunk = uniq[c : c + 256]
            prod = (user_items[chunk] @ sim).tocsr()
            lo, hi = bounds[c], bounds[min(c + 256, len(uniq))]
            rowpos = np.searchsorted(chunk, su[lo:hi])
            out[order[lo:hi]] = np.asarray(prod[rowpos, si[lo:hi]]).ravel()
        return out

    def user_scores(self, user: int, user_items: sp.csr_matrix) -> np.ndarray:
        """The model's score of every item for one user (`user_items`: the full matrix)."""
        if self.kind in FACTOR_KINDS:
            uf = np.asarray(self.model.user_factors)[user]
            return (np.asarray(self.model.item_factors) @ uf).astype(np.float64)
        return np.asarray((user_items[user] @ self.model.similarity).todense()).ravel()

    def fold_in(
        self, items: np.ndarray, weights: np.ndarray, *, regularization: float, alpha: float
    ) -> np.ndarray | None:
        """User factors of a customer the model does not know, from their interactions (item
        indices, weights as in training): the least-squares step ALS takes for every user, via
        implicit's `recalculate_user`. None for models without user factors to solve (BPR,
        item-item)."""
        if self.kind != "als":
            return None
        model = self.model
        # from_arrays builds the model with default hyperparameters: set the trained ones.
        model.factors = model.item_factors.shape[1]
        model.regularization = regularization
        model.alpha = alpha
        row = sp.csr_matrix(
            (np.log1p(weights).astype(np.float32), items.astype(np.int32), [0, len(items)]),
            shape=(1, self.n_items),
        )
        row.sum_duplicates()
        with threadpool_limits(1, "blas"):
            return np.asarray(model.recalculate_user(0, row), dtype=np.float32)

    def history_scores(
        self, items: np.ndarray, weights: np.ndarray, params: Mapping[str, object]
    ) -> np.ndarray:
        """The model's score of every item for a customer whose history is `items` (item
        indices) with `weights` (as in the user×item matrix), as if the model knew the customer
        from that history alone: the customer's own history, less what may not be used
        (sensitive products without sensitive consent). `params` are the trained
        hyperparameters (the manifest's `params`).

        - als: factors folded in (`fold_in`, the least-squares step ALS takes for every user);
        - bpr: factors learned by BPR's own objective with the item factors fixed: from zero
          (bias 1), BPR_FOLD_IN_STEPS steps of the mean gradient of log σ(u·(v_i − v_j)) over
          the bought i and BPR_FOLD_IN_NEGATIVES sampled others j each (seeded by `seed`: the
          same history gives the same scores), less `bpr_regularization` · u;
        - cosine, bm25: the history row times the similarity, as their recommend scores.
        """
        items = np.asarray(items, dtype=np.int64)
        weights = np.asarray(weights, dtype=np.float64)
        if self.kind in ITEM_ITEM_KINDS:
            row = sp.csr_matrix(
                (weights.astype(np.float32), items.astype(np.int32), [0, len(items)]),
                shape=(1, self.n_items),
            )
            row.sum_duplicates()
            return np.asarray((row @ self.model.similarity).todense(), dtype=np.float64).ravel()
        itf = np.asarray(self.model.item_factors)
        if self.kind == "als":
            factors = self.fold_in(
                items,
                weights,
                regularization=float(params.get("als_regularization", 0.05)),
                alpha=float(params.get("als_alpha", 10.0)),
            )
        else:
            factors = _bpr_fold_in(
                itf.astype(np.float64),
                np.unique(items),
                learning_rate=1.0,
                regularization=float(params.get("bpr_regularization", 0.01)),
                seed=int(params.get("seed", 42)),
            )
        return (itf @ factors).astype(np.float64)

    def _unit_factors(self) -> np.ndarray:
        """Item factors scaled to unit length (zero rows stay zero), computed once."""
        if self._unit is None:
            itf = np.asarray(self.model.item_factors, dtype=np.float32)
            unit = np.empty_like(itf)
            # In blocks: one numpy call holds the GIL throughout (41 ms for 68k products at
            # once, which every call of a serving process waited for).
            for lo in range(0, len(itf), 8192):
                block = itf[lo : lo + 8192]
                norm = np.linalg.norm(block, axis=1, keepdims=True)
                unit[lo : lo + 8192] = block / np.where(norm > 0, norm, 1.0)
            self._unit = unit
        return self._unit

    def item_similarity(self, items: np.ndarray, others: np.ndarray | None = None) -> np.ndarray:
        """Similarity of each of `items` (rows) to each of `others` (columns; default every item):
        cosine of the item factors for als/bpr, the item-item model's similarity for cosine/bm25
        (implicit's `similar_items` uses the same measures)."""
        items = np.asarray(items, dtype=np.int64)
        if self.kind in FACTOR_KINDS:
            unit = self._unit_factors()
            right = unit if others is None else unit[np.asarray(others, dtype=np.int64)]
            return (unit[items] @ right.T).astype(np.float64)
        rows = self.model.similarity[items]
        if others is not None:
            rows = rows[:, np.asarray(others, dtype=np.int64)]
        return rows.toarray().astype(np.float64)

    def arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays that `from_arrays` turns back into the same model."""
        if self.kind in FACTOR_KINDS:
            return {
                "user_factors": np.asarray(self.model.user_factors),
                "item_factors": np.asarray(self.model.item_factors),
            }
        sim = self.model.similarity.tocsr()
        return {
            "sim_data": sim.data,
            "sim_indices": sim.indices,
            "sim_indptr": sim.indptr,
            "sim_shape": np.asarray(sim.shape, dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, kind: str, arrays: dict[str, np.ndarray]) -> CFModel:
        """Rebuild a model saved by `arrays()`."""
        if kind in FACTOR_KINDS:
            # implicit checks (and warns about) BLAS threads when a model is constructed.
            with threadpool_limits(1, "blas"):
                model = (
                    AlternatingLeastSquares() if kind == "als" else BayesianPersonalizedRanking()
                )
        elif kind in ITEM_ITEM_KINDS:
            model = ItemItemRecommender()
            shape = tuple(int(x) for x in arrays["sim_shape"])
            model.similarity = sp.csr_matrix(
                (arrays["sim_data"], arrays["sim_indices"], arrays["sim_indptr"]), shape=shape
            )
            # As implicit's own ItemItemRecommender.load does.
            model.scorer = NearestNeighboursScorer(model.similarity)
            return cls(kind=kind, model=model)
        else:
            raise ValueError(f"unknown CF kind {kind!r}")
        model.user_factors = np.ascontiguousarray(arrays["user_factors"], dtype=np.float32)
        model.item_factors = np.ascontiguousarray(arrays["item_factors"], dtype=np.float32)
        return cls(kind=kind, model=model)


def _bpr_fold_in(
    item_factors: np.ndarray,
    bought: np.ndarray,
    *,
    learning_rate: float,
    regularization: float,
    seed: int,
) -> np.ndarray:
    """One customer's BPR factors for the `bought` items with the item factors fixed (their last
    column is implicit's item bias: the user's is held at 1). See `CFModel.history_scores`."""
    n_items, width = item_factors.shape
    user = np.zeros(width)
    user[-1] = 1.0
    others = np.setdiff1d(np.arange(n_items), bought)
    if not len(bought) or not len(others):
        return user.astype(np.float32)
    rng = np.random.default_rng(seed)
    positive = np.repeat(bought, BPR_FOLD_IN_NEGATIVES)
    for _ in range(BPR_FOLD_IN_STEPS):
        negative = others[rng.integers(0, len(others), len(positive))]
        diff = item_factors[positive] - item_factors[negative]
        z = 1.0 / (1.0 + np.exp(np.clip(diff @ user, -30.0, 30.0)))  # σ(−x): d log σ(x)/dx
        step = (z[:, None] * diff).mean(axis=0) - regularization * user
        step[-1] = 0.0
        user += learning_rate * step
    return user.astype(np.float32)
