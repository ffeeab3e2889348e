"""nextbest: consent-aware next-best-product recommendations."""

__version__ = "0.1.0"
