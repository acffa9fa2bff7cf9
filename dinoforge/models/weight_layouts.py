"""Foreign state-dict layouts of the DINOv2 ViT, recognised from their keys and converted to the official layout.

The official layout (facebookresearch/dinov2 hub checkpoints) is what `DinoVisionTransformer.state_dict()` holds.
The other layouts met in practice:

- chunked: DINOv2 training with `block_chunks > 0` stores block i of chunk c as `blocks.c.i.*` (the chunks are
  padded with Identity modules so that i stays the global block index).
- timm `vit_*_dinov2`: official names, but no `mask_token`; register models keep `reg_token` and fold the class
  position into `cls_token` (`no_embed_class`: `pos_embed` covers the patches only); ViT-g packs SwiGLU into
  `mlp.fc1`/`mlp.fc2` (gate first, as in `w12`).
- Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel`: `embeddings.*`, `encoder.layer.N.*`, separate q/k/v,
  `layer_scale{1,2}.lambda1`; hub files (transformers 4) name them `attention.attention.{query,key,value}`,
  `attention.output.dense`, `mlp.weights_in/weights_out`, transformers 5 in memory `attention.{q,k,v,o}_proj`,
  `mlp.{gate,up,down}_proj`.

Converters rename what they know and pass every other key through unchanged, so that the strict check that follows
reports it under its original name.

Converted weights reproduce the source model exactly at its native resolution. At other resolutions each library
resizes position embeddings its own way (official: bicubic with a legacy 0.1 offset, antialiased without offset for
register models; Hugging Face: bicubic to the target size, no antialiasing; timm: its own resampling of the patch
grid), so outputs there differ slightly between libraries. Layer-norm epsilon is 1e-6 everywhere (HF configs set it).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch
from torch import Tensor

OFFICIAL, CHUNKED, TIMM, HF = "official", "official_chunked", "timm", "hf"
LAYOUTS = (OFFICIAL, CHUNKED, TIMM, HF)

_CHUNKED_BLOCK = re.compile(r"^blocks\.(\d+)\.(\d+)\.(.+)$")
_TIMM_PACKED_FC = re.compile(r"^blocks\.(\d+)\.mlp\.fc([12])\.(weight|bias)$")

# (pattern, replacement) applied to the first matching pattern of each Hugging Face key.
_HF_RENAMES = [
    (re.compile(r"^embeddings\.cls_token$"), "cls_token"),
    (re.compile(r"^embeddings\.mask_token$"), "mask_token"),
    (re.compile(r"^embeddings\.position_embeddings$"), "pos_embed"),
    (re.compile(r"^embeddings\.register_tokens$"), "register_tokens"),
    (re.compile(r"^embeddings\.patch_embeddings\.projection\.(weight|bias)$"), r"patch_embed.proj.\1"),
    (re.compile(r"^layernorm\.(weight|bias)$"), r"norm.\1"),
    (re.compile(r"^encoder\.layer\.(\d+)\.norm([12])\.(weight|bias)$"), r"blocks.\1.norm\2.\3"),
    (re.compile(r"^encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$"), r"blocks.\1.ls\2.gamma"),
    (re.compile(r"^encoder\.layer\.(\d+)\.attention\.(?:output\.dense|o_proj)\.(weight|bias)$"),
     r"blocks.\1.attn.proj.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$"), r"blocks.\1.mlp.\2.\3"),
    (re.compile(r"^encoder\.layer\.(\d+)\.mlp\.weights_in\.(weight|bias)$"), r"blocks.\1.mlp.w12.\2"),
    (re.compile(r"^encoder\.layer\.(\d+)\.mlp\.(?:weights_out|down_proj)\.(weight|bias)$"), r"blocks.\1.mlp.w3.\2"),
]
# Separate Hugging Face projections that the official layout stores fused, in the order they are concatenated.
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.(?:attention\.)?(query|key|value|q_proj|k_proj|v_proj)"
                     r"\.(weight|bias)$")
_HF_GATE_UP = re.compile(r"^encoder\.layer\.(\d+)\.mlp\.(gate_proj|up_proj)\.(weight|bias)$")
_PART_INDEX = {"query": 0, "q_proj": 0, "key": 1, "k_proj": 1, "value": 2, "v_proj": 2, "gate_proj": 0, "up_proj": 1}


class LayoutError(ValueError):
    """A state dict that looks like a known layout but cannot be converted (e.g. a q projection without its k)."""


def detect_layout(state: Mapping[str, Tensor]) -> str:
    """The layout of a backbone state dict (no `backbone.` prefix, no heads): one of `LAYOUTS`."""
    keys = state.keys()
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in keys):
        return HF
    if any(_CHUNKED_BLOCK.match(k) for k in keys):
        return CHUNKED
    if "reg_token" in keys or _timm_packed_swiglu_blocks(state):
        return TIMM
    if "cls_token" in keys and "mask_token" not in keys:
        return TIMM
    return OFFICIAL


def to_official(state: Mapping[str, Tensor], layout: str) -> tuple[dict[str, Tensor], list[str]]:
    """Convert a backbone state dict from `layout` to the official layout; also return notes on what was changed
    beyond renaming (filled-in or reshaped tensors), for the log."""
    if layout == OFFICIAL:
        return dict(state), []
    if layout == CHUNKED:
        return unchunk_blocks(state), ["un-chunked blocks.C.I keys"]
    if layout == TIMM:
        return timm_to_official(state)
    if layout == HF:
        return hf_to_official(state)
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


def unchunk_blocks(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """`blocks.C.I.rest` -> `blocks.I.rest` (I is already the global block index in DINOv2's BlockChunk)."""
    out: dict[str, Tensor] = {}
    chunk_of: dict[int, int] = {}
    for key, value in state.items():
        match = _CHUNKED_BLOCK.match(key)
        if not match:
            out[key] = value
            continue
        chunk, index, rest = int(match[1]), int(match[2]), match[3]
        if chunk_of.setdefault(index, chunk) != chunk:
            raise LayoutError(f"block {index} appears in chunks {chunk_of[index]} and {chunk} ({key}): "
                              "not a DINOv2 chunked checkpoint")
        out[f"blocks.{index}.{rest}"] = value
    return out


def _timm_packed_swiglu_blocks(state: Mapping[str, Tensor]) -> set[int]:
    """Blocks whose timm `mlp.fc1` holds gate and value packed (twice the rows that `mlp.fc2` takes as input)."""
    packed = set()
    for key, value in state.items():
        match = _TIMM_PACKED_FC.match(key)
        if match and match[2] == "1" and match[3] == "weight":
            fc2 = state.get(f"blocks.{match[1]}.mlp.fc2.weight")
            if fc2 is not None and value.shape[0] == 2 * fc2.shape[1]:
                packed.add(int(match[1]))
    return packed


def timm_to_official(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """timm `vit_*_dinov2` -> official (see the module docstring for the differences)."""
    notes: list[str] = []
    packed = _timm_packed_swiglu_blocks(state)
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        match = _TIMM_PACKED_FC.match(key)
        if key == "reg_token":
            out["register_tokens"] = value
        elif match and int(match[1]) in packed:
            out[f"blocks.{match[1]}.mlp.{'w12' if match[2] == '1' else 'w3'}.{match[3]}"] = value
        else:
            out[key] = value
    if packed:
        notes.append(f"timm packed SwiGLU mlp.fc1/fc2 -> mlp.w12/w3 in {len(packed)} blocks")
    pos = out.get("pos_embed")
    if pos is not None and pos.dim() == 3 and math.isqrt(pos.shape[1]) ** 2 == pos.shape[1]:
        # no_embed_class: timm added the class position into cls_token, so a zero class position is exact.
        out["pos_embed"] = torch.cat([pos.new_zeros(1, 1, pos.shape[2]), pos], dim=1)
        notes.append("timm pos_embed without a class position: prepended a zero class position")
    if "mask_token" not in out and "cls_token" in out:
        # timm drops the iBOT mask token; zeros is its DINOv2 initial value and it only matters for masked inputs.
        cls = out["cls_token"]
        out["mask_token"] = cls.new_zeros(1, cls.shape[-1])
        notes.append("timm stores no mask_token: set to zeros (only used for masked inputs)")
    return out, notes


def hf_to_official(state: Mapping[str, Tensor]) -> tuple[dict[str, Tensor], list[str]]:
    """Hugging Face `Dinov2Model` / `Dinov2WithRegistersModel` (transformers 4 or 5 names) -> official."""
    out: dict[str, Tensor] = {}
    parts_of: dict[str, dict[int, tuple[str, Tensor]]] = {}  # fused target -> {part index: (source key, tensor)}
    for key, value in state.items():
        qkv, gate_up = _HF_QKV.match(key), _HF_GATE_UP.match(key)
        if qkv or gate_up:
            match = qkv or gate_up
            target = f"blocks.{match[1]}.{'attn.qkv' if qkv else 'mlp.w12'}.{match[3]}"
            parts_of.setdefault(target, {})[_PART_INDEX[match[2]]] = (key, value)
            continue
        for pattern, replacement in _HF_RENAMES:
            if pattern.match(key):
                out[pattern.sub(replacement, key)] = value
                break
        else:
            out[key] = value
    for target, parts in parts_of.items():
        count = 3 if ".attn.qkv." in target else 2
        if sorted(parts) != list(range(count)):
            names = "q, k and v" if count == 3 else "gate and up"
            raise LayoutError(f"Hugging Face projections {sorted(k for k, _ in parts.values())} are incomplete: "
                              f"{target} needs all of {names}")
        out[target] = torch.cat([parts[i][1] for i in range(count)], dim=0)
    return out, ["Hugging Face separate projections fused into attn.qkv / mlp.w12"] if parts_of else []


def normalise_head_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Weight-norm keys of torch's parametrization API (`last_layer.parametrizations.weight.original0/1`) -> the
    `weight_g`/`weight_v` names that DINOv2 heads (and ours) use; everything else unchanged."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"parametrizations\.weight\.original0$", "weight_g", key)
        out[re.sub(r"parametrizations\.weight\.original1$", "weight_v", key)] = value
    return out
