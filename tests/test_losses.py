"""DINO, iBOT, KoLeo losses and Sinkhorn-Knopp, each against a direct formula written out here."""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
import torch.nn.functional as F

from pretrain.losses import DINOLoss, KoLeoLoss, iBOTPatchLoss, masks_weight_from_masks, sinkhorn_knopp


def naive_sinkhorn(logits: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """DINOv2's exp-based algorithm, in float64 (overflows beyond logits / temp ~ 709)."""
    q = torch.exp(logits.double() / temp).t()  # [K, B]
    n_prototypes, n_samples = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(dim=1, keepdim=True)
        q /= n_prototypes
        q /= q.sum(dim=0, keepdim=True)
        q /= n_samples
    q *= n_samples
    return q.t()


def exact_sinkhorn(logits: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """The same algorithm in 50-digit arbitrary precision (no overflow at any magnitude)."""
    mpmath.mp.dps = 50
    n_samples, n_prototypes = logits.shape
    q = [[mpmath.exp(mpmath.mpf(float(v)) / mpmath.mpf(temp)) for v in row] for row in logits.tolist()]
    for _ in range(n_iterations):
        for k in range(n_prototypes):
            column = mpmath.fsum(q[b][k] for b in range(n_samples))
            for b in range(n_samples):
                q[b][k] /= column * n_prototypes
        for b in range(n_samples):
            row = mpmath.fsum(q[b])
            q[b] = [v / row for v in q[b]]
    return torch.tensor([[float(v) for v in row] for row in q], dtype=torch.float64)


# ---------------------------------------------------------------- Sinkhorn-Knopp


@pytest.mark.parametrize("n_iterations", [1, 3, 5])
def test_sinkhorn_matches_naive_exp_at_benign_values(n_iterations: int) -> None:
    torch.manual_seed(0)
    logits = torch.randn(12, 20)
    expected = naive_sinkhorn(logits, 0.5, n_iterations)
    got = sinkhorn_knopp(logits, teacher_temp=0.5, n_iterations=n_iterations)
    assert got.dtype == torch.float32 and got.shape == (12, 20)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(12))
    # Passing the global count gives the same targets (it only sets intermediate marginals).
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.5, n_iterations, n_samples=12), got)
    torch.testing.assert_close(sinkhorn_knopp(logits, 0.5, n_iterations, n_samples=torch.tensor(12)), got)


def test_sinkhorn_matches_float64_where_float32_exp_overflows() -> None:
    torch.manual_seed(1)
    logits = torch.rand(10, 30) * 24.0  # logits / temp up to 600: exp overflows fp32 (88.7), not fp64 (709)
    reference_fp32 = torch.exp(logits / 0.04)
    assert torch.isinf(reference_fp32).any(), "the test values must overflow the reference's fp32 exp"
    expected = naive_sinkhorn(logits, 0.04, 3)
    got = sinkhorn_knopp(logits, teacher_temp=0.04, n_iterations=3)
    torch.testing.assert_close(got.double(), expected, rtol=1e-4, atol=1e-6)


def test_arbitrary_precision_reference_agrees_with_naive_exp() -> None:
    torch.manual_seed(14)
    logits = torch.randn(4, 6)
    torch.testing.assert_close(exact_sinkhorn(logits, 0.3, 3), naive_sinkhorn(logits, 0.3, 3))


def test_sinkhorn_finite_at_temp_004_with_logits_of_magnitude_100() -> None:
    torch.manual_seed(2)
    logits = (torch.rand(8, 16) * 2 - 1) * 100.0
    logits[0, 3] = 100.0
    logits[5] = -100.0  # a sample whose every logit is far below the global maximum
    got = sinkhorn_knopp(logits, teacher_temp=0.04, n_iterations=3)
    assert torch.isfinite(got).all()
    assert (got >= 0).all()
    torch.testing.assert_close(got.sum(dim=1), torch.ones(8))
    torch.testing.assert_close(got.double(), exact_sinkhorn(logits, 0.04, 3), rtol=1e-4, atol=1e-6)


def test_sinkhorn_bf16_input_gives_fp32_targets_of_the_upcast_values() -> None:
    torch.manual_seed(3)
    logits = (torch.randn(6, 10) * 30).bfloat16()
    got = sinkhorn_knopp(logits, teacher_temp=0.04)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, sinkhorn_knopp(logits.float(), teacher_temp=0.04))


def test_sinkhorn_has_no_gradient_and_rejects_bad_arguments() -> None:
    logits = torch.randn(4, 5, requires_grad=True)
    assert not sinkhorn_knopp(logits, 0.1).requires_grad
    with pytest.raises(ValueError, match="teacher_temp"):
        sinkhorn_knopp(logits, 0.0)
    with pytest.raises(ValueError, match="n_iterations"):
        sinkhorn_knopp(logits, 0.1, n_iterations=0)
    with pytest.raises(ValueError, match="n_samples"):
        sinkhorn_knopp(logits, 0.1, n_samples=0)
    with pytest.raises(ValueError, match=r"\[batch, prototypes\]"):
        sinkhorn_knopp(logits[0], 0.1)


# ---------------------------------------------------------------- EMA centering


@pytest.mark.parametrize("loss_class", [DINOLoss, iBOTPatchLoss])
def test_ema_centering_follows_the_formula(loss_class: type) -> None:
    torch.manual_seed(4)
    loss = loss_class(7, center_momentum=0.8)
    first, second = torch.randn(5, 7), torch.randn(9, 7) + 2.0
    loss.update_center(first)
    center = 0.2 * first.mean(dim=0)
    torch.testing.assert_close(loss.center.reshape(7), center)
    loss.update_center(second)
    center = 0.8 * center + 0.2 * second.mean(dim=0)
    torch.testing.assert_close(loss.center.reshape(7), center)

    teacher = torch.randn(3, 7)
    expected = torch.softmax((teacher - center) / 0.07, dim=-1)
    got = loss.softmax_center_teacher(teacher.bfloat16().float(), teacher_temp=0.07)
    torch.testing.assert_close(got, torch.softmax((teacher.bfloat16().float() - center) / 0.07, dim=-1))
    torch.testing.assert_close(loss.softmax_center_teacher(teacher, 0.07), expected)


def test_center_buffers_keep_dinov2_names_and_shapes() -> None:
    assert DINOLoss(11).state_dict()["center"].shape == (1, 11)
    assert iBOTPatchLoss(11).state_dict()["center"].shape == (1, 1, 11)


def test_centering_rejects_a_mismatched_out_dim() -> None:
    with pytest.raises(ValueError, match="out_dim"):
        DINOLoss(8).update_center(torch.randn(2, 9))
    with pytest.raises(ValueError, match="out_dim"):
        DINOLoss(8).softmax_center_teacher(torch.randn(2, 9), 0.04)


def test_ema_update_with_no_rows_leaves_the_center_unchanged() -> None:
    loss = DINOLoss(4)
    loss.update_center(torch.ones(2, 4))
    before = loss.center.clone()
    loss.update_center(torch.empty(0, 4))
    torch.testing.assert_close(loss.center, before)


# ---------------------------------------------------------------- DINO loss


def naive_dino_loss(students, teachers, student_temp, ignore_diagonal):
    total, terms = 0.0, 0
    for i, s in enumerate(students):
        for j, t in enumerate(teachers):
            if ignore_diagonal and i == j:
                continue
            pair = 0.0
            for b in range(s.shape[0]):
                log_p = s[b].double() / student_temp - torch.logsumexp(s[b].double() / student_temp, dim=0)
                pair += -(t[b].double() * log_p).sum()
            total += pair / s.shape[0]
            terms += 1
    return total / terms


@pytest.mark.parametrize("ignore_diagonal", [False, True])
def test_dino_loss_matches_naive_pair_loop(ignore_diagonal: bool) -> None:
    torch.manual_seed(5)
    loss = DINOLoss(16, student_temp=0.1)
    students = [torch.randn(4, 16, requires_grad=True) for _ in range(5)]  # 2 global + 3 local crops
    teachers = [torch.softmax(torch.randn(4, 16) / 0.05, dim=-1) for _ in range(2)]
    got = loss(students, teachers, ignore_diagonal=ignore_diagonal)
    expected = naive_dino_loss(students, teachers, 0.1, ignore_diagonal)
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)

    grads = torch.autograd.grad(got, students)
    expected_grads = torch.autograd.grad(expected, students)
    for g, e in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e.float(), rtol=1e-4, atol=1e-7)


def test_dino_loss_pair_count() -> None:
    assert DINOLoss.num_pairs(10, 2) == 20
    assert DINOLoss.num_pairs(10, 2, ignore_diagonal=True) == 18
    assert DINOLoss.num_pairs(2, 2, ignore_diagonal=True) == 2
    with pytest.raises(ValueError, match="no \\(student, teacher\\) pair"):
        DINOLoss(4)([torch.randn(2, 4)], [torch.rand(2, 4)], ignore_diagonal=True)


def test_ignore_diagonal_skips_exactly_the_same_view() -> None:
    """With identical student and teacher views, only the diagonal pairs differ between the two modes."""
    torch.manual_seed(6)
    loss = DINOLoss(8, student_temp=1.0)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    ta, tb = torch.softmax(a, -1), torch.softmax(b, -1)
    cross = loss([a], [tb]) + loss([b], [ta])
    torch.testing.assert_close(loss([a, b], [ta, tb], ignore_diagonal=True), cross / 2)


def test_dino_loss_bf16_inputs_give_fp32_finite_loss() -> None:
    torch.manual_seed(7)
    loss = DINOLoss(32)
    students = [(torch.randn(4, 32) * 50).bfloat16() for _ in range(3)]
    teachers = [sinkhorn_knopp((torch.randn(4, 32) * 100).bfloat16(), 0.04).bfloat16() for _ in range(2)]
    got = loss(students, teachers, ignore_diagonal=True)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    expected = loss([s.float() for s in students], [t.float() for t in teachers], ignore_diagonal=True)
    torch.testing.assert_close(got, expected)


def test_dino_loss_rejects_mismatched_shapes() -> None:
    loss = DINOLoss(4)
    with pytest.raises(ValueError, match=r"teacher_probs\[0\] has batch size 3"):
        loss([torch.randn(2, 4)], [torch.rand(3, 4)])
    with pytest.raises(ValueError, match=r"student_logits\[0\] has shape \(2, 5\)"):
        loss([torch.randn(2, 5)], [torch.rand(2, 4)])


# ---------------------------------------------------------------- iBOT loss


def test_masks_weight_is_one_over_masked_count_in_gather_order() -> None:
    masks = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(masks_weight_from_masks(masks), torch.tensor([1 / 3, 1 / 3, 1 / 3, 1.0]))
    with pytest.raises(ValueError, match="bool"):
        masks_weight_from_masks(masks.long())


def test_ibot_loss_matches_naive_per_image_loop() -> None:
    torch.manual_seed(8)
    n_images, n_patches, k = 5, 6, 12
    masks = torch.rand(n_images, n_patches) < 0.4
    masks[0] = False  # an image without mask still counts in n_images
    masks[1, :2] = True
    student = torch.randn(n_images, n_patches, k)
    teacher = torch.softmax(torch.randn(n_images, n_patches, k) / 0.1, dim=-1)

    expected = 0.0
    for i in range(n_images):
        masked = [p for p in range(n_patches) if masks[i, p]]
        if not masked:
            continue
        per_token = [-(teacher[i, p] * F.log_softmax(student[i, p] / 0.1, dim=-1)).sum() for p in masked]
        expected += sum(per_token) / len(masked)
    expected /= n_images

    loss = iBOTPatchLoss(k, student_temp=0.1)
    got = loss.forward_masked(student[masks], teacher[masks], masks_weight_from_masks(masks), n_images=n_images)
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got, expected)


def test_ibot_loss_bf16_inputs_give_fp32_finite_loss() -> None:
    torch.manual_seed(9)
    student = (torch.randn(7, 20) * 40).bfloat16()
    teacher = sinkhorn_knopp(torch.randn(7, 20) * 100, 0.04).bfloat16()
    weights = torch.full((7,), 0.5)
    got = iBOTPatchLoss(20).forward_masked(student, teacher, weights, n_images=4)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    expected = iBOTPatchLoss(20).forward_masked(student.float(), teacher.float(), weights, n_images=4)
    torch.testing.assert_close(got, expected)


def test_ibot_loss_rejects_bad_inputs() -> None:
    loss = iBOTPatchLoss(4)
    with pytest.raises(ValueError, match="masks_weight"):
        loss.forward_masked(torch.randn(3, 4), torch.rand(3, 4), torch.ones(2), n_images=1)
    with pytest.raises(ValueError, match="n_images"):
        loss.forward_masked(torch.randn(3, 4), torch.rand(3, 4), torch.ones(3), n_images=0)
    with pytest.raises(ValueError, match="teacher_patch_probs"):
        loss.forward_masked(torch.randn(3, 4), torch.rand(2, 4), torch.ones(3), n_images=1)


def test_ibot_sinkhorn_teacher_uses_the_given_count() -> None:
    torch.manual_seed(10)
    logits = torch.randn(9, 6) * 100
    got = iBOTPatchLoss(6).sinkhorn_knopp_teacher(logits, 0.04, n_masked_patches=torch.tensor(9))
    torch.testing.assert_close(got, sinkhorn_knopp(logits, 0.04))


# ---------------------------------------------------------------- KoLeo


def naive_koleo(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    z = x.double() / x.double().norm(dim=1, keepdim=True)
    logs = []
    for i in range(len(z)):
        nearest = min(float((z[i] - z[j]).norm()) for j in range(len(z)) if j != i)
        logs.append(math.log(nearest + eps))
    return torch.tensor(-sum(logs) / len(logs), dtype=torch.float64)


def test_koleo_matches_naive_pairwise_loop() -> None:
    torch.manual_seed(11)
    x = torch.randn(10, 6)
    got = KoLeoLoss()(x)
    assert got.dtype == torch.float32 and got.ndim == 0
    torch.testing.assert_close(got.double(), naive_koleo(x), rtol=1e-5, atol=1e-5)


def test_koleo_uses_dinov2_eps() -> None:
    assert KoLeoLoss().eps == 1e-8


def test_koleo_duplicate_rows_are_finite_with_finite_gradients() -> None:
    torch.manual_seed(12)
    x = torch.randn(4, 8)
    x[1] = x[0]
    x[3] = x[2] * 5.0  # same direction, so also a duplicate after normalisation
    x.requires_grad_(True)
    loss = KoLeoLoss()(x)
    assert torch.isfinite(loss)
    # Every row's nearest neighbour is its duplicate at distance ||eps * 1|| (the eps inside the distance).
    eps = 1e-8
    nearest = torch.full((4,), eps * math.sqrt(8), dtype=torch.float64)
    torch.testing.assert_close(loss.double(), -torch.log(nearest + eps).mean(), rtol=1e-3, atol=0.0)
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.isfinite(grad).all()


def test_koleo_antipodal_pair_does_not_pick_itself() -> None:
    """The reference fills the diagonal with -1, ties with an antipodal neighbour and may choose itself."""
    v = torch.randn(1, 5)
    got = KoLeoLoss()(torch.cat([v, -v]))
    torch.testing.assert_close(got, torch.tensor(-math.log(2.0)), rtol=1e-5, atol=1e-6)


def test_koleo_batch_of_one_is_zero_with_a_zero_gradient() -> None:
    x = torch.randn(1, 4, requires_grad=True)
    loss = KoLeoLoss()(x)
    assert loss.item() == 0.0
    (grad,) = torch.autograd.grad(loss, x)
    assert torch.equal(grad, torch.zeros_like(x))


def test_koleo_bf16_input_gives_fp32_finite_loss() -> None:
    torch.manual_seed(13)
    x = torch.randn(6, 16).bfloat16()
    x[1] = x[0]
    got = KoLeoLoss()(x)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, KoLeoLoss()(x.float()))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert KoLeoLoss()(x.float()).dtype == torch.float32
