"""The personalization-value rule (SPEC §5), written once: RecommendProducts ranks by it and
ExplainRecommendation reports its terms.

    value = (relevance × timeliness − privacy_loss) × trust × fatigue

`relevance × timeliness` is one number: the blend's calibrated probability that the customer
buys the product soon, which learned the repurchase timing from its features (for a fold-in
answer, the relative CF score, which has no timing). privacy_loss = the product's sensitivity ×
the channel's exposure; trust comes from the customer's consent state; fatigue is
`policy.fatigue_demotion` for a product shown `policy.fatigue_impressions` times without an
answer, else 1. Products whose value falls below `policy.min_value` are withheld.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nextbest.config import PolicySettings

__all__ = ["Valued", "value_terms", "AnswerTrace"]


@dataclass(frozen=True)
class Valued:
    """The terms and the result of the value rule for a customer's candidates."""

    relevance: np.ndarray
    """relevance × timeliness, in (0, 1]."""
    privacy_loss: np.ndarray
    trust: float
    shown: np.ndarray
    """Unanswered impressions of each candidate (fatigue)."""
    tired: np.ndarray
    """Shown at least policy.fatigue_impressions times: demoted."""
    fatigue: np.ndarray
    """The factor fatigue applied: policy.fatigue_demotion for tired candidates, else 1."""
    before_fatigue: np.ndarray
    """(relevance − privacy_loss) × trust."""
    value: np.ndarray
    """before_fatigue × fatigue."""
    kept: np.ndarray
    """value ≥ policy.min_value."""


def value_terms(
    relevance: np.ndarray,
    sensitivity: np.ndarray,
    exposure: float,
    trust: float,
    shown: np.ndarray,
    policy: PolicySettings,
) -> Valued:
    """The value rule over candidates: their relevance × timeliness, sensitivity and times
    shown without an answer, on a channel of `exposure`, for a customer of `trust`."""
    loss = sensitivity * exposure
    tired = shown >= policy.fatigue_impressions
    fatigue = np.where(tired, policy.fatigue_demotion, 1.0)
    before_fatigue = (relevance - loss) * trust
    value = before_fatigue * fatigue
    return Valued(
        relevance=relevance,
        privacy_loss=loss,
        trust=trust,
        shown=shown,
        tired=tired,
        fatigue=fatigue,
        before_fatigue=before_fatigue,
        value=value,
        kept=value >= policy.min_value,
    )


@dataclass(frozen=True)
class AnswerTrace:
    """How one RecommendProducts answer was made (asked for by ExplainRecommendation): what
    each stage kept, as the stages computed it."""

    personalized: bool
    sensitive_ok: bool
    mask: np.ndarray | None
    """The request's item mask (filters and purchases recorded since training), None: all."""
    recorded: np.ndarray
    """Items the customer bought since the model was trained (recorded events)."""
    bought: np.ndarray
    """Items the customer bought (the model's history and recorded), sorted."""
    candidates: np.ndarray
    """The items the ranking offered to the value rule, in ranking order (for a non-personal
    answer: the best sellers it holds)."""
    valued: Valued | None
    """The value rule over `candidates` (None for a non-personal answer)."""
    chosen: np.ndarray
    """Positions in `candidates` of the answer's personal items, in answer order."""
    fetch: int
    """How many candidates the ranking offered at most."""
