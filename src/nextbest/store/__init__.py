"""Model artifacts on disk (and, later, the consent and event store)."""
