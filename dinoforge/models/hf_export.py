"""Our ViT as a Hugging Face transformers folder (`config.json` + `model.safetensors`) for `AutoModel.from_pretrained`.

The weights are written under the hub-file names that transformers' `save_pretrained` writes (the transformers 4
names: `encoder.layer.N.attention.attention.{query,key,value}`, `attention.output.dense`, `mlp.weights_in/out`);
transformers 5 renames them on load (its conversion mapping for `Dinov2Model` / `Dinov2WithRegistersModel`: q/k/v/o
projections, `weights_in` chunked into `gate_proj` and `up_proj`), and transformers 4 reads them as they are.
`official_to_hf` is the exact inverse of `weight_layouts.hf_to_official` on the official layout.

What Hugging Face's DINOv2 can represent, and what it cannot:
- SwiGLU: its hidden width is `(int(int(D * mlp_ratio) * 2 / 3) + 7) // 8 * 8`, the same rule as ours
  (`ffn.swiglu_hidden_features`), gate first as in our fused `w12`. `mlp_ratio` must be an integer (its config is a
  strict dataclass with `mlp_ratio: int`).
- LayerScale: always applied; a model without LayerScale is written with lambda1 = ones (exact).
- Biases: the attention output and FFN linears always have one (`proj_bias` / `ffn_bias` False cannot be written);
  `qkv_bias` is a config field.
- Position embeddings: at the model's position-grid size (`image_size` in the config) neither library interpolates
  and the outputs agree to float rounding. At other sizes Hugging Face resizes bicubically to the target grid
  (`Dinov2Model` without antialiasing, `Dinov2WithRegistersModel` with it), while ours follows DINOv2
  (`interpolate_offset`: the legacy scale-factor form with a 0.1 offset; `interpolate_antialias`), so outputs there
  agree only for a model with `interpolate_offset=0` and `interpolate_antialias` False (no registers) or True
  (registers), and differ slightly otherwise.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from dinoforge.atomic import atomic_write_text
from dinoforge.models.ffn import Mlp, SwiGLUFFN, swiglu_hidden_features
from dinoforge.models.layer_scale import LayerScale
from dinoforge.models.vision_transformer import DinoVisionTransformer
from dinoforge.models.weight_layouts import LayoutError
from dinoforge.models.weights import export_official, save_safetensors

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
LAYER_NORM_EPS = 1e-6
_MAX_MLP_RATIO = 64  # search bound when recovering an integer mlp_ratio from a SwiGLU width

# official key -> hub-file key, the inverse of weight_layouts._HF_RENAMES (first match wins).
_OFFICIAL_RENAMES = [
    (re.compile(r"^cls_token$"), "embeddings.cls_token"),
    (re.compile(r"^mask_token$"), "embeddings.mask_token"),
    (re.compile(r"^pos_embed$"), "embeddings.position_embeddings"),
    (re.compile(r"^register_tokens$"), "embeddings.register_tokens"),
    (re.compile(r"^patch_embed\.proj\.(weight|bias)$"), r"embeddings.patch_embeddings.projection.\1"),
    (re.compile(r"^norm\.(weight|bias)$"), r"layernorm.\1"),
    (re.compile(r"^blocks\.(\d+)\.norm([12])\.(weight|bias)$"), r"encoder.layer.\1.norm\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.ls([12])\.gamma$"), r"encoder.layer.\1.layer_scale\2.lambda1"),
    (re.compile(r"^blocks\.(\d+)\.attn\.proj\.(weight|bias)$"), r"encoder.layer.\1.attention.output.dense.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.(fc[12])\.(weight|bias)$"), r"encoder.layer.\1.mlp.\2.\3"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.w12\.(weight|bias)$"), r"encoder.layer.\1.mlp.weights_in.\2"),
    (re.compile(r"^blocks\.(\d+)\.mlp\.w3\.(weight|bias)$"), r"encoder.layer.\1.mlp.weights_out.\2"),
]
_OFFICIAL_QKV = re.compile(r"^blocks\.(\d+)\.attn\.qkv\.(weight|bias)$")
_OFFICIAL_NORM1 = re.compile(r"^blocks\.(\d+)\.norm1\.weight$")


def hf_config(model: DinoVisionTransformer) -> dict:
    """The transformers `config.json` of `model`, read from its modules; ValueError naming the setting that
    Hugging Face's DINOv2 cannot represent (see the module docstring)."""
    if not isinstance(model, DinoVisionTransformer):
        raise TypeError(f"expected a DinoVisionTransformer, got {type(model).__name__}")
    dim, blocks = model.embed_dim, list(model.blocks)
    kinds = {type(blk.mlp) for blk in blocks}
    if len(kinds) != 1:
        raise ValueError(f"blocks mix FFN kinds {sorted(k.__name__ for k in kinds)}: Hugging Face DINOv2 has one")
    mlp = blocks[0].mlp
    if isinstance(mlp, Mlp):
        if not isinstance(mlp.act, torch.nn.GELU) or mlp.act.approximate != "none":
            raise ValueError(f"ffn activation {mlp.act}: Hugging Face DINOv2 uses exact GELU (hidden_act='gelu')")
        hidden, swiglu = mlp.fc1.out_features, False
        ratio = hidden // dim if hidden % dim == 0 else None
    elif isinstance(mlp, SwiGLUFFN):
        hidden, swiglu = mlp.w3.in_features, True
        ratio = next((r for r in range(1, _MAX_MLP_RATIO + 1) if swiglu_hidden_features(dim * r) == hidden), None)
    else:
        raise ValueError(f"ffn_layer {type(mlp).__name__}: Hugging Face DINOv2 has only 'mlp' and 'swiglufused'")
    if ratio is None:
        raise ValueError(f"ffn hidden width {hidden} for embed_dim {dim} is no integer mlp_ratio: Hugging Face "
                         "DINOv2's config holds mlp_ratio as an int")
    if any(blk.attn.proj.bias is None for blk in blocks):
        raise ValueError("proj_bias=False: Hugging Face DINOv2's attention output projection always has a bias")
    if any(linear.bias is None for blk in blocks for linear in _ffn_linears(blk.mlp)):
        raise ValueError("ffn_bias=False: Hugging Face DINOv2's FFN linears always have biases")
    qkv_bias = {blk.attn.qkv.bias is not None for blk in blocks}
    if len(qkv_bias) != 1:
        raise ValueError("qkv_bias differs between blocks: Hugging Face DINOv2 has one qkv_bias setting")
    heads = {blk.attn.num_heads for blk in blocks}
    if heads != {model.num_heads}:
        raise ValueError(f"num_heads differs between blocks ({sorted(heads)}): Hugging Face DINOv2 has one")
    eps = {m.eps for blk in blocks for m in (blk.norm1, blk.norm2)} | {model.norm.eps}
    if eps != {LAYER_NORM_EPS}:
        raise ValueError(f"layer-norm eps {sorted(eps)}: the exported config sets layer_norm_eps {LAYER_NORM_EPS}")
    positions = model.pos_embed.shape[1] - 1
    side = math.isqrt(positions)
    if side * side != positions:
        raise ValueError(f"pos_embed holds {positions} patch positions, not a square grid: Hugging Face DINOv2 "
                         "needs a square image_size")
    registers = model.num_register_tokens
    config = {
        "architectures": ["Dinov2WithRegistersModel" if registers else "Dinov2Model"],
        "model_type": "dinov2_with_registers" if registers else "dinov2",
        "hidden_size": dim,
        "num_hidden_layers": len(blocks),
        "num_attention_heads": model.num_heads,
        "mlp_ratio": ratio,
        "use_swiglu_ffn": swiglu,
        "hidden_act": "gelu",
        "qkv_bias": qkv_bias.pop(),
        "layerscale_value": 1.0,  # the init value only; the weights hold every lambda1
        "layer_norm_eps": LAYER_NORM_EPS,
        "image_size": model.patch_size * side,
        "patch_size": model.patch_size,
        "num_channels": model.patch_embed.proj.in_channels,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "drop_path_rate": 0.0,
        "initializer_range": 0.02,
        "dtype": str(model.pos_embed.dtype).removeprefix("torch."),
    }
    if registers:
        config["num_register_tokens"] = registers
    return config


def _ffn_linears(mlp) -> tuple:
    return (mlp.fc1, mlp.fc2) if isinstance(mlp, Mlp) else (mlp.w12, mlp.w3)


def official_to_hf(state: Mapping[str, Tensor], *, fill_layer_scale: bool = False) -> dict[str, Tensor]:
    """Official DINOv2 keys (`export_official(model)`) -> Hugging Face hub-file keys, the exact inverse of
    `weight_layouts.hf_to_official`: fused `attn.qkv` is split into query/key/value (copies, so that no two tensors
    share memory in a safetensors file). With `fill_layer_scale`, blocks without `ls1`/`ls2` get lambda1 = ones
    (Hugging Face always applies LayerScale); the result then no longer round-trips to `state`. A key that has no
    Hugging Face name raises LayoutError naming it."""
    out: dict[str, Tensor] = {}
    unknown = []
    for key, value in state.items():
        qkv = _OFFICIAL_QKV.match(key)
        if qkv:
            prefix = f"encoder.layer.{qkv[1]}.attention.attention"
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}.{name}.{qkv[2]}"] = part.clone()
            continue
        for pattern, replacement in _OFFICIAL_RENAMES:
            if pattern.match(key):
                out[pattern.sub(replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise LayoutError(f"no Hugging Face name for {sorted(unknown)}: official_to_hf converts a DINOv2 backbone "
                          "(no heads, no training state)")
    if fill_layer_scale:
        for key, weight in state.items():
            block = _OFFICIAL_NORM1.match(key)
            if block:
                for i in (1, 2):
                    out.setdefault(f"encoder.layer.{block[1]}.layer_scale{i}.lambda1", torch.ones_like(weight))
    return out


def write_hf_folder(model: DinoVisionTransformer, out_dir: str | Path) -> Path:
    """Write `out_dir/config.json` and `out_dir/model.safetensors` for `transformers.AutoModel.from_pretrained`
    (a `Dinov2Model`, or `Dinov2WithRegistersModel` with registers). Deterministic: the same model gives the same
    bytes (sorted JSON without timestamps or versions; safetensors orders tensors itself). Returns `out_dir`."""
    config = hf_config(model)  # raises before anything is written
    has_layer_scale = all(isinstance(blk.ls1, LayerScale) and isinstance(blk.ls2, LayerScale) for blk in model.blocks)
    state = official_to_hf(export_official(model), fill_layer_scale=not has_layer_scale)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(state, out_dir / WEIGHTS_FILE)
    atomic_write_text(out_dir / CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out_dir
