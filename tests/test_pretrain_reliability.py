"""`pretrain train` on a run folder (issue 26 points 1 and 6): a second run on the same folder refuses in one line
naming the holder, and a resume that passes over a damaged checkpoint records it in metrics.jsonl."""

from __future__ import annotations

import socket

import pytest
from test_checkpoint_integrity import cut_in_half, shard
from test_run_lock import Holder
from test_train import CONFIG, tiny_overrides

from pretrain.__main__ import main as pretrain_main
from pretrain.metrics import read_metrics

pytestmark = pytest.mark.timeout(300)


def test_second_pretrain_run_on_the_folder_refuses_naming_the_holder(image_folder, tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = Holder(run_dir)
    try:
        code = pretrain_main(["train", str(CONFIG), *tiny_overrides(image_folder, tmp_path, "run", steps=2)])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and err.startswith("error: "), err
        assert f"PID {holder.proc.pid} on host {socket.gethostname()}" in err
        assert not (run_dir / "config.yaml").exists()  # refused before its first write
    finally:
        holder.release()
    assert pretrain_main(["train", str(CONFIG), *tiny_overrides(image_folder, tmp_path, "run", steps=2)]) == 0


def test_resume_past_a_damaged_checkpoint_is_recorded_in_metrics(image_folder, tmp_path):
    overrides = tiny_overrides(image_folder, tmp_path, "run", steps=3, checkpoint_every=1, keep_last=3)
    assert pretrain_main(["train", str(CONFIG), *overrides]) == 0
    run_dir = tmp_path / "run"
    damaged = shard(run_dir / "checkpoints" / "step_00000003")
    cut_in_half(damaged)
    assert pretrain_main(["train", str(CONFIG), *overrides, "total_steps=4"]) == 0
    notes = [r for r in read_metrics(run_dir) if "damaged_checkpoint" in r]
    assert [(n["damaged_checkpoint"], n["step"]) for n in notes] == [(str(damaged), 2)], notes
