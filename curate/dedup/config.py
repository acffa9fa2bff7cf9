"""`DedupConfig`: the dedup step's options, and the one home of its thresholds' defaults.

Torch- and faiss-free, so that a curation config loads (and ingest runs) without them.
"""

from __future__ import annotations

from dataclasses import dataclass

from curate.knn.graph import GPU_MAX_K

KEEP_RULES = ("first_uid", "first_row")
# The one home of the thresholds' defaults, by the embedding dedup runs on: (dedup.threshold, dedup.eval_threshold)
# cosines. DINOv2's (Oquab et al. 2023) were chosen for SSCD copy-detection features and serve every network
# embedding; the weight-free copydetect descriptor puts unrelated photos near cosine 0.6, so it has its own, measured
# on planted copies (see curate.embedding.copydetect).
NETWORK_THRESHOLDS = (0.6, 0.45)
COPYDETECT_THRESHOLDS = (0.8, 0.75)


@dataclass
class DedupConfig:
    """Dedup step options (defaults: the DINOv2 paper, thresholds fitted to the embedding)."""

    k: int = 64  # neighbours per image in the kNN graph
    # Cosines at or above which two pool images are copies, and a pool image is a copy of an evaluation image.
    # None: the default of the embedding dedup runs on (`fill_default_thresholds`).
    threshold: float | None = None
    eval_threshold: float | None = None
    keep: str = "first_uid"  # which member of a duplicate group survives: smallest uid, or first row
    use_gpu: str = "auto"  # faiss on GPU: auto (when present) | gpu | cpu

    def __post_init__(self) -> None:
        if not 1 <= self.k < GPU_MAX_K:
            raise ValueError(f"dedup.k={self.k}: must be in [1, {GPU_MAX_K - 1}] (the graph searches k + 1 neighbours "
                             f"and faiss GPU search returns at most {GPU_MAX_K})")
        if self.keep not in KEEP_RULES:
            raise ValueError(f"dedup.keep={self.keep!r}: use one of {', '.join(KEEP_RULES)}")
        for key in ("threshold", "eval_threshold"):
            value = getattr(self, key)
            if value is not None and not -1.0 <= value <= 1.0:
                raise ValueError(f"dedup.{key}={value}: a cosine similarity threshold must lie in [-1, 1]")

    def fill_default_thresholds(self, embed_kind: str) -> None:
        """Set the unset thresholds to the defaults that fit an embedding of `embed_kind` (`COPYDETECT_THRESHOLDS`
        for the copydetect descriptor, `NETWORK_THRESHOLDS` for every network)."""
        threshold, eval_threshold = COPYDETECT_THRESHOLDS if embed_kind == "copydetect" else NETWORK_THRESHOLDS
        if self.threshold is None:
            self.threshold = threshold
        if self.eval_threshold is None:
            self.eval_threshold = eval_threshold
