"""The served ranking (scoring.recommend_for) on a model trained from synthetic purchases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import synthetic_catalog, synthetic_events, write_csv

from nextbest.config import load_settings
from nextbest.data.readers import read_catalog, read_events
from nextbest.scoring import cf_candidates_for, recommend_for
from nextbest.training import train


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = tmp_path_factory.mktemp("scoring")
    catalog, _ = read_catalog(write_csv(synthetic_catalog(), folder / "catalog.csv"))
    pq.write_table(synthetic_events(), folder / "events.parquet")
    events, _ = read_events(folder / "events.parquet")
    settings = load_settings(None, environ={}).with_overrides(
        "train", tune=False, als_factors=8, candidate_pool=20, num_threads=1
    )
    settings = settings.with_overrides("policy", sensitive_categories=("pharmacy",))
    model, _, _ = train(events, catalog, settings)
    return model


def serve(bundle, customers, *, sensitive_ok, personal_ok=True, N=10):
    ids = np.array(customers)
    return recommend_for(
        bundle,
        ids,
        N=N,
        now_day=bundle.reference_day,
        personalization_ok=np.full(len(ids), personal_ok),
        sensitive_ok=np.full(len(ids), sensitive_ok),
        durable_repeat_rate=0.05,
        pool=20,
    )


def test_sensitive_products_only_with_sensitive_consent(bundle):
    customers = [f"c{c:03d}" for c in range(80)]
    sensitive = set(np.flatnonzero(bundle.item_sensitive).tolist())
    assert sensitive, "the fixture must have sensitive products in the model"
    without = serve(bundle, customers, sensitive_ok=False)
    assert not sensitive & set(without.ids[without.ids >= 0].tolist())
    with_consent = serve(bundle, customers, sensitive_ok=True)
    assert sensitive & set(with_consent.ids[with_consent.ids >= 0].tolist())


def test_non_personal_answers_are_best_sellers_without_sensitive_products(bundle):
    recs = serve(bundle, ["c000", "nobody"], sensitive_ok=True, personal_ok=False)
    assert not recs.personalized.any() and recs.reasons == ["no_consent", "no_consent"]
    assert recs.ids[0].tolist() == recs.ids[1].tolist()
    assert not bundle.item_sensitive[recs.ids[0][recs.ids[0] >= 0]].any()
    unknown = serve(bundle, ["nobody"], sensitive_ok=True)
    assert unknown.reasons == ["unknown_customer"]


def test_scores_decrease_and_bought_durables_stay_out(bundle):
    recs = serve(bundle, ["c000", "c001"], sensitive_ok=True)
    for row, customer in enumerate(["c000", "c001"]):
        scores = recs.scores[row][recs.ids[row] >= 0]
        assert len(scores) == 10 and np.all(np.diff(scores) <= 0) and np.all(scores > 0)
        u = bundle.user_index(np.array([customer]))[0]
        bought = set(bundle.repeat.days_bought[u].indices.tolist())
        again = bought & set(recs.ids[row].tolist())
        # Durables: products almost nobody bought twice (smoothed repeat rate below 0.05).
        rate = bundle.repeat.item_repeat_rate
        assert any(rate[i] < 0.05 for i in bought), "the fixture must have bought durables"
        assert all(rate[i] >= 0.05 for i in again), "a bought durable came back"


def test_identical_requests_identical_answers(bundle):
    a = serve(bundle, ["c010", "c011", "c012"], sensitive_ok=False)
    b = serve(bundle, ["c010", "c011", "c012"], sensitive_ok=False)
    assert np.array_equal(a.ids, b.ids) and np.array_equal(a.scores, b.scores)


def test_precomputed_cf_candidates_give_the_same_ranking(bundle):
    customers = [f"c{c:03d}" for c in range(80)] + ["unknown"]
    ids = np.array(customers)
    common = dict(
        N=10,
        now_day=bundle.reference_day,
        personalization_ok=np.ones(len(ids), bool),
        sensitive_ok=np.ones(len(ids), bool),
        durable_repeat_rate=0.05,
        pool=20,
    )
    precomputed = cf_candidates_for(bundle, 20, batch=7)
    assert precomputed.shape == (bundle.shape[0], 20)
    a = recommend_for(bundle, ids, **common)
    b = recommend_for(bundle, ids, **common, cf_candidates=precomputed)
    assert np.array_equal(a.ids, b.ids)
    assert np.allclose(a.scores[a.ids >= 0], b.scores[b.ids >= 0])


def test_user_score_overrides_drive_candidates_and_scores(bundle):
    """With each customer's own scores as the override, the ranking is unchanged; with the scores
    of another history, it follows those scores."""
    customers = [f"c{c:03d}" for c in range(20)]
    ids = np.array(customers)
    common = dict(
        N=10,
        now_day=bundle.reference_day,
        personalization_ok=np.ones(len(ids), bool),
        sensitive_ok=np.zeros(len(ids), bool),
        durable_repeat_rate=0.05,
        pool=20,
    )
    users = bundle.user_index(ids)
    plain = recommend_for(bundle, ids, **common)
    own = {r: bundle.cf.user_scores(int(u), bundle.user_items) for r, u in enumerate(users)}
    same = recommend_for(bundle, ids, **common, user_scores=own)
    assert np.array_equal(plain.ids, same.ids)
    assert np.allclose(plain.scores[plain.ids >= 0], same.scores[same.ids >= 0])
    flat = recommend_for(bundle, ids, **common, user_scores={0: np.zeros(bundle.shape[1])})
    # Without scores the CF side of customer 0 carries no preference: other rows unchanged.
    assert np.array_equal(flat.ids[1:], plain.ids[1:])
    assert not np.array_equal(flat.scores[0], plain.scores[0])


def test_a_customer_with_only_sensitive_candidates_gets_none(bundle):
    """Without sensitive consent and a catalog that is all sensitive, nothing is a candidate (a
    hypothesis property found the empty case crashing)."""
    import dataclasses

    from nextbest.scoring import candidate_features

    everything = dataclasses.replace(bundle, item_sensitive=np.ones(bundle.shape[1], bool))
    users = np.array([0, 1])
    c = candidate_features(
        everything, users, now_day=bundle.reference_day, pool=20, plain=np.ones(2, bool)
    )
    assert len(c.pos) == 0 and c.features.shape[0] == 0
    recs = recommend_for(
        everything,
        bundle.user_ids[:2],
        N=5,
        now_day=bundle.reference_day,
        personalization_ok=np.ones(2, bool),
        sensitive_ok=np.zeros(2, bool),
        durable_repeat_rate=0.05,
        pool=20,
    )
    assert (recs.ids < 0).all()


def test_top_n_keeps_the_reserved_places():
    from nextbest.scoring import top_n

    pos = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    item = np.array([1, 2, 3, 4, 5, 1, 2, 3])
    score = np.array([0.9, 0.8, 0.7, 0.1, 0.05, 0.5, 0.4, 0.3])
    new = np.array([0, 0, 0, 1, 1, 0, 1, 0], dtype=bool)
    ids, scores = top_n(pos, item, score, 3, 3, reserve=new, reserved=2)
    # User 0: its two new items take two places, the best other one the third, by score.
    assert ids[0].tolist() == [1, 4, 5] and scores[0].tolist() == [0.9, 0.1, 0.05]
    # User 1: one new item only; the rest by score. User 2: no candidates.
    assert ids[1].tolist() == [1, 2, 3] and ids[2].tolist() == [-1, -1, -1]
    plain, _ = top_n(pos, item, score, 3, 3)
    assert plain[0].tolist() == [1, 2, 3]


@pytest.mark.parametrize("share", [0.0, 0.5])
def test_discovery_share_of_new_products(bundle, share):
    customers = [f"c{c:03d}" for c in range(40)]
    ids = np.array(customers)
    recs = recommend_for(
        bundle,
        ids,
        N=10,
        now_day=bundle.reference_day,
        personalization_ok=np.ones(len(ids), bool),
        sensitive_ok=np.ones(len(ids), bool),
        durable_repeat_rate=0.05,
        discovery_share=share,
        pool=20,
        include_purchased=np.ones(len(ids), bool),  # every bought product may come back
    )
    fresh = []
    for row, customer in enumerate(customers):
        u = bundle.user_index(np.array([customer]))[0]
        bought = set(bundle.repeat.days_bought[u].indices.tolist())
        fresh.append(sum(1 for i in recs.ids[row] if i >= 0 and i not in bought))
    if share:
        assert min(fresh) >= 5
    else:
        assert min(fresh) < 5, "without discovery places some lists hold mostly repeats"


def test_with_discovery_one_customer():
    from nextbest.scoring import with_discovery

    fresh = np.array([False, False, True, False, True, True])
    # Two places for new products: the first two fresh ones, then the best others.
    assert with_discovery(fresh, 4, 2).tolist() == [True, True, True, False, True, False]
    # More places than fresh candidates: all of them, the rest from the others.
    assert with_discovery(fresh, 5, 9).tolist() == [True, True, True, False, True, True]
    assert with_discovery(fresh, 3, 0).tolist() == [True, True, True, False, False, False]


def test_the_blend_is_not_fitted_on_products_off_sale_in_its_window():
    """A product unsold in the validation window is off sale only when its history predicts
    at least OFF_SALE_EXPECTED purchase days there; rarely bought products stay as negatives."""
    from types import SimpleNamespace

    import scipy.sparse as sp

    from nextbest.training.fit import OFF_SALE_EXPECTED, _off_sale

    # 300 days of history; product 0: 60 purchase days (6 expected in 30 days), product 1: 60,
    # product 2: 5 (0.5 expected), product 3: never bought.
    rows = np.repeat(np.arange(125), 1)
    cols = np.r_[np.zeros(60, int), np.ones(60, int), np.full(5, 2)]
    days = sp.csr_matrix((np.ones(125), (rows, cols)), shape=(125, 4))
    first = sp.csr_matrix((np.full(125, 700.0), (rows, cols)), shape=(125, 4))
    bundle = SimpleNamespace(
        shape=(125, 4),
        reference_day=1000.0,
        repeat=SimpleNamespace(days_bought=days, first_day=first),
    )
    sold = np.array([1, 1])  # only product 1 was bought in the window
    off = _off_sale(bundle, sold, window_days=30.0)
    assert off.tolist() == [True, False, False, False]
    assert 60 * 30 / 300 >= OFF_SALE_EXPECTED > 5 * 30 / 300


def test_cf_candidates_are_drawn_from_the_best_sellers_the_config_names(bundle):
    """`train.cf_candidate_products`: a factor model's CF candidates come from that many best
    sellers only (precomputed by the trainer and per call alike); 0 = every product."""
    everything = cf_candidates_for(bundle, 20)
    assert bundle.manifest["params"]["cf_candidate_products"] == 20_000  # the default: all here
    few = 15
    limited = dataclasses.replace(
        bundle,
        manifest={
            **bundle.manifest,
            "params": {**bundle.manifest["params"], "cf_candidate_products": few},
        },
    )
    top = set(bundle.best_sellers[:few].tolist())
    pool = cf_candidates_for(limited, 20)
    assert set(pool[pool >= 0].tolist()) <= top
    assert not set(everything[everything >= 0].tolist()) <= top  # the limit is what made it
    # Per call (no precomputed candidates): the same products.
    common = dict(
        N=50,
        now_day=bundle.reference_day,
        personalization_ok=np.ones(40, bool),
        sensitive_ok=np.ones(40, bool),
        durable_repeat_rate=0.05,
        pool=20,
    )
    customers = np.array([f"c{c:03d}" for c in range(40)])
    per_call = recommend_for(limited, customers, **common)
    precomputed = recommend_for(limited, customers, **common, cf_candidates=pool)
    assert np.array_equal(per_call.ids, precomputed.ids)
