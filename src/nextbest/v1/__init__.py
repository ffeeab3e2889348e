"""Code generated from `protos/nextbest/v1/*.proto` by `make proto` (do not edit)."""
