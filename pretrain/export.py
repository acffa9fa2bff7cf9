"""Writing the consolidated teacher export (official DINOv2 backbone layout + heads, safetensors); the reader every
stage uses is dinoforge.models.export_reader."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from torch import nn

from dinoforge.collectives import barrier
from dinoforge.launch import DistributedEnv
from dinoforge.models import save_safetensors
from dinoforge.models.config import ModelConfig
from dinoforge.models.export_reader import BACKBONE_FILE, HEADS_FILE, MODEL_CONFIG_FILE
from pretrain.checkpoint import export_full_state_dict
from pretrain.meta_arch import SSLMetaArch

logger = logging.getLogger(__name__)


def export_teacher(meta: SSLMetaArch, out_dir: str | Path, env: DistributedEnv) -> Path:
    """Write the teacher's backbone (official keys) and heads, consolidated on rank 0; every rank must call it."""
    return export_model(meta.teacher, meta.model_cfg, out_dir, env)


def export_model(model: nn.Module, model_cfg: ModelConfig, out_dir: str | Path, env: DistributedEnv) -> Path:
    """Write `model` (a ModuleDict of `backbone` and its heads, if any) as an export folder: the backbone in the
    official key layout, the heads beside it, and `model.json`. Every rank must call it (it gathers FSDP2 shards)."""
    out_dir = Path(out_dir)
    full = export_full_state_dict(model)  # collective: all ranks gather, rank 0 keeps the result
    if env.is_main:
        backbone = {k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")}
        heads = {k: v for k, v in full.items() if not k.startswith("backbone.")}
        model_json = asdict(model_cfg)
        metadata = {"format": "dinoforge-teacher", "model": json.dumps(model_json)}
        save_safetensors(backbone, out_dir / BACKBONE_FILE, metadata=metadata)
        if heads:
            save_safetensors(heads, out_dir / HEADS_FILE, metadata=metadata)
        (out_dir / MODEL_CONFIG_FILE).write_text(json.dumps(model_json, indent=2) + "\n")
        logger.info("exported %s (%d backbone tensors, %d head tensors)", out_dir, len(backbone), len(heads))
    barrier()
    return out_dir / BACKBONE_FILE


def export_run(run_dir: str | Path, step: int | None = None) -> Path:
    """Export the teacher of a run's checkpoint (the latest, or `step`) to `run_dir/export`, in one process."""
    from dinoforge.config import ConfigError, load_config
    from dinoforge.launch import init_distributed
    from pretrain.checkpoint import Checkpointer, ModelState
    from pretrain.train_config import TrainConfig

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
