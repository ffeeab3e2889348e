"""A/B experiments: assignment of customers to variants, attribution of purchases to what was
shown, and the report (lift over the control holdout, confidence intervals, sample ratio)."""

from nextbest.experiments.assignment import Assignment, assign, assigner

__all__ = ["Assignment", "assign", "assigner"]
