"""Loading and exporting ViT weights: any known layout in, the official DINOv2 layout out, strictly.

`load_pretrained(model, source)` reads a file without running pickled code, finds the state dict inside the
checkpoint container, separates heads from the backbone, converts the backbone to the official layout
(`weight_layouts.py`) and checks it key by key and shape by shape against the model before loading anything.
"""

from __future__ import annotations

import logging
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoforge.atomic import atomic_path
from dinoforge.models.weight_check import CheckpointError, CheckpointMismatchError, check_state_dict
from dinoforge.models.weight_layouts import detect_layout, normalise_head_keys, to_official

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "LoadResult",
    "export_official",
    "find_state_dict",
    "load_heads",
    "load_pretrained",
    "read_checkpoint",
    "resize_pos_embed",
    "save_safetensors",
    "split_heads",
]

logger = logging.getLogger(__name__)

HEAD_PREFIXES = ("dino_head", "ibot_head")
BACKBONE_PREFIX = "backbone."
# Module names that wrappers insert into keys: DDP (leading `module`), torch.compile, activation checkpointing, FSDP1.
_WRAPPER_COMPONENTS = ("_orig_mod", "_checkpoint_wrapped_module", "_fsdp_wrapped_module")
# Dicts a checkpoint may nest its state dict in, tried in this order: DINOv2's eval `teacher_checkpoint.pth`
# ({"teacher": ...}), fvcore/DINOv2 training checkpoints ({"model": ..., "optimizer": ...}), Lightning-style files.
_CONTAINER_KEYS = ("teacher", "model", "state_dict")
_PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")

StateDict = dict[str, Tensor]
Source = str | os.PathLike | Mapping


@dataclass(frozen=True)
class LoadResult:
    """What `load_pretrained` found and did."""

    source: str
    layout: str
    notes: tuple[str, ...] = ()
    ignored_heads: tuple[str, ...] = field(default=())


# -- reading ----------------------------------------------------------------------------------------------------------


def read_checkpoint(path: str | os.PathLike) -> object:
    """The object stored in a `.safetensors` or torch pickle file, read without executing any pickled code."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; pass a weights file (.safetensors, .pth, .pt, .bin)")
    if not path.exists():
        raise FileNotFoundError(f"weights file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except SafetensorError as err:
            raise CheckpointError(f"{path} is not a safetensors file ({err}); expected weights saved with "
                                  "safetensors (save_file)") from None
    if path.suffix not in _PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown weights format {path.suffix!r}; "
                              f"use .safetensors or a torch file ({', '.join(_PICKLE_SUFFIXES)})")
    # torch.save writes a zip archive (before torch 1.6, a pickle starting with byte 0x80); anything else, such as
    # a text file, would make torch.load fail with a misleading unpickling error or a bare KeyError.
    with open(path, "rb") as f:
        head = f.read(1)
    if not zipfile.is_zipfile(path) and head != b"\x80":
        raise _not_a_torch_checkpoint(path, "")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} contains pickled objects other than tensors and plain containers, and loading it would run "
            f"code from the file, which we never do. Re-save only its state dict (torch.save(model.state_dict())) or "
            f"convert it to safetensors in an environment you trust. ({str(err).splitlines()[0]})"
        ) from err
    except (RuntimeError, KeyError, EOFError) as err:
        # torch.load's errors for a file that is no torch archive at all (text, truncated download): KeyError or
        # RuntimeError from the zip reader, EOFError for an empty file.
        detail = f" ({str(err).splitlines()[0]})" if isinstance(err, RuntimeError) else ""  # KeyError: 101 says nothing
        raise _not_a_torch_checkpoint(path, detail) from None


def _not_a_torch_checkpoint(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"{path} is not a torch checkpoint{detail}; expected a file written by torch.save "
                           "(.pth/.pt/.bin) or a .safetensors file")


def _strip_wrappers(key: str) -> str:
    parts = [p for p in key.split(".") if p not in _WRAPPER_COMPONENTS]
    if parts and parts[0] == "module":
        parts = parts[1:]
    return ".".join(parts)


def find_state_dict(obj: object, checkpoint_key: str | None = None, where: str = "checkpoint") -> StateDict:
    """The flat {name: tensor} state dict inside a checkpoint object, with wrapper names removed from its keys.

    `checkpoint_key` is a dotted path of nested dict keys and/or key prefixes, e.g. "teacher", "model.student"
    (the student of a full DINOv2 training checkpoint). By default the teacher is taken wherever there is a choice.
    """
    path = checkpoint_key.split(".") if checkpoint_key else []
    trail: list[str] = []
    while True:
        if not isinstance(obj, Mapping):
            raise CheckpointError(f"{where}{''.join(f'[{t!r}]' for t in trail)} is a {type(obj).__name__}, "
                                  "not a dict of tensors")
        flat = all(isinstance(v, Tensor) for v in obj.values())
        if flat:
            obj = {_strip_wrappers(str(k)): v for k, v in obj.items()}
        if path:
            name = path.pop(0)
        elif flat:
            # A whole DINOv2 meta-architecture (`teacher.*`, `student.*`, loss centers): the teacher is the model.
            if not any(k.startswith("teacher.") for k in obj):
                break
            name = "teacher"
        else:
            name = next((k for k in _CONTAINER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if name is None:
                raise CheckpointError(
                    f"cannot find a state dict in {where}: top-level keys {sorted(map(str, obj))[:20]}; "
                    "pass checkpoint_key= naming the dict (or dotted path) that holds the weights"
                )
        if name in obj:
            obj, trail = obj[name], [*trail, name]
            continue
        prefixed = {k[len(name) + 1:]: v for k, v in obj.items() if str(k).startswith(name + ".")}
        if not prefixed:
            raise CheckpointError(f"{where}: no key or key prefix {name!r} (checkpoint_key={checkpoint_key!r}); "
                                  f"top-level names: {sorted({str(k).split('.')[0] for k in obj})[:20]}")
        left = sorted({str(k).split(".")[0] for k in obj if not str(k).startswith(name + ".")})
        logger.info("took the %r part of %s; not loading the rest: %s", name, where, left)
        obj, trail = prefixed, [*trail, name]
    sharded = [k for k in obj if "flat_param" in k]
    if sharded:
        raise CheckpointError(f"{where} is a sharded FSDP checkpoint ({sharded[0]}, ...): consolidate it to a full "
                              "state dict first (e.g. DINOv2's eval/*/teacher_checkpoint.pth holds one)")
    return dict(obj)


def split_heads(state: Mapping[str, Tensor]) -> tuple[StateDict, dict[str, StateDict]]:
    """(backbone state, {prefix: head state}). A training checkpoint's backbone is its `backbone.` part and every
    other top-level module is a head; in a flat backbone file, only `dino_head.*` / `ibot_head.*` keys are heads."""
    training = any(k.startswith(BACKBONE_PREFIX) for k in state)
    backbone: StateDict = {}
    heads: dict[str, StateDict] = {}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if training and key.startswith(BACKBONE_PREFIX):
            backbone[key[len(BACKBONE_PREFIX):]] = value
        elif rest and (training or prefix in HEAD_PREFIXES):
            heads.setdefault(prefix, {})[rest] = value
        else:
            backbone[key] = value
    return backbone, {name: normalise_head_keys(head) for name, head in heads.items()}


def _read_state(source: Source, checkpoint_key: str | None) -> tuple[StateDict, str]:
    if isinstance(source, Mapping):
        return find_state_dict(source, checkpoint_key, "the given state dict"), "<state dict>"
    if not isinstance(source, str | os.PathLike):
        raise TypeError(f"weights source must be a path or a state dict, not {type(source).__name__}")
    return find_state_dict(read_checkpoint(source), checkpoint_key, str(source)), str(source)


# -- loading ----------------------------------------------------------------------------------------------------------


def resize_pos_embed(pos_embed: Tensor, num_patches: int, antialias: bool = False) -> Tensor:
    """[1, 1 + n, D] position embeddings of a square grid -> [1, 1 + num_patches, D], bicubic, class position kept."""
    old, new = round((pos_embed.shape[1] - 1) ** 0.5), round(num_patches**0.5)
    if old * old != pos_embed.shape[1] - 1 or new * new != num_patches:
        raise CheckpointError(f"pos_embed {list(pos_embed.shape)} or the model's {num_patches} patches is not a "
                              "square grid; cannot interpolate")
    if old == new:
        return pos_embed
    grid = pos_embed[:, 1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def load_pretrained(
    model: nn.Module,
    source: Source,
    *,
    ignore_heads: bool = False,
    interpolate_pos_embed: bool = False,
    checkpoint_key: str | None = None,
) -> LoadResult:
    """Load backbone weights into `model`, strictly, from a file or an in-memory state dict in any known layout:
    official DINOv2 hub, DINOv2 training (teacher, `backbone.` prefix, chunked blocks), timm, Hugging Face, or our
    safetensors export.

    A checkpoint with heads (`dino_head`, `ibot_head`) is an error unless `ignore_heads=True` (load them with
    `load_heads`). `interpolate_pos_embed=True` resizes a stored position grid of another resolution to the model's.
    Missing, unexpected or mis-shaped keys raise `CheckpointMismatchError` listing them; nothing is loaded then.
    A model on the meta device receives the checkpoint tensors themselves (no copy).
    """
    state, origin = _read_state(source, checkpoint_key)
    backbone, heads = split_heads(state)
    known_heads = sorted(h for h in heads if h in HEAD_PREFIXES)
    other = {f"{h}.{k}": v for h, head in heads.items() if h not in HEAD_PREFIXES for k, v in head.items()}
    if known_heads and not ignore_heads:
        sizes = ", ".join(f"{h} ({len(heads[h])} tensors)" for h in known_heads)
        raise CheckpointError(f"{origin} holds heads besides the backbone: {sizes}. Pass ignore_heads=True to load "
                              "the backbone alone, and load_heads() to get the heads for their own modules")
    layout = detect_layout(backbone)
    official, notes = to_official(backbone, layout)
    # Non-head modules of a training checkpoint are never dropped: they reach the check as unexpected keys.
    official.update(other)
    expected = model.state_dict()
    if interpolate_pos_embed and "pos_embed" in official and "pos_embed" in expected:
        target = expected["pos_embed"].shape[1] - 1
        if official["pos_embed"].shape[1] - 1 != target:
            official["pos_embed"] = resize_pos_embed(official["pos_embed"], target,
                                                     antialias=getattr(model, "interpolate_antialias", False))
            notes.append(f"pos_embed interpolated to {target} patches")
    check_state_dict(expected, official, origin=f"{origin} (layout {layout})",
                     patch_size=getattr(model, "patch_size", None))
    assign = any(t.is_meta for t in expected.values())
    model.load_state_dict(official, strict=True, assign=assign)
    ignored = tuple(known_heads) if ignore_heads else ()
    for note in notes:
        logger.info("%s: %s", origin, note)
    logger.info("loaded %d tensors from %s (layout %s)%s", len(official), origin, layout,
                f", heads ignored: {', '.join(ignored)}" if ignored else "")
    return LoadResult(source=origin, layout=layout, notes=tuple(notes), ignored_heads=ignored)


def load_heads(source: Source, *, checkpoint_key: str | None = None) -> dict[str, StateDict]:
    """{prefix: state dict} of the heads in a training checkpoint or a heads file (`dino_head`, `ibot_head`, ...),
    keys relative to the head module, with weight-norm keys in DINOv2's `weight_g`/`weight_v` names."""
    state, origin = _read_state(source, checkpoint_key)
    _, heads = split_heads(state)
    if not heads:
        raise CheckpointError(f"{origin} holds no heads (only backbone weights); heads come from a DINOv2 training "
                              "checkpoint (teacher/student dict) or from our heads export")
    return heads


# -- exporting --------------------------------------------------------------------------------------------------------


def export_official(model: nn.Module) -> StateDict:
    """The model's weights in the official DINOv2 key layout: CPU, contiguous, detached, wrapper names removed
    (torch.compile, activation checkpointing, DDP) and FSDP2 DTensors gathered to full tensors.

    Tensors of a CPU model share memory with it; clone them before modifying them.
    """
    out: StateDict = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "full_tensor"):  # a DTensor of an FSDP2-sharded model (collective: call on every rank)
            value = value.full_tensor()
        out[_strip_wrappers(key)] = value.detach().cpu().contiguous()
    return out


def save_safetensors(state: Mapping[str, Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write a state dict (e.g. `export_official(model)`) as safetensors, atomically (temporary file + rename).

    `metadata` values must be strings (serialise anything else, e.g. with json.dumps).
    """
    from safetensors.torch import save_file

    bad = {k: type(v).__name__ for k, v in (metadata or {}).items() if not isinstance(v, str)}
    if bad:
        raise TypeError(f"safetensors metadata values must be str; got {bad}: serialise them (json.dumps) first")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", **(metadata or {})})
    return path
