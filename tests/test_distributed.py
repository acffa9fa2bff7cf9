"""Distributed runtime: process-group setup, FSDP2 on real 2-process gloo jobs, EMA on shards, AC and compile."""

import copy
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.debug import CommDebugMode

from dinoforge.collectives import all_reduce_mean, all_reduce_sum, barrier
from dinoforge.launch import DistributedEnv, destroy_distributed, init_distributed
from dinoforge.models import vit_tiny
from dinoforge.precision import autocast
from pretrain.checkpoint import export_full_state_dict
from pretrain.distributed import apply_activation_checkpointing, apply_compile, apply_fsdp, ema_update

# a collective that never completes must fail the test, not hang the suite (gloo waits 30 min)
pytestmark = pytest.mark.timeout(300)

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID",
                    "SLURM_NTASKS", "SLURM_LOCALID")
GLOBAL_BATCH = 8
STEPS = 2
MOMENTUM = 0.9
HEAD_DIM = 32
LR = 1e-3


def tiny_vit(seed: int, drop_path_rate: float = 0.0) -> torch.nn.Module:
    """Two blocks, 4 patches. No qkv bias: the key bias has an exactly-zero gradient (softmax ignores a constant
    shift), so AdamW would turn the float noise of different reduction orders into +-lr updates that no two runs
    share; every remaining parameter has a real gradient to compare."""
    torch.manual_seed(seed)
    return vit_tiny(patch_size=14, img_size=28, depth=2, drop_path_rate=drop_path_rate, qkv_bias=False)


def backbone_and_head(seed: int) -> torch.nn.ModuleDict:
    """The trainer's shape of a model: a container without forward whose children are called one by one."""
    backbone = tiny_vit(seed)
    return torch.nn.ModuleDict({"backbone": backbone, "head": torch.nn.Linear(backbone.embed_dim, HEAD_DIM)})


def global_batch(dim: int = HEAD_DIM) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(123)
    images = torch.randn(GLOBAL_BATCH, 3, 28, 28, generator=generator)
    targets = torch.randn(GLOBAL_BATCH, dim, generator=generator)
    return images, targets


def regression_loss(features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the (local) batch: averaged over equal-sized ranks it is the mean over the global batch."""
    return (features - targets).pow(2).sum(-1).mean()


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_torchrun_like(fn, world_size: int, *args) -> None:
    """Run fn(rank, *args) in `world_size` fresh processes that see torchrun's environment variables."""
    mp.spawn(_torchrun_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


def _torchrun_entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share the test machine's cores
    try:
        fn(rank, *args)
    finally:
        destroy_distributed()


# -- the 2-process job: one spawn, several behaviours checked below -------------------------------------------------


def _fsdp_worker(rank: int, out_dir: str) -> None:
    env = init_distributed("auto")
    assert init_distributed() == env, "init_distributed must be idempotent"
    result: dict = {"env": (env.rank, env.world_size, env.local_rank, str(env.device), env.backend, env.is_main)}

    total = all_reduce_sum(torch.tensor([rank + 1.0]))
    mean = all_reduce_mean(torch.tensor([rank + 1.0]))
    result["collectives"] = (total.item(), mean.item())

    model = backbone_and_head(seed=0)
    apply_fsdp(model, model["backbone"].blocks, env)
    result["sharded"] = all(isinstance(p, DTensor) for p in model.parameters())
    result["local_rows"] = model["backbone"].blocks[0].attn.qkv.weight.to_local().shape[0]
    optimizer = make_optimizer(model)
    images, targets = global_batch()
    local = slice(rank * GLOBAL_BATCH // env.world_size, (rank + 1) * GLOBAL_BATCH // env.world_size)
    losses = []
    for step in range(STEPS):
        loss = regression_loss(model["head"](model["backbone"](images[local])), targets[local])
        loss.backward()
        if step == 0:  # full_tensor() all-gathers the gradient shards, so every rank calls it
            result["grads"] = {n: p.grad.full_tensor() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(all_reduce_mean(loss.detach().clone()).item())
    result["losses"] = losses
    result["student"] = export_full_state_dict(model)
    with torch.no_grad():  # entry points other than forward() gather parameters too
        result["patch_tokens"] = model["backbone"].forward_features(images)["x_norm_patchtokens"]
        result["last_layer"] = model["backbone"].get_intermediate_layers(images, n=1, return_class_token=True)[0]

    teacher = backbone_and_head(seed=1)
    apply_fsdp(teacher, teacher["backbone"].blocks, env)
    with torch.no_grad():  # as in training: a no-grad forward leaves the root units and the last block gathered
        teacher["head"](teacher["backbone"](images[local]))
    with CommDebugMode() as ema_comms:
        ema_update(teacher, model, MOMENTUM)
    with CommDebugMode() as export_comms:
        result["teacher"] = export_full_state_dict(teacher)
    result["ema_collectives"] = ema_comms.get_total_counts()
    result["export_collectives"] = export_comms.get_total_counts()

    # the trainer's order: activation checkpointing, then per-block compile, then FSDP2
    composed = backbone_and_head(seed=0)
    apply_activation_checkpointing(composed["backbone"].blocks)
    apply_compile(composed["backbone"].blocks, backend="aot_eager")
    apply_fsdp(composed, composed["backbone"].blocks, env)
    regression_loss(composed["head"](composed["backbone"](images[local])), targets[local]).backward()
    result["composed_grads"] = {n: p.grad.full_tensor() for n, p in composed.named_parameters() if p.grad is not None}

    bf16 = tiny_vit(seed=0)
    apply_fsdp(bf16, bf16.blocks, env, param_dtype="bf16")
    bf16_loss = regression_loss(bf16(images[local]), global_batch(dim=192)[1][local])
    bf16_loss.backward()
    result["bf16_loss"] = all_reduce_mean(bf16_loss.detach().float().clone()).item()
    result["bf16_param_and_grad_dtypes"] = {(p.dtype, p.grad.dtype) for p in bf16.parameters()
                                                  if p.grad is not None}
    barrier()
    if env.is_main:
        torch.save(result, Path(out_dir) / "result.pt")


@pytest.fixture(scope="module")
def two_process_result(tmp_path_factory) -> dict:
    out_dir = tmp_path_factory.mktemp("fsdp")
    spawn_torchrun_like(_fsdp_worker, 2, str(out_dir))
    return torch.load(out_dir / "result.pt", weights_only=True)


@pytest.fixture(scope="module")
def single_process_reference() -> dict:
    """The same training on one process with the whole global batch."""
    model = backbone_and_head(seed=0)
    optimizer = make_optimizer(model)
    images, targets = global_batch()
    losses, grads = [], {}
    for step in range(STEPS):
        loss = regression_loss(model["head"](model["backbone"](images)), targets)
        loss.backward()
        if step == 0:
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    teacher = backbone_and_head(seed=1)
    expected_teacher = {k: MOMENTUM * v + (1 - MOMENTUM) * model.state_dict()[k]
                        for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        patch_tokens = model["backbone"].forward_features(images)["x_norm_patchtokens"]
        last_layer = model["backbone"].get_intermediate_layers(images, n=1, return_class_token=True)[0]
        bf16_target = global_batch(dim=192)[1]
        fp32_loss = regression_loss(tiny_vit(seed=0)(images), bf16_target).item()
    return {"losses": losses, "grads": grads, "student": model.state_dict(), "teacher": expected_teacher,
            "patch_tokens": patch_tokens, "last_layer": last_layer, "fp32_loss": fp32_loss}


def test_two_process_env_and_collectives(two_process_result):
    assert two_process_result["env"] == (0, 2, 0, "cpu", "gloo", True)
    assert two_process_result["collectives"] == (3.0, 1.5)


def test_fsdp_shards_every_parameter(two_process_result):
    assert two_process_result["sharded"]
    assert two_process_result["local_rows"] == 3 * 192 // 2


def test_fsdp_two_processes_match_one_process(two_process_result, single_process_reference):
    assert two_process_result["losses"] == pytest.approx(single_process_reference["losses"], rel=1e-5)
    assert two_process_result["losses"][1] < two_process_result["losses"][0]
    # gradients are averaged over ranks (a sum would double them; Adam's scale invariance would hide that below)
    got, expected = two_process_result["grads"], single_process_reference["grads"]
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    got, expected = two_process_result["student"], single_process_reference["student"]
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == torch.float32
        # Adam's first steps are about lr * sign(grad): a gradient near eps, summed in another order, moves its
        # parameter by a visible fraction of lr; 1e-5 is 1/200 of the two steps' movement (2 * lr)
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-5, msg=key)
    # the AdamW steps did move the parameters (the comparison above is not between two initial states)
    initial = backbone_and_head(seed=0)["backbone"].blocks[0].attn.qkv.weight
    assert not torch.allclose(expected["backbone.blocks.0.attn.qkv.weight"], initial)


def test_fsdp_composes_with_checkpointing_and_compile(two_process_result, single_process_reference):
    got, expected = two_process_result["composed_grads"], single_process_reference["grads"]
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)


def test_fsdp_other_entry_points_gather_parameters(two_process_result, single_process_reference):
    got, expected = two_process_result, single_process_reference
    torch.testing.assert_close(got["patch_tokens"], expected["patch_tokens"], rtol=1e-4, atol=1e-5)
    for got_part, expected_part in zip(got["last_layer"], expected["last_layer"], strict=True):
        torch.testing.assert_close(got_part, expected_part, rtol=1e-4, atol=1e-5)


def test_ema_on_shards_matches_full_tensors_without_communication(two_process_result, single_process_reference):
    assert two_process_result["ema_collectives"] == 0
    assert two_process_result["export_collectives"] > 0  # the counter does see FSDP2's collectives
    got, expected = two_process_result["teacher"], single_process_reference["teacher"]
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=2e-6, msg=key)


def test_fsdp_bf16_params_with_fp32_master_weights(two_process_result, single_process_reference):
    # sharded parameters and their gradients stay fp32; only the gathered compute copies are bf16
    assert two_process_result["bf16_param_and_grad_dtypes"] == {(torch.float32, torch.float32)}
    assert two_process_result["bf16_loss"] == pytest.approx(single_process_reference["fp32_loss"], rel=2e-2)


# -- single process ------------------------------------------------------------------------------------------------


@pytest.fixture
def no_torchrun(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    destroy_distributed()
    yield
    destroy_distributed()


def test_single_process_without_torchrun_variables(no_torchrun):
    env = init_distributed()
    expected_device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    assert env == DistributedEnv(0, 1, 0, expected_device, None)
    assert env.is_main
    assert init_distributed() is env
    assert not torch.distributed.is_initialized()
    t = torch.tensor([2.0, 4.0])
    assert all_reduce_mean(all_reduce_sum(t)) is t and t.tolist() == [2.0, 4.0]
    barrier()


def test_torchrun_variables_with_one_process_create_a_group(no_torchrun, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    env = init_distributed("gloo")
    assert env == DistributedEnv(0, 1, 0, torch.device("cpu"), "gloo")
    assert torch.distributed.is_initialized() and init_distributed() == env
    destroy_distributed()
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize("variables,match", [
    ({"RANK": "0"}, "WORLD_SIZE is missing"),
    ({"RANK": "2", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "x", "MASTER_PORT": "1"}, "outside"),
    ({"RANK": "0", "WORLD_SIZE": "two", "LOCAL_RANK": "0"}, "not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_PORT": "1"}, "MASTER_ADDR is not"),
])
def test_bad_torchrun_variables_are_named(no_torchrun, monkeypatch, variables, match):
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RuntimeError, match=match):
        init_distributed()


def test_bad_backend_and_dtype_names(no_torchrun):
    with pytest.raises(ValueError, match="unknown distributed backend 'mpi'"):
        init_distributed("mpi")
    with pytest.raises(ValueError, match="unknown param_dtype 'fp16'"):
        apply_fsdp(tiny_vit(0), [], DistributedEnv(), param_dtype="fp16")
    with pytest.raises(TypeError, match="floating-point"):
        all_reduce_mean(torch.tensor([1, 2]))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised without CUDA")
def test_nccl_without_cuda_is_an_error(no_torchrun):
    with pytest.raises(RuntimeError, match="needs CUDA"):
        init_distributed("nccl")


def test_one_process_is_left_unsharded():
    model = tiny_vit(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert apply_fsdp(model, model.blocks, DistributedEnv()) is model
    assert not any(isinstance(p, DTensor) for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_autocast_bf16_and_fp32():
    a, b = torch.randn(4, 4), torch.randn(4, 4)
    with autocast(torch.device("cpu"), "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with autocast(torch.device("cpu"), "fp32"):
        assert (a @ b).dtype == torch.float32


def test_ema_update_formula_and_checks():
    teacher, student = tiny_vit(1), tiny_vit(2)
    t0 = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.99)
    for key, value in teacher.state_dict().items():
        torch.testing.assert_close(value, 0.99 * t0[key] + 0.01 * student.state_dict()[key])
    ema_update(teacher, student, 0.0)
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in teacher.state_dict().items())
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
        ema_update(teacher, student, 1.5)
    with pytest.raises(ValueError, match="only in teacher"):
        ema_update(teacher, vit_tiny(patch_size=14, img_size=28, depth=1, qkv_bias=False), 0.9)


# -- activation checkpointing and compile --------------------------------------------------------------------------


def _forward_backward(model: torch.nn.Module, seed: int = 5) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Output, parameter gradients and the number of tensors autograd saved for backward."""
    images, targets = global_batch(dim=192)
    saved = 0

    def count(tensor):
        nonlocal saved
        saved += 1
        return tensor

    torch.manual_seed(seed)  # stochastic depth draws must match between the runs compared
    with torch.autograd.graph.saved_tensors_hooks(count, lambda t: t):
        out = model(images)
    regression_loss(out, targets).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, saved


def test_activation_checkpointing_keeps_keys_numerics_and_saves_memory():
    plain = tiny_vit(0, drop_path_rate=0.3).train()
    checkpointed = copy.deepcopy(plain)
    apply_activation_checkpointing(checkpointed.blocks)
    apply_activation_checkpointing(checkpointed.blocks)  # idempotent
    assert list(checkpointed.state_dict()) == list(plain.state_dict())
    out_p, grads_p, saved_p = _forward_backward(plain)
    out_c, grads_c, saved_c = _forward_backward(checkpointed)
    torch.testing.assert_close(out_c, out_p)
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], msg=name)
    assert saved_c < saved_p / 2  # the blocks' activations are recomputed, not stored
    # a deep copy (student -> teacher) owns its parameters: changing the copy leaves the original alone
    teacher = copy.deepcopy(checkpointed)
    with torch.no_grad():
        for p in teacher.parameters():
            p.zero_()
    torch.testing.assert_close(_forward_backward(checkpointed)[0], out_p)


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compile_keeps_keys_and_numerics(backend):
    torch._dynamo.reset()
    plain = tiny_vit(0).train()
    compiled = copy.deepcopy(plain)
    apply_activation_checkpointing(compiled.blocks)
    apply_compile(compiled.blocks, backend=backend)
    assert list(compiled.state_dict()) == list(plain.state_dict())
    out_p, grads_p, _ = _forward_backward(plain)
    out_c, grads_c, _ = _forward_backward(compiled)
    torch.testing.assert_close(out_c, out_p, rtol=1e-4, atol=1e-5)
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=1e-4, atol=1e-5, msg=name)
