"""Input files: readers with the bad-input rules, dataset adapters, and the interaction matrix."""
