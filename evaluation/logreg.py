"""L2-regularised multinomial logistic regression on frozen features, in torch (CPU or GPU, no cuML).

The objective is scikit-learn's / cuML's: C * sum_i CE(W x_i + b, y_i) + ||W||^2 / 2 (bias not penalised),
divided here by C * N so that its scale does not depend on C or N. It is smooth and strictly convex, so
full-batch L-BFGS with a strong-Wolfe line search reaches its unique minimum. C is chosen on a stratified
holdout of the train split (DINOv2's default protocol), then the model is refit on the whole train split.
Fits run from the smallest C up, each warm-started from the previous solution, which cuts iterations.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from evaluation.config import LogregConfig
from evaluation.holdout import stratified_holdout
from evaluation.metrics import topk_accuracy

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def c_grid(cfg: LogregConfig) -> list[float]:
    """The C values to try, ascending: 10 ** linspace(c_log10_min, c_log10_max, c_steps)."""
    if cfg.c_steps < 1 or cfg.c_log10_min > cfg.c_log10_max:
        raise ValueError(f"bad C grid: logreg.c_log10_min={cfg.c_log10_min}, c_log10_max={cfg.c_log10_max}, "
                         f"c_steps={cfg.c_steps} (need min <= max and steps >= 1)")
    return (10 ** torch.linspace(cfg.c_log10_min, cfg.c_log10_max, cfg.c_steps, dtype=torch.float64)).tolist()


def logreg_objective(weight: Tensor, bias: Tensor, x: Tensor, y: Tensor, C: float) -> Tensor:
    """mean_i CE(W x_i + b, y_i) + ||W||^2 / (2 C N)."""
    return F.cross_entropy(x @ weight.T + bias, y) + weight.square().sum() / (2 * C * len(x))


def fit_logreg(x: Tensor, y: Tensor, num_classes: int, C: float, max_iter: int = 1000, tolerance: float = 1e-9,
               init: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
    """Minimise `logreg_objective` over (W [C, D], b [C]) on x's device and dtype; returns detached (W, b)."""
    if C <= 0:
        raise ValueError(f"C must be > 0, got {C}")
    if init is None:
        weight = x.new_zeros(num_classes, x.shape[1])
        bias = x.new_zeros(num_classes)
    else:
        weight, bias = (t.detach().to(x.device, x.dtype).clone() for t in init)
    weight.requires_grad_(True)
    bias.requires_grad_(True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, max_eval=2 * max_iter,
                                  tolerance_grad=tolerance, tolerance_change=1e-15, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = logreg_objective(weight, bias, x, y, C)
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def predict_scores(weight: Tensor, bias: Tensor, x: Tensor) -> Tensor:
    return x.to(weight.device, weight.dtype) @ weight.T + bias


def logistic_regression(train_x: Tensor, train_y: Tensor, val_x: Tensor, val_y: Tensor, num_classes: int,
                        cfg: LogregConfig, seed: int = 0, device: torch.device | str = "cpu") -> dict:
    """Sweep C on a train holdout, refit the best C on all train data, measure val accuracy.

    Returns {"metrics": {top1, top5}, "chosen": {C, holdout_top1}, "grid": [{C, holdout_top1, holdout_top5}]}.
    """
    if cfg.dtype not in DTYPES:
        raise ValueError(f"logreg.dtype={cfg.dtype!r}; choose one of {sorted(DTYPES)}")
    dtype, device = DTYPES[cfg.dtype], torch.device(device)
    fit_idx, holdout_idx = stratified_holdout(train_y, cfg.holdout_fraction, seed)
    x = train_x.to(device, dtype)
    y = train_y.to(device)
    fit_x, fit_y, holdout_x, holdout_y = x[fit_idx.to(device)], y[fit_idx.to(device)], x[holdout_idx.to(device)], \
        y[holdout_idx.to(device)]
    grid, solution = [], None
    for C in tqdm(c_grid(cfg), desc="logreg C sweep", leave=False):
        solution = fit_logreg(fit_x, fit_y, num_classes, C, cfg.max_iter, cfg.tolerance, init=solution)
        acc = topk_accuracy(predict_scores(*solution, holdout_x), holdout_y)
        grid.append({"C": C, "holdout_top1": acc[1], "holdout_top5": acc[5]})
        logger.debug("logreg C=%.3g: holdout top-1 %.2f", C, acc[1])
    # Highest holdout top-1; ties go to the smaller C (the stronger regularisation).
    best = max(range(len(grid)), key=lambda i: (grid[i]["holdout_top1"], -i))
    best_C = grid[best]["C"]
    for i, row in enumerate(grid):
        row["chosen"] = i == best
    weight, bias = fit_logreg(x, y, num_classes, best_C, cfg.max_iter, cfg.tolerance)
    acc = topk_accuracy(predict_scores(weight, bias, val_x.to(device, dtype)), val_y)
    return {
        "metrics": {"top1": acc[1], "top5": acc[5]},
        "chosen": {"C": best_C, "holdout_top1": grid[best]["holdout_top1"]},
        "grid": grid,
        "split": {"fit": len(fit_idx), "holdout": len(holdout_idx), "val": len(val_y)},
    }
