"""DCP checkpoints: atomic publish, keep-last-N, latest pointer, exact round trips, resharding 1 -> 2 -> 1 processes."""

import copy
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from test_distributed import (
    GLOBAL_BATCH,
    HEAD_DIM,
    backbone_and_head,
    global_batch,
    make_optimizer,
    regression_loss,
    spawn_torchrun_like,
)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

import pretrain.checkpoint as checkpoint_module
from dinoforge.launch import init_distributed
from pretrain.checkpoint import Checkpointer, ModelState, OptimizerState, RNGState, export_full_state_dict
from pretrain.distributed import apply_fsdp

# a collective that never completes must fail the test, not hang the suite (gloo waits 30 min)
pytestmark = pytest.mark.timeout(300)

SAVED_STEP = 10
RESAVED_STEP = 11


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, rank: int = 0, world_size: int = 1) -> None:
    images, targets = global_batch()
    local = slice(rank * GLOBAL_BATCH // world_size, (rank + 1) * GLOBAL_BATCH // world_size)
    regression_loss(model["head"](model["backbone"](images[local])), targets[local]).backward()
    optimizer.step()
    optimizer.zero_grad()


def app_state(model, optimizer, loop: dict) -> dict:
    return {"model": ModelState(model), "optimizer": OptimizerState(model, optimizer), "loop": loop,
            "rng": RNGState()}


def blank_loop() -> dict:
    return {"step": -1, "data": {"epoch": -1, "position": -1, "sampler": ""}, "center": torch.zeros(HEAD_DIM)}


def full_optimizer_state(model, optimizer) -> dict:
    """Unsharded optimizer state keyed by parameter name (rank 0; {} elsewhere); every rank must call it."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    # a copy: replicated CPU entries (AdamW's step) are the live tensors, which the next step increments
    return copy.deepcopy(get_optimizer_state_dict(model, optimizer, options=options).get("state", {}))


def generator_draws() -> tuple:
    return torch.rand(4), random.random(), float(np.random.rand())


def assert_same_tensors(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=0, msg=key)


def assert_same_optimizer_state(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys() and got
    for name in expected:
        assert got[name].keys() == expected[name].keys() == {"step", "exp_avg", "exp_avg_sq"}, name
        for key in expected[name]:
            torch.testing.assert_close(torch.as_tensor(got[name][key]), torch.as_tensor(expected[name][key]),
                                       rtol=0, atol=0, msg=f"{name}.{key}")


# -- 1 process -> 2 processes -> 1 process ------------------------------------------------------------------------


def _resharding_worker(rank: int, one_process_root: str, two_process_root: str, out_dir: str) -> None:
    env = init_distributed()
    model = backbone_and_head(seed=7)  # a different init: loading must overwrite all of it
    apply_fsdp(model, model["backbone"].blocks, env)
    optimizer = make_optimizer(model)
    loop = blank_loop()
    torch.manual_seed(1000 + rank)  # rank 1 has no saved generator state and keeps this one
    state = app_state(model, optimizer, loop)
    result = {"step": Checkpointer(one_process_root).load(state)}
    result["draws"] = generator_draws()
    result["loop"] = copy.deepcopy(loop)
    result["model"] = export_full_state_dict(model)
    result["optimizer"] = full_optimizer_state(model, optimizer)

    train_step(model, optimizer, rank, env.world_size)
    loop["step"] = RESAVED_STEP
    loop["data"]["position"] += GLOBAL_BATCH
    result["saved_to"] = str(Checkpointer(two_process_root).save(RESAVED_STEP, state))
    result["draws_after_save"] = generator_draws()
    result["model_after"] = export_full_state_dict(model)
    result["optimizer_after"] = full_optimizer_state(model, optimizer)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def resharding(tmp_path_factory) -> dict:
    """Train 1 step on 1 process and save; load on 2 (FSDP2), train 1 step, save; return everything observed."""
    base = tmp_path_factory.mktemp("reshard")
    model = backbone_and_head(seed=0)
    optimizer = make_optimizer(model)
    train_step(model, optimizer)
    loop = {"step": SAVED_STEP, "data": {"epoch": 2, "position": 1234, "sampler": "infinite"},
            "center": torch.arange(HEAD_DIM, dtype=torch.float32)}
    torch.manual_seed(42)
    random.seed(42)
    np.random.seed(42)
    Checkpointer(base / "one").save(SAVED_STEP, app_state(model, optimizer, loop))
    expected_draws = generator_draws()  # what the rank that restores rank 0's generators draws next
    torch.manual_seed(1001)
    rank1_draw = torch.rand(4)
    spawn_torchrun_like(_resharding_worker, 2, str(base / "one"), str(base / "two"), str(base))
    ranks = [torch.load(base / f"rank{r}.pt", weights_only=True) for r in range(2)]
    return {"model": model.state_dict(), "optimizer": full_optimizer_state(model, optimizer), "loop": loop,
            "draws": expected_draws, "rank1_draw": rank1_draw, "ranks": ranks, "two_process_root": base / "two"}


def test_one_process_checkpoint_loads_into_two(resharding):
    rank0 = resharding["ranks"][0]
    assert rank0["step"] == SAVED_STEP
    assert_same_tensors(rank0["model"], resharding["model"])
    assert_same_optimizer_state(rank0["optimizer"], resharding["optimizer"])
    assert rank0["loop"]["data"] == {"epoch": 2, "position": 1234, "sampler": "infinite"}
    assert rank0["loop"]["step"] == SAVED_STEP
    torch.testing.assert_close(rank0["loop"]["center"], resharding["loop"]["center"])


def test_generators_restored_per_rank(resharding):
    rank0, rank1 = resharding["ranks"]
    expected_torch, expected_python, expected_numpy = resharding["draws"]
    assert torch.equal(rank0["draws"][0], expected_torch)
    assert rank0["draws"][1:] == (expected_python, expected_numpy)
    # no state was saved for rank 1: it keeps the generator it was seeded with
    assert torch.equal(rank1["draws"][0], resharding["rank1_draw"])


def test_two_process_checkpoint_loads_into_one(resharding):
    rank0 = resharding["ranks"][0]
    root = resharding["two_process_root"]
    assert rank0["saved_to"] == str(root / f"step_{RESAVED_STEP:08d}")
    model = backbone_and_head(seed=9)
    optimizer = make_optimizer(model)
    loop = blank_loop()
    assert Checkpointer(root).load(app_state(model, optimizer, loop)) == RESAVED_STEP
    assert_same_tensors(model.state_dict(), rank0["model_after"])
    assert_same_optimizer_state(full_optimizer_state(model, optimizer), rank0["optimizer_after"])
    assert loop["step"] == RESAVED_STEP and loop["data"]["position"] == 1234 + GLOBAL_BATCH
    # this single process is rank 0 and continues rank 0's generators
    assert torch.equal(generator_draws()[0], rank0["draws_after_save"][0])


# -- single process: the directory protocol ------------------------------------------------------------------------


@pytest.fixture
def small():
    model = backbone_and_head(seed=0)
    optimizer = make_optimizer(model)
    train_step(model, optimizer)
    return model, optimizer


def saved_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_save_publishes_directory_and_pointer(tmp_path, small):
    checkpointer = Checkpointer(tmp_path / "checkpoints")
    assert checkpointer.latest_step() is None
    path = checkpointer.save(5, app_state(*small, blank_loop()))
    assert path == tmp_path / "checkpoints" / "step_00000005"
    assert (path / ".metadata").is_file()
    assert (tmp_path / "checkpoints" / "latest").read_text() == "step_00000005\n"
    assert saved_dirs(tmp_path / "checkpoints") == ["latest", "step_00000005"]
    assert checkpointer.latest_step() == 5 and checkpointer.steps() == [5]


def test_round_trip_restores_everything_in_place(tmp_path, small):
    model, optimizer = small
    loop = {"step": 3, "data": {"epoch": 1, "position": 77, "sampler": "infinite"}, "center": torch.randn(HEAD_DIM)}
    expected_loop = {"step": 3, "data": dict(loop["data"]), "center": loop["center"].clone()}
    checkpointer = Checkpointer(tmp_path)
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    checkpointer.save(3, app_state(model, optimizer, loop))
    expected_draws = generator_draws()

    other_model = backbone_and_head(seed=5)
    other_optimizer = make_optimizer(other_model)
    other_loop = blank_loop()
    state = app_state(other_model, other_optimizer, other_loop)
    assert checkpointer.load(state) == 3
    assert_same_tensors(other_model.state_dict(), model.state_dict())
    assert_same_optimizer_state(full_optimizer_state(other_model, other_optimizer),
                                full_optimizer_state(model, optimizer))
    assert other_optimizer.param_groups[0]["lr"] == optimizer.param_groups[0]["lr"]
    # nested dicts are filled in place; tensors are copied into the existing ones
    assert other_loop["data"] == expected_loop["data"] and state["loop"]["step"] == 3
    assert torch.equal(other_loop["center"], expected_loop["center"])
    draws = generator_draws()
    assert torch.equal(draws[0], expected_draws[0]) and draws[1:] == expected_draws[1:]


def test_crash_before_rename_leaves_latest_on_the_previous_checkpoint(tmp_path, small, monkeypatch):
    model, optimizer = small
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(1, app_state(model, optimizer, {"step": 1}))
    real_save = checkpoint_module.dcp.save

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)  # every shard and the metadata are written: only the rename is missing
        raise KeyboardInterrupt("preempted")

    monkeypatch.setattr(checkpoint_module.dcp, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        checkpointer.save(2, app_state(model, optimizer, {"step": 2}))
    monkeypatch.undo()
    names = saved_dirs(tmp_path)
    assert [n for n in names if n.startswith("step_00000002")] and "step_00000002" not in names
    assert checkpointer.latest_step() == 1 and checkpointer.steps() == [1]
    loop = {"step": -1}
    state = {"model": ModelState(model), "loop": loop}
    assert checkpointer.load(state) == 1 and state["loop"]["step"] == 1
    checkpointer.save(3, app_state(model, optimizer, {"step": 3}))
    assert saved_dirs(tmp_path) == ["latest", "step_00000001", "step_00000003"]  # the stale temporary is gone


def test_keep_last_prunes_oldest(tmp_path, small):
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    for step in (1, 2, 3, 4):
        checkpointer.save(step, {"model": ModelState(small[0]), "loop": {"step": step}})
    assert checkpointer.steps() == [3, 4]
    assert saved_dirs(tmp_path) == ["latest", "step_00000003", "step_00000004"]
    assert checkpointer.latest_step() == 4


def test_saving_the_same_step_again_replaces_it(tmp_path, small):
    checkpointer = Checkpointer(tmp_path)
    checkpointer.save(7, {"loop": {"position": 1}})
    checkpointer.save(7, {"loop": {"position": 2}})
    assert saved_dirs(tmp_path) == ["latest", "step_00000007"]
    loop = {"position": 0}
    checkpointer.load({"loop": loop})
    assert loop["position"] == 2


def test_dangling_pointer_falls_back_to_newest_complete(tmp_path, small):
    checkpointer = Checkpointer(tmp_path)
    for step in (1, 2):
        checkpointer.save(step, {"loop": {"step": step}})
    (tmp_path / "latest").write_text("step_00000009\n")
    assert checkpointer.latest_step() == 2
    (tmp_path / "latest").unlink()
    assert checkpointer.latest_step() == 2
    (tmp_path / "step_00000005").mkdir()  # no .metadata: never counted as a checkpoint
    assert checkpointer.steps() == [1, 2]


def test_load_errors_name_the_problem(tmp_path, small):
    checkpointer = Checkpointer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no complete checkpoint under"):
        checkpointer.load({"loop": {"step": 0}})
    checkpointer.save(1, {"loop": {"step": 1}})
    with pytest.raises(KeyError, match=r"has no entries \['model'\]; it holds \['loop'\]"):
        checkpointer.load({"loop": {"step": 0}, "model": ModelState(small[0])})
    with pytest.raises(FileNotFoundError, match=r"complete steps: \[1\]"):
        checkpointer.load({"loop": {"step": 0}}, step=4)
    with pytest.raises(ValueError, match="without dots"):
        checkpointer.save(2, {"a.b": {"step": 0}})
    with pytest.raises(ValueError, match="keep_last"):
        Checkpointer(tmp_path, keep_last=0)


def test_export_full_state_dict_single_process(small):
    model, _ = small
    model["head"].to(torch.bfloat16)
    exported = export_full_state_dict(model)
    assert exported.keys() == model.state_dict().keys()
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in exported.values())
    torch.testing.assert_close(exported["head.weight"], model["head"].weight.float())
    before = model["backbone"].pos_embed.detach().clone()
    exported["backbone.pos_embed"].zero_()  # a copy, not the live parameter
    assert torch.equal(model["backbone"].pos_embed, before)
