"""Reading images: one decoder and its policy, and the dataset sources every stage reads (ImageFolder, file lists,
tar shards, curated shard sets)."""
