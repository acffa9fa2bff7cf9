"""Inputs: the source readers (folders, tars, WebDataset shards, file lists), the acceptance of image bytes, ingest's
manifest rows, and re-reading a sample from where the manifest says it is."""
