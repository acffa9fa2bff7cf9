"""Curation engine: image sources -> manifest -> embeddings -> dedup -> clusters -> retrieval -> WebDataset shards.

The DINOv2 LVD-142M data engine, from a folder of JPEGs on a laptop to Slurm arrays. Entry points:
`python -m curate run|STEP CONFIG [key=value ...]`, or `curate.steps.run_all(curate.config.load_curate_config(path))`.
Importing this package loads nothing heavy; torch and faiss are imported by the steps that use them.
"""
