"""Reading what `python -m pretrain train|export` writes: the consolidated teacher export of a run.

An export folder holds `teacher_backbone.safetensors` (official DINOv2 keys), `teacher_heads.safetensors` and
`model.json` (the run's ModelConfig). Evaluation and curation load our own models through here.
"""

from __future__ import annotations

import json
from pathlib import Path

from torch import nn

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


def exported_model_config(path: str | Path) -> ModelConfig:
    """The model config of a pretrain run's export (or of the export folder itself): what the run trained."""
    return ModelConfig(**json.loads((find_export(path) / MODEL_CONFIG_FILE).read_text()))


def load_exported_backbone(path: str | Path) -> nn.Module:
    """The teacher backbone of a pretrain run (or its export folder), built from the run's model config, in eval
    mode: how evaluation and curation use our own models."""
    backbone = build_backbone(exported_model_config(path), drop_path=False)
    load_pretrained(backbone, find_export(path) / BACKBONE_FILE)
    return backbone.eval()
