"""Frozen-backbone features of one labelled dataset, in dataset order."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class FeatureSet:
    """What the classifiers read. `block_cls[:, -1]` is the backbone's output embedding (`model(x)`)."""

    labels: Tensor  # [N] int64
    block_cls: Tensor  # [N, L, D] CLS token of the last L blocks after the final norm, oldest block first
    patch_mean: Tensor  # [N, D] mean of the last block's normed patch tokens
    decode_errors: int = 0  # samples the dataset reported as undecodable (substituted or skipped by the reader)

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.block_cls.ndim != 3 or self.patch_mean.ndim != 2:
            raise ValueError(
                f"block_cls must be [N, L, D] and patch_mean [N, D], got {tuple(self.block_cls.shape)} and "
                f"{tuple(self.patch_mean.shape)}"
            )
        if len(self.block_cls) != n or len(self.patch_mean) != n:
            raise ValueError(
                f"{n} labels but {len(self.block_cls)} block_cls rows and {len(self.patch_mean)} patch_mean rows"
            )

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def cls(self) -> Tensor:
        """[N, D] the final CLS embedding."""
        return self.block_cls[:, -1]

    @property
    def n_blocks(self) -> int:
        return self.block_cls.shape[1]

    @property
    def dim(self) -> int:
        return self.block_cls.shape[2]

    def subset(self, indices: Tensor) -> FeatureSet:
        return FeatureSet(self.labels[indices], self.block_cls[indices], self.patch_mean[indices], 0)
