"""Nearest neighbours: the one index config (flat, IVF, IVF-PQ), kNN search and graph edges, and where faiss runs."""
