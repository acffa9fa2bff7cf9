"""The DINOv2 Vision Transformer: patch tokens + CLS + registers, pre-norm blocks, packed multi-crop forward.

State-dict keys are identical to the official DINOv2 backbones (`cls_token`, `pos_embed`, `register_tokens`,
`mask_token`, `patch_embed.proj`, `blocks.N.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.*,ls2.gamma}`, `norm`),
so official checkpoints load without renaming (see `weights.py` for the other layouts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dinoforge.models.block import Block
from dinoforge.models.packing import TokenLayout
from dinoforge.models.patch_embed import PatchEmbed


class DinoVisionTransformer(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = 1.0,
        ffn_layer: str = "mlp",
        block_chunks: int = 0,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attn_backend: str = "auto",
        efficient_drop_path: bool = True,
    ) -> None:
        """DINOv2's arguments by name. `block_chunks` is accepted so reference code ports unchanged; blocks are
        never chunked here (FSDP2 shards per block) and chunked checkpoints are un-chunked on load."""
        super().__init__()
        del block_chunks
        self.embed_dim = self.num_features = embed_dim
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.n_blocks = depth
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        # linear decay rule of stochastic depth, in Python so the model also builds on the meta device
        rates = [drop_path_rate if drop_path_uniform else drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        block = partial(Block, dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                        proj_bias=proj_bias, ffn_bias=ffn_bias, init_values=init_values, ffn_layer=ffn_layer,
                        attn_backend=attn_backend, efficient_drop_path=efficient_drop_path)
        self.blocks = nn.ModuleList([block(drop_path=rate) for rate in rates])
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.init_weights()

    def init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.register_tokens is not None:
            nn.init.normal_(self.register_tokens, std=1e-6)
        nn.init.zeros_(self.mask_token)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def set_attn_backend(self, backend: str) -> None:
        for blk in self.blocks:
            blk.attn.backend = backend

    def set_efficient_drop_path(self, enabled: bool) -> None:
        for blk in self.blocks:
            blk.efficient_drop_path = enabled

    # -- tokens ---------------------------------------------------------------------------------------------------

    def interpolate_pos_encoding(self, h_patches: int, w_patches: int, dtype: torch.dtype) -> Tensor:
        """Position embeddings for an h x w patch grid, bicubic-resized from the trained square grid.

        The reference swaps height and width, which is wrong for non-square inputs; here rows stay rows.
        `interpolate_offset` reproduces its legacy scale-factor form (0.1 in the first DINOv2 releases).
        """
        pos = self.pos_embed
        n = pos.shape[1] - 1
        m = math.isqrt(n)
        if m * m != n:
            raise ValueError(f"pos_embed holds {n} patch positions, not a square grid")
        if h_patches == w_patches == m:
            return pos.to(dtype)
        grid = pos[:, 1:].float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
        if self.interpolate_offset:
            scale = ((h_patches + self.interpolate_offset) / m, (w_patches + self.interpolate_offset) / m)
            grid = F.interpolate(grid, scale_factor=scale, mode="bicubic", antialias=self.interpolate_antialias)
        else:
            grid = F.interpolate(grid, size=(h_patches, w_patches), mode="bicubic",
                                 antialias=self.interpolate_antialias)
        if grid.shape[-2:] != (h_patches, w_patches):
            raise RuntimeError(f"position interpolation gave {tuple(grid.shape[-2:])}, wanted {(h_patches, w_patches)}")
        grid = grid.permute(0, 2, 3, 1).reshape(1, h_patches * w_patches, -1)
        return torch.cat([pos[:, :1].float(), grid], dim=1).to(dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """[B, C, H, W] (+ [B, N] bool mask of patches to replace by the mask token) -> [B, 1 + R + N, D]."""
        b, _, h, w = x.shape
        tokens = self.patch_embed(x)
        if masks is not None:
            tokens = torch.where(masks.unsqueeze(-1), self.mask_token.to(tokens.dtype).unsqueeze(0), tokens)
        tokens = torch.cat([self.cls_token.expand(b, -1, -1).to(tokens.dtype), tokens], dim=1)
        tokens = tokens + self.interpolate_pos_encoding(h // self.patch_size, w // self.patch_size, tokens.dtype)
        if self.register_tokens is not None:
            regs = self.register_tokens.expand(b, -1, -1).to(tokens.dtype)
            tokens = torch.cat([tokens[:, :1], regs, tokens[:, 1:]], dim=1)
        return tokens

    # -- forward --------------------------------------------------------------------------------------------------

    def _blocks(self, tokens: list[Tensor], keep: Sequence[int] = ()) -> tuple[list[Tensor], dict[int, list[Tensor]]]:
        """Run every block on the packed token groups; also return the outputs of the blocks in `keep`."""
        layout = TokenLayout.of(tokens)
        x = layout.pack(tokens)
        kept = {}
        for i, blk in enumerate(self.blocks):
            x = blk(x, layout)
            if i in keep:
                kept[i] = layout.unpack(x)
        return layout.unpack(x), kept

    def _output_dict(self, x: Tensor, masks: Tensor | None) -> dict[str, Tensor | None]:
        x_norm = self.norm(x)
        r = self.num_register_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],
            "x_norm_regtokens": x_norm[:, 1 : r + 1],
            "x_norm_patchtokens": x_norm[:, r + 1 :],
            "x_prenorm": x,
            "masks": masks,
        }

    def forward_features(self, x: Tensor | list[Tensor], masks: Tensor | list[Tensor | None] | None = None):
        """A batch -> dict of normalised CLS/register/patch tokens; a list of crop batches -> list of dicts,
        computed in one packed pass (crops of different sizes share every dense matmul)."""
        if isinstance(x, Tensor):
            return self.forward_features_list([x], [masks])[0]
        return self.forward_features_list(x, masks)

    def forward_features_list(self, xs: list[Tensor], masks_list: list[Tensor | None] | None = None):
        masks_list = list(masks_list) if masks_list is not None else [None] * len(xs)
        if len(masks_list) != len(xs):
            raise ValueError(f"got {len(xs)} crop batches but {len(masks_list)} masks")
        tokens = [self.prepare_tokens_with_masks(x, m) for x, m in zip(xs, masks_list, strict=True)]
        outs, _ = self._blocks(tokens)
        return [self._output_dict(o, m) for o, m in zip(outs, masks_list, strict=True)]

    def forward(self, x: Tensor | list[Tensor], masks=None, is_training: bool = False):
        """CLS embedding [B, D] (after the final norm); with `is_training` the dict(s) of `forward_features`."""
        out = self.forward_features(x, masks)
        if is_training:
            return out
        return self.head(out["x_norm_clstoken"])

    def get_intermediate_layers(self, x: Tensor, n: int | Sequence[int] = 1, reshape: bool = False,
                                return_class_token: bool = False, norm: bool = True):
        """Outputs of the last `n` blocks (or of the block indices in `n`): patch tokens [B, N, D] (or [B, D, h, w]
        with `reshape`), paired with the CLS token when `return_class_token`."""
        depth = len(self.blocks)
        indices = range(depth - n, depth) if isinstance(n, int) else n
        bad = [i for i in indices if not 0 <= i < depth]
        if bad:
            raise ValueError(f"block indices {bad} out of range for a {depth}-block model")
        _, kept = self._blocks([self.prepare_tokens_with_masks(x)], keep=tuple(indices))
        outputs = [self.norm(kept[i][0]) if norm else kept[i][0] for i in indices]
        class_tokens = [out[:, 0] for out in outputs]
        patches = [out[:, 1 + self.num_register_tokens :] for out in outputs]
        if reshape:
            b, _, h, w = x.shape
            p = self.patch_size
            patches = [o.reshape(b, h // p, w // p, -1).permute(0, 3, 1, 2).contiguous() for o in patches]
        if return_class_token:
            return tuple(zip(patches, class_tokens, strict=True))
        return tuple(patches)


def _vit(width: int, blocks: int, heads: int, kwargs: dict) -> DinoVisionTransformer:
    """The variant's width/depth/heads unless `kwargs` overrides them (e.g. `depth=2` for a shallow test model)."""
    variant = {"embed_dim": width, "depth": blocks, "num_heads": heads, "mlp_ratio": 4}
    return DinoVisionTransformer(**{**variant, **kwargs})


def vit_tiny(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-Ti: 192 wide, 12 deep, 3 heads (for CPU work)."""
    return _vit(192, 12, 3, dict(patch_size=patch_size, num_register_tokens=num_register_tokens, **kwargs))


def vit_small(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-S: 384 wide, 12 deep, 6 heads."""
    return _vit(384, 12, 6, dict(patch_size=patch_size, num_register_tokens=num_register_tokens, **kwargs))


def vit_base(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-B: 768 wide, 12 deep, 12 heads."""
    return _vit(768, 12, 12, dict(patch_size=patch_size, num_register_tokens=num_register_tokens, **kwargs))


def vit_large(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-L: 1024 wide, 24 deep, 16 heads."""
    return _vit(1024, 24, 16, dict(patch_size=patch_size, num_register_tokens=num_register_tokens, **kwargs))


def vit_giant2(patch_size: int = 16, num_register_tokens: int = 0, **kwargs) -> DinoVisionTransformer:
    """ViT-g/2 of DINOv2: 1536 wide, 40 deep, 24 heads (head dim 64); official weights use ffn_layer='swiglufused'."""
    return _vit(1536, 40, 24, dict(patch_size=patch_size, num_register_tokens=num_register_tokens, **kwargs))


ARCHITECTURES = {f.__name__: f for f in (vit_tiny, vit_small, vit_base, vit_large, vit_giant2)}


def build_vit(arch: str, **kwargs) -> DinoVisionTransformer:
    """A ViT by factory name (`vit_small`, ...), for configs."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    return ARCHITECTURES[arch](**kwargs)
