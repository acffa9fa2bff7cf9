"""Writing the consolidated teacher export (official DINOv2 backbone layout + heads, safetensors); the reader every
stage uses is dinoforge.models.export_reader."""

from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from dinoforge.collectives import barrier
from dinoforge.launch import DistributedEnv
from dinoforge.models import save_safetensors
from dinoforge.models.export_reader import BACKBONE_FILE, HEADS_FILE, MODEL_CONFIG_FILE
from pretrain.checkpoint import export_full_state_dict
from pretrain.meta_arch import SSLMetaArch

logger = logging.getLogger(__name__)



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
