"""The model bundle: everything one published model version holds, in memory.

Training builds it, `store/artifacts.py` saves and loads it as plain arrays, `scoring.py` ranks with
it. Ids are sorted numpy unicode arrays, so id → index is a binary search.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import scipy.sparse as sp

from nextbest.cf import CFModel
from nextbest.data.interactions import RepeatStats
from nextbest.data.readers import CONTENT_SCHEMA

__all__ = ["FEATURES", "ModelBundle", "lookup"]

FEATURES = (
    "repeat",
    "log_days_bought",
    "log_recency_weighted",
    "log_age",
    "timeliness",
    "repeat_rate",
    "cf_new",
    "cf_old",
    "log_popularity",
    "log_share",
    "own_timeliness",
    "log_prev_popularity",
    "log_season_days",
    "log_season_popularity",
)
"""Blend features of a (customer, product) candidate; see `scoring.candidate_features`."""


def lookup(sorted_ids: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Index of each of `ids` in `sorted_ids`, -1 where absent."""
    ids = np.asarray(ids, dtype=str)
    if len(sorted_ids) == 0:
        return np.full(len(ids), -1, dtype=np.int64)
    pos = np.searchsorted(sorted_ids, ids)
    pos = np.minimum(pos, len(sorted_ids) - 1)
    return np.where(sorted_ids[pos] == ids, pos, -1).astype(np.int64)


@dataclass(kw_only=True)
class ModelBundle:
    """One model version: id maps, CF model, repeat statistics, blend weights, catalog snapshot."""

    user_ids: np.ndarray
    item_ids: np.ndarray
    user_items: sp.csr_matrix
    """CF input matrix (user × item), also the evidence for 'already bought' and explanations."""
    repeat: RepeatStats
    cf: CFModel
    blend_weights: np.ndarray
    """One weight per entry of FEATURES."""
    blend_intercept: float
    reference_day: float
    """Days since the epoch of the newest training event: 'now' for the model."""
    item_sensitive: np.ndarray
    item_available: np.ndarray
    item_repurchase_days: np.ndarray
    """Catalog repurchase interval per item (NaN when the catalog gives none)."""
    best_sellers: np.ndarray
    """Item indices by distinct buyers, most first."""
    recent_best_sellers: np.ndarray
    """Item indices by distinct buyers in the last 30 days, most first."""
    catalog: pa.Table
    content: pa.Table = field(default_factory=CONTENT_SCHEMA.empty_table)
    """Content snapshot (CONTENT_SCHEMA): what ScoreContent knows by id."""
    manifest: dict = field(default_factory=dict)
    lifecycle: object | None = None
    """The `lifecycle.model.LifecycleModel` (customer summaries, churn risk); None for a model
    without one (older formats, or data too short to fit risk)."""
    cf_candidates: np.ndarray | None = None
    """(n_users, candidate pool) int32: each customer's CF model top new products, -1 padded,
    computed once by the trainer (`scoring.cf_candidates_for`); None: computed at load."""
    history: object | None = None
    """The `history.CustomerHistory` (each customer's learned period and purposes); None for a
    model published without one."""
    forgotten: np.ndarray | None = None
    """Bool per customer: dropped from this loaded model (erasure, `ServedModel.forget`), so
    `user_index` no longer finds them; None: nobody."""
    cf_pool_items: np.ndarray | None = field(init=False, repr=False)
    """The products a factor model's CF candidates are drawn from (sorted item indices): the
    `train.cf_candidate_products` best sellers of the manifest's params; None = every product.
    Derived from `best_sellers` and `manifest` when the bundle is made."""

    def __post_init__(self) -> None:
        k = int(self.manifest.get("params", {}).get("cf_candidate_products", 0))
        top = k and k < len(self.item_ids)
        self.cf_pool_items = np.sort(self.best_sellers[:k]) if top else None

    @property
    def version(self) -> str:
        return str(self.manifest.get("version", ""))

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.user_ids), len(self.item_ids)

    def user_index(self, customer_ids: np.ndarray) -> np.ndarray:
        """Row of each customer, -1 for those the model does not know (or has forgotten)."""
        rows = lookup(self.user_ids, customer_ids)
        if self.forgotten is not None and len(rows):
            rows = np.where(self.forgotten[np.maximum(rows, 0)] & (rows >= 0), -1, rows)
        return rows

    def item_index(self, product_ids: np.ndarray) -> np.ndarray:
        return lookup(self.item_ids, product_ids)
