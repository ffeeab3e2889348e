"""Offline evaluation: ranking metrics at k on held-out purchases, for what the server serves,
every candidate model and the trainer's blend, beside best sellers, buy again and TIFU-KNN, in
three protocols:

- `next_basket`: the products of the customer's first purchase day on or after the cutoff.
- `all`: every product bought within `window_days` (30) of the cutoff; rankings may contain
  bought products.
- `new`: the products bought within the window that the customer had not bought before;
  rankings leave bought products out (the served list is filtered, as an email system would).

`served` is the answer of the serving path itself (`service.ServedModel.recommend`, the code behind
RecommendProducts): email channel, consent allowed, the clock at the cutoff, SERVED_DEPTH products
asked for. It is the headline; `blend` is the trainer's ranking before the serving rules (a
diagnostic). Only customers known to the model with at least one relevant product are evaluated.
Products the model never saw still count as relevant (no model can hit them), so recall is honest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp

from nextbest.bundle import ModelBundle
from nextbest.cf import CFModel
from nextbest.data.interactions import to_days
from nextbest.scoring import (
    UNKNOWN_INTERVAL_DAYS,
    _pair_lookup,
    is_durable,
    item_interval,
    rank_blend,
    timeliness,
    top_n,
)
from nextbest.tifu import TifuParams, customer_vectors, tifu_top_n

if TYPE_CHECKING:
    from nextbest.config import Settings
    from nextbest.data.interactions import Interactions

__all__ = [
    "PROTOCOLS",
    "METRICS",
    "Relevance",
    "Rankings",
    "relevance",
    "metric_curves",
    "ranking_metrics",
    "win_back_evaluation",
    "metrics_at",
    "item_popularity",
    "popularity_percentile",
    "popularity_profile",
    "rank_models",
    "evaluate_models",
    "served_rankings",
    "durable_share",
    "TifuVectors",
    "WINDOW_DAYS",
    "SERVED_DEPTH",
]

PROTOCOLS = ("next_basket", "all", "new")
SERVED_BATCH = 1024
WINDOW_DAYS = 30.0
"""The `all` and `new` protocols count purchases within this many days of the cutoff."""
SERVED_DEPTH = 50
"""Products asked of the serving path per customer (then cut to k; filtered first for `new`)."""
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


def relevance(
    bundle: ModelBundle, test_events: pa.Table, *, now_day: float, window_days: float = WINDOW_DAYS
) -> dict[str, Relevance]:
    """Relevant products per protocol from the purchases in `test_events` (all on or after
    `now_day`, the cutoff)."""
    purchases = test_events.filter(pc.equal(test_events["event_type"], "purchase"))
    products = purchases["product_id"].combine_chunks()
    # Product codes for every bought id, those unknown to the model included (they count).
    code = pc.dictionary_encode(products).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    u_all = bundle.user_index(purchases["customer_id"].to_numpy(zero_copy_only=False))
    i_all = bundle.item_index(products.to_numpy(zero_copy_only=False))
    day = np.floor(to_days(purchases["timestamp"]))
    known_user = u_all >= 0
    u_all, i_all, day, code = (
        u_all[known_user],
        i_all[known_user],
        day[known_user],
        code[known_user],
    )
    n_users, n_items = bundle.shape
    first_day = np.full(n_users, np.inf)
    np.minimum.at(first_day, u_all, day)
    selections = {
        "next_basket": day == first_day[u_all],
        "all": day < np.floor(now_day) + window_days,
    }
    selections["new"] = selections["all"]
    n_codes = int(code.max()) + 1 if len(code) else 1
    out = {}
    for protocol in PROTOCOLS:
        keep = selections[protocol]
        # One entry per (customer, product).
        _, first = np.unique(u_all[keep] * n_codes + code[keep], return_index=True)
        u, i = u_all[keep][first], i_all[keep][first]
        if protocol == "new":
            _, bought_before = _pair_lookup(
                bundle.repeat.days_bought, np.arange(n_users), u, np.where(i >= 0, i, 0)
            )
            fresh = ~(bought_before & (i >= 0))
            u, i = u[fresh], i[fresh]
        users, inverse, counts = np.unique(u, return_inverse=True, return_counts=True)
        known = i >= 0
        keys = np.sort(inverse[known].astype(np.int64) * n_items + i[known])
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
class TifuVectors:
    """TIFU-KNN (Hu et al., SIGIR 2020) customer vectors of the training period, rows and columns
    as the bundle's users and items: the published strong baseline for repeat-heavy data."""

    vectors: sp.csr_matrix
    params: TifuParams

    @classmethod
    def fit(cls, inter: Interactions, params: TifuParams | None = None) -> TifuVectors:
        params = params or TifuParams()
        return cls(vectors=customer_vectors(inter, params), params=params)

    def top_n(self, users: np.ndarray, k: int, exclude: sp.csr_matrix | None = None) -> np.ndarray:
        return tifu_top_n(self.vectors, users, k, self.params, exclude=exclude)[0]


@dataclass(frozen=True)
class Rankings:
    """Every model's ranking of the customers evaluated in one protocol."""

    relevance: Relevance
    """The protocol's evaluated customers and their held-out products."""
    ids: dict[str, np.ndarray]
    """Per model name, item indices of shape (customers, depth), best first, -1 for empty slots."""


def served_rankings(
    bundle: ModelBundle, settings: Settings, users: np.ndarray, *, now_day: float, depth: int
) -> np.ndarray:
    """What RecommendProducts answers each of `users` (user indices) on the email channel, with
    every consent granted and the clock at `now_day`: item indices (len(users), depth), -1
    padded. The same `ServedModel` code as the server, not a copy of it."""
    from nextbest.policy import ConsentState
    from nextbest.service import ProductQuery, ServedModel, fixed_consent

    served = ServedModel(
        bundle, settings, fixed_consent(ConsentState(default_allow=True, granted={})), as_of=now_day
    )
    ids = np.full((len(users), depth), -1, dtype=np.int64)
    customer_ids = bundle.user_ids[users]
    for lo in range(0, len(users), SERVED_BATCH):
        queries = [
            ProductQuery(customer_id=str(c), limit=depth, channel="email")
            for c in customer_ids[lo : lo + SERVED_BATCH]
        ]
        for row, answer in enumerate(served.recommend(queries), lo):
            items = bundle.item_index(np.asarray([it.product_id for it in answer.items], dtype=str))
            ids[row, : len(items)] = items
    return ids


def win_back_evaluation(
    bundle: ModelBundle, settings: Settings, test_events: pa.Table, *, now_day: float, k: int
) -> dict[str, dict[str, float]]:
    """Customers dormant at `now_day` (the lifecycle stage from the training summaries) who bought
    again afterwards: NDCG and the other metrics at k of NextBestAction's win-back products (the
    serving path, every consent granted, the clock at the cutoff) against their return basket
    (their first purchase day after the cutoff), beside buy again and best sellers. Empty when
    the model has no lifecycle state or no dormant customer came back."""
    from nextbest.lifecycle.stages import STAGES
    from nextbest.policy import ConsentState
    from nextbest.service import ProductQuery, ServedModel, fixed_consent

    if bundle.lifecycle is None:
        return {}
    served = ServedModel(
        bundle, settings, fixed_consent(ConsentState(default_allow=True, granted={})), as_of=now_day
    )
    dormant = served.lifecycle.stages(now_day) == STAGES.index("dormant")
    basket = relevance(bundle, test_events, now_day=now_day)["next_basket"]
    back = dormant[basket.users]
    if not back.any():
        return {}
    n_items = bundle.shape[1]
    positions = np.flatnonzero(back)
    # Re-key the relevant products to the returning dormant customers' positions.
    pos, item = np.divmod(basket.keys, n_items)
    new_pos = np.full(len(basket.users), -1)
    new_pos[positions] = np.arange(len(positions))
    keep = new_pos[pos] >= 0
    rel = Relevance(
        users=basket.users[positions],
        keys=np.sort(new_pos[pos[keep]] * n_items + item[keep]),
        n_relevant=basket.n_relevant[positions],
    )
    ids = np.full((len(rel.users), k), -1, dtype=np.int64)
    for row, user in enumerate(rel.users.tolist()):
        query = ProductQuery(customer_id=str(bundle.user_ids[user]), limit=k, channel="email")
        answer = served.action_products(query, user, True, "win_back")
        got = bundle.item_index(np.asarray([i.product_id for i in answer.items], dtype=str))
        ids[row, : len(got)] = got
    return {
        "win_back": ranking_metrics(ids, rel, n_items),
        "buy_again": ranking_metrics(_buy_again(bundle, rel.users, k), rel, n_items),
        "best_sellers": ranking_metrics(_best_sellers(bundle, rel.users, k, False), rel, n_items),
    }


def _without_bought(bundle: ModelBundle, users: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Each row of `ids` without the products the customer bought before, cut to k."""
    n, depth = ids.shape
    pos = np.repeat(np.arange(n), depth)
    flat = ids.ravel()
    _, bought = _pair_lookup(bundle.repeat.days_bought, users, pos, np.where(flat >= 0, flat, 0))
    keep = (flat >= 0) & ~bought
    rank = np.tile(-np.arange(depth, dtype=np.float64), n)
    return top_n(pos[keep], flat[keep], rank[keep], n, k)[0]


def durable_share(bundle: ModelBundle, users: np.ndarray, ids: np.ndarray, settings) -> float:
    """Share of the served items (slots of `ids`) that are durables the customer bought before:
    the rule says none (`scoring.is_durable`)."""
    n, depth = ids.shape
    pos = np.repeat(np.arange(n), depth)
    flat = ids.ravel()
    valid = flat >= 0
    if not valid.any():
        return 0.0
    pos, flat = pos[valid], flat[valid]
    _, bought = _pair_lookup(bundle.repeat.days_bought, users, pos, flat)
    durable = is_durable(bundle, flat, durable_repeat_rate=settings.serve.durable_repeat_rate)
    return float((bought & durable).mean())


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
    served: tuple[np.ndarray, np.ndarray] | None = None,
    tifu: TifuVectors | None = None,
    window_days: float = WINDOW_DAYS,
) -> dict[str, Rankings]:
    """Each model's top k per evaluated customer, per protocol: what is served (`served`: user
    indices and their `served_rankings`, covering every evaluated customer), best sellers, buy
    again, repeat, TIFU-KNN (with `tifu`) as baselines (with `baselines`), each CF candidate,
    and the trainer's blend (`blend`)."""
    rels = relevance(bundle, test_events, now_day=now_day, window_days=window_days)
    candidates = candidates or {bundle.cf.kind: bundle.cf}
    served_ids = None if served is None else dict(zip(served[0].tolist(), served[1], strict=True))
    out: dict[str, Rankings] = {}
    for protocol in protocols:
        rel = rels[protocol]
        users = rel.users
        new = protocol == "new"
        rankings: dict[str, np.ndarray] = {}
        out[protocol] = Rankings(relevance=rel, ids=rankings)
        if len(users) == 0:
            continue
        if served_ids is not None:
            ids = np.stack([served_ids[u] for u in users.tolist()])
            rankings["served"] = _without_bought(bundle, users, ids, k) if new else ids[:, :k]
        if baselines:
            rankings["best sellers"] = _best_sellers(bundle, users, k, exclude_bought=new)
        if baselines and not new:
            rankings["buy again"] = _buy_again(bundle, users, k)
            rankings["repeat"] = _repeat_model(bundle, users, k, now_day)
        if baselines and tifu is not None:
            exclude = bundle.repeat.days_bought if new else None
            rankings["tifu-knn"] = tifu.top_n(users, k, exclude=exclude)
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
    served: tuple[np.ndarray, np.ndarray] | None = None,
    tifu: TifuVectors | None = None,
) -> dict[str, dict[str, dict[str, float]]]:
    """Metrics at k per protocol, per model name, of `rank_models`' rankings."""
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
        served=served,
        tifu=tifu,
    )
    return metrics_at(rankings, bundle.shape[1])
