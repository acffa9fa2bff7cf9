"""Strict comparison of a checkpoint state dict with a model's: every missing, unexpected or mis-shaped key listed,
with hints on which model argument explains the difference."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from torch import Tensor

from dinoforge.errors import CheckpointError, CheckpointMismatchError  # noqa: F401  (weights.py imports both here)

_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")
_MAX_LINES = 24


def summarise_keys(keys: list[str]) -> list[str]:
    """Keys with per-block repeats folded: blocks.{2,3}.mlp.fc1.weight -> 'blocks.[2-3].mlp.fc1.weight'."""
    per_suffix: dict[str, list[int]] = {}
    lines = []
    for key in keys:
        match = _BLOCK_KEY.match(key)
        if match:
            per_suffix.setdefault(match[2], []).append(int(match[1]))
        else:
            lines.append(key)
    for suffix, blocks in per_suffix.items():
        lines.append(f"blocks.[{_ranges(sorted(set(blocks)))}].{suffix}" if len(blocks) > 1 else
                     f"blocks.{blocks[0]}.{suffix}")
    if len(lines) > _MAX_LINES:
        lines = lines[:_MAX_LINES] + [f"... and {len(lines) - _MAX_LINES} more"]
    return lines


def _ranges(values: list[int]) -> str:
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _depth(keys) -> int:
    return 1 + max((int(m[1]) for k in keys if (m := _BLOCK_KEY.match(k))), default=-1)


def mismatch_hints(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], patch_size: int | None) -> list[str]:
    """Model arguments that would explain the differences between the model's state and the checkpoint's."""
    hints = []
    exp_dim, got_dim = (s["cls_token"].shape[-1] if "cls_token" in s else None for s in (expected, state))
    if exp_dim and got_dim and exp_dim != got_dim:
        hints.append(f"checkpoint width (embed_dim) is {got_dim}, the model's {exp_dim}: build the matching size "
                     "(vit_small 384, vit_base 768, vit_large 1024, vit_giant2 1536)")
    if _depth(expected) != _depth(state):
        hints.append(f"checkpoint has {_depth(state)} blocks, the model {_depth(expected)}: pass depth= or pick "
                     "the matching size")
    regs = state.get("register_tokens")
    model_regs = expected.get("register_tokens")
    if (regs is None) != (model_regs is None) or (regs is not None and regs.shape != model_regs.shape):
        n = 0 if regs is None else regs.shape[1]
        hints.append(f"checkpoint has {n} register tokens: build the model with num_register_tokens={n}")
    if any(k.endswith("mlp.w12.weight") for k in state) and any(k.endswith("mlp.fc1.weight") for k in expected):
        hints.append("checkpoint uses a SwiGLU FFN (mlp.w12/w3): build the model with ffn_layer='swiglufused'")
    if any(k.endswith("mlp.fc1.weight") for k in state) and any(k.endswith("mlp.w12.weight") for k in expected):
        hints.append("checkpoint uses a plain MLP FFN (mlp.fc1/fc2): build the model with ffn_layer='mlp'")
    if any(k.endswith("ls1.gamma") for k in state) != any(k.endswith("ls1.gamma") for k in expected):
        hints.append("LayerScale (ls1/ls2.gamma) present in only one of them: set init_values (1.0 for DINOv2) "
                     "or init_values=None to match")
    proj, model_proj = state.get("patch_embed.proj.weight"), expected.get("patch_embed.proj.weight")
    if proj is not None and model_proj is not None and proj.shape[-2:] != model_proj.shape[-2:]:
        hints.append(f"checkpoint patch size is {proj.shape[-1]}, the model's {model_proj.shape[-1]}: pass "
                     f"patch_size={proj.shape[-1]}")
    pos, model_pos = state.get("pos_embed"), expected.get("pos_embed")
    if pos is not None and model_pos is not None and pos.shape[1] != model_pos.shape[1]:
        side = math.isqrt(pos.shape[1] - 1)
        size = f"img_size={side * patch_size}" if patch_size and side * side == pos.shape[1] - 1 else "its img_size"
        hints.append(f"pos_embed {list(pos.shape)} vs model {list(model_pos.shape)}: build the model with {size} "
                     "or pass interpolate_pos_embed=True")
    return hints


def check_state_dict(expected: Mapping[str, Tensor], state: Mapping[str, Tensor], origin: str,
                     patch_size: int | None = None) -> None:
    """Raise `CheckpointMismatchError` unless `state` has exactly the keys and shapes of `expected`."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in expected.items()
                  if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if not (missing or unexpected or mismatched):
        return
    lines = [f"{origin} does not match the model:"]
    if missing:
        lines.append(f"  missing ({len(missing)} in the model, not in the checkpoint):")
        lines += [f"    {k}" for k in summarise_keys(missing)]
    if unexpected:
        lines.append(f"  unexpected ({len(unexpected)} in the checkpoint, not in the model):")
        lines += [f"    {k}" for k in summarise_keys(unexpected)]
    if mismatched:
        lines.append(f"  mis-shaped ({len(mismatched)}):")
        lines += [f"    {k}: checkpoint {list(got)} vs model {list(want)}" for k, got, want in mismatched[:_MAX_LINES]]
        if len(mismatched) > _MAX_LINES:
            lines.append(f"    ... and {len(mismatched) - _MAX_LINES} more")
    hints = mismatch_hints(expected, state, patch_size)
    if hints:
        lines.append("  hints:")
        lines += [f"    - {h}" for h in hints]
    raise CheckpointMismatchError("\n".join(lines), missing, unexpected, mismatched)
