"""Rules of run folders, one test each (issue 26 point 9): config.yaml follows the config, atomic writes leave the
old file or the new one and no temporary. Each test was checked against the one-line bug it names."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_curate_steps_plumbing import TOY_STEPS, _toy_config

import curate.steps.runner as runner
from curate.config import load_curate_config
from dinoforge.atomic import atomic_path, atomic_write, atomic_write_bytes, atomic_write_json, temporary_sibling
from dinoforge.config import to_yaml

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "curate" / "cpu_demo.yaml"


def curate_config(tmp_path: Path, *overrides: str):
    return load_curate_config(CONFIG, [f"runs_root={tmp_path}", "name=run", *overrides])


def test_config_yaml_is_rewritten_when_the_config_changes(tmp_path):
    """Bug caught: config.yaml written only when missing, so a rerun with new values keeps describing the old ones."""
    first = curate_config(tmp_path)
    runner.save_run_config(first)
    path = first.run_dir / "config.yaml"
    assert path.read_text() == to_yaml(first)
    changed = curate_config(tmp_path, "partitions=7")
    assert to_yaml(changed) != to_yaml(first)
    runner.save_run_config(changed)
    assert path.read_text() == to_yaml(changed)


def test_config_yaml_is_left_alone_when_the_config_is_the_same(tmp_path, monkeypatch):
    """A finished run on a read-only disk reruns as a no-op: an unchanged config writes nothing."""
    cfg = curate_config(tmp_path)
    runner.save_run_config(cfg)

    def no_write(*args: object) -> None:
        raise AssertionError("config.yaml rewritten although the config did not change")

    monkeypatch.setattr(runner, "save_config", no_write)
    runner.save_run_config(curate_config(tmp_path))


def test_atomic_write_that_fails_leaves_the_old_file_and_no_temporary(tmp_path):
    """Bug caught: the temporary kept after a failed write, or renamed over the target despite the error."""
    target = tmp_path / "doc.json"
    atomic_write_json(target, {"v": 1})

    def half_then_fail(fh) -> None:
        fh.write(b'{"v": ')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == atomic_write_json(tmp_path / "again.json", {"v": 1}).read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.json", "doc.json"]


def test_atomic_write_replaces_and_cleans_up(tmp_path):
    target = tmp_path / "sub" / "file.bin"
    atomic_write_bytes(target, b"old")
    atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"new" and sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]


def test_atomic_path_renames_only_on_success(tmp_path):
    target = tmp_path / "table.parquet"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"first")
        assert not target.exists()  # nothing visible before the block ends
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_bytes(b"second")
        raise ValueError("writer failed")
    assert target.read_bytes() == b"first" and [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_temporary_names_are_hidden_and_unique_to_the_process(tmp_path):
    """Slurm array tasks write the same shared file at once: each needs its own temporary."""
    tmp = temporary_sibling(tmp_path / "marker")
    assert tmp.parent == tmp_path and tmp.name.startswith(".") and str(os.getpid()) in tmp.name
    assert tmp != tmp_path / "marker"


def test_force_redoes_a_step_whose_marker_is_current(tmp_path):
    """Bug caught: `--force` leaving the current marker, so the forced step is skipped."""
    cfg = _toy_config(tmp_path)
    assert [r.status for r in runner.run_all(TOY_STEPS, cfg)] == ["done", "done"]
    assert [r.status for r in runner.run_all(TOY_STEPS, cfg)] == ["skipped", "skipped"]
    assert runner.run_step(TOY_STEPS, "total", cfg, force=True).status == "done"
    assert [r.status for r in runner.run_all(TOY_STEPS, cfg, force=True)] == ["done", "done"]
