"""Loss terms: the configured sum is bit-identical to the former fixed DINO + KoLeo + iBOT chain, a term added by
config changes the total by exactly its weighted value, and the number of global crops comes from the batch."""

from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf
from test_meta_arch import K, synthetic_batch

from dinoforge.models.config import ModelConfig
from pretrain.data.collate import stack_crops
from pretrain.losses.terms import LossTerm, build_terms, resolve_term
from pretrain.meta_arch import HeadConfig, LossConfig, SSLMetaArch, head_logits, images_in_batch


def tiny_meta(**loss_overrides) -> SSLMetaArch:
    """test_meta_arch's model, with every loss field open to overrides."""
    torch.manual_seed(0)
    head = HeadConfig(out_dim=K, hidden_dim=16, bottleneck_dim=8)
    loss = LossConfig(**{"dino_head": head, "ibot_head": head, "koleo_loss_weight": 0.1, **loss_overrides})
    meta = SSLMetaArch(ModelConfig(arch="vit_tiny", patch_size=8, img_size=32, layerscale=1.0), loss)
    for blocks in (meta.student["backbone"].blocks, meta.teacher["backbone"].blocks):
        del blocks[2:]
    return meta.train()


def fixed_chain(meta: SSLMetaArch, batch: dict, teacher_temp: float) -> tuple[torch.Tensor, dict]:
    """SSLMetaArch.compute_losses as it was before loss terms (n_global = 2, one if per loss), for parity."""
    cfg = meta.loss_cfg
    n_global = 2
    targets = meta.teacher_targets(batch, teacher_temp)
    teacher_cls = list(targets["cls"].chunk(n_global))
    global_out, local_out = meta._backbone(
        meta.student["backbone"], [batch["global_crops"], batch["local_crops"]], [batch["masks"], None])
    student_cls = torch.cat([global_out["x_norm_clstoken"], local_out["x_norm_clstoken"]])
    masked = global_out["x_norm_patchtokens"].flatten(0, 1)[batch["mask_indices"]]
    cls_logits, patch_logits = head_logits(meta.student, student_cls, masked)
    n_local = local_out["x_norm_clstoken"].shape[0] // teacher_cls[0].shape[0]
    student_crops = list(cls_logits.chunk(n_global + n_local))
    terms = {}
    total = cls_logits.new_zeros((), dtype=torch.float32)
    if cfg.dino_loss_weight:
        terms["dino_loss"] = meta.dino_loss(student_crops, teacher_cls, ignore_diagonal=True)
        total = total + cfg.dino_loss_weight * terms["dino_loss"]
    if cfg.koleo_loss_weight:
        terms["koleo_loss"] = sum(meta.koleo_loss(c) for c in global_out["x_norm_clstoken"].chunk(n_global))
        total = total + cfg.koleo_loss_weight * terms["koleo_loss"]
    if cfg.ibot_loss_weight and masked.shape[0]:
        terms["ibot_loss"] = meta.ibot_patch_loss.forward_masked(
            patch_logits, targets["patch"], batch["masks_weight"], n_images=batch["global_crops"].shape[0])
        total = total + cfg.ibot_loss_weight * terms["ibot_loss"]
    return total, terms


class ToyTerm(LossTerm):
    """Mean squared [CLS] of the global crops: a stand-in for a new loss file."""

    name = "toy_loss"

    def __call__(self, outputs, batch, teacher_temp):
        cls = outputs.student_global["x_norm_clstoken"].float()
        return cls.pow(2).mean(), {"toy_cls_norm": cls.norm(dim=-1).mean()}


TOY = f"{__name__}:ToyTerm"


def run(meta: SSLMetaArch, batch: dict, fn=None, seed: int = 5):
    torch.manual_seed(seed)  # stochastic depth draws from the global generator
    return (fn or SSLMetaArch.compute_losses)(meta, batch, 0.07)


@pytest.mark.parametrize("overrides", [
    {},
    {"centering": "centering", "ibot_separate_head": True},
    {"dino_loss_weight": 0.0},
    {"ibot_loss_weight": 0.0, "koleo_loss_weight": 0.0},
])
def test_terms_are_bit_identical_to_the_fixed_chain(overrides):
    batch = synthetic_batch()
    # two fresh models: EMA centering moves a center during the call
    expected_total, expected = run(tiny_meta(**overrides), batch, fixed_chain)
    total, stats = run(tiny_meta(**overrides), batch)
    assert torch.equal(total, expected_total)
    assert [k for k in stats if k.endswith("_loss")] == list(expected)
    for key, value in expected.items():
        assert torch.equal(stats[key], value.detach()), key


def test_a_batch_without_masked_patches_has_no_ibot_term():
    batch = synthetic_batch()
    batch["masks"][:] = False
    batch["mask_indices"] = batch["mask_indices"][:0]
    batch["masks_weight"] = batch["masks_weight"][:0]
    expected_total, expected = run(tiny_meta(), batch, fixed_chain)
    total, stats = run(tiny_meta(), batch)
    assert "ibot_loss" not in stats and "ibot_loss" not in expected
    assert torch.equal(total, expected_total)


def test_a_term_from_the_config_adds_exactly_its_weighted_value():
    batch = synthetic_batch()
    base_total, base = run(tiny_meta(), batch)
    meta = tiny_meta(terms={TOY: 0.5})
    assert [t.name for t in meta.loss_terms] == ["dino_loss", "koleo_loss", "ibot_loss", "toy_loss"]
    total, stats = run(meta, batch)
    for key in ("dino_loss", "koleo_loss", "ibot_loss"):
        assert torch.equal(stats[key], base[key])
    assert torch.equal(total, base_total + 0.5 * stats["toy_loss"])
    assert "toy_cls_norm" in stats  # a term's extra statistics are logged with it
    total.backward()  # the new term is part of the graph


def test_a_zero_weight_leaves_the_term_out():
    assert "toy_loss" not in [t.name for t in tiny_meta(terms={TOY: 0.0}).loss_terms]
    assert [t.name for t in tiny_meta(koleo_loss_weight=0.0).loss_terms] == ["dino_loss", "ibot_loss"]


def test_bad_term_specs_are_errors():
    meta = tiny_meta()
    with pytest.raises(ValueError, match="unknown loss term 'nope'"):
        build_terms(LossConfig(terms={"nope": 1.0}), meta)
    with pytest.raises(ValueError, match="set loss.koleo_loss_weight instead"):
        build_terms(LossConfig(terms={"koleo_loss": 1.0}), meta)
    with pytest.raises(ValueError, match="not a LossTerm subclass"):
        resolve_term(f"{__name__}:tiny_meta")


def test_terms_load_from_yaml_strictly():
    cfg = OmegaConf.merge(OmegaConf.structured(LossConfig), OmegaConf.create({"terms": {TOY: 0.25}}))
    loss = OmegaConf.to_object(cfg)
    assert loss.terms == {TOY: 0.25}
    assert [t.weight for t in build_terms(loss, tiny_meta())][-1] == 0.25


def test_the_number_of_global_crops_comes_from_the_batch():
    batch = synthetic_batch()
    labelled = {**batch, "n_global_crops": 2}
    assert torch.equal(run(tiny_meta(), batch)[0], run(tiny_meta(), labelled)[0])
    # the same tensors read as 3 crops of 2 images (B=3, 2 crops -> 6 rows): different pairing, still a loss
    three = {**batch, "n_global_crops": 3, "local_crops": batch["local_crops"][:4]}
    total, stats = run(tiny_meta(), three)
    assert torch.isfinite(total) and images_in_batch(three) == 2
    assert not torch.equal(stats["koleo_loss"], run(tiny_meta(), batch)[1]["koleo_loss"])


def test_collate_records_the_number_of_global_crops():
    crop = torch.zeros(3, 8, 8)
    samples = [{"global_crops": [crop, crop], "local_crops": [crop[:, :4, :4]]} for _ in range(3)]
    batch = stack_crops(samples, torch.float32)
    assert batch["n_global_crops"] == 2 and images_in_batch(batch) == 3
