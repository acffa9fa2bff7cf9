"""Sinkhorn-Knopp and EMA centering across 2 real gloo processes equal the single-process result on the whole batch."""

from __future__ import annotations

import socket
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pretrain.losses import DINOLoss, iBOTPatchLoss, sinkhorn_knopp

WORLD_SIZE = 2
K = 16
# Rows held by each rank: unequal on purpose, and the iBOT case leaves rank 1 with no masked token at all.
DINO_SPLIT = (3, 5)
IBOT_SPLIT = (10, 0)
CENTER_SPLITS = ((2, 6), (7, 1))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rank_slice(tensor: torch.Tensor, split: tuple[int, ...], rank: int) -> torch.Tensor:
    return tensor.split(list(split))[rank]


def make_inputs() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {
        "dino_logits": (torch.rand(sum(DINO_SPLIT), K) * 2 - 1) * 100.0,
        "ibot_logits": torch.randn(sum(IBOT_SPLIT), K) * 5.0,
        "center_steps": [torch.randn(sum(split), K) + step for step, split in enumerate(CENTER_SPLITS)],
        "teacher": torch.randn(4, K),
    }


def worker(rank: int, port: int, out_dir: str, inputs: dict) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=timedelta(seconds=60),
    )
    try:
        results: dict[str, torch.Tensor] = {}
        results["dino_sk"] = DINOLoss(K).sinkhorn_knopp_teacher(
            rank_slice(inputs["dino_logits"], DINO_SPLIT, rank), teacher_temp=0.04
        )
        results["sk_given_count"] = sinkhorn_knopp(
            rank_slice(inputs["dino_logits"], DINO_SPLIT, rank), 0.04, n_samples=sum(DINO_SPLIT)
        )
        results["ibot_sk"] = iBOTPatchLoss(K).sinkhorn_knopp_teacher(
            rank_slice(inputs["ibot_logits"], IBOT_SPLIT, rank),
            teacher_temp=0.1,
            n_masked_patches=torch.tensor(sum(IBOT_SPLIT)),
        )
        dino_loss, ibot_loss = DINOLoss(K, center_momentum=0.7), iBOTPatchLoss(K, center_momentum=0.7)
        for step, split in enumerate(CENTER_SPLITS):
            local = rank_slice(inputs["center_steps"][step], split, rank)
            dino_loss.update_center(local)
            ibot_loss.update_center(local)
            results[f"dino_center_{step}"] = dino_loss.center.clone()
            results[f"ibot_center_{step}"] = ibot_loss.center.clone()
        results["dino_centered"] = dino_loss.softmax_center_teacher(inputs["teacher"], teacher_temp=0.07)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, list[dict]]:
    inputs = make_inputs()
    out_dir = tmp_path_factory.mktemp("losses_distributed")
    mp.spawn(worker, args=(free_port(), str(out_dir), inputs), nprocs=WORLD_SIZE, join=True)
    results = [torch.load(out_dir / f"rank{rank}.pt", weights_only=True) for rank in range(WORLD_SIZE)]
    return inputs, results


def test_sinkhorn_on_two_processes_equals_single_process_on_concatenated_batch(rank_results) -> None:
    inputs, results = rank_results
    expected = sinkhorn_knopp(inputs["dino_logits"], teacher_temp=0.04)
    for key in ("dino_sk", "sk_given_count"):
        got = torch.cat([r[key] for r in results])
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_sinkhorn_with_an_empty_rank_and_a_given_count(rank_results) -> None:
    inputs, results = rank_results
    assert results[1]["ibot_sk"].shape == (0, K)
    got = torch.cat([r["ibot_sk"] for r in results])
    torch.testing.assert_close(got, sinkhorn_knopp(inputs["ibot_logits"], teacher_temp=0.1), rtol=1e-5, atol=1e-6)


def test_ema_center_is_all_reduced_over_unequal_batches(rank_results) -> None:
    inputs, results = rank_results
    center = torch.zeros(K)
    for step in range(len(CENTER_SPLITS)):
        center = 0.7 * center + 0.3 * inputs["center_steps"][step].mean(dim=0)
        for rank_result in results:
            torch.testing.assert_close(rank_result[f"dino_center_{step}"], center.reshape(1, K))
            torch.testing.assert_close(rank_result[f"ibot_center_{step}"], center.reshape(1, 1, K))
    expected = torch.softmax((inputs["teacher"] - center) / 0.07, dim=-1)
    for rank_result in results:
        torch.testing.assert_close(rank_result["dino_centered"], expected)
