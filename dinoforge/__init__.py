"""The common core beneath every stage: config loading, image decoding and dataset sources, the shard-index schema,
the launch environment and collectives, atomic writes and hashing, logging, and the model layer. It imports no
stage (curate, pretrain, evaluation, slurm)."""
