"""AdamW param groups (layer-wise lr decay, patch-embed multiplier, no-decay set, last layer), gradient clipping
(global, per module, FSDP2-sharded) and gradient accumulation equivalence."""

from __future__ import annotations

import math
import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from dinoforge.config import ConfigError, load_config
from dinoforge.models import vit_tiny
from dinoforge.models.heads import DINOHead
from pretrain.optim import (
    OptimConfig,
    accumulation_scale,
    build_optimizer,
    clean_name,
    clip_grad_norm,
    clip_grad_norm_per_module,
    layer_id,
    param_groups,
)
from pretrain.schedules import TrainingSchedules

DIM, PATCH, IMG, N_PROTOTYPES = 16, 8, 16, 8


class MetaArch(nn.Module):
    """The layout of the SSL meta-architecture: `student.backbone`, `student.dino_head`, `student.ibot_head`."""

    def __init__(self, registers: int = 1, ibot_frozen_g: bool = True, use_bn: bool = False) -> None:
        super().__init__()
        self.student = nn.ModuleDict({
            "backbone": vit_tiny(patch_size=PATCH, img_size=IMG, depth=2, embed_dim=DIM, num_heads=2,
                                 num_register_tokens=registers, init_values=1.0),
            "dino_head": DINOHead(DIM, N_PROTOTYPES, hidden_dim=DIM, bottleneck_dim=4, nlayers=2, use_bn=use_bn),
            "ibot_head": DINOHead(DIM, N_PROTOTYPES, hidden_dim=DIM, bottleneck_dim=4, nlayers=2,
                                  norm_last_layer=ibot_frozen_g),
        })


# lr multipliers for layerwise_decay=0.5, patch_embed_lr_mult=0.2, depth 2: layer l gets 0.5 ** (3 - l)
EMBED, PATCH_EMBED, BLOCK0, BLOCK1, TOP = 0.125, 0.025, 0.25, 0.5, 1.0
BLOCK_WD = {"norm1.weight": 0, "norm1.bias": 0, "attn.qkv.weight": 1, "attn.qkv.bias": 0, "attn.proj.weight": 1,
            "attn.proj.bias": 0, "ls1.gamma": 0, "norm2.weight": 0, "norm2.bias": 0, "mlp.fc1.weight": 1,
            "mlp.fc1.bias": 0, "mlp.fc2.weight": 1, "mlp.fc2.bias": 0, "ls2.gamma": 0}
HEAD = {"mlp.0.weight": (TOP, 1, False), "mlp.0.bias": (TOP, 0, False), "mlp.2.weight": (TOP, 1, False),
        "mlp.2.bias": (TOP, 0, False), "last_layer.weight_g": (TOP, 1, True), "last_layer.weight_v": (TOP, 1, True)}
EXPECTED = {  # name -> (lr_multiplier, wd_multiplier, is_last_layer)
    "student.backbone.cls_token": (EMBED, 1, False),
    "student.backbone.pos_embed": (EMBED, 1, False),
    "student.backbone.register_tokens": (EMBED, 1, False),
    "student.backbone.mask_token": (EMBED, 1, False),
    "student.backbone.patch_embed.proj.weight": (PATCH_EMBED, 1, False),
    "student.backbone.patch_embed.proj.bias": (PATCH_EMBED, 0, False),
    **{f"student.backbone.blocks.0.{k}": (BLOCK0, wd, False) for k, wd in BLOCK_WD.items()},
    **{f"student.backbone.blocks.1.{k}": (BLOCK1, wd, False) for k, wd in BLOCK_WD.items()},
    "student.backbone.norm.weight": (TOP, 0, False),
    "student.backbone.norm.bias": (TOP, 0, False),
    **{f"student.dino_head.{k}": v for k, v in HEAD.items()},
    # the iBOT head here has norm_last_layer=True: weight_g is frozen and gets no group
    **{f"student.ibot_head.{k}": v for k, v in HEAD.items() if k != "last_layer.weight_g"},
}


def assignment(groups: list[dict]) -> dict[str, tuple[float, float, bool]]:
    return {name: (g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in groups for name in g["names"]}


def test_groups_match_hand_written_table():
    model = MetaArch()
    groups = param_groups(model, depth=2, layerwise_decay=0.5, patch_embed_lr_mult=0.2)
    got = assignment(groups)
    assert set(got) == set(EXPECTED)
    for name, (lr, wd, last) in EXPECTED.items():
        assert got[name][0] == pytest.approx(lr), name
        assert got[name][1:] == (wd, last), name
    # merged: one group per distinct (lr, wd, last); every trainable tensor exactly once, the right tensor
    assert len(groups) == len({(round(lr, 12), wd, last) for lr, wd, last in EXPECTED.values()}) == 10
    params = dict(model.named_parameters())
    for group in groups:
        assert len(group["params"]) == len(group["names"])
        assert all(p is params[n] for p, n in zip(group["params"], group["names"], strict=True))
    assert sum(len(g["params"]) for g in groups) == sum(p.requires_grad for p in model.parameters())


def test_layer_ids_and_wrapped_names():
    assert [layer_id(n, 12) for n in ("pos_embed", "backbone.patch_embed.proj.bias", "blocks.0.ls1.gamma",
                                      "student.backbone.blocks.11.mlp.fc2.weight", "norm.weight",
                                      "dino_head.mlp.0.weight")] == [0, 0, 1, 12, 13, 13]
    # activation-checkpoint and torch.compile wrappers insert path components that are not model names
    wrapped = "student.backbone._orig_mod.blocks.3._checkpoint_wrapped_module.attn.qkv.weight"
    assert clean_name(wrapped) == "student.backbone.blocks.3.attn.qkv.weight"
    assert layer_id(wrapped, 4) == 4
    with pytest.raises(ValueError, match=r"block 3 but depth=2.*model\.n_blocks"):
        layer_id("blocks.3.norm1.weight", 2)


def test_depth_inferred_and_defaults_are_dinov2():
    model = MetaArch()
    inferred = assignment(param_groups(model, layerwise_decay=0.5, patch_embed_lr_mult=0.2))
    assert inferred == assignment(param_groups(model, depth=2, layerwise_decay=0.5, patch_embed_lr_mult=0.2))
    cfg = OptimConfig()
    groups = assignment(param_groups(model, 2, cfg.layerwise_decay, cfg.patch_embed_lr_mult))
    assert groups["student.backbone.patch_embed.proj.weight"][0] == pytest.approx(0.2 * 0.9**3)
    assert groups["student.backbone.blocks.0.attn.qkv.weight"][0] == pytest.approx(0.9**2)


def test_token_decay_switch_and_batchnorm_head():
    model = MetaArch(use_bn=True)
    groups = assignment(param_groups(model, 2, 0.5, 0.2, decay_tokens=False))
    for token in ("cls_token", "pos_embed", "register_tokens", "mask_token"):
        assert groups[f"student.backbone.{token}"][1] == 0
    assert groups["student.backbone.patch_embed.proj.weight"][1] == 1
    # with use_bn the head is Linear(0) BN(1) GELU(2) Linear(3): BN weights are norm weights, not decayed
    assert groups["student.dino_head.mlp.1.weight"][1] == 0 and groups["student.dino_head.mlp.3.weight"][1] == 1


def test_no_trainable_parameter_is_an_error():
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        param_groups(frozen)


def test_build_optimizer_and_config():
    cfg = load_config(OptimConfig, None, ["betas=[0.8,0.95]", "eps=1e-6"])
    optimizer = build_optimizer(MetaArch(), cfg, depth=2)
    assert isinstance(optimizer, torch.optim.AdamW) and len(optimizer.param_groups) == 10
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["foreach"] is True
    assert build_optimizer(MetaArch(), cfg, implementation="for_loop").param_groups[0]["foreach"] is False
    with pytest.raises(ValueError, match="implementation='apex'"):
        build_optimizer(MetaArch(), cfg, implementation="apex")
    with pytest.raises(ConfigError, match=r"scaling_rule='sqrt'.*; clip_grad=-1.0 must be >= 0"):
        load_config(OptimConfig, None, ["scaling_rule=sqrt", "clip_grad=-1"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_build_optimizer_is_fused_on_cuda():
    optimizer = build_optimizer(MetaArch().cuda(), OptimConfig())
    assert all(g["fused"] for g in optimizer.param_groups)


# -- clipping ---------------------------------------------------------------------------------------------------


def with_random_grads(model: nn.Module, scale: float = 1.0) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * scale if p.requires_grad else None
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def manual_norm(grads) -> float:
    return math.sqrt(sum(float(g.double().square().sum()) for g in grads))


def test_global_clipping_equals_manual_norm():
    model = MetaArch()
    before = with_random_grads(model)
    norm = manual_norm(before.values())
    total = clip_grad_norm(model, max_norm=3.0)
    assert total.item() == pytest.approx(norm, rel=1e-5)
    coef = 3.0 / (norm + 1e-6)
    for name, p in model.named_parameters():
        if name in before:
            torch.testing.assert_close(p.grad, before[name] * coef)
    assert manual_norm(p.grad for p in model.parameters() if p.grad is not None) == pytest.approx(3.0, rel=1e-5)
    # below the threshold nothing changes; max_norm 0 only measures
    small = with_random_grads(model, scale=1e-3)
    assert clip_grad_norm(model, max_norm=3.0).item() == pytest.approx(manual_norm(small.values()), rel=1e-5)
    assert all(torch.equal(p.grad, small[n]) for n, p in model.named_parameters() if n in small)
    big = with_random_grads(model)
    assert clip_grad_norm(model, max_norm=0.0).item() == pytest.approx(norm, rel=1e-5)
    assert all(torch.equal(p.grad, big[n]) for n, p in model.named_parameters() if n in big)


def test_per_module_clipping_clips_each_child_by_its_own_norm():
    model = MetaArch()
    before = with_random_grads(model)
    units = {u: [g for n, g in before.items() if n.startswith(f"student.{u}.")]
             for u in ("backbone", "dino_head", "ibot_head")}
    norms = {u: manual_norm(gs) for u, gs in units.items()}
    max_norm = 0.5 * min(norms.values())  # every unit gets clipped, each by its own factor
    total = clip_grad_norm(model.student, max_norm, per_module=True)
    assert total.item() == pytest.approx(math.sqrt(sum(n**2 for n in norms.values())), rel=1e-5)
    for name, p in model.named_parameters():
        if name in before:
            unit = name.split(".")[1]
            torch.testing.assert_close(p.grad, before[name] * (max_norm / (norms[unit] + 1e-6)))
    with_random_grads(model)
    measured = clip_grad_norm_per_module(model.student, max_norm=0.0)
    assert set(measured) == {"backbone", "dino_head", "ibot_head"}
    assert {u: pytest.approx(v.item(), rel=1e-5) for u, v in measured.items()} == norms


def test_clipping_without_gradients_and_inf_norm():
    model = MetaArch()
    assert clip_grad_norm(model, 1.0).item() == 0.0
    assert clip_grad_norm(model.student, 1.0, per_module=True).item() == 0.0
    grads = with_random_grads(model)
    biggest = max(g.abs().max().item() for g in grads.values())
    assert clip_grad_norm(model.student, 0.0, per_module=True, norm_type=math.inf).item() == pytest.approx(biggest)


# -- gradient accumulation --------------------------------------------------------------------------------------


def ssl_like_loss(model: MetaArch, images: torch.Tensor, masks: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A per-sample mean: CE of the DINO head on CLS + CE of the iBOT head on every (partly masked) patch token."""
    out = model.student["backbone"].forward_features(images, masks=masks)
    cls_loss = F.cross_entropy(model.student["dino_head"](out["x_norm_clstoken"]), targets)
    patch_logits = model.student["ibot_head"](out["x_norm_patchtokens"])  # [B, N, K], N the same for every sample
    patch_loss = F.cross_entropy(patch_logits.flatten(0, 1), targets.repeat_interleave(patch_logits.shape[1]))
    return cls_loss + patch_loss


def one_step(batches: list[tuple[torch.Tensor, ...]], cfg: OptimConfig, scale: float | None = None):
    """One optimizer step over `batches` accumulated, each loss times `scale` (default 1/k); returns the grads
    (after clipping), the parameters before and after the step, and the gradient norm before clipping."""
    torch.manual_seed(0)
    model = MetaArch(registers=0).double()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg, depth=2)
    TrainingSchedules.from_config(cfg, total_steps=10, global_batch=8).apply_to_optimizer(optimizer, step=3)
    scale = accumulation_scale(len(batches)) if scale is None else scale
    for images, masks, targets in batches:
        (ssl_like_loss(model, images, masks, targets) * scale).backward()
    norm = clip_grad_norm(model.student, cfg.clip_grad, per_module=cfg.clip_per_module).item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    optimizer.step()
    return grads, initial, {n: p.detach().clone() for n, p in model.named_parameters()}, norm


@pytest.mark.parametrize("per_module", [False, True])
def test_two_accumulated_micro_batches_equal_one_double_batch(per_module):
    torch.manual_seed(5)
    images = torch.randn(8, 3, IMG, IMG, dtype=torch.float64)
    masks = torch.rand(8, (IMG // PATCH) ** 2) < 0.5
    targets = torch.randint(0, N_PROTOTYPES, (8,))
    cfg = OptimConfig(base_lr=0.05, warmup_steps=2, freeze_last_layer_steps=0, warmup_teacher_temp_steps=0,
                      clip_grad=0.5, clip_per_module=per_module, accumulation_steps=2)
    full_grads, initial, full_params, full_norm = one_step([(images, masks, targets)], cfg)
    halves = [(images[s], masks[s], targets[s]) for s in (slice(0, 4), slice(4, 8))]
    acc_grads, _, acc_params, acc_norm = one_step(halves, cfg)
    assert full_norm > cfg.clip_grad  # clipping is active, so it is part of what must agree
    assert acc_norm == pytest.approx(full_norm, rel=1e-9)
    assert full_grads.keys() == acc_grads.keys() and "student.backbone.mask_token" in full_grads
    for name in full_grads:
        torch.testing.assert_close(acc_grads[name], full_grads[name], rtol=0, atol=1e-6, msg=name)
    for name, param in full_params.items():
        torch.testing.assert_close(acc_params[name], param, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(full_params["student.backbone.blocks.0.attn.qkv.weight"],
                           initial["student.backbone.blocks.0.attn.qkv.weight"])  # the step did move parameters
    # without the 1/k scale the accumulated gradient is the sum, twice the mean: the scale is what makes them agree
    unscaled_norm = one_step(halves, cfg, scale=1.0)[3]
    assert unscaled_norm == pytest.approx(2 * full_norm, rel=1e-9)


def test_accumulation_scale_rejects_zero():
    assert accumulation_scale(4) == 0.25
    with pytest.raises(ValueError, match="accumulation_steps=0"):
        accumulation_scale(0)


# -- FSDP2 (DTensor parameters and gradients) on 2 real gloo processes ------------------------------------------

WORLD_SIZE = 2


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train_step(shard: bool, batch: tuple[torch.Tensor, ...], cfg: OptimConfig) -> dict:
    """Build the tiny student (FSDP2-sharded per block, backbone and head when `shard`), take one optimizer step."""
    torch.manual_seed(0)
    model = MetaArch()
    if shard:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        mesh = init_device_mesh("cpu", (WORLD_SIZE,))
        backbone = model.student["backbone"]
        for block in backbone.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(backbone, mesh=mesh)
        register_fsdp_forward_method(backbone, "forward_features")  # the loss calls it instead of forward
        fully_shard(model.student["dino_head"], mesh=mesh)
        fully_shard(model.student["ibot_head"], mesh=mesh)
    optimizer = build_optimizer(model, cfg)
    TrainingSchedules.from_config(cfg, total_steps=10, global_batch=8).apply_to_optimizer(optimizer, step=3)
    ssl_like_loss(model, *batch).backward()
    module_norms = {k: v.item() for k, v in clip_grad_norm_per_module(model.student, 0.0).items()}
    norm = clip_grad_norm(model, cfg.clip_grad).item()
    optimizer.step()
    full = {n: (p.full_tensor() if shard else p).detach().clone() for n, p in model.named_parameters()}
    groups = [(g["names"], g["lr_multiplier"], g["wd_multiplier"], g["is_last_layer"]) for g in optimizer.param_groups]
    return {"norm": norm, "module_norms": module_norms, "params": full, "groups": groups}


def fsdp_worker(rank: int, port: int, out_dir: str, batch: tuple, cfg: OptimConfig) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=timedelta(seconds=60))
    try:
        # every rank sees the whole batch: FSDP2 averages the gradients, which equals the single-process gradient
        torch.save(train_step(True, batch, cfg), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # ~30 s: two spawned processes import torch
def test_fsdp2_groups_clipping_and_step_match_unsharded(tmp_path):
    torch.manual_seed(5)
    batch = (torch.randn(4, 3, IMG, IMG), torch.rand(4, (IMG // PATCH) ** 2) < 0.5,
             torch.randint(0, N_PROTOTYPES, (4,)))
    cfg = OptimConfig(base_lr=0.05, warmup_steps=2, freeze_last_layer_steps=0, warmup_teacher_temp_steps=0,
                      clip_grad=0.5, layerwise_decay=0.5)
    mp.spawn(fsdp_worker, args=(free_port(), str(tmp_path), batch, cfg), nprocs=WORLD_SIZE)
    reference = train_step(False, batch, cfg)
    assert reference["norm"] > cfg.clip_grad
    for rank in range(WORLD_SIZE):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got["groups"] == reference["groups"]
        assert got["norm"] == pytest.approx(reference["norm"], rel=1e-5)
        assert got["module_norms"] == pytest.approx(reference["module_norms"], rel=1e-5)
        for name, param in reference["params"].items():
            torch.testing.assert_close(got["params"][name], param, rtol=1e-5, atol=1e-6, msg=name)
