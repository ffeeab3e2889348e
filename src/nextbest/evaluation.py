"""Offline evaluation: ranking metrics at k on held-out purchases, for every candidate model and the
blend, beside best sellers and buy again, in two protocols:

- `all`: every product bought in the test period counts; rankings may contain bought products.
- `new`: only products the customer had not bought before count; rankings exclude bought products.

Only customers known to the model with at least one relevant product are evaluated. Products the
model never saw still count as relevant (no model can hit them), so recall is honest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nextbest.bundle import ModelBundle
from nextbest.cf import CFModel
from nextbest.scoring import (
    UNKNOWN_INTERVAL_DAYS,
    _pair_lookup,
    item_interval,
    rank_blend,
    timeliness,
    top_n,
)

__all__ = [
    "PROTOCOLS",
    "METRICS",
    "Relevance",
    "Rankings",
    "relevance",
    "metric_curves",
    "ranking_metrics",
    "metrics_at",
    "item_popularity",
    "popularity_percentile",
    "popularity_profile",
    "rank_models",
    "evaluate_models",
]

PROTOCOLS = ("all", "new")
METRICS = ("precision", "recall", "ndcg", "map", "hit_rate", "coverage")


@dataclass(frozen=True)
class Relevance:
    """Held-out products per evaluated customer, for one protocol."""

    users: np.ndarray
    """User indices evaluated (each with >= 1 relevant product)."""
    keys: np.ndarray
    """Sorted keys position * n_items + item of relevant products known to the model."""
    n_relevant: np.ndarray
    """Relevant products per evaluated user, including products unknown to the model."""


def relevance(bundle: ModelBundle, test_events: pa.Table) -> dict[str, Relevance]:
    """Relevant products per protocol from the purchases in `test_events`."""
    purchases = test_events.filter(pc.equal(test_events["event_type"], "purchase"))
    pairs = purchases.group_by(["customer_id", "product_id"], use_threads=False).aggregate([])
    u = bundle.user_index(pairs["customer_id"].to_numpy(zero_copy_only=False))
    i = bundle.item_index(pairs["product_id"].to_numpy(zero_copy_only=False))
    known_user = u >= 0
    u, i = u[known_user], i[known_user]
    n_users, n_items = bundle.shape
    _, bought_before = _pair_lookup(
        bundle.repeat.days_bought, np.arange(n_users), u, np.where(i >= 0, i, 0)
    )
    bought_before &= i >= 0
    out = {}
    for protocol, keep in (("all", np.ones(len(u), bool)), ("new", ~bought_before)):
        uu, ii = u[keep], i[keep]
        users, inverse, counts = np.unique(uu, return_inverse=True, return_counts=True)
        known = ii >= 0
        keys = np.sort(inverse[known].astype(np.int64) * n_items + ii[known])
        out[protocol] = Relevance(users=users, keys=keys, n_relevant=counts)
    return out


def _hits(ids: np.ndarray, rel: Relevance, n_items: int) -> np.ndarray:
    """hits[p, r]: the product at rank r of `ids[p]` is relevant for `rel.users[p]`."""
    n, k = ids.shape
    if len(rel.keys) == 0:
        return np.zeros((n, k), bool)
    keys = np.arange(n, dtype=np.int64)[:, None] * n_items + np.where(ids >= 0, ids, 0)
    at = np.minimum(np.searchsorted(rel.keys, keys), len(rel.keys) - 1)
    return (rel.keys[at] == keys) & (ids >= 0)


def metric_curves(ids: np.ndarray, rel: Relevance, n_items: int) -> dict[str, np.ndarray]:
    """Every metric of METRICS at each k = 1..K from one ranking of depth K = ids.shape[1].

    Entry k-1 of each array is the metric of the top k, `ids[:, :k]`: one pass over the ranking,
    cumulative sums along the ranks instead of K evaluations. `ids[p]` is the ranking for
    `rel.users[p]` (-1 for empty slots). Per customer, at k:
    precision = hits / k; recall = hits / relevant; NDCG = DCG / ideal DCG of min(relevant, k)
    hits; AP = sum of precision at each hit rank / min(relevant, k); hit rate = any hit. Means over
    customers. Coverage@k = distinct products in the top k of any customer / products in the model.
    """
    n, depth = ids.shape
    hits = _hits(ids, rel, n_items)
    ranks = np.arange(1, depth + 1)
    n_rel = rel.n_relevant.astype(np.float64)[:, None]
    discounts = 1.0 / np.log2(ranks + 1)
    hits_at = np.cumsum(hits, axis=1)
    dcg_at = np.cumsum(hits * discounts, axis=1)
    ideal_at = np.cumsum(discounts)[np.minimum(rel.n_relevant[:, None], ranks) - 1]
    precision_at = hits_at / ranks
    ap_at = np.cumsum(precision_at * hits, axis=1) / np.minimum(n_rel, ranks)
    # Coverage: the best rank at which each product is recommended to anyone.
    valid = ids >= 0
    first = np.full(n_items, depth, dtype=np.int64)
    np.minimum.at(first, ids[valid], np.broadcast_to(np.arange(depth), ids.shape)[valid])
    first_counts = np.bincount(first, minlength=depth + 1)[:depth]
    return {
        "precision": precision_at.mean(axis=0),
        "recall": (hits_at / n_rel).mean(axis=0),
        "ndcg": (dcg_at / ideal_at).mean(axis=0),
        "map": ap_at.mean(axis=0),
        "hit_rate": (hits_at > 0).mean(axis=0),
        "coverage": np.cumsum(first_counts) / max(n_items, 1),
    }


def ranking_metrics(ids: np.ndarray, rel: Relevance, n_items: int) -> dict[str, float]:
    """Mean precision, recall, NDCG, MAP and hit rate at k = ids.shape[1], and catalog coverage
    (the last point of `metric_curves`), plus the number of customers (`users`).

    `ids[p]` is the ranking for `rel.users[p]` (-1 for empty slots).
    """
    curves = metric_curves(ids, rel, n_items)
    return {**{m: float(curves[m][-1]) for m in METRICS}, "users": int(ids.shape[0])}


def item_popularity(bundle: ModelBundle) -> np.ndarray:
    """Distinct buyers per model item in the training data (what best sellers are ranked by)."""
    return np.asarray(bundle.repeat.item_buyers, dtype=np.float64)


def popularity_percentile(popularity: np.ndarray) -> np.ndarray:
    """Each item's popularity percentile in the catalog, 0 (least bought) .. 100 (most bought);
    tied items share their mid-rank, so the catalog's mean is 50."""
    n = len(popularity)
    if n == 0:
        return np.zeros(0)
    order = np.sort(popularity)
    below = np.searchsorted(order, popularity, side="left")
    ties = np.searchsorted(order, popularity, side="right") - below
    return 100.0 * (below + 0.5 * ties) / n


def popularity_profile(
    ids: np.ndarray, popularity: np.ndarray, *, top_share: float = 0.1
) -> dict[str, float]:
    """Popularity bias of a ranking (every non-empty slot counts once): the mean popularity
    percentile of the recommended products (the catalog's is 50) and the share of recommendations
    that are among the top `top_share` best sellers (the catalog's share is `top_share`)."""
    items = ids[ids >= 0]
    if len(items) == 0 or len(popularity) == 0:
        return {"mean_percentile": float("nan"), "top_share": float("nan")}
    percentile = popularity_percentile(popularity)
    n_top = max(int(np.ceil(top_share * len(popularity))), 1)
    top = np.zeros(len(popularity), bool)
    top[np.lexsort((np.arange(len(popularity)), -popularity))[:n_top]] = True
    return {
        "mean_percentile": float(percentile[items].mean()),
        "top_share": float(top[items].mean()),
    }


def _best_sellers(bundle: ModelBundle, users: np.ndarray, k: int, exclude_bought: bool):
    if not exclude_bought:
        order = bundle.best_sellers[:k]
        ids = np.full((len(users), k), -1, dtype=np.int64)
        ids[:, : len(order)] = order
        return ids
    # Enough best sellers that each customer keeps k after removing what they bought.
    bought_per_user = np.diff(bundle.repeat.days_bought[users].indptr)
    m = int(min(len(bundle.best_sellers), k + (bought_per_user.max() if len(users) else 0)))
    pool = bundle.best_sellers[:m]
    pos = np.repeat(np.arange(len(users)), m)
    item = np.tile(pool, len(users))
    _, bought = _pair_lookup(bundle.repeat.days_bought, users, pos, item)
    score = np.tile(-np.arange(m, dtype=np.float64), len(users))
    return top_n(pos[~bought], item[~bought], score[~bought], len(users), k)[0]


def _own_history(bundle: ModelBundle, users: np.ndarray, k: int, score_of) -> np.ndarray:
    """Rank each user's bought products by `score_of(pos, item, sub_rows)`, filled with best
    sellers (GP-TopFreq style)."""
    sub = bundle.repeat.days_bought[users]
    pos = np.repeat(np.arange(len(users)), np.diff(sub.indptr))
    item = sub.indices.astype(np.int64)
    score = score_of(pos, item)
    fill = bundle.best_sellers[:k]
    f_pos = np.repeat(np.arange(len(users)), len(fill))
    f_item = np.tile(fill, len(users))
    f_score = np.tile(-1.0 - np.arange(len(fill), dtype=np.float64), len(users))
    pos2 = np.concatenate([pos, f_pos])
    item2 = np.concatenate([item, f_item])
    score2 = np.concatenate([score, f_score])
    # Drop fill items the user already has in their own list.
    key = pos2 * bundle.shape[1] + item2
    _, first = np.unique(key, return_index=True)
    keep = np.zeros(len(key), bool)
    keep[first] = True
    return top_n(pos2[keep], item2[keep], score2[keep], len(users), k)[0]


def _buy_again(bundle: ModelBundle, users: np.ndarray, k: int) -> np.ndarray:
    """The customer's most frequently bought products (purchase days; ties: most recent)."""
    rs = bundle.repeat

    def score(pos, item):
        days, _ = _pair_lookup(rs.days_bought, users, pos, item)
        last, _ = _pair_lookup(rs.last_day, users, pos, item)
        return days + last / 1e6  # frequency first, recency breaks ties; both >= 1

    return _own_history(bundle, users, k, score)


def _repeat_model(bundle: ModelBundle, users: np.ndarray, k: int, now_day: float) -> np.ndarray:
    """The repeat-purchase model alone: recency-weighted frequency × timeliness × repeat rate."""
    rs = bundle.repeat
    half_life = float(bundle.manifest.get("params", {}).get("repeat_half_life_days", 90.0))

    def score(pos, item):
        rw, _ = _pair_lookup(rs.recency_weighted, users, pos, item)
        last, _ = _pair_lookup(rs.last_day, users, pos, item)
        rw = rw * 0.5 ** (max(now_day - bundle.reference_day, 0.0) / half_life)
        interval = item_interval(bundle, item)
        interval = np.where(np.isfinite(interval), interval, UNKNOWN_INTERVAL_DAYS)
        age = np.maximum(now_day - last, 0.0)
        closeness = np.exp(timeliness(age, interval))
        return rw * (0.5 + 0.5 * closeness) * (0.5 + rs.item_repeat_rate[item]) + 1.0

    return _own_history(bundle, users, k, score)


@dataclass(frozen=True)
class Rankings:
    """Every model's ranking of the customers evaluated in one protocol."""

    relevance: Relevance
    """The protocol's evaluated customers and their held-out products."""
    ids: dict[str, np.ndarray]
    """Per model name, item indices of shape (customers, depth), best first, -1 for empty slots."""


def rank_models(
    bundle: ModelBundle,
    test_events: pa.Table,
    *,
    k: int,
    now_day: float,
    pool: int,
    candidates: dict[str, CFModel] | None = None,
    protocols: tuple[str, ...] = PROTOCOLS,
    baselines: bool = True,
    blend: bool = True,
) -> dict[str, Rankings]:
    """Each model's top k per evaluated customer, per protocol: best sellers, buy again, repeat
    (with `baselines`), each CF candidate, and the blend (`blend`)."""
    rels = relevance(bundle, test_events)
    candidates = candidates or {bundle.cf.kind: bundle.cf}
    out: dict[str, Rankings] = {}
    for protocol in protocols:
        rel = rels[protocol]
        users = rel.users
        new = protocol == "new"
        rankings: dict[str, np.ndarray] = {}
        out[protocol] = Rankings(relevance=rel, ids=rankings)
        if len(users) == 0:
            continue
        if baselines:
            rankings["best sellers"] = _best_sellers(bundle, users, k, exclude_bought=new)
        if baselines and not new:
            rankings["buy again"] = _buy_again(bundle, users, k)
            rankings["repeat"] = _repeat_model(bundle, users, k, now_day)
        for name, model in candidates.items():
            rankings[name] = model.recommend(
                users, bundle.user_items[users], N=k, filter_already_liked_items=new
            )[0]
        if blend:
            allow = (lambda c: ~c.bought) if new else None
            rankings["blend"] = rank_blend(
                bundle, users, N=k, now_day=now_day, pool=pool, allow=allow
            )[0]
    return out


def metrics_at(
    rankings: dict[str, Rankings], n_items: int, k: int | None = None
) -> dict[str, dict[str, dict[str, float]]]:
    """`ranking_metrics` per protocol and model of the top k of each ranking (all of it when k is
    None); a protocol without evaluated customers maps to {}."""
    return {
        protocol: {
            name: ranking_metrics(ids[:, :k], r.relevance, n_items) for name, ids in r.ids.items()
        }
        for protocol, r in rankings.items()
    }


def evaluate_models(
    bundle: ModelBundle,
    test_events: pa.Table,
    *,
    k: int,
    now_day: float,
    pool: int,
    candidates: dict[str, CFModel] | None = None,
    protocols: tuple[str, ...] = PROTOCOLS,
    baselines: bool = True,
    blend: bool = True,
) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics at k per protocol, per model name: best sellers, buy again, repeat (with
    `baselines`), each CF candidate, and the blend (`blend`)."""
    rankings = rank_models(
        bundle,
        test_events,
        k=k,
        now_day=now_day,
        pool=pool,
        candidates=candidates,
        protocols=protocols,
        baselines=baselines,
        blend=blend,
    )
    return metrics_at(rankings, bundle.shape[1])
