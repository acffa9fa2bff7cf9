"""Consolidated teacher export (official DINOv2 backbone layout + heads, safetensors) and initial-weight loading."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from torch import nn

from pretrain.checkpoint import export_full_state_dict
from pretrain.distributed import DistributedEnv, barrier
from pretrain.meta_arch import ModelConfig, SSLMetaArch, build_backbone
from pretrain.models import load_heads, load_pretrained, save_safetensors

logger = logging.getLogger(__name__)

BACKBONE_FILE = "teacher_backbone.safetensors"
HEADS_FILE = "teacher_heads.safetensors"
MODEL_CONFIG_FILE = "model.json"


def export_teacher(meta: SSLMetaArch, out_dir: str | Path, env: DistributedEnv) -> Path:
    """Write the teacher's backbone (official keys) and heads, consolidated on rank 0; every rank must call it."""
    out_dir = Path(out_dir)
    full = export_full_state_dict(meta.teacher)  # collective: all ranks gather, rank 0 keeps the result
    if env.is_main:
        backbone = {k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")}
        heads = {k: v for k, v in full.items() if not k.startswith("backbone.")}
        model_cfg = asdict(meta.model_cfg)
        metadata = {"format": "dinoforge-teacher", "model": json.dumps(model_cfg)}
        save_safetensors(backbone, out_dir / BACKBONE_FILE, metadata=metadata)
        save_safetensors(heads, out_dir / HEADS_FILE, metadata=metadata)
        (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model_cfg, indent=2) + "\n")
        logger.info("exported the teacher to %s (%d backbone tensors, %d head tensors)", out_dir, len(backbone),
                    len(heads))
    barrier()
    return out_dir / BACKBONE_FILE


def export_run(run_dir: str | Path, step: int | None = None) -> Path:
    """Export the teacher of a run's checkpoint (the latest, or `step`) to `run_dir/export`, in one process."""
    from pretrain.checkpoint import Checkpointer, ModelState
    from pretrain.config import ConfigError, load_config
    from pretrain.distributed import init_distributed
    from pretrain.train import TrainConfig

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir} is not a pretrain run (no config.yaml); a run directory, written by "
                          "`python -m pretrain train`, holds config.yaml and checkpoints/step_*/")
    cfg = load_config(TrainConfig, run_dir / "config.yaml")
    meta = SSLMetaArch(cfg.model, cfg.loss)
    checkpointer = Checkpointer(run_dir / "checkpoints")
    if checkpointer.latest_step() is None:
        raise FileNotFoundError(f"{run_dir}: no complete checkpoint under checkpoints/ to export")
    loaded = checkpointer.load({"model": ModelState(meta)}, step=step)
    logger.info("loaded step %d of %s", loaded, run_dir)
    return export_teacher(meta, run_dir / "export", init_distributed())


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


def load_exported_backbone(path: str | Path) -> nn.Module:
    """The teacher backbone of a pretrain run (or its export folder), built from the run's model config, in eval
    mode: how evaluation and curation use our own models."""
    folder = find_export(path)
    backbone = build_backbone(ModelConfig(**json.loads((folder / MODEL_CONFIG_FILE).read_text())), drop_path=False)
    load_pretrained(backbone, folder / BACKBONE_FILE)
    return backbone.eval()


def _resolve(source: Path) -> tuple[Path, Path | None]:
    if source.is_file():
        return source, None
    folder = find_export(source)
    heads = folder / HEADS_FILE
    return folder / BACKBONE_FILE, heads if heads.is_file() else None


def _load_heads(side: nn.ModuleDict, heads: dict, source: Path) -> None:
    for name in (n for n in side if n != "backbone"):
        state = heads.get(name) or (heads.get("dino_head") if name == "ibot_head" else None)
        if state is None:
            raise KeyError(f"{source}: no weights for the {name} (found {sorted(heads)})")
        side[name].load_state_dict(state, strict=True)
