"""SSLMetaArch: the weighted DINO + iBOT + KoLeo loss against a direct computation with the reference's pairing."""

import pytest
import torch
import torch.nn.functional as F

from dinoforge.models.config import ModelConfig
from pretrain.losses import masks_weight_from_masks, sinkhorn_knopp
from pretrain.meta_arch import HeadConfig, LossConfig, SSLMetaArch

B, N_LOCAL, K = 3, 2, 32


def tiny_meta(**loss_overrides) -> SSLMetaArch:
    torch.manual_seed(0)
    model = ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, layerscale=1.0)
    head = HeadConfig(out_dim=K, hidden_dim=16, bottleneck_dim=8)
    loss = LossConfig(dino_head=head, ibot_head=head, koleo_loss_weight=0.1, ibot_loss_weight=1.0, **loss_overrides)
    meta = SSLMetaArch(model, loss)
    for blocks in (meta.student["backbone"].blocks, meta.teacher["backbone"].blocks):
        del blocks[2:]  # two blocks are enough for the algebra
    return meta.train()


def synthetic_batch() -> dict:
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(2 * B, 16, generator=g) < 0.3
    masks[0, :3] = True  # at least one masked patch
    masks[-1] = False  # an image without mask still counts in the iBOT normaliser
    return {
        "global_crops": torch.randn(2 * B, 3, 32, 32, generator=g),
        "local_crops": torch.randn(N_LOCAL * B, 3, 16, 16, generator=g),
        "masks": masks,
        "mask_indices": masks.flatten().nonzero().flatten(),
        "masks_weight": masks_weight_from_masks(masks),
        "n_masked_patches": int(masks.sum()),
    }


def ce(target, logits, temp=0.1):
    return -(target * F.log_softmax(logits / temp, dim=-1)).sum(-1)


def test_total_loss_matches_direct_formula():
    meta, batch, temp = tiny_meta(), synthetic_batch(), 0.07
    total, terms = meta.compute_losses(batch, teacher_temp=temp)

    with torch.no_grad():
        t_out = meta.teacher["backbone"].forward_features(batch["global_crops"])
        t_cls = sinkhorn_knopp(meta.teacher["dino_head"](t_out["x_norm_clstoken"]), temp)
        masks = batch["masks"]
        t_patch = sinkhorn_knopp(meta.teacher["dino_head"](t_out["x_norm_patchtokens"][masks]), temp)
    student = meta.student["backbone"]
    g_out = student.forward_features(batch["global_crops"], masks=masks)
    l_out = student.forward_features(batch["local_crops"])
    head = meta.student["dino_head"]
    s_global = head(g_out["x_norm_clstoken"]).chunk(2)
    s_local = head(l_out["x_norm_clstoken"]).chunk(N_LOCAL)
    t1, t2 = t_cls.chunk(2)
    # the reference: global crop 1 learns from teacher crop 2 and vice versa ("swapped"), locals from both
    pairs = [(t2, s_global[0]), (t1, s_global[1])] + [(t, s) for s in s_local for t in (t1, t2)]
    dino = sum(ce(t, s).mean() for t, s in pairs) / len(pairs)

    weights = masks_weight_from_masks(masks)
    ibot = (ce(t_patch, head(g_out["x_norm_patchtokens"][masks])) * weights).sum() / (2 * B)

    def koleo(x):
        x = F.normalize(x, dim=-1)
        d = torch.cdist(x, x) + torch.diag(torch.full((len(x),), float("inf")))
        return -torch.log(d.min(dim=1).values + 1e-8).mean()

    koleo_loss = sum(koleo(c) for c in g_out["x_norm_clstoken"].chunk(2))
    torch.testing.assert_close(terms["dino_loss"], dino, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["ibot_loss"], ibot, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(terms["koleo_loss"], koleo_loss, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(total, dino + ibot + 0.1 * koleo_loss, atol=1e-5, rtol=1e-5)


def test_sequence_packing_does_not_change_the_loss():
    meta, batch = tiny_meta(), synthetic_batch()
    packed, _ = meta.compute_losses(batch, 0.07)
    meta.model_cfg.sequence_packing = False
    unpacked, _ = meta.compute_losses(batch, 0.07)
    torch.testing.assert_close(packed, unpacked, atol=1e-5, rtol=1e-5)


def test_only_the_student_gets_gradients_and_the_teacher_stays_in_eval():
    meta = tiny_meta()
    meta.train()
    assert meta.student.training and not meta.teacher.training
    total, _ = meta.compute_losses(synthetic_batch(), 0.07)
    total.backward()
    assert all(p.grad is None for p in meta.teacher.parameters())
    assert all(p.grad is not None for p in meta.student["backbone"].blocks.parameters())
    assert meta.teacher["backbone"].blocks[0].drop_path == 0.0


@pytest.mark.parametrize("separate", [False, True])
def test_ema_centering_and_separate_ibot_head(separate):
    meta = tiny_meta(centering="centering", ibot_separate_head=separate)
    assert ("ibot_head" in meta.student) == separate
    before = meta.dino_loss.center.clone()
    total, terms = meta.compute_losses(synthetic_batch(), 0.04)
    assert torch.isfinite(total) and set(terms) >= {"dino_loss", "ibot_loss", "koleo_loss", "teacher_entropy"}
    assert not torch.equal(meta.dino_loss.center, before)  # the center moved towards the batch mean


def test_unknown_centering_is_rejected():
    with pytest.raises(ValueError, match="loss.centering must be one of"):
        SSLMetaArch(ModelConfig(arch="vit_tiny"), LossConfig(centering="softmax"))
