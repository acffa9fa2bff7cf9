"""Deduplication: its config and thresholds, the array kernels (exact, near-duplicate components, decontamination),
and the split into per-partition queries and one merge."""
