"""Why a product is, or is not, in a customer's answer now (Recommender.ExplainRecommendation).

The explanation is read off the answer itself: `ServedModel.recommend(..., trace=True)` runs the
one serving path and keeps what each stage decided (`value_rule.AnswerTrace`), so the value and
rank of every item of an answer are the answer's own, and the rule named for an absent product
is the rule that removed it (`scoring.removed_by`, `value_rule.value_terms`), not a second copy.

    explanation = explain(served, ProductQuery(customer_id="c004", channel="web"), "p006")

For a customer without sensitive consent a sensitive product is never described: the
explanation names the rule that hid it by kind (`sensitivity`) and says nothing else about it
(no id, title, category, value or reason).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nextbest.errors import NotFound
from nextbest.scoring import removed_by
from nextbest.service import ProductQuery, Reason, ServedModel
from nextbest.value_rule import AnswerTrace

__all__ = ["RULES", "Terms", "Explanation", "explain"]

RULES = (
    "consent",
    "sensitivity",
    "unavailable",
    "filter",
    "already_bought",
    "outranked",
    "below_min_value",
    "fatigue",
)
"""What can keep a product out of an answer:
- consent: the answer is not personalized (no personalization consent, erased, or the consent
  store unreadable): best sellers only;
- sensitivity: a sensitive product, for a customer without sensitive consent;
- unavailable: the catalog marks it unavailable;
- filter: the request's include / exclude categories or exclude_product_ids;
- already_bought: a durable the customer bought, or a purchase recorded since the model was
  trained (unless include_purchased);
- outranked: other products rank above it (not among the customer's best candidates, below the
  answer's last item, or the answer's places for products new to the customer);
- below_min_value: its value under the privacy rule is below policy.min_value;
- fatigue: shown too often without an answer: demoted, and so below the answer's items."""

_CONSENT_REASONS = ("no_consent", "erased", "consent_unavailable")


@dataclass(frozen=True)
class Terms:
    """The value rule's terms for one product (`value_rule.value_terms`)."""

    relevance: float
    """relevance × timeliness: the blend's probability of a purchase soon (the repurchase timing
    is one of its features)."""
    privacy_loss: float
    """sensitivity × the channel's exposure."""
    trust: float
    fatigue: float
    """1, or policy.fatigue_demotion when the product was shown too often without an answer."""
    times_shown: int
    value: float
    """(relevance − privacy_loss) × trust × fatigue."""
    min_value: float


@dataclass(frozen=True)
class Explanation:
    customer_id: str
    product_id: str
    """'' when the product is hidden (sensitive, without sensitive consent)."""
    in_answer: bool
    rank: int
    """1-based position in the answer; 0 when absent."""
    score: float
    """The item's score in the answer (0 when absent)."""
    personalized: bool
    not_personalized_reason: str
    removed_by: str
    """'' when in the answer, else one of RULES."""
    detail: str
    """In words: why it is there, or what removed it."""
    reasons: tuple[Reason, ...] = ()
    """The item's reasons in the answer (its evidence), when it is in it."""
    terms: Terms | None = None
    """The value rule's terms, when the product reached the privacy rule."""
    title: str = ""
    category: str = ""
    limit: int = 0


def explain(model: ServedModel, query: ProductQuery, product_id: str) -> Explanation:
    """Why `product_id` is or is not in the answer `model` gives `query` now. NotFound when the
    model does not know the product."""
    b = model.bundle
    item = int(b.item_index(np.asarray([product_id], dtype=str))[0])
    if item < 0:
        raise NotFound(f"product_id {product_id!r} is not in model {model.version}")
    [answer] = model.recommend([query], trace=True)
    trace = answer.trace
    base = {
        "customer_id": query.customer_id,
        "personalized": answer.personalized,
        "not_personalized_reason": answer.not_personalized_reason,
        "limit": query.limit,
    }
    if b.item_sensitive[item] and not trace.sensitive_ok:
        return Explanation(
            **base,
            product_id="",
            in_answer=False,
            rank=0,
            score=0.0,
            removed_by="sensitivity",
            detail="hidden: a kind of product shown only with the customer's sensitive consent",
        )
    about = {"product_id": product_id, "title": model.titles[item]}
    about["category"] = model.categories[item]
    at = np.flatnonzero(trace.candidates == item)
    position = int(at[0]) if len(at) else -1
    for rank, shown in enumerate(answer.items, 1):
        if shown.product_id == product_id:
            personal = trace.valued is not None and position in trace.chosen
            if personal:
                detail = f"in the answer at rank {rank}: value {shown.score:.4g}"
            elif answer.personalized:
                detail = f"in the answer at rank {rank}: a best seller added to fill the list"
                if position >= 0 and not trace.valued.kept[position]:
                    detail += (
                        f" (as a personal item its value {trace.valued.value[position]:.4g} was "
                        f"below policy.min_value {model.settings.policy.min_value:g})"
                    )
            else:
                detail = (
                    f"in the answer at rank {rank}: a best seller (not personalized: "
                    f"{answer.not_personalized_reason})"
                )
            return Explanation(
                **base,
                **about,
                in_answer=True,
                rank=rank,
                score=shown.score,
                removed_by="",
                detail=detail,
                reasons=shown.reasons,
                terms=_terms(model, trace, position) if personal else None,
            )
    rule, detail = _absent(model, query, trace, answer.not_personalized_reason, item, position)
    terms = _terms(model, trace, position) if trace.valued is not None and position >= 0 else None
    return Explanation(
        **base,
        **about,
        in_answer=False,
        rank=0,
        score=0.0,
        removed_by=rule,
        detail=detail,
        terms=terms,
    )


def _terms(model: ServedModel, trace: AnswerTrace, k: int) -> Terms:
    v = trace.valued
    return Terms(
        relevance=float(v.relevance[k]),
        privacy_loss=float(v.privacy_loss[k]),
        trust=float(v.trust),
        fatigue=float(v.fatigue[k]),
        times_shown=int(v.shown[k]),
        value=float(v.value[k]),
        min_value=model.settings.policy.min_value,
    )


def _absent(
    model: ServedModel,
    query: ProductQuery,
    trace: AnswerTrace,
    why: str,
    item: int,
    position: int,
) -> tuple[str, str]:
    """(rule, detail) of a product the answer does not hold, in the order the stages run."""
    b = model.bundle
    policy = model.settings.policy
    removed = removed_by(
        b,
        np.asarray([item]),
        np.isin([item], trace.bought),
        sensitive_ok=np.asarray([trace.sensitive_ok]),
        allowed=np.asarray([trace.mask is None or bool(trace.mask[item])]),
        include_purchased=np.asarray([query.include_purchased]),
        durable_repeat_rate=model.settings.serve.durable_repeat_rate,
    )
    if removed["unavailable"][0]:
        return "unavailable", "the catalog marks it unavailable"
    if removed["filter"][0]:
        if np.isin(item, trace.recorded) and not query.include_purchased:
            return "already_bought", (
                "bought since the model was trained (include_purchased shows it)"
            )
        return "filter", "excluded by the request's categories or exclude_product_ids"
    if not trace.personalized:
        rule = "consent" if why in _CONSENT_REASONS else "outranked"
        return rule, (
            f"not personalized ({why}): the answer holds best sellers only, and this product "
            f"is not among the first {query.limit}"
        )
    if removed["durable_bought"][0]:
        return "already_bought", (
            "a durable the customer already bought: almost nobody buys it twice "
            "(include_purchased shows it)"
        )
    if position < 0:
        return "outranked", (
            f"not among the {trace.fetch} products the model ranks first for the customer"
        )
    v = trace.valued
    if not v.kept[position]:
        if v.tired[position] and v.before_fatigue[position] >= policy.min_value:
            return "fatigue", (
                f"shown {int(v.shown[position])} times in {policy.fatigue_days:g} days without "
                f"a click or purchase: demoted to a value below {policy.min_value:g}"
            )
        return "below_min_value", (
            f"value {v.value[position]:.4g} below policy.min_value {policy.min_value:g} on the "
            f"{query.channel} channel"
        )
    if v.tired[position]:
        return "fatigue", (
            f"shown {int(v.shown[position])} times in {policy.fatigue_days:g} days without a "
            "click or purchase: demoted below the answer's items"
        )
    return "outranked", (
        f"value {v.value[position]:.4g}: below the {query.limit} items of the answer (or its "
        "places for products new to the customer)"
    )
