"""Consent gate and sensitivity rules: pure functions over tables, no I/O (SPEC §5).

Purposes: `personalization` (use purchase history at all), `behavioral` (use views, carts, email
clicks), `sensitive` (sensitive products may be used and shown). A customer's latest record per
purpose wins; a purpose with no record follows `policy.default_consent`.

Erasure (the tombstone, `erased_at`): everything of the customer dated at or before `erased_at`
is erased data, never stored, served or learned from again (`erased_rows`). The customer stays
erased (nothing personal whatever the default, nothing of them stored or learned) until
`personalization` consent is recorded again after the erasure; from then on they are a new
customer: their consent decides, and their history after the erasure counts (`still_erased`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nextbest.config import PolicySettings

__all__ = [
    "BEHAVIORAL_EVENTS",
    "FOR_GOOD",
    "erased_rows",
    "still_erased",
    "erasure_blocks",
    "ConsentState",
    "ConsentReport",
    "consent_state",
    "sensitive_mask",
    "filter_training_events",
]

BEHAVIORAL_EVENTS = ("view", "cart", "email_click")
"""Event types that need `behavioral` consent (purchases and returns need `personalization`)."""


@dataclass(frozen=True)
class ConsentState:
    """Latest consent per purpose for the customers that have records; others take the default."""

    default_allow: bool
    granted: dict[str, dict[str, bool]] = field(default_factory=dict)
    """purpose → customer id → granted."""

    def allowed(self, purpose: str, customer_ids: pa.Array) -> np.ndarray:
        """Bool mask: does each customer allow `purpose`?"""
        records = self.granted.get(purpose, {})
        if not records:
            return np.full(len(customer_ids), self.default_allow)
        ids = pa.array(list(records.keys()), pa.string())
        values = np.fromiter(records.values(), dtype=bool, count=len(records))
        idx = pc.index_in(customer_ids, value_set=ids)
        found = pc.is_valid(idx).to_numpy(zero_copy_only=False)
        idx_np = pc.fill_null(idx, 0).to_numpy(zero_copy_only=False)
        out = np.full(len(customer_ids), self.default_allow)
        out[found] = values[idx_np[found]]
        return out

    def recorded(self, purpose: str, customer_ids: pa.Array) -> np.ndarray:
        """Bool mask: has each customer a record for `purpose` (not the default)?"""
        records = self.granted.get(purpose, {})
        if not records:
            return np.zeros(len(customer_ids), dtype=bool)
        ids = pa.array(list(records.keys()), pa.string())
        return pc.is_in(customer_ids, value_set=ids).to_numpy(zero_copy_only=False)


FOR_GOOD = dt.datetime(9999, 12, 31)
"""The erasure time of a customer erased without a known time (`nextbest train --erased`):
everything of theirs is before it."""


def erased_rows(
    customers: pa.Array, times: pa.Array, erased: Mapping[str, dt.datetime]
) -> np.ndarray:
    """Bool per row of (customer, time): erased data, dated at or before the customer's latest
    erasure (`erased`: customer → erased_at, naive UTC)."""
    if not erased or not len(customers):
        return np.zeros(len(customers), dtype=bool)
    ids = pa.array(list(erased), pa.string())
    at = pa.array(list(erased.values()), pa.timestamp("us"))
    erased_at = pc.take(at, pc.index_in(customers, value_set=ids))  # null: not erased
    before = pc.less_equal(pc.cast(times, pa.timestamp("us")), erased_at)
    return pc.fill_null(before, False).to_numpy(zero_copy_only=False)


def still_erased(
    state: ConsentState, customers: pa.Array, erased: Mapping[str, dt.datetime]
) -> np.ndarray:
    """Bool per customer: erased and without `personalization` consent recorded since the
    erasure. `state` must hold only records made after each customer's erasure (the store's:
    `forget` deletes the older ones and refuses replayed ones; a consent file's rows pass
    `erased_rows` first)."""
    if not erased or not len(customers):
        return np.zeros(len(customers), dtype=bool)
    tombstoned = pc.is_in(customers, value_set=pa.array(list(erased), pa.string()))
    tombstoned = tombstoned.to_numpy(zero_copy_only=False)
    return tombstoned & ~state.recorded("personalization", customers)


def erasure_blocks(
    customers: pa.Array,
    times: pa.Array,
    state: ConsentState,
    erased: Mapping[str, dt.datetime],
) -> np.ndarray:
    """Bool per row of (customer, time): the erasure rule keeps the row out of the store and of
    every model (dated at or before the erasure, or the customer is `still_erased`)."""
    return erased_rows(customers, times, erased) | still_erased(state, customers, erased)


def consent_state(consent: pa.Table | None, policy: PolicySettings) -> ConsentState:
    """Fold a consent table (SPEC §2 columns) into the latest value per customer and purpose."""
    default_allow = policy.default_consent == "allow"
    if consent is None or consent.num_rows == 0:
        return ConsentState(default_allow=default_allow)
    rows = consent.append_column("__row", pa.array(np.arange(consent.num_rows)))
    rows = rows.sort_by([("updated_at", "ascending"), ("__row", "ascending")])
    latest = rows.group_by(["customer_id", "purpose"], use_threads=False).aggregate(
        [("granted", "last")]
    )
    granted: dict[str, dict[str, bool]] = {}
    for purpose, customer, value in zip(
        latest["purpose"].to_pylist(),
        latest["customer_id"].to_pylist(),
        latest["granted_last"].to_pylist(),
        strict=True,
    ):
        granted.setdefault(purpose, {})[customer] = bool(value)
    return ConsentState(default_allow=default_allow, granted=granted)


def sensitive_mask(catalog: pa.Table, policy: PolicySettings) -> np.ndarray:
    """Per catalog row: is the product sensitive (sensitivity > 0, or a listed category or
    department)?"""
    mask = np.nan_to_num(catalog["sensitivity"].to_numpy(zero_copy_only=False)) > 0
    for column, listed in (
        ("category", policy.sensitive_categories),
        ("department", policy.sensitive_departments),
    ):
        if listed:
            values = pc.utf8_upper(pc.fill_null(catalog[column], ""))
            wanted = pa.array([v.strip().upper() for v in listed])
            mask |= pc.is_in(values, wanted).to_numpy(zero_copy_only=False)
    return mask


@dataclass
class ConsentReport:
    """What the consent gate removed before training."""

    customers_without_personalization: int = 0
    customers_erased: int = 0
    events_without_personalization: int = 0
    events_erased: int = 0
    sensitive_events_dropped: int = 0
    behavioral_events_dropped: int = 0

    def summary(self) -> str:
        return (
            f"consent: {self.customers_without_personalization:,} customers without "
            f"personalization consent ({self.events_without_personalization:,} events), "
            f"{self.customers_erased:,} erased ({self.events_erased:,} events), "
            f"{self.sensitive_events_dropped:,} sensitive and {self.behavioral_events_dropped:,} "
            f"behavioral events dropped"
        )


def filter_training_events(
    events: pa.Table,
    state: ConsentState,
    *,
    sensitive_products: pa.Array,
    erased: Mapping[str, dt.datetime] | None = None,
) -> tuple[pa.Table, ConsentReport]:
    """Keep only the events that the customers' consents allow a model to learn from.

    Erased customers (`erased`: customer → erased_at) lose their events dated at or before the
    erasure, and every event until they record personalization consent again
    (`erasure_blocks`); customers without `personalization` consent lose every event; events on
    sensitive products are dropped for customers without `sensitive` consent; views, carts and
    email clicks are dropped for customers without `behavioral` consent.
    """
    report = ConsentReport()
    customers = events["customer_id"].combine_chunks()
    uniq = pc.unique(customers)
    keep = np.ones(events.num_rows, dtype=bool)
    if erased:
        gone = erasure_blocks(customers, events["timestamp"].combine_chunks(), state, erased)
        report.customers_erased = int(len(pc.unique(customers.filter(pa.array(gone)))))
        report.events_erased = int(gone.sum())
        keep &= ~gone
    allowed_u = state.allowed("personalization", uniq)
    denied_ids = uniq.filter(pa.array(~allowed_u))
    if len(denied_ids):
        denied = pc.is_in(customers, denied_ids).to_numpy(zero_copy_only=False) & keep
        report.customers_without_personalization = int(
            len(pc.unique(customers.filter(pa.array(denied))))
        )
        report.events_without_personalization = int(denied.sum())
        keep &= ~denied
    if len(sensitive_products):
        on_sensitive = pc.is_in(events["product_id"], sensitive_products).to_numpy(
            zero_copy_only=False
        )
        no_sensitive = ~state.allowed("sensitive", customers)
        drop = on_sensitive & no_sensitive & keep
        report.sensitive_events_dropped = int(drop.sum())
        keep &= ~drop
    behavioral = pc.is_in(events["event_type"], pa.array(BEHAVIORAL_EVENTS)).to_numpy(
        zero_copy_only=False
    )
    if behavioral.any():
        drop = behavioral & ~state.allowed("behavioral", customers) & keep
        report.behavioral_events_dropped = int(drop.sum())
        keep &= ~drop
    return events.filter(pa.array(keep)), report
