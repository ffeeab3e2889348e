"""What history of each customer a model learned from: the period and the consent purposes.

The trainer computes it from the consent-gated events it fitted on (so it says what the model
actually used, not what the customer allows today) and publishes it with the model
(`history.npz`, plain arrays aligned with the model's customers). The customer data export
(`export.py`) reads it: "the served model holds you, learned from your history of 2024-01-03 ..
2024-04-28, under personalization and sensitive".

    history = customer_history(events, bundle.user_ids, bundle.item_ids, bundle.item_sensitive)
    history.purposes_of(row)   # ("personalization", "sensitive")
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from nextbest.bundle import lookup
from nextbest.data.interactions import to_days
from nextbest.data.readers import PURPOSES
from nextbest.policy import BEHAVIORAL_EVENTS

__all__ = ["PURPOSE_BITS", "CustomerHistory", "customer_history"]

PURPOSE_BITS = {purpose: 1 << k for k, purpose in enumerate(PURPOSES)}
"""Bit of each purpose in `CustomerHistory.purposes`."""


@dataclass(frozen=True)
class CustomerHistory:
    """Per model customer (rows aligned with `ModelBundle.user_ids`)."""

    first_day: np.ndarray
    """Days since the epoch of the customer's first event the model learned from."""
    last_day: np.ndarray
    """... and of the last one."""
    events: np.ndarray
    """Number of the customer's events the model learned from."""
    purposes: np.ndarray
    """uint8 bit set (`PURPOSE_BITS`): the purposes those events were used under: purchases
    and returns need personalization, views, carts and email clicks behavioral, events on
    sensitive products sensitive."""

    def purposes_of(self, row: int) -> tuple[str, ...]:
        bits = int(self.purposes[row])
        return tuple(p for p in PURPOSES if bits & PURPOSE_BITS[p])

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "first_day": self.first_day,
            "last_day": self.last_day,
            "events": self.events,
            "purposes": self.purposes,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], n_users: int) -> CustomerHistory:
        history = cls(
            first_day=arrays["first_day"],
            last_day=arrays["last_day"],
            events=arrays["events"],
            purposes=arrays["purposes"],
        )
        if any(len(a) != n_users for a in history.to_arrays().values()):
            raise ValueError(f"history arrays do not have one row per customer ({n_users})")
        return history


def customer_history(
    events: pa.Table, user_ids: np.ndarray, item_ids: np.ndarray, item_sensitive: np.ndarray
) -> CustomerHistory:
    """The history of each of `user_ids` in `events` (the events a model was fitted on)."""
    n = len(user_ids)
    users = lookup(user_ids, events["customer_id"].to_numpy(zero_copy_only=False))
    items = lookup(item_ids, events["product_id"].to_numpy(zero_copy_only=False))
    kinds = events["event_type"].to_numpy(zero_copy_only=False)
    days = to_days(events["timestamp"])
    known = users >= 0
    users, items, kinds, days = users[known], items[known], kinds[known], days[known]
    behavioral = np.isin(kinds, BEHAVIORAL_EVENTS)
    sensitive = np.where(items >= 0, item_sensitive[np.maximum(items, 0)], False)
    bits = np.where(behavioral, PURPOSE_BITS["behavioral"], PURPOSE_BITS["personalization"]).astype(
        np.uint8
    )
    bits |= np.where(sensitive, PURPOSE_BITS["sensitive"], 0).astype(np.uint8)
    first = np.full(n, np.inf)
    last = np.full(n, -np.inf)
    purposes = np.zeros(n, dtype=np.uint8)
    np.minimum.at(first, users, days)
    np.maximum.at(last, users, days)
    np.bitwise_or.at(purposes, users, bits)
    return CustomerHistory(
        first_day=first,
        last_day=last,
        events=np.bincount(users, minlength=n).astype(np.int64),
        purposes=purposes,
    )
