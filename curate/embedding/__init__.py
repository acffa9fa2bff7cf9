"""Embeddings: the embedders (our ViTs, open_clip, the weight-free copy-detection descriptor), their config, and the
store of float16 vectors per partition."""
