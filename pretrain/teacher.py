"""A distillation teacher from anywhere: a pretrain run or its export, a distillation run or one of its students, a
release folder (checked against its SHA256SUMS), or a bare weights file in any layout `load_pretrained` reads (official
hub, DINOv2 training checkpoint, timm, Hugging Face). Its backbone (and its DINO/iBOT heads, when the source has them)
are loaded strictly, frozen, in eval mode."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, fields
from pathlib import Path

import yaml
from torch import Tensor, nn

from dinoforge.config import ConfigError
from dinoforge.errors import CheckpointError
from dinoforge.models import DINOHead, load_heads, load_pretrained
from dinoforge.models.config import ModelConfig, build_backbone
from dinoforge.models.export_reader import read_model_folder
from pretrain.distill_config import TeacherConfig

logger = logging.getLogger(__name__)

STUDENTS_DIR = "students"


@dataclass(frozen=True)
class TeacherSource:
    """The files a teacher is read from and the architecture they hold."""

    backbone: Path
    heads: Path | None  # a file holding its heads (an export's heads file, or a training checkpoint itself)
    model: ModelConfig
    origin: str  # what the user named, for messages
    bare_file: bool = False  # a weights file: the architecture is the config's teacher.* keys


def _model_fields(cfg: TeacherConfig) -> ModelConfig:
    return ModelConfig(**{f.name: getattr(cfg, f.name) for f in fields(ModelConfig)})


def _distill_student_folder(run: Path, student: str) -> Path:
    """RUN/students/NAME of a distillation run: `student`, or the run's only student."""
    config = yaml.safe_load((run / "config.yaml").read_text()) or {}
    names = [s.get("name") for s in config.get("students") or []]
    if not student:
        if len(names) != 1:
            raise ConfigError(f"teacher.weights={run} is a distillation run with students {names}: set "
                              f"teacher.student to the one that teaches")
        student = names[0]
    if student not in names:
        raise ConfigError(f"teacher.student={student!r} is not a student of {run} (its students: {names})")
    return run / STUDENTS_DIR / student


def resolve_teacher(cfg: TeacherConfig) -> TeacherSource:
    """Where the teacher's weights are and which architecture they hold; a bad path is one clear error."""
    if not cfg.weights:
        raise ConfigError("teacher.weights is empty: give a pretrain or distillation run, an export folder or a "
                          "weights file (.pth / .safetensors)")
    path = Path(cfg.weights).expanduser()
    if path.is_file():
        return TeacherSource(path, path, _model_fields(cfg), str(path), bare_file=True)
    if not path.is_dir():
        raise FileNotFoundError(f"teacher.weights={path} does not exist: give a pretrain or distillation run, an "
                                "export folder or a weights file")
    if (path / STUDENTS_DIR).is_dir() and (path / "config.yaml").is_file():
        path = _distill_student_folder(path, cfg.student)
    try:
        folder = read_model_folder(path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"teacher.weights: {err}") from None
    return TeacherSource(folder.backbone, folder.heads, folder.model, str(path))


def _head_from_state(state: dict[str, Tensor], in_dim: int) -> DINOHead:
    """A DINOHead shaped like `state` (DINOv2's key layout: mlp.N.*, last_layer.weight_g/v)."""
    linear = sorted(int(m.group(1)) for k in state if (m := re.fullmatch(r"mlp\.(\d+)\.weight", k))
                    and state[k].ndim == 2)
    use_bn = any(k.endswith("running_mean") for k in state)
    out_dim, bottleneck = state["last_layer.weight_v"].shape
    nlayers = len(linear) if linear else 1
    hidden = state[f"mlp.{linear[0]}.weight"].shape[0] if nlayers > 1 else 2048
    bias = any(k.startswith("mlp") and k.endswith("bias") for k in state)
    head = DINOHead(in_dim, out_dim, use_bn=use_bn, nlayers=nlayers, hidden_dim=hidden, bottleneck_dim=bottleneck,
                    mlp_bias=bias)
    head.load_state_dict(state, strict=True)
    return head


def load_teacher(cfg: TeacherConfig, need_heads: bool) -> tuple[nn.ModuleDict, ModelConfig]:
    """The frozen teacher (`backbone`, and `dino_head` / `ibot_head` when its source has them) in eval mode, and its
    architecture. `need_heads` (the `dino` objective) makes a source without heads an error saying what to do."""
    source = resolve_teacher(cfg)
    backbone = build_backbone(source.model, drop_path=False)
    try:
        # a bare file's grid (official weights: 518 px) is resized to teacher.img_size; our exports fit theirs
        load_pretrained(backbone, source.backbone, ignore_heads=True, interpolate_pos_embed=source.bare_file)
    except CheckpointError as err:
        raise CheckpointError(f"teacher {source.origin} does not match its architecture (arch={source.model.arch}, "
                              f"depth={source.model.depth or 'default'}, patch_size={source.model.patch_size}, "
                              f"num_register_tokens={source.model.num_register_tokens}): {err}") from None
    modules: dict[str, nn.Module] = {"backbone": backbone}
    if source.heads is not None:
        try:
            heads = load_heads(source.heads)
        except CheckpointError:
            heads = {}  # a bare backbone file
        for name in ("dino_head", "ibot_head"):
            if name in heads:
                modules[name] = _head_from_state(heads[name], backbone.embed_dim)
    if need_heads and "dino_head" not in modules:
        raise ConfigError(f"teacher {source.origin} has no DINO head, which objective=dino learns from: use "
                          "objective=features (the teacher's tokens), or a teacher with heads (our pretrain runs and "
                          "exports, a DINOv2 training checkpoint)")
    teacher = nn.ModuleDict(modules).eval()
    teacher.requires_grad_(False)
    logger.info("teacher %s: %s/%d, %d blocks, width %d, heads %s", source.origin, source.model.arch,
                source.model.patch_size, len(backbone.blocks), backbone.embed_dim,
                sorted(modules.keys() - {"backbone"}))
    return teacher, source.model
