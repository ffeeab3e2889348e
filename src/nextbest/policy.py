"""Consent gate and sensitivity rules: pure functions over tables, no I/O (SPEC §5).

Purposes: `personalization` (use purchase history at all), `behavioral` (use views, carts, email
clicks), `sensitive` (sensitive products may be used and shown). A customer's latest record per
purpose wins; a purpose with no record follows `policy.default_consent`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from nextbest.config import PolicySettings

__all__ = [
    "BEHAVIORAL_EVENTS",
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
    erased: pa.Array | None = None,
) -> tuple[pa.Table, ConsentReport]:
    """Keep only the events that the customers' consents allow a model to learn from.

    Erased customers and customers without `personalization` consent lose every event; events on
    sensitive products are dropped for customers without `sensitive` consent; views, carts and
    email clicks are dropped for customers without `behavioral` consent.
    """
    report = ConsentReport()
    customers = events["customer_id"].combine_chunks()
    uniq = pc.unique(customers)
    keep = np.ones(events.num_rows, dtype=bool)
    if erased is not None and len(erased):
        gone = pc.is_in(customers, erased).to_numpy(zero_copy_only=False)
        report.customers_erased = int(pc.sum(pc.is_in(uniq, erased)).as_py() or 0)
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
