"""Contract tests: every model on a tiny matrix with known answers (implicit's mixin pattern)."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from nextbest.cf import CFModel
from nextbest.config import load_settings
from nextbest.training import fit_cf

# Two blocks: users 0-3 buy items 0-3, users 4-7 buy items 4-7. Each user misses one item of their
# block, which every model must rank first among unseen items; the other block must come after.
BLOCK = 4


def tiny_matrix() -> sp.csr_matrix:
    dense = np.zeros((2 * BLOCK, 2 * BLOCK), dtype=np.float32)
    for u in range(2 * BLOCK):
        base = (u // BLOCK) * BLOCK
        for i in range(base, base + BLOCK):
            if i - base != u % BLOCK:
                dense[u, i] = 1.0
    return sp.csr_matrix(dense)


class CFContract:
    kind = ""

    def fit(self) -> tuple[CFModel, sp.csr_matrix]:
        settings = load_settings(None, environ={}).with_overrides(
            "train",
            als_factors=2,
            als_iterations=30,
            bpr_factors=3,
            bpr_iterations=400,
            bpr_learning_rate=0.05,
            item_neighbours=8,
            num_threads=1,
        )
        matrix = tiny_matrix()
        return fit_cf(self.kind, matrix, settings, als=(2, 0.01, 10.0)), matrix

    def test_recommends_the_missing_item_of_the_own_block(self):
        model, matrix = self.fit()
        users = np.arange(matrix.shape[0])
        ids, scores = model.recommend(users, matrix[users], N=1, filter_already_liked_items=True)
        expected = (users // BLOCK) * BLOCK + users % BLOCK
        assert ids[:, 0].tolist() == expected.tolist()
        assert np.isfinite(scores[:, 0]).all()

    def test_never_returns_bought_items_when_filtered(self):
        model, matrix = self.fit()
        users = np.arange(matrix.shape[0])
        ids, _ = model.recommend(users, matrix[users], N=8, filter_already_liked_items=True)
        for u in users:
            returned = set(ids[u][ids[u] >= 0].tolist())
            assert not returned & set(matrix[u].indices.tolist())

    def test_pair_scores_agree_with_recommend(self):
        model, matrix = self.fit()
        users = np.arange(matrix.shape[0])
        ids, scores = model.recommend(users, matrix[users], N=1, filter_already_liked_items=True)
        pair = model.pair_scores(users, ids[:, 0], matrix)
        assert np.allclose(pair, scores[:, 0], rtol=1e-4, atol=1e-5)

    def test_user_scores_agree_with_pair_scores(self):
        model, matrix = self.fit()
        n_users, n_items = matrix.shape
        for u in range(n_users):
            pair = model.pair_scores(np.full(n_items, u), np.arange(n_items), matrix)
            assert np.allclose(model.user_scores(u, matrix), pair, rtol=1e-4, atol=1e-5)

    def test_history_scores_rank_the_missing_item_of_the_own_block_first(self):
        """`history_scores` of a user's own row (what serving computes from a history without
        what may not be used) ranks like the model: the missing item of the own block first."""
        model, matrix = self.fit()
        params = {"als_regularization": 0.01, "als_alpha": 10.0, "bpr_regularization": 0.01}
        for u in range(matrix.shape[0]):
            row = matrix[u]
            scores = model.history_scores(row.indices, row.data, params)
            assert scores.shape == (matrix.shape[1],)
            unseen = np.setdiff1d(np.arange(matrix.shape[1]), row.indices)
            best = unseen[np.argmax(scores[unseen])]
            assert best == (u // BLOCK) * BLOCK + u % BLOCK
            assert np.array_equal(scores, model.history_scores(row.indices, row.data, params))
            if model.kind in ("cosine", "bm25"):  # the row itself: the model's own scores
                assert np.allclose(scores, model.user_scores(u, matrix))

    def test_item_similarity_ranks_like_implicit_similar_items(self):
        model, matrix = self.fit()
        for i in range(matrix.shape[1]):
            sim = model.item_similarity([i])[0]
            ids, scores = model.model.similar_items(i, N=4)
            assert np.allclose(sim[ids], scores, rtol=1e-4, atol=1e-5)
            assert sim.max() <= scores[0] + 1e-5

    def test_arrays_round_trip_without_pickle(self, tmp_path):
        model, matrix = self.fit()
        path = tmp_path / "cf.npz"
        np.savez(path, **model.arrays())
        with np.load(path, allow_pickle=False) as npz:
            again = CFModel.from_arrays(self.kind, {k: npz[k] for k in npz.files})
        users = np.arange(matrix.shape[0])
        a = model.recommend(users, matrix[users], N=3, filter_already_liked_items=True)
        b = again.recommend(users, matrix[users], N=3, filter_already_liked_items=True)
        assert np.array_equal(a[0], b[0])


class TestALS(CFContract):
    kind = "als"


class TestBPR(CFContract):
    kind = "bpr"


class TestCosine(CFContract):
    kind = "cosine"


class TestBM25(CFContract):
    kind = "bm25"


def test_als_fold_in_reproduces_a_users_factors():
    """Folding in a known user's own row gives nearly the factors ALS learned for them (not
    exactly: ALS's last half-step moved the item factors after the user factors)."""
    settings = load_settings(None, environ={}).with_overrides(
        "train", als_factors=2, als_iterations=30, num_threads=1
    )
    matrix = tiny_matrix()
    model = fit_cf("als", matrix, settings, als=(2, 0.01, 10.0))
    again = CFModel.from_arrays("als", model.arrays())
    for u in range(matrix.shape[0]):
        row = matrix[u]
        folded = again.fold_in(row.indices, row.data, regularization=0.01, alpha=10.0)
        learned = np.asarray(model.model.user_factors)[u]
        assert np.allclose(folded, learned, rtol=5e-2, atol=5e-2)
        itf = np.asarray(model.model.item_factors)
        assert (
            np.argsort(-(itf @ folded))[:BLOCK].tolist()
            == np.argsort(-(itf @ learned))[:BLOCK].tolist()
        )
    assert (
        CFModel.from_arrays("cosine", fit_cf("cosine", matrix, settings).arrays()).fold_in(
            np.array([0]), np.array([1.0]), regularization=0.01, alpha=10.0
        )
        is None
    )
