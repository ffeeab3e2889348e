"""Collaborative-filtering models from `implicit`, rebuilt from plain arrays.

`CFModel` wraps a fitted implicit model with the vocabulary of implicit (`recommend`, `N`,
`filter_already_liked_items`) and adds `pair_scores` (the model's score of given customer/product
pairs) and `arrays()` / `from_arrays()` for saving without pickle. Fitting lives in `training.py`.
"""

from __future__ import annotations

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
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-N `(ids, scores)` of shape (len(users), N); missing slots are id -1, score -inf.

        `user_items` holds the rows of `users` (one row per requested user, in order).
        """
        n = min(N, self.n_items)
        ids, scores = self.model.recommend(
            users,
            user_items,
            N=n,
            filter_already_liked_items=filter_already_liked_items,
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

    def _unit_factors(self) -> np.ndarray:
        """Item factors scaled to unit length (zero rows stay zero), computed once."""
        if self._unit is None:
            itf = np.asarray(self.model.item_factors, dtype=np.float32)
            norm = np.linalg.norm(itf, axis=1, keepdims=True)
            self._unit = itf / np.where(norm > 0, norm, 1.0)
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
