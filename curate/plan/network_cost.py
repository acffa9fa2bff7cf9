"""What one image costs the configured embedding network: forward FLOPs (from its architecture, by the analytic ViT
count of `dinoforge.models.flops`, which tests hold equal to torch's FLOP counter), parameters and output dim.

Our ViTs are built on the meta device (no memory, no weights read) so the widths and depths are the constructors'
own; open_clip towers are read from open_clip's model config. The weight-free copydetect descriptor has no network
to count: the plan times it at its measured CPU rate instead.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from curate.embedding.config import EmbedConfig, embed_image_size, own_model_config


@dataclass(frozen=True)
class NetworkCost:
    name: str
    flops_per_image: int  # forward, one image at the configured input size
    params: int
    dim: int  # embedding width (what is stored per image)


def network_cost(cfg: EmbedConfig) -> NetworkCost | None:
    """The network's cost per image; None for copydetect (no network). ValueError naming the key when the
    architecture is unknown."""
    if cfg.kind == "copydetect":
        return None
    if cfg.kind == "open_clip":
        return _open_clip_cost(cfg)
    return _vit_cost(cfg)


def copydetect_dim() -> int:
    """The descriptor's width (it is computed by running the descriptor once on a blank image)."""
    from curate.embedding.copydetect import CopyDetectDescriptor

    return CopyDetectDescriptor().dim


def _vit_cost(cfg: EmbedConfig) -> NetworkCost:
    import torch

    from dinoforge.models.flops import vit_forward_flops_analytic
    from dinoforge.models.vision_transformer import ARCHITECTURES

    size = embed_image_size(cfg)
    own = own_model_config(cfg)
    if own:  # one of our runs, exports or releases: its own architecture, not the embed.* fields
        cfg = replace(cfg, **{key: getattr(own, key) for key in
                              ("arch", "depth", "patch_size", "num_register_tokens", "ffn_layer")})
    if cfg.arch not in ARCHITECTURES:
        raise ValueError(f"embed.arch={cfg.arch!r}: use one of {', '.join(ARCHITECTURES)}")
    extra = {"depth": cfg.depth} if cfg.depth else {}
    with torch.device("meta"):
        model = ARCHITECTURES[cfg.arch](patch_size=cfg.patch_size, num_register_tokens=cfg.num_register_tokens,
                                        img_size=size, ffn_layer=cfg.ffn_layer, **extra)
    flops = vit_forward_flops_analytic(embed_dim=model.embed_dim, depth=len(model.blocks), patch_size=cfg.patch_size,
                                       crops=[(1, 3, size, size)],
                                       num_register_tokens=cfg.num_register_tokens, ffn_layer=cfg.ffn_layer)
    params = sum(p.numel() for p in model.parameters())
    return NetworkCost(f"{cfg.arch}/{cfg.patch_size} at {size} px", flops, params, model.embed_dim)


def _open_clip_cost(cfg: EmbedConfig) -> NetworkCost:
    from dinoforge.models.flops import vit_forward_flops_analytic

    try:
        import open_clip
    except ImportError:
        raise ValueError("embed.kind=open_clip needs open_clip_torch installed to read its architecture") from None
    arch = open_clip.get_model_config(cfg.open_clip_model)
    vision = (arch or {}).get("vision_cfg", {})
    if "width" not in vision or "layers" not in vision or "patch_size" not in vision:
        raise ValueError(f"embed.open_clip_model={cfg.open_clip_model!r}: not a ViT open_clip knows "
                         "(the plan counts ViT towers only)")
    width, layers, patch = int(vision["width"]), int(vision["layers"]), int(vision["patch_size"])
    size = embed_image_size(cfg)
    mlp_ratio = float(vision.get("mlp_ratio", 4.0))
    flops = vit_forward_flops_analytic(embed_dim=width, depth=layers, patch_size=patch,
                                       crops=[(1, 3, size, size)], mlp_ratio=mlp_ratio)
    hidden = int(width * mlp_ratio)
    # per block: qkv + projection (4 w^2) and the MLP (2 w h), biases and norms left out (< 1%)
    params = layers * (4 * width * width + 2 * width * hidden) + 3 * patch * patch * width
    return NetworkCost(f"open_clip {cfg.open_clip_model} at {size} px", flops, params,
                       int(arch["embed_dim"]))
