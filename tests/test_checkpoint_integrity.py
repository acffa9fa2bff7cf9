"""Damaged checkpoints (issue 26 point 1): each checkpoint's manifest (sizes at publish, SHA-256 from a background
thread) is checked before loading; resume falls back to the newest intact checkpoint, naming the damaged file, and
a damaged step asked for by number is a one-line error."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from test_train import CONFIG, tiny_overrides

from pretrain.__main__ import main as pretrain_main
from pretrain.checkpoint import Checkpointer, ModelState
from pretrain.checkpoint_manifest import MANIFEST, DamagedCheckpointError, read_manifest

pytestmark = pytest.mark.timeout(300)


def save_steps(root: Path, steps: tuple[int, ...] = (1, 2, 3)) -> tuple[Checkpointer, dict[int, torch.Tensor]]:
    """Checkpoints of a Linear layer whose weight is filled with the step number; hashes finished."""
    checkpointer = Checkpointer(root, keep_last=5)
    weights = {}
    layer = torch.nn.Linear(16, 8)
    for step in steps:
        with torch.no_grad():
            layer.weight.fill_(step)
        checkpointer.save(step, {"model": ModelState(layer)})
        weights[step] = layer.weight.detach().clone()
    checkpointer.wait_for_hashes()
    return checkpointer, weights


def shard(directory: Path) -> Path:
    return next(p for p in sorted(directory.iterdir()) if p.suffix == ".distcp")


def cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def load_fresh(checkpointer: Checkpointer, step: int | None = None) -> tuple[int, torch.Tensor]:
    layer = torch.nn.Linear(16, 8)
    loaded = checkpointer.load({"model": ModelState(layer)}, step=step)
    return loaded, layer.weight.detach()


def test_manifest_lists_every_file_with_size_and_hash(tmp_path):
    checkpointer, _ = save_steps(tmp_path, (1,))
    directory = checkpointer.step_dir(1)
    manifest = read_manifest(directory)
    names = {p.name for p in directory.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == names and ".metadata" in names
    for name, entry in manifest["files"].items():
        assert entry["size"] == (directory / name).stat().st_size
        assert len(entry["sha256"]) == 64


@pytest.mark.parametrize("damage", ["shard cut in half", "metadata truncated", "metadata overwritten",
                                    "metadata same size", "shard missing"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, caplog, damage):
    checkpointer, weights = save_steps(tmp_path)
    latest = checkpointer.step_dir(3)
    metadata = latest / ".metadata"
    if damage == "shard cut in half":
        damaged = shard(latest)
        cut_in_half(damaged)
    elif damage == "metadata truncated":
        damaged = metadata
        cut_in_half(damaged)
    elif damage == "metadata overwritten":
        damaged = metadata
        damaged.write_bytes(b"not a pickle")
    elif damage == "metadata same size":  # only the hash can tell
        damaged = metadata
        damaged.write_bytes(bytes(b ^ 0xFF for b in damaged.read_bytes()))
    else:
        damaged = shard(latest)
        damaged.unlink()
    with caplog.at_level(logging.WARNING):
        step, weight = load_fresh(checkpointer)
    assert step == 2
    torch.testing.assert_close(weight, weights[2])
    assert [(d.step, d.path) for d in checkpointer.damaged] == [(3, damaged)]
    assert str(damaged) in caplog.text


def test_two_damaged_checkpoints_are_both_passed_over(tmp_path):
    checkpointer, weights = save_steps(tmp_path)
    cut_in_half(shard(checkpointer.step_dir(3)))
    (checkpointer.step_dir(2) / ".metadata").write_bytes(b"")
    step, weight = load_fresh(checkpointer)
    assert step == 1 and [d.step for d in checkpointer.damaged] == [3, 2]
    torch.testing.assert_close(weight, weights[1])


def test_every_checkpoint_damaged_is_one_error(tmp_path):
    checkpointer, _ = save_steps(tmp_path, (1, 2))
    for step in (1, 2):
        cut_in_half(shard(checkpointer.step_dir(step)))
    with pytest.raises(DamagedCheckpointError, match="every checkpoint .* is damaged"):
        load_fresh(checkpointer)


def test_damaged_step_asked_for_is_an_error_naming_the_file(tmp_path):
    checkpointer, _ = save_steps(tmp_path)
    damaged = shard(checkpointer.step_dir(2))
    cut_in_half(damaged)
    with pytest.raises(DamagedCheckpointError) as info:
        load_fresh(checkpointer, step=2)
    assert info.value.path == damaged and str(damaged) in str(info.value)
    assert load_fresh(checkpointer, step=3)[0] == 3  # the others still load


def test_checkpoint_without_manifest_damaged_is_still_named(tmp_path):
    """Checkpoints written before manifests: DCP's own read errors become the same error, and resume falls back."""
    checkpointer, weights = save_steps(tmp_path)
    for step in (1, 2, 3):
        (checkpointer.step_dir(step) / MANIFEST).unlink()
    cut_in_half(shard(checkpointer.step_dir(3)))
    (checkpointer.step_dir(2) / ".metadata").write_bytes(b"garbage")
    step, weight = load_fresh(checkpointer)
    assert step == 1 and [d.step for d in checkpointer.damaged] == [3, 2]
    assert checkpointer.damaged[1].path == checkpointer.step_dir(2) / ".metadata"
    torch.testing.assert_close(weight, weights[1])


def test_unreadable_manifest_is_damage(tmp_path):
    checkpointer, _ = save_steps(tmp_path)
    (checkpointer.step_dir(3) / MANIFEST).write_text("{")
    assert load_fresh(checkpointer)[0] == 2
    assert checkpointer.damaged[0].path == checkpointer.step_dir(3) / MANIFEST


def test_a_checkpoint_of_another_model_is_not_called_damaged(tmp_path):
    checkpointer, _ = save_steps(tmp_path, (1,))
    with pytest.raises(BaseException) as info:  # DCP's CheckpointException derives from BaseException
        checkpointer.load({"model": ModelState(torch.nn.Linear(16, 4))})
    assert not isinstance(info.value, DamagedCheckpointError) and "Size mismatch" in str(info.value)


def test_hashes_of_a_replaced_step_describe_the_new_files(tmp_path):
    checkpointer, _ = save_steps(tmp_path, (1,))
    layer = torch.nn.Linear(16, 8)
    checkpointer.save(1, {"model": ModelState(layer)})  # the same step again (after a resume)
    checkpointer.wait_for_hashes()
    assert load_fresh(checkpointer)[0] == 1 and not checkpointer.damaged


def test_pretrain_resume_and_export_with_a_damaged_latest(image_folder, tmp_path, capsys, caplog):
    """`pretrain train` resumes from the checkpoint before a damaged latest, warning with the file's name;
    `pretrain export --step N` of the damaged one is a one-line error naming the file."""
    overrides = tiny_overrides(image_folder, tmp_path, "run", steps=3, checkpoint_every=1, keep_last=3)
    assert pretrain_main(["train", str(CONFIG), *overrides]) == 0
    run_dir = tmp_path / "run"
    damaged = shard(run_dir / "checkpoints" / "step_00000003")
    cut_in_half(damaged)
    capsys.readouterr()
    assert pretrain_main(["export", str(run_dir), "--step", "3"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(damaged) in err
    with caplog.at_level(logging.INFO):
        assert pretrain_main(["train", str(CONFIG), *overrides, "total_steps=4"]) == 0
    assert "resumed from step 2" in caplog.text and str(damaged) in caplog.text
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000004"


def test_large_files_are_checked_by_size_and_fully_on_request(tmp_path, monkeypatch):
    """Above HASH_CHECK_MAX_BYTES a load checks sizes only (hashing a ViT-g shard again costs minutes): a cut shard
    is still found; a same-size overwrite takes `full=True`."""
    import pretrain.checkpoint_manifest as manifest_module

    checkpointer, _ = save_steps(tmp_path, (1, 2))
    monkeypatch.setattr(manifest_module, "HASH_CHECK_MAX_BYTES", 0)
    cut = shard(checkpointer.step_dir(2))
    cut_in_half(cut)
    with pytest.raises(DamagedCheckpointError, match="bytes"):
        manifest_module.verify(checkpointer.step_dir(2))
    flipped = shard(checkpointer.step_dir(1))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    manifest_module.verify(checkpointer.step_dir(1))  # sizes agree
    with pytest.raises(DamagedCheckpointError, match="SHA-256"):
        manifest_module.verify(checkpointer.step_dir(1), full=True)
