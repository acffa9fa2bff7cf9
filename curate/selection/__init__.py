"""Selection of the curated set: hierarchical k-means with balanced sampling, and seed-based retrieval."""
