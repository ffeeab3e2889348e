"""NextBestAction's decision: one action per customer from their state and what the serving path
would show them, in a fixed order (SPEC §1's playbook). Pure: `ServedModel.next_best_action`
gathers the inputs (consent first) and the payload.
"""

from __future__ import annotations

from dataclasses import dataclass

from nextbest.lifecycle.model import CustomerState

__all__ = ["ACTIONS", "Situation", "decide"]

ACTIONS = ("welcome", "human_touch", "win_back", "care", "replenish", "cross_sell", "rest")


@dataclass(frozen=True)
class Situation:
    """What the decision needs to know about one customer."""

    state: CustomerState | None
    why_not: str
    """'' when `state` is set; else no_consent, erased, consent_unavailable, unknown_customer or
    no_lifecycle_model."""
    valuable: bool = False
    """In the top `lifecycle.human_touch_share` of the model's customers by purchase value."""
    recent_durable: str = ""
    """Title of a durable bought within `lifecycle.care_days` that content is about ('' none)."""
    due: int = 0
    """Products of the customer's answer due again (a repurchase_due reason)."""
    new: int = 0
    """Products of the customer's (personalized) answer they never bought."""


def decide(s: Situation, care_days: float) -> tuple[str, tuple[str, ...]]:
    """(action, reasons in words)."""
    if s.state is None:
        if s.why_not == "unknown_customer":
            return "welcome", ("no purchase known yet: welcome with best sellers",)
        if s.why_not == "no_lifecycle_model":
            if s.new or s.due:
                return "cross_sell", ("the model has no lifecycle state: its best products",)
            return "rest", ("the model has no lifecycle state and nothing to offer",)
        words = {
            "no_consent": "no personalization consent: nothing personal is decided or sent",
            "erased": "the customer was forgotten: nothing is decided or sent",
            "consent_unavailable": "consent cannot be read now: nothing personal (fail closed)",
        }
        return "rest", (words.get(s.why_not, s.why_not),)
    st = s.state
    head = st.reasons[0]
    if st.stage == "new":
        return "welcome", (head, "new customer: the best of the first purchase's category")
    if st.stage in ("at_risk", "dormant") and s.valuable:
        return "human_touch", (
            head,
            f"valuable and {st.stage.replace('_', ' ')}: hand to a person, no automated message",
        )
    if st.stage == "dormant":
        return "win_back", (head, "dormant: win back with the products most likely bought now")
    if st.stage == "lapsed":
        return "rest", (head, "lapsed: past win-back")
    if s.recent_durable:
        return "care", (
            head,
            f"bought {s.recent_durable} within {care_days:g} days: content about it, not the "
            "product again",
        )
    if s.due:
        return "replenish", (head, f"{s.due} products due again")
    if s.new:
        return "cross_sell", (head, f"{s.new} products new to the customer")
    return "rest", (head, "nothing above policy.min_value (fatigue included)")
