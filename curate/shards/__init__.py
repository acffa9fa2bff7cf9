"""WebDataset shard output: which sample goes into which shard, and the deterministic writer."""
