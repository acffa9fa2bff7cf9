"""Reading our own model folders: the consolidated export of a run (`python -m pretrain train|export`) and releases.

An export folder holds `teacher_backbone.safetensors` (official DINOv2 keys), `teacher_heads.safetensors` and
`model.json` (the run's ModelConfig); a release (dinoforge.models.release_format) holds the same in its own names,
checked against its SHA256SUMS. Evaluation, curation and distillation teachers load our own models through here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from dinoforge.models import release_format as release
from dinoforge.models.config import ModelConfig, build_backbone
from dinoforge.models.weights import load_pretrained

BACKBONE_FILE = "teacher_backbone.safetensors"
HEADS_FILE = "teacher_heads.safetensors"
MODEL_CONFIG_FILE = "model.json"


def find_export(path: str | Path) -> Path:
    """The export folder of a pretrain run directory (or the export folder itself).

    Raises FileNotFoundError saying what to do: a run stopped before its end has checkpoints but no export yet.
    """
    path = Path(path).expanduser()
    for folder in (path / "export", path):
        if (folder / BACKBONE_FILE).is_file():
            return folder
    if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
        raise FileNotFoundError(f"pretrain run {path} has no export yet (no export/{BACKBONE_FILE}; the run stopped "
                                f"before its end?): run `python -m pretrain export {path}` first")
    raise FileNotFoundError(f"{path}: no {BACKBONE_FILE} in it or in its export/ folder; pass a pretrain run "
                            "directory, its export/ folder, or a backbone weights file")


@dataclass(frozen=True)
class ModelFolder:
    """The files of one of our models and the architecture they hold."""

    backbone: Path
    heads: Path | None
    model: ModelConfig
    is_release: bool


def read_model_folder(path: str | Path, verify: bool = True) -> ModelFolder:
    """A release, a pretrain run or an export folder -> its files and architecture; a release is checked against its
    SHA256SUMS first (`verify`)."""
    path = Path(path).expanduser()
    if release.is_release(path):
        heads = path / release.HEADS_FILE
        heads = heads if heads.is_file() else None
        if verify:
            release.verify_release(path, [release.CONFIG_FILE, release.BACKBONE_FILE, *([heads.name] if heads else [])])
        return ModelFolder(path / release.BACKBONE_FILE, heads, release.release_model_config(path), True)
    folder = find_export(path)
    heads = folder / HEADS_FILE
    model = ModelConfig(**json.loads((folder / MODEL_CONFIG_FILE).read_text()))
    return ModelFolder(folder / BACKBONE_FILE, heads if heads.is_file() else None, model, False)


def exported_model_config(path: str | Path) -> ModelConfig:
    """The model config of a pretrain run's export, an export folder or a release: what the run trained."""
    return read_model_folder(path, verify=False).model


def load_exported_backbone(path: str | Path) -> nn.Module:
    """The backbone of a pretrain run, its export folder or a release, built from its own model config, in eval mode:
    how evaluation and curation use our own models."""
    folder = read_model_folder(path)
    backbone = build_backbone(folder.model, drop_path=False)
    load_pretrained(backbone, folder.backbone)
    return backbone.eval()
