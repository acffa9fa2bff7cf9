"""Logistic regression: the L-BFGS solution satisfies the optimality conditions of the sklearn/cuML objective,
C is chosen on the train holdout, and the whole evaluation is reproducible."""

from __future__ import annotations

import pytest
import torch
from test_eval_support import one_torch_thread

from evaluation.config import LogregConfig
from evaluation.logreg import c_grid, fit_logreg, logistic_regression

NUM_CLASSES, DIM = 4, 10


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def blobs(n: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 2.0 * torch.randn(NUM_CLASSES, DIM, generator=torch.Generator().manual_seed(7))
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, DIM, generator=g), labels


def objective_gradient(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, y: torch.Tensor, C: float):
    """Gradient of C * sum_i CE_i + ||W||^2 / 2, divided by C * N, written out: ((P - Y)^T X / N + W / (C N),
    mean(P - Y))."""
    p = torch.softmax(x @ w.T + b, dim=1)
    residual = p - torch.nn.functional.one_hot(y, NUM_CLASSES).double()
    n = len(x)
    return residual.T @ x / n + w / (C * n), residual.mean(dim=0)


@pytest.mark.parametrize("C", [1e-3, 0.1, 10.0])
def test_solution_satisfies_first_order_optimality(C):
    x, y = blobs(300, 0, spread=2.0)
    x = x.double()
    w, b = fit_logreg(x, y, NUM_CLASSES, C, max_iter=500, tolerance=1e-10)
    grad_w, grad_b = objective_gradient(w, b, x, y, C)
    assert grad_w.abs().max() < 1e-7 and grad_b.abs().max() < 1e-7
    # Stronger regularisation (smaller C) gives smaller weights: the penalty is really there.
    w_small, _ = fit_logreg(x, y, NUM_CLASSES, C / 100, max_iter=500, tolerance=1e-10)
    assert w_small.norm() < w.norm()


def test_warm_start_reaches_the_same_minimum():
    x, y = blobs(200, 1, spread=2.0)
    x = x.double()
    cold = fit_logreg(x, y, NUM_CLASSES, 1.0, tolerance=1e-10)
    warm = fit_logreg(x, y, NUM_CLASSES, 1.0, tolerance=1e-10, init=fit_logreg(x, y, NUM_CLASSES, 0.01))
    torch.testing.assert_close(warm[0], cold[0], atol=1e-6, rtol=1e-5)


def test_c_grid_is_dinov2_log_spacing():
    grid = c_grid(LogregConfig())
    assert len(grid) == 45 and grid[0] == pytest.approx(1e-6) and grid[-1] == pytest.approx(1e5)
    with pytest.raises(ValueError, match="bad C grid"):
        c_grid(LogregConfig(c_log10_min=2, c_log10_max=1))


CFG = LogregConfig(c_log10_min=-4, c_log10_max=2, c_steps=7, max_iter=200, tolerance=1e-8)


def test_evaluation_chooses_C_on_the_holdout_and_is_reproducible():
    train_x, train_y = blobs(400, 2, spread=2.5)
    val_x, val_y = blobs(200, 3, spread=2.5)
    result = logistic_regression(train_x, train_y, val_x, val_y, NUM_CLASSES, CFG, seed=0)
    assert [row["C"] for row in result["grid"]] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0])
    best = max(row["holdout_top1"] for row in result["grid"])
    assert result["chosen"]["holdout_top1"] == best
    assert sum(row["chosen"] for row in result["grid"]) == 1
    # Overlapping blobs (spread 2.5) of 4 classes: far above the 25% chance level, below perfect.
    assert 60.0 < result["metrics"]["top1"] < 100.0

    assert logistic_regression(train_x, train_y, val_x, val_y, NUM_CLASSES, CFG, seed=0) == result
    scrambled = val_y[torch.randperm(200, generator=torch.Generator().manual_seed(0))]
    again = logistic_regression(train_x, train_y, val_x, scrambled, NUM_CLASSES, CFG, seed=0)
    assert again["chosen"] == result["chosen"] and again["grid"] == result["grid"]


def test_refit_uses_all_train_data():
    """The reported model is the chosen C refit on fit + holdout: with one C in the grid it equals a direct fit."""
    train_x, train_y = blobs(200, 4, spread=2.0)
    val_x, val_y = blobs(100, 5, spread=2.0)
    cfg = LogregConfig(c_log10_min=0, c_log10_max=0, c_steps=1, tolerance=1e-10)
    result = logistic_regression(train_x, train_y, val_x, val_y, NUM_CLASSES, cfg)
    w, b = fit_logreg(train_x.double(), train_y, NUM_CLASSES, 1.0, tolerance=1e-10)
    direct = 100.0 * ((val_x.double() @ w.T + b).argmax(dim=1) == val_y).double().mean().item()
    assert result["metrics"]["top1"] == pytest.approx(direct)
    assert result["split"]["fit"] + result["split"]["holdout"] == 200


def test_float32_option_and_bad_dtype():
    train_x, train_y = blobs(200, 6)
    val_x, val_y = blobs(100, 7)
    result = logistic_regression(train_x, train_y, val_x, val_y, NUM_CLASSES,
                                 LogregConfig(c_steps=3, c_log10_min=-2, c_log10_max=0, dtype="float32"))
    assert result["metrics"]["top1"] > 90.0  # spread 1 around centres 2 sigma apart: nearly separable
    with pytest.raises(ValueError, match="logreg.dtype"):
        logistic_regression(train_x, train_y, val_x, val_y, NUM_CLASSES, LogregConfig(dtype="float16"))
