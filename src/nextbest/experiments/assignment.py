"""Deterministic assignment: a keyed hash of the customer id picks the experiment, a second one
keyed by the experiment's salt picks the variant. Nothing is stored: every replica and channel
computes the same answer from the config alone."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nextbest.config import Experiment, Variant

__all__ = ["Assignment", "assign", "assigner", "unit"]

_LAYER = b"nextbest-experiments"
"""Key of the hash that places a customer in at most one experiment."""


@dataclass(frozen=True)
class Assignment:
    experiment: str
    variant: str
    control: bool
    model_version: str
    """The variant's pinned model version ('' = the served one)."""

    @property
    def label(self) -> str:
        return f"{self.experiment}/{self.variant}"


def unit(customer_id: str, key: bytes) -> float:
    """A uniform number in [0, 1) from a keyed BLAKE2b hash of the customer id."""
    digest = hashlib.blake2b(customer_id.encode("utf-8"), key=key[:64], digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2.0**64


def _pick(u: float, shares: Sequence[float]) -> int:
    """The index whose cumulative share interval holds `u`, -1 past the last."""
    edge = 0.0
    for k, share in enumerate(shares):
        edge += share
        if u < edge:
            return k
    return -1


def assign(customer_id: str, experiments: Sequence[Experiment]) -> Assignment | None:
    """The customer's experiment and variant, or None when outside every experiment. The caller
    applies it only to customers with personalization consent."""
    if not experiments:
        return None
    k = _pick(unit(customer_id, _LAYER), [e.share for e in experiments])
    if k < 0:
        return None
    e = experiments[k]
    key = (e.salt or e.name).encode("utf-8")
    j = _pick(unit(customer_id, key), [v.share for v in e.variants])
    v: Variant = e.variants[j if j >= 0 else -1]  # float rounding at the top edge: the last arm
    return Assignment(e.name, v.name, v.control, v.model_version)


def assigner(experiments: Sequence[Experiment]) -> Callable[[str], Assignment | None]:
    """`assign` bound to a config's experiments."""
    frozen = tuple(experiments)
    return lambda customer_id: assign(customer_id, frozen)
