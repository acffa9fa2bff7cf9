"""Starting a run from trained weights: a finished run, its export, or a backbone file (e.g. the high-resolution
phase continues a 224 px run)."""

from __future__ import annotations

import logging
from pathlib import Path

from torch import nn

from dinoforge.models import load_heads, load_pretrained
from dinoforge.models.export_reader import read_model_folder
from pretrain.meta_arch import SSLMetaArch

logger = logging.getLogger(__name__)


def load_initial_weights(meta: SSLMetaArch, source: str | Path) -> None:
    """Start student and teacher from `source`: a pretrain run directory (its export), an export directory, or a
    backbone weights file in any layout `load_pretrained` reads. Position embeddings are resized to the model's grid
    (the high-resolution phase starts from a 224 px model at 518 px)."""
    backbone_file, heads_file = _resolve(Path(source))
    for side in (meta.student, meta.teacher):
        load_pretrained(side["backbone"], backbone_file, interpolate_pos_embed=True, ignore_heads=True)
    if heads_file is not None:
        heads = load_heads(heads_file)
        for side in (meta.student, meta.teacher):
            _load_heads(side, heads, heads_file)
    logger.info("initialised student and teacher from %s%s", backbone_file, f" + {heads_file}" if heads_file else "")


def _resolve(source: Path) -> tuple[Path, Path | None]:
    if source.is_file():
        return source, None
    folder = read_model_folder(source)
    return folder.backbone, folder.heads


def _load_heads(side: nn.ModuleDict, heads: dict, source: Path) -> None:
    for name in (n for n in side if n != "backbone"):
        state = heads.get(name) or (heads.get("dino_head") if name == "ibot_head" else None)
        if state is None:
            raise KeyError(f"{source}: no weights for the {name} (found {sorted(heads)})")
        side[name].load_state_dict(state, strict=True)
