"""Fit candidate models with `implicit`, learn the blend on a validation window, build the bundle,
and run the time-split evaluation.

    bundle, report, _ = train(events, catalog, settings)     # what `nextbest train` publishes
    results = evaluate_at(events, catalog, settings, cutoff)  # what `nextbest evaluate` prints
    run = evaluate_ranked_at(events, catalog, settings, cutoff, k=10, depth=20)  # and --report

The validation window is always cut from the end of the data the model is trained on, never from a
test period: `evaluate_at` trains on the events before the cutoff exactly as `train` would.
"""

from __future__ import annotations

import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
from implicit.cpu.als import AlternatingLeastSquares
from implicit.cpu.bpr import BayesianPersonalizedRanking
from implicit.nearest_neighbours import BM25Recommender, CosineRecommender
from threadpoolctl import threadpool_limits

from nextbest.bundle import FEATURES, ModelBundle
from nextbest.cf import CF_KINDS, CFModel
from nextbest.config import Settings, parse_als_spec
from nextbest.data.interactions import (
    DAY_US,
    SEASON_LAG_DAYS,
    Interactions,
    RepeatStats,
    build_interactions,
    cf_matrix,
    purchase_days,
    repeat_stats,
)
from nextbest.data.readers import CONTENT_SCHEMA
from nextbest.errors import DataError
from nextbest.evaluation import (
    SERVED_DEPTH,
    Rankings,
    TifuVectors,
    durable_share,
    evaluate_models,
    metrics_at,
    rank_models,
    relevance,
    served_rankings,
    win_back_evaluation,
)
from nextbest.history import customer_history
from nextbest.lifecycle.model import fit_lifecycle
from nextbest.policy import sensitive_mask
from nextbest.scoring import candidate_features, cf_candidates_for

if TYPE_CHECKING:  # the Spark engine (and pyspark) is imported only when train.engine = "spark"
    from nextbest.spark_engine import SparkALS

__all__ = [
    "DEFAULT_BLEND",
    "TrainReport",
    "RankedEvaluation",
    "fit_cf",
    "train",
    "evaluate_at",
    "evaluate_ranked_at",
    "split_at",
]

logger = logging.getLogger(__name__)

DEFAULT_BLEND = {
    # Learned by `nextbest evaluate --cutoff 2011-11-01` on Online Retail, on its validation window
    # 2011-10-02 .. 2011-11-01 (before that cutoff), rounded. Used only when tuning is off and the
    # config gives no train.blend_weights.
    "intercept": -5.13,
    "repeat": 1.16,
    "log_days_bought": 0.45,
    "log_recency_weighted": 1.08,
    "log_age": -0.03,
    "timeliness": -0.04,
    "repeat_rate": 0.03,
    "cf_new": 2.19,
    "cf_old": 0.87,
    "log_popularity": 0.37,
    "log_share": 0.12,
    "own_timeliness": 0.15,
}
MAX_BLEND_USERS = 4000


@dataclass
class TrainReport:
    """What a training run did and measured."""

    params: dict[str, object] = field(default_factory=dict)
    validation: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)
    """Validation-window metrics per protocol and model (blend weights were fitted there too)."""
    als_grid: list[dict[str, object]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    lifecycle: dict = field(default_factory=dict)
    """The churn-risk model chosen and the validation AUC of each candidate (empty: none)."""


@dataclass(frozen=True)
class _Prepared:
    inter: Interactions
    matrix: sp.csr_matrix
    repeat: RepeatStats
    reference_day: float


def _prepare(events: pa.Table, settings: Settings, reference_day: float | None = None) -> _Prepared:
    inter = build_interactions(events, settings.data.event_weights)
    if len(inter.user) == 0:
        raise DataError("no usable training events after consent and return rules")
    ref = inter.last_day if reference_day is None else reference_day
    t = settings.train
    return _Prepared(
        inter=inter,
        matrix=cf_matrix(inter, half_life_days=t.half_life_days, reference_day=ref),
        repeat=repeat_stats(inter, half_life_days=t.repeat_half_life_days, reference_day=ref),
        reference_day=ref,
    )


def fit_cf(
    kind: str,
    matrix: sp.csr_matrix,
    settings: Settings,
    *,
    als: tuple[int, float, float] | None = None,
    progress: bool = False,
    engine: SparkALS | None = None,
) -> CFModel:
    """Fit one implicit model on the user×item weight matrix (BLAS held to one thread).

    With `engine` (the Spark engine of `train.engine = "spark"`), ALS is fitted there on the same
    log1p weights instead; the factors come back as plain arrays in a CFModel like implicit's."""
    t = settings.train
    x = matrix.copy()
    x.data = np.log1p(x.data).astype(np.float32)
    if kind == "als" and engine is not None:
        factors, reg, alpha = als or (t.als_factors, t.als_regularization, t.als_alpha)
        user_factors, item_factors = engine.fit(
            x,
            factors=factors,
            regularization=reg,
            alpha=alpha,
            iterations=t.als_iterations,
            seed=t.seed,
        )
        arrays = {"user_factors": user_factors, "item_factors": item_factors}
        return CFModel.from_arrays("als", arrays)
    with threadpool_limits(1, "blas"):
        if kind == "als":
            factors, reg, alpha = als or (t.als_factors, t.als_regularization, t.als_alpha)
            model = AlternatingLeastSquares(
                factors=factors,
                regularization=reg,
                alpha=alpha,
                iterations=t.als_iterations,
                random_state=t.seed,
                num_threads=t.num_threads,
            )
        elif kind == "bpr":
            x.data = np.ones_like(x.data)
            # One thread: implicit's BPR on several threads is Hogwild SGD, whose racing
            # updates give another model on every run (train.seed promises the same one).
            model = BayesianPersonalizedRanking(
                factors=t.bpr_factors,
                learning_rate=t.bpr_learning_rate,
                regularization=t.bpr_regularization,
                iterations=t.bpr_iterations,
                random_state=t.seed,
                num_threads=1,
            )
        elif kind == "cosine":
            model = CosineRecommender(K=t.item_neighbours, num_threads=t.num_threads)
        elif kind == "bm25":
            model = BM25Recommender(K=t.item_neighbours, num_threads=t.num_threads)
        else:
            raise ValueError(f"unknown CF kind {kind!r} (expected one of {CF_KINDS})")
        with warnings.catch_warnings():
            # implicit's item-item fit converts an internal COO product itself and warns about it.
            warnings.filterwarnings("ignore", message="Method expects CSR input")
            model.fit(x, show_progress=progress)
    return CFModel(kind=kind, model=model)


def _item_arrays(item_ids: np.ndarray, catalog: pa.Table | None, settings: Settings):
    """Per model item: sensitive, available, catalog repurchase days."""
    n = len(item_ids)
    sensitive = np.zeros(n, dtype=bool)
    available = np.ones(n, dtype=bool)
    repurchase = np.full(n, np.nan)
    if catalog is None or catalog.num_rows == 0:
        return sensitive, available, repurchase
    idx = pc.index_in(pa.array(item_ids), value_set=catalog["product_id"])
    found = pc.is_valid(idx).to_numpy(zero_copy_only=False)
    rows = pc.fill_null(idx, 0).to_numpy(zero_copy_only=False)[found]
    sensitive[found] = sensitive_mask(catalog, settings.policy)[rows]
    available[found] = catalog["available"].to_numpy(zero_copy_only=False)[rows]
    rep = catalog["repurchase_days"].to_numpy(zero_copy_only=False).astype(np.float64)
    repurchase[found] = rep[rows]
    return sensitive, available, repurchase


def _assemble(
    prep: _Prepared,
    cf: CFModel,
    blend: dict[str, float],
    catalog: pa.Table | None,
    settings: Settings,
    manifest: dict,
    content: pa.Table | None = None,
) -> ModelBundle:
    inter, rs = prep.inter, prep.repeat
    sensitive, available, repurchase = _item_arrays(inter.item_ids, catalog, settings)
    rs = dataclasses.replace(rs, user_days_plain=purchase_days(inter, ~sensitive))
    best = np.lexsort((np.arange(len(rs.item_buyers)), -rs.item_buyers))
    recent = np.lexsort((-rs.item_buyers, -rs.item_recent_buyers))
    return ModelBundle(
        user_ids=inter.user_ids,
        item_ids=inter.item_ids,
        user_items=prep.matrix,
        repeat=rs,
        cf=cf,
        blend_weights=np.array([blend.get(f, 0.0) for f in FEATURES], dtype=np.float64),
        blend_intercept=float(blend.get("intercept", 0.0)),
        reference_day=prep.reference_day,
        item_sensitive=sensitive,
        item_available=available,
        item_repurchase_days=repurchase,
        best_sellers=best.astype(np.int64),
        recent_best_sellers=recent.astype(np.int64),
        catalog=catalog
        if catalog is not None
        else pa.table({"product_id": pa.array([], pa.string())}),
        content=content if content is not None else CONTENT_SCHEMA.empty_table(),
        manifest=manifest,
    )


def split_at(events: pa.Table, day: float) -> tuple[pa.Table, pa.Table]:
    """(events before `day`, events from `day` on); `day` in days since the epoch."""
    cut = pa.scalar(int(round(day * DAY_US)), pa.int64()).cast(pa.timestamp("us"))
    before = pc.less(events["timestamp"], cut)
    return events.filter(before), events.filter(pc.invert(before))


OFF_SALE_EXPECTED = 3.0
"""A product unsold in the validation window counts as off sale when its history predicts at
least this many purchase days there (P(none) ≈ e^-3 = 5% were it on sale)."""


def _off_sale(bundle: ModelBundle, sold: np.ndarray, *, window_days: float) -> np.ndarray:
    """Per product: nobody bought it in the window (`sold`: item index of each purchase there)
    although its rate before it predicts OFF_SALE_EXPECTED purchase days or more. Its candidates
    say nothing about what customers prefer (nobody could buy it: censored, not rejected), so
    the blend is not fitted on them; rarely bought products stay, as the negatives they are."""
    days = bundle.repeat.days_bought
    n_items = bundle.shape[1]
    if not days.nnz:
        return np.zeros(n_items, dtype=bool)
    span = max(bundle.reference_day - float(bundle.repeat.first_day.data.min()), window_days)
    expected = np.asarray(days.sum(axis=0)).ravel() * window_days / span
    unsold = np.ones(n_items, dtype=bool)
    unsold[sold] = False
    return unsold & (expected >= OFF_SALE_EXPECTED)


def _fit_blend(bundle: ModelBundle, val_events: pa.Table, settings: Settings) -> dict[str, float]:
    """Logistic regression of 'bought in the validation window' on the candidates' FEATURES."""
    purchases = val_events.filter(pc.equal(val_events["event_type"], "purchase"))
    u = bundle.user_index(purchases["customer_id"].to_numpy(zero_copy_only=False))
    i = bundle.item_index(purchases["product_id"].to_numpy(zero_copy_only=False))
    ok = (u >= 0) & (i >= 0)
    users = np.unique(u[u >= 0])
    if len(users) == 0:
        logger.warning("validation window has no purchases by known customers: default blend")
        return dict(DEFAULT_BLEND)
    rng = np.random.default_rng(settings.train.seed)
    if len(users) > MAX_BLEND_USERS:
        users = np.sort(rng.choice(users, MAX_BLEND_USERS, replace=False))
    n_items = bundle.shape[1]
    pos_of = np.full(bundle.shape[0], -1, dtype=np.int64)
    pos_of[users] = np.arange(len(users))
    keep = ok & (pos_of[np.where(u >= 0, u, 0)] >= 0)
    positive = np.unique(pos_of[u[keep]] * n_items + i[keep])
    cands = candidate_features(
        bundle, users, now_day=bundle.reference_day, pool=settings.train.candidate_pool
    )
    if not bundle.repeat.season_covered:
        logger.info(
            "blend: the history starts less than %d days before the validation window: the "
            "season features (log_season_days, log_season_popularity) are 0 and get no weight",
            SEASON_LAG_DAYS,
        )
    off = _off_sale(bundle, i[i >= 0], window_days=settings.train.validation_days)
    if off.any():
        logger.info("blend: %d products off sale in the validation window: left out", off.sum())
    keep = ~off[cands.item]
    features = cands.features[keep]
    keys = cands.pos[keep] * n_items + cands.item[keep]
    labels = np.isin(keys, positive)
    if labels.all() or not labels.any():
        logger.warning("validation labels are all of one class: default blend")
        return dict(DEFAULT_BLEND)
    from sklearn.linear_model import LogisticRegression  # only needed when tuning (slow import)

    lr = LogisticRegression(C=1.0, max_iter=2000)
    lr.fit(features, labels)
    blend = {f: float(w) for f, w in zip(FEATURES, lr.coef_[0], strict=True)}
    blend["intercept"] = float(lr.intercept_[0])
    return blend


def _ndcg(results: dict, protocol: str, name: str) -> float:
    return results.get(protocol, {}).get(name, {}).get("ndcg", float("nan"))


def train(
    events: pa.Table,
    catalog: pa.Table | None,
    settings: Settings,
    *,
    progress: bool = False,
    fit_candidates: bool = False,
    content: pa.Table | None = None,
    engine: SparkALS | None = None,
) -> tuple[ModelBundle, TrainReport, dict[str, CFModel]]:
    """Train the served model on `events` (already consent-filtered).

    `content` (CONTENT_SCHEMA) is kept in the bundle as its content snapshot, rows linking products
    unknown to the model included; `report.counts` says how many such links there are.

    With `settings.train.tune`, the last `validation_days` of the data are held out: ALS
    hyperparameters are chosen by the NDCG@k of new-to-customer purchases there, and the blend is
    fitted there; the final models are then refitted on all events. Returns the bundle, the report
    and, with `fit_candidates`, every candidate CF model refitted on all events.

    With `train.engine = "spark"` every ALS fit (grid and final) runs on one Spark session,
    started here and stopped before returning, or on `engine` when given (left running).
    """
    t = settings.train
    if engine is None and t.engine == "spark":
        from nextbest.spark_engine import SparkALS

        with SparkALS(t) as spark:
            return train(
                events,
                catalog,
                settings,
                progress=progress,
                fit_candidates=fit_candidates,
                content=content,
                engine=spark,
            )
    report = TrainReport()
    clock = time.perf_counter()
    candidates = tuple(dict.fromkeys((t.cf_model, *t.candidates)))
    als_params = (t.als_factors, t.als_regularization, t.als_alpha)
    blend = dict(t.blend_weights) if t.blend_weights else dict(DEFAULT_BLEND)
    base_manifest = {"params": _params(settings, als_params)}
    if t.tune:
        last_day = pc.max(events["timestamp"]).cast(pa.int64()).as_py() / DAY_US
        split_day = np.floor(last_day) + 1.0 - t.validation_days
        fit_events, val_events = split_at(events, split_day)
        if fit_events.num_rows == 0 or val_events.num_rows == 0:
            raise DataError(
                f"the validation window ({t.validation_days} days) leaves no events on one side; "
                "set train.validation_days or train.tune = false"
            )
        prep = _prepare(fit_events, settings, reference_day=split_day)
        report.timings["prepare_validation_s"] = time.perf_counter() - clock
        fitted: dict[str, CFModel] = {}
        best_ndcg = -1.0
        grid = [parse_als_spec(s) for s in t.als_grid] if t.cf_model == "als" else []
        for spec in grid:
            model = fit_cf("als", prep.matrix, settings, als=spec, progress=progress, engine=engine)
            probe = _assemble(prep, model, blend, catalog, settings, base_manifest)
            res = evaluate_models(
                probe,
                val_events,
                k=t.k,
                now_day=split_day,
                pool=t.candidate_pool,
                candidates={"als": model},
                protocols=("new",),
                baselines=False,
                blend=False,
            )
            score = _ndcg(res, "new", "als")
            report.als_grid.append(
                {
                    "factors": spec[0],
                    "regularization": spec[1],
                    "alpha": spec[2],
                    "validation_ndcg_new": score,
                }
            )
            logger.info("ALS %s: validation NDCG@%d (new) %.4f", spec, t.k, score)
            if score > best_ndcg:
                best_ndcg, als_params, fitted["als"] = score, spec, model
        for kind in candidates:
            if kind not in fitted:
                fitted[kind] = fit_cf(
                    kind, prep.matrix, settings, als=als_params, progress=progress, engine=engine
                )
        base_manifest = {"params": _params(settings, als_params)}
        probe = _assemble(prep, fitted[t.cf_model], blend, catalog, settings, base_manifest)
        blend = _fit_blend(probe, val_events, settings)
        probe = _assemble(prep, fitted[t.cf_model], blend, catalog, settings, base_manifest)
        report.validation = evaluate_models(
            probe,
            val_events,
            k=t.k,
            now_day=split_day,
            pool=t.candidate_pool,
            candidates=fitted,
        )
        report.timings["tune_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    prep = _prepare(events, settings)
    report.timings["prepare_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    final: dict[str, CFModel] = {}
    for kind in candidates if fit_candidates else (t.cf_model,):
        started = time.perf_counter()
        final[kind] = fit_cf(
            kind, prep.matrix, settings, als=als_params, progress=progress, engine=engine
        )
        report.timings[f"fit_{kind}_s"] = time.perf_counter() - started
    report.timings["fit_s"] = time.perf_counter() - clock
    report.params = {**_params(settings, als_params), "blend": blend}
    if engine is not None:
        report.params["spark"] = engine.describe()
    manifest = {"params": report.params}
    bundle = _assemble(prep, final[t.cf_model], blend, catalog, settings, manifest, content)
    clock = time.perf_counter()
    bundle.cf_candidates = cf_candidates_for(bundle, t.candidate_pool)
    report.timings["cf_candidates_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    bundle.lifecycle = fit_lifecycle(
        events, bundle.user_ids, bundle.reference_day, settings.lifecycle
    )
    report.timings["lifecycle_s"] = time.perf_counter() - clock
    bundle.history = customer_history(
        events, bundle.user_ids, bundle.item_ids, bundle.item_sensitive
    )
    if bundle.lifecycle is not None:
        report.lifecycle = bundle.lifecycle.manifest()
    links = pc.list_flatten(bundle.content["product_ids"]).to_numpy(zero_copy_only=False)
    report.counts = {
        "customers": bundle.shape[0],
        "products": bundle.shape[1],
        "interactions": int(prep.matrix.nnz),
        "events": int(events.num_rows),
        "content_items": bundle.content.num_rows,
        "content_product_links": len(links),
        "content_links_unknown_to_model": int((bundle.item_index(links.astype(str)) < 0).sum()),
    }
    return bundle, report, final


def _params(settings: Settings, als: tuple[int, float, float]) -> dict[str, object]:
    t = settings.train
    return {
        "cf_model": t.cf_model,
        "als_engine": t.engine,
        "als_factors": als[0],
        "als_regularization": als[1],
        "als_alpha": als[2],
        "als_iterations": t.als_iterations,
        "bpr_factors": t.bpr_factors,
        "bpr_learning_rate": t.bpr_learning_rate,
        "bpr_regularization": t.bpr_regularization,
        "bpr_iterations": t.bpr_iterations,
        "item_neighbours": t.item_neighbours,
        "half_life_days": t.half_life_days,
        "repeat_half_life_days": t.repeat_half_life_days,
        "validation_days": t.validation_days,
        "candidate_pool": t.candidate_pool,
        "cf_candidate_products": t.cf_candidate_products,
        "tuned": t.tune,
        "event_weights": dict(settings.data.event_weights),
        "seed": t.seed,
    }


def _train_before(
    events: pa.Table, catalog: pa.Table | None, settings: Settings, cutoff_day: float, progress
) -> tuple[ModelBundle, TrainReport, dict[str, CFModel], pa.Table]:
    """Train on the events before the cutoff; also returns the events from the cutoff on."""
    before, after = split_at(events, cutoff_day)
    if before.num_rows == 0:
        raise DataError("no events before --cutoff")
    if after.num_rows == 0:
        raise DataError("no events on or after --cutoff")
    bundle, report, fitted = train(
        before, catalog, settings, progress=progress, fit_candidates=True
    )
    return bundle, report, fitted, after


def _tifu_of(events: pa.Table, bundle: ModelBundle, settings: Settings) -> TifuVectors:
    """TIFU-KNN vectors of the training events, coded like the bundle."""
    inter = build_interactions(events, settings.data.event_weights)
    if not (
        np.array_equal(inter.user_ids, bundle.user_ids)
        and np.array_equal(inter.item_ids, bundle.item_ids)
    ):
        raise DataError("TIFU-KNN: the training events do not code like the model (a bug)")
    return TifuVectors.fit(inter)


def evaluate_at(
    events: pa.Table,
    catalog: pa.Table | None,
    settings: Settings,
    cutoff_day: float,
    *,
    k: int,
    progress: bool = False,
) -> tuple[dict[str, dict[str, dict[str, float]]], TrainReport]:
    """Train on events before the cutoff (tuning inside that period only) and evaluate what is
    served, every model and the baselines on the purchases from the cutoff on."""
    run = evaluate_ranked_at(events, catalog, settings, cutoff_day, k=k, depth=k, progress=progress)
    return run.results, run.report


@dataclass(frozen=True)
class RankedEvaluation:
    """What `evaluate_ranked_at` measured: the metrics at k and the rankings behind them."""

    results: dict[str, dict[str, dict[str, float]]]
    """Metrics at k per protocol and model, as `evaluate_at` returns them."""
    report: TrainReport
    bundle: ModelBundle
    """The model trained on the events before the cutoff."""
    rankings: dict[str, Rankings]
    """Every model's top max(k, depth) per protocol (metric curves, popularity bias)."""
    test_events: pa.Table
    """The events from the cutoff on."""
    durable_share: float = 0.0
    """Share of the served top-k items (protocol `all`) that are durables the customer bought
    before: the durable rule says 0."""
    served_users: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    """Every evaluated customer (user indices), and ..."""
    served_ids: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.int64))
    """... what the serving path answered each of them (item indices, -1 padded)."""
    win_back: dict = field(default_factory=dict)
    """Customers dormant at the cutoff who came back: metrics at k of the win-back products,
    buy again and best sellers against their return basket (`win_back_evaluation`)."""


def evaluate_ranked_at(
    events: pa.Table,
    catalog: pa.Table | None,
    settings: Settings,
    cutoff_day: float,
    *,
    k: int,
    depth: int,
    progress: bool = False,
) -> RankedEvaluation:
    """`evaluate_at` that ranks max(k, depth) products once per customer and model and keeps the
    rankings: the metrics at k come from their top k, the curves at 1..depth from the same
    rankings (`evaluation.metric_curves`). The served answers come from the serving path with
    the clock at the cutoff."""
    bundle, report, fitted, after = _train_before(events, catalog, settings, cutoff_day, progress)
    clock = time.perf_counter()
    tifu = _tifu_of(split_at(events, cutoff_day)[0], bundle, settings)
    report.timings["tifu_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    rels = relevance(bundle, after, now_day=cutoff_day)
    users = np.unique(np.concatenate([r.users for r in rels.values()]))
    served = served_rankings(
        bundle, settings, users, now_day=cutoff_day, depth=max(k, depth, SERVED_DEPTH)
    )
    report.timings["serve_s"] = time.perf_counter() - clock
    clock = time.perf_counter()
    rankings = rank_models(
        bundle,
        after,
        k=max(k, depth),
        now_day=cutoff_day,
        pool=settings.train.candidate_pool,
        candidates=fitted,
        served=(users, served),
        tifu=tifu,
    )
    report.timings["evaluate_s"] = time.perf_counter() - clock
    every = rankings["all"]
    share = (
        durable_share(bundle, every.relevance.users, every.ids["served"][:, :k], settings)
        if "served" in every.ids
        else 0.0
    )
    clock = time.perf_counter()
    win_back = win_back_evaluation(bundle, settings, after, now_day=cutoff_day, k=k)
    report.timings["win_back_s"] = time.perf_counter() - clock
    return RankedEvaluation(
        win_back=win_back,
        results=metrics_at(rankings, bundle.shape[1], k),
        report=report,
        bundle=bundle,
        rankings=rankings,
        test_events=after,
        durable_share=share,
        served_users=users,
        served_ids=served,
    )
