"""TIFU-KNN: customer vectors, neighbour blend and top-N against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

import nextbest.tifu as tifu
from nextbest.data.interactions import Interactions
from nextbest.tifu import TifuParams, customer_vectors, tifu_scores, tifu_top_n


def make_interactions(
    events: list[tuple[int, int, float]],
    n_users: int,
    n_items: int,
    not_purchase: list[tuple[int, int, float]] = (),
) -> Interactions:
    """(user, item, day) purchase events, plus optional non-purchase events."""
    rows = list(events) + list(not_purchase)
    user = np.array([r[0] for r in rows], dtype=np.int32)
    item = np.array([r[1] for r in rows], dtype=np.int32)
    day = np.array([r[2] for r in rows], dtype=np.float64)
    is_purchase = np.r_[np.ones(len(events), bool), np.zeros(len(not_purchase), bool)]
    return Interactions(
        user_ids=np.array([f"c{u}" for u in range(n_users)]),
        item_ids=np.array([f"p{i}" for i in range(n_items)]),
        user=user,
        item=item,
        day=day,
        weight=np.ones(len(rows)),
        is_purchase=is_purchase,
    )


def dense_row(vectors: sp.csr_matrix, u: int) -> np.ndarray:
    return vectors[u].toarray().ravel()


# --- customer vectors ------------------------------------------------------------------------


def test_three_baskets_one_per_group():
    # Customer 0: day 10 {0, 1}, day 11 {1}, day 12 {2}; m = 7 > 3 baskets → 3 groups of one.
    # Same item twice on a day counts once; a view (not a purchase) is ignored.
    inter = make_interactions(
        [(0, 0, 10.2), (0, 1, 10.3), (0, 1, 10.9), (0, 1, 11.5), (0, 2, 12.0)],
        n_users=1,
        n_items=4,
        not_purchase=[(0, 3, 12.5)],
    )
    v = customer_vectors(inter, TifuParams(basket_decay=0.9, group_decay=0.7, groups=7))
    # basket j weight = 0.9^(n-1-j) · 0.7^(m-1-j) / (number of groups = 3)
    w0 = 0.81 * 0.117649 / 3  # 0.9² · 0.7⁶ / 3 = 0.03176523
    w1 = 0.9 * 0.16807 / 3  # 0.9 · 0.7⁵ / 3 = 0.050421
    w2 = 0.2401 / 3  # 0.7⁴ / 3 = 0.08003333…
    np.testing.assert_allclose(dense_row(v, 0), [w0, w0 + w1, w2, 0.0], rtol=1e-12)
    np.testing.assert_allclose(dense_row(v, 0), [0.03176523, 0.08218623, 0.0800333333, 0.0])


def test_more_baskets_than_groups_split_and_weights():
    # 8 baskets (days 0..7), basket j holds item j and item 8; m = 3, r_b = r_g = 0.5.
    # 8 = 3·2 + 2 → group sizes 2, 3, 3 (the later groups take the remainder).
    events = [(0, j, float(j)) for j in range(8)] + [(0, 8, float(j) + 0.5) for j in range(8)]
    inter = make_interactions(events, n_users=1, n_items=9)
    v = customer_vectors(inter, TifuParams(basket_decay=0.5, group_decay=0.5, groups=3))
    # weight_j = 0.5^(7-j) · 0.5^(2-g) / size_g / 3
    expected = [
        1 / 128 * 1 / 4 / 2 / 3,  # j=0, group 0 (size 2)
        1 / 64 * 1 / 4 / 2 / 3,  # j=1, group 0
        1 / 32 * 1 / 2 / 3 / 3,  # j=2, group 1 (size 3)
        1 / 16 * 1 / 2 / 3 / 3,  # j=3, group 1
        1 / 8 * 1 / 2 / 3 / 3,  # j=4, group 1
        1 / 4 / 3 / 3,  # j=5, group 2 (size 3)
        1 / 2 / 3 / 3,  # j=6, group 2
        1 / 3 / 3,  # j=7, group 2
    ]
    np.testing.assert_allclose(dense_row(v, 0)[:8], expected, rtol=1e-12)
    np.testing.assert_allclose(dense_row(v, 0)[8], sum(expected), rtol=1e-12)
    # 0.1111111 (j=7) and 0.000325520833 (j=0), written out.
    np.testing.assert_allclose(dense_row(v, 0)[[0, 7]], [0.000325520833, 0.111111111111])


def test_group_split_with_remainder_one_and_exact():
    # 4 baskets, m = 3 → sizes 1, 1, 2; 6 baskets, m = 3 → sizes 2, 2, 2. r_b = 1 isolates r_g.
    events = [(0, j, float(j)) for j in range(4)] + [(1, j, float(j)) for j in range(6)]
    inter = make_interactions(events, n_users=2, n_items=6)
    v = customer_vectors(inter, TifuParams(basket_decay=1.0, group_decay=0.5, groups=3))
    # user 0: group weights 0.25, 0.5, 1 over sizes 1, 1, 2; divided by 3 groups.
    np.testing.assert_allclose(
        dense_row(v, 0), [0.25 / 3, 0.5 / 3, 0.5 / 3, 0.5 / 3, 0, 0], rtol=1e-12
    )
    # user 1: every group of size 2.
    np.testing.assert_allclose(
        dense_row(v, 1),
        [0.125 / 3, 0.125 / 3, 0.25 / 3, 0.25 / 3, 0.5 / 3, 0.5 / 3],
        rtol=1e-12,
    )


def test_before_day_drops_later_events():
    # Events at day 0, 1.2, 1.7 and 2.0; before_day = 1.5 keeps days 0 and 1.2 only.
    inter = make_interactions(
        [(0, 0, 0.0), (0, 1, 1.2), (0, 2, 1.7), (0, 3, 2.0)], n_users=1, n_items=4
    )
    v = customer_vectors(inter, TifuParams(), before_day=1.5)
    # two baskets, m = 7: 0.9 · 0.7⁶ / 2 and 0.7⁵ / 2
    np.testing.assert_allclose(dense_row(v, 0), [0.0529420500, 0.084035, 0.0, 0.0])
    full = customer_vectors(inter, TifuParams())
    # without the cut, day 1 is one basket {1, 2} and day 2 another: 3 baskets
    np.testing.assert_allclose(dense_row(full, 0), [0.03176523, 0.050421, 0.050421, 0.0800333333])


def test_customer_without_purchases():
    inter = make_interactions(
        [(0, 0, 0.0), (0, 1, 1.0), (2, 1, 0.0), (2, 2, 0.0)],
        n_users=3,
        n_items=3,
        not_purchase=[(1, 0, 0.0)],
    )
    params = TifuParams(k=5, alpha=0.5)
    v = customer_vectors(inter, params)
    assert v.shape == (3, 3)
    assert v[1].nnz == 0
    assert np.all(tifu_scores(v, np.array([1]), params).toarray() == 0)
    ids, scores = tifu_top_n(v, np.array([1, 0]), 3, params)
    assert ids[0].tolist() == [-1, -1, -1]
    assert np.all(np.isneginf(scores[0]))
    assert ids[1, 0] >= 0


def test_no_purchases_at_all():
    inter = make_interactions([], n_users=2, n_items=3, not_purchase=[(0, 0, 0.0), (1, 2, 1.0)])
    v = customer_vectors(inter, TifuParams())
    assert v.shape == (2, 3) and v.nnz == 0
    ids, scores = tifu_top_n(v, np.arange(2), 2, TifuParams())
    assert (ids == -1).all() and np.isneginf(scores).all()


# --- neighbours ------------------------------------------------------------------------------


@pytest.fixture
def four_plus():
    """One basket each (m = 1 → 0/1 vectors): c0 {0,1}, c1 {0,1,2}, c2 {3,4}, c3 {3,4,5,6},
    c4 no purchase, c5 {7}. Squared distances: c0–c1 1, c0–c2 4, c0–c3 6, c1–c2 5, c1–c3 7,
    c2–c3 2, c5–c0 3, c5–c1 4, c5–c2 3, c5–c3 5, c5–c4 1 (but c4 is never a neighbour)."""
    baskets = {0: [0, 1], 1: [0, 1, 2], 2: [3, 4], 3: [3, 4, 5, 6], 5: [7]}
    events = [(u, i, 3.0) for u, items in baskets.items() for i in items]
    inter = make_interactions(events, n_users=6, n_items=8, not_purchase=[(4, 7, 1.0)])
    return customer_vectors(inter, TifuParams(groups=1))


def test_vectors_of_fixture_are_binary(four_plus):
    assert sorted(set(four_plus.data.tolist())) == [1.0]


def test_k1_blend(four_plus):
    params = TifuParams(k=1, alpha=0.7, groups=1)
    got = tifu_scores(four_plus, np.arange(6), params).toarray()
    expected = np.array(
        [
            [1.0, 1.0, 0.3, 0, 0, 0, 0, 0],  # c0 ← c1
            [1.0, 1.0, 0.7, 0, 0, 0, 0, 0],  # c1 ← c0
            [0, 0, 0, 1.0, 1.0, 0.3, 0.3, 0],  # c2 ← c3
            [0, 0, 0, 1.0, 1.0, 0.7, 0.7, 0],  # c3 ← c2
            [0, 0, 0, 0, 0, 0, 0, 0],  # c4: no purchases, no scores
            [0.3, 0.3, 0, 0, 0, 0, 0, 0.7],  # c5 ← c0 (tie with c2 at 3; c4 excluded)
        ]
    )
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_k2_and_k_above_candidates(four_plus):
    users = np.array([0])
    # k = 2: c0's nearest are c1 (distance² 1) and c5 (3; c2 is at 4) → mean of {0,1,2}, {7}:
    # 0.7 · [1, 1, 0, …] + 0.3 · [.5, .5, .5, 0, 0, 0, 0, .5].
    got = tifu_scores(four_plus, users, TifuParams(k=2, alpha=0.7)).toarray()[0]
    np.testing.assert_allclose(got, [0.85, 0.85, 0.15, 0, 0, 0, 0, 0.15], atol=1e-12)
    # k = 300 > 4 other customers with purchases → all of c1, c2, c3, c5:
    # mean = [1, 1, 1, 2, 2, 1, 1, 1] / 4.
    got = tifu_scores(four_plus, users, TifuParams(k=300, alpha=0.6)).toarray()[0]
    np.testing.assert_allclose(got, [0.7, 0.7, 0.1, 0.2, 0.2, 0.1, 0.1, 0.1], atol=1e-12)


def test_alpha_edges(four_plus):
    users = np.array([2])
    only_own = tifu_scores(four_plus, users, TifuParams(k=1, alpha=1.0)).toarray()[0]
    np.testing.assert_allclose(only_own, [0, 0, 0, 1, 1, 0, 0, 0])
    only_nbr = tifu_scores(four_plus, users, TifuParams(k=1, alpha=0.0)).toarray()[0]
    np.testing.assert_allclose(only_nbr, [0, 0, 0, 1, 1, 1, 1, 0])


def test_blocks_and_chunks_do_not_change_results(four_plus, monkeypatch):
    params = TifuParams(k=2, alpha=0.7)
    users = np.array([5, 0, 3, 3, 1, 4, 2])
    ref_ids, ref_scores = tifu_top_n(four_plus, users, 4, params)
    ref = tifu_scores(four_plus, users, params).toarray()
    monkeypatch.setattr(tifu, "_DENSE_CELLS", 16)  # two rows of 8 items per dense chunk
    for block in (1, 2, 3, 512):
        ids, scores = tifu_top_n(four_plus, users, 4, params, block=block)
        np.testing.assert_array_equal(ids, ref_ids)
        np.testing.assert_allclose(scores, ref_scores, atol=1e-15)
        np.testing.assert_allclose(
            tifu_scores(four_plus, users, params, block=block).toarray(), ref, atol=1e-15
        )


# --- top-N -----------------------------------------------------------------------------------


def test_top_n_from_neighbours_tie_lower_item(four_plus):
    ids, scores = tifu_top_n(four_plus, np.array([5, 0]), 4, TifuParams(k=1, alpha=0.7))
    assert ids.tolist() == [[7, 0, 1, -1], [0, 1, 2, -1]]
    np.testing.assert_allclose(scores[:, :3], [[0.7, 0.3, 0.3], [1.0, 1.0, 0.3]])
    assert np.isneginf(scores[:, 3]).all()


def test_top_n_order_ties_exclude_padding():
    # alpha = 1 → the scores are the rows of `vectors` themselves.
    vectors = sp.csr_matrix(
        np.array(
            [
                [0.5, 0.2, 0.5, 0.0, 0.1, 0.0],
                [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],
                [0.3, 0.3, 0.3, 0.3, 0.1, 0.9],
            ]
        )
    )
    params = TifuParams(alpha=1.0)
    ids, scores = tifu_top_n(vectors, np.array([0, 1, 2]), 3, params)
    assert ids.tolist() == [[0, 2, 1], [-1, -1, -1], [5, 0, 1]]
    np.testing.assert_allclose(scores[[0, 2]], [[0.5, 0.5, 0.2], [0.9, 0.3, 0.3]])
    assert np.isneginf(scores[1]).all()
    # padding past the positive scores
    ids, scores = tifu_top_n(vectors, np.array([0]), 6, params)
    assert ids.tolist() == [[0, 2, 1, 4, -1, -1]]
    assert np.isneginf(scores[0, 4:]).all() and scores[0, 3] == pytest.approx(0.1)
    # N beyond the catalogue
    ids, _ = tifu_top_n(vectors, np.array([2]), 8, params)
    assert ids.tolist() == [[5, 0, 1, 2, 3, 4, -1, -1]]
    # exclude is in the row order of all users: users [2, 0] take exclude rows 2 and 0.
    exclude = sp.csr_matrix(
        np.array([[1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 1]], dtype=bool)
    )
    ids, scores = tifu_top_n(vectors, np.array([2, 0]), 3, params, exclude=exclude)
    assert ids.tolist() == [[0, 1, 2], [2, 1, 4]]
    np.testing.assert_allclose(scores, [[0.3, 0.3, 0.3], [0.5, 0.2, 0.1]])
    # N = 0 and no users
    ids, scores = tifu_top_n(vectors, np.array([0, 2]), 0, params)
    assert ids.shape == scores.shape == (2, 0)
    ids, scores = tifu_top_n(vectors, np.array([], dtype=np.int64), 3, params)
    assert ids.shape == scores.shape == (0, 3)


def test_top_n_many_ties_across_the_cut():
    # 50 equal scores and one larger: the 5 best are the larger one, then items 0..3.
    row = np.full(60, 0.25)
    row[50:] = 0.0
    row[55] = 0.75
    ids, scores = tifu_top_n(sp.csr_matrix(row[None, :]), np.array([0]), 5, TifuParams(alpha=1))
    assert ids.tolist() == [[55, 0, 1, 2, 3]]
    np.testing.assert_allclose(scores, [[0.75, 0.25, 0.25, 0.25, 0.25]])


def test_bad_users_block_n_exclude():
    vectors = sp.csr_matrix(np.eye(3))
    with pytest.raises(ValueError, match="users"):
        tifu_top_n(vectors, np.array([3]), 2, TifuParams())
    with pytest.raises(ValueError, match="N"):
        tifu_top_n(vectors, np.array([0]), -1, TifuParams())
    with pytest.raises(ValueError, match="block"):
        tifu_top_n(vectors, np.array([0]), 2, TifuParams(), block=0)
    with pytest.raises(ValueError, match="exclude"):
        tifu_top_n(vectors, np.array([0]), 2, TifuParams(), exclude=sp.csr_matrix((3, 2)))


# --- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("k", 0),
        ("k", -3),
        ("k", 2.5),
        ("alpha", -0.1),
        ("alpha", 1.01),
        ("alpha", float("nan")),
        ("basket_decay", 0.0),
        ("basket_decay", 1.5),
        ("group_decay", 0.0),
        ("group_decay", -0.2),
        ("groups", 0),
        ("groups", True),
    ],
)
def test_bad_params_name_the_parameter(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must"):
        TifuParams(**{field: value})


def test_edge_params_are_accepted():
    TifuParams(k=1, alpha=0.0, basket_decay=1.0, group_decay=1.0, groups=1)
    TifuParams(alpha=1.0)


# --- against a plain loop version of the reference code --------------------------------------


def _loop_vector(baskets: list[set[int]], n_items: int, p: TifuParams) -> np.ndarray:
    """Per customer, the authors' `temporal_decay_sum_history` / `group_history_list`."""
    n, m = len(baskets), p.groups
    if n == 0:
        return np.zeros(n_items)
    his = []
    for j, b in enumerate(baskets):
        vec = np.zeros(n_items)
        vec[list(b)] = p.basket_decay ** (n - 1 - j)
        his.append(vec)
    if n < m:
        groups = his
    else:
        base, extra = n // m, n % m
        sizes = [base] * (m - extra) + [base + 1] * extra
        groups, at = [], 0
        for s in sizes:
            groups.append(sum(his[at : at + s]) / s)
            at += s
    out = sum(g * p.group_decay ** (m - 1 - i) for i, g in enumerate(groups))
    return out / len(groups)


def test_matches_loop_reference_on_random_data():
    rng = np.random.default_rng(3)
    n_users, n_items = 30, 25
    events = []
    for u in range(n_users - 2):  # the last two customers buy nothing
        for d in rng.choice(60, size=int(rng.integers(1, 20)), replace=False):
            for i in rng.choice(n_items, size=int(rng.integers(1, 5)), replace=False):
                events.append((u, int(i), float(d) + float(rng.random())))
    inter = make_interactions(events, n_users, n_items)
    p = TifuParams(k=4, basket_decay=0.8, group_decay=0.6, alpha=0.6, groups=5)
    v = customer_vectors(inter, p).toarray()
    ref = np.zeros((n_users, n_items))
    for u in range(n_users):
        days = sorted({int(d) for uu, _, d in events if uu == u})
        baskets = [{i for uu, i, d in events if uu == u and int(d) == day} for day in days]
        ref[u] = _loop_vector(baskets, n_items, p)
    np.testing.assert_allclose(v, ref, rtol=1e-12, atol=1e-15)
    scores = tifu_scores(sp.csr_matrix(ref), np.arange(n_users), p).toarray()
    has = ref.any(axis=1)
    for u in range(n_users):
        if not has[u]:
            assert not scores[u].any()
            continue
        dist = ((ref - ref[u]) ** 2).sum(axis=1)
        dist[u] = np.inf
        dist[~has] = np.inf
        nbr = np.argsort(dist, kind="stable")[: p.k]
        expect = p.alpha * ref[u] + (1 - p.alpha) * ref[nbr].mean(axis=0)
        np.testing.assert_allclose(scores[u], expect, rtol=1e-9, atol=1e-12)


def test_equidistant_neighbours_lower_index_first():
    # c0 {0, 1}; c_i {1, i + 1} for i = 1..10 (distance² 2 from c0, each with its own item);
    # c11 {0, 1, 12} (distance² 1). k = 3 → c11, then c1 and c2 of the ten tied at 2 (items 2
    # and 3). A bare argpartition picks c1, c3 here; the tie fix must restore c2.
    events = [(0, 0, 0.0), (0, 1, 0.0), (11, 0, 0.0), (11, 1, 0.0), (11, 12, 0.0)]
    events += [(i, 1, 0.0) for i in range(1, 11)] + [(i, i + 1, 0.0) for i in range(1, 11)]
    inter = make_interactions(events, n_users=12, n_items=13)
    params = TifuParams(k=3, alpha=0.7, groups=1)
    got = tifu_scores(customer_vectors(inter, params), np.array([0]), params).toarray()[0]
    # 0.7 · own + 0.3 · mean({0, 1, 12}, {1, 2}, {1, 3})
    expected = np.zeros(13)
    expected[[0, 1, 2, 3, 12]] = [0.8, 1.0, 0.1, 0.1, 0.1]
    np.testing.assert_allclose(got, expected, atol=1e-12)
