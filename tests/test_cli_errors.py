"""Bad input at the command line: one `error: ...` line and a non-zero exit, never a traceback; finished runs rerun.

The CLIs are called in-process (`main(argv)`). Read-only places are made of paths below a regular file, which no
one (root included, who runs CI containers) can create anything in.
"""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from curate.__main__ import main as curate_main
from dinoforge.config import load_config, save_config
from pretrain.__main__ import main as pretrain_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _own_root_logging():
    """The CLIs configure the root logger (console and run-directory files): start without the handlers earlier
    tests left (their captured streams may be closed), and give the next test the old ones back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = []
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level


def _one_error_line(err: str) -> str:
    """The `error: ...` line of the CLI's stderr (logging may come before it), checking there is no traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith(("error: ", "config error: "))]
    assert len(lines) == 1, err
    return lines[0]


def _photos(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def _curate_config(tmp_path: Path, sources: list[dict], **extra) -> str:
    doc = {"name": "run", "runs_root": str(tmp_path / "runs"), "partitions": 2, "sources": sources,
           "embed": {"num_workers": 0}, "cluster": {"n_clusters": [3, 2]}, "select": {"method": "all"},
           "report": {"thumb_size": 32, "max_groups": 2, "images_per_group": 2}, **extra}
    path = tmp_path / "curate.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


# --- curate --------------------------------------------------------------------------------------------------------


def test_curate_bad_sources_fail_at_ingest_naming_them(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    binary = tmp_path / "photos.lst"
    binary.write_bytes(bytes(range(128, 256)))
    cases = [({"path": str(tmp_path / "empty")}, f"error: pool source 'empty': {tmp_path / 'empty'} holds no inputs"),
             ({"path": str(binary), "kind": "filelist"}, f"error: source 'photos': {binary}: not a file list")]
    for source, message in cases:
        assert curate_main(["run", _curate_config(tmp_path, [source])]) == 1
        assert _one_error_line(capsys.readouterr().err).startswith(message)
        assert not (tmp_path / "runs" / "run" / "manifest.parquet").exists()  # no step ran on it


def test_curate_nothing_left_to_cluster_is_a_one_line_error(tmp_path, capsys):
    pool = tmp_path / "pool"
    pool.mkdir()
    (pool / "a.jpg").write_text("not a photo")
    assert curate_main(["run", _curate_config(tmp_path, [{"path": str(pool)}])]) == 1
    assert _one_error_line(capsys.readouterr().err).startswith("error: nothing to cluster: no pool image survived")


def test_curate_unwritable_run_directory_is_a_one_line_error(tmp_path, capsys):
    pool = _photos(tmp_path / "pool", 2)
    (tmp_path / "file").write_text("")
    cfg = _curate_config(tmp_path, [{"path": str(pool)}], runs_root=str(tmp_path / "file" / "runs"))
    assert curate_main(["ingest", cfg]) == 1
    err = capsys.readouterr().err
    assert "cannot write the log file" in err
    assert _one_error_line(err) == f"error: [Errno 20] Not a directory: '{tmp_path / 'file' / 'runs' / 'run'}'"


def test_curate_embedding_with_an_unexported_pretrain_run_says_what_to_run(tmp_path, capsys):
    pool = _photos(tmp_path / "pool", 2)
    run = _unexported_pretrain_run(tmp_path / "pretrain_run")
    cfg = _curate_config(tmp_path, [{"path": str(pool)}], embed={"kind": "dinov2", "weights": str(run)})
    assert curate_main(["ingest", cfg]) == 0
    capsys.readouterr()
    assert curate_main(["embed", cfg]) == 1
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: pretrain run {run} has no export yet (no export/teacher_backbone.safetensors; the run stopped before "
        f"its end?): run `python -m pretrain export {run}` first")


def test_finished_curate_run_reruns_as_a_no_op_on_a_read_only_folder(tmp_path, capsys):
    cfg = _curate_config(tmp_path, [{"path": str(_photos(tmp_path / "pool", 12))}])
    assert curate_main(["run", cfg]) == 0
    root = tmp_path / "runs" / "run"
    for log in (root / "logs").iterdir():
        log.unlink()
    (root / "logs").rmdir()
    (root / "logs").write_text("")  # no log file can be created, for root too (chmod does not stop root)
    files = sorted(root.rglob("*"))
    for path in files:
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    root.chmod(0o555)
    before = {p: (p.stat().st_size, p.stat().st_mtime_ns) for p in files}
    capsys.readouterr()
    try:
        assert curate_main(["run", cfg]) == 0
        out, err = capsys.readouterr()
        assert sorted(root.rglob("*")) == files and {p: (p.stat().st_size, p.stat().st_mtime_ns)
                                                     for p in files} == before
    finally:
        for path in [root, *files]:
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert [line.split()[1] for line in out.splitlines()] == ["skipped"] * 7
    assert "cannot write the log file" in err and "Traceback" not in err


# --- pretrain ------------------------------------------------------------------------------------------------------


def _unexported_pretrain_run(run: Path) -> Path:
    """The directory of a pretraining run killed before its end: its config and checkpoints, no export/."""
    from pretrain.train_config import TrainConfig

    save_config(load_config(TrainConfig, REPO / "configs/pretrain/cpu_tiny.yaml", ["data.dataset=x"]), run)
    (run / "checkpoints").mkdir()
    return run


def test_pretrain_cli_errors_are_one_line(tmp_path, capsys):
    run = _unexported_pretrain_run(tmp_path / "killed")
    assert pretrain_main(["export", str(run)]) == 1
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: {run}: no complete checkpoint under checkpoints/ to export")
    images = _photos(tmp_path / "images" / "class_a", 4).parent
    (tmp_path / "file").write_text("")
    train = ["train", str(REPO / "configs/pretrain/cpu_tiny.yaml"), f"data.dataset={images}", "data.num_workers=0"]
    assert pretrain_main([*train, f"output_dir={tmp_path / 'file'}"]) == 1
    assert _one_error_line(capsys.readouterr().err).startswith("error: [Errno 20] Not a directory:")
    assert pretrain_main([*train, f"output_dir={tmp_path / 'runs'}", f"init_weights={run}"]) == 1
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: pretrain run {run} has no export yet (no export/teacher_backbone.safetensors; the run stopped before "
        f"its end?): run `python -m pretrain export {run}` first")
    assert pretrain_main(["export", str(tmp_path / "images")]) == 2
    assert _one_error_line(capsys.readouterr().err).startswith(
        f"error: {tmp_path / 'images'} is not a pretrain run (no config.yaml); a run directory")
    (tmp_path / "notes.pth").write_text("not weights")
    assert pretrain_main([*train, f"output_dir={tmp_path / 'runs'}", f"init_weights={tmp_path / 'notes.pth'}"]) == 1
    assert _one_error_line(capsys.readouterr().err).startswith(
        f"error: {tmp_path / 'notes.pth'} is not a torch checkpoint")


@pytest.mark.timeout(120)
def test_pretrain_dataset_errors_are_one_line_before_workers_start(tmp_path, capsys):
    """A text file taken as a file list of missing images once sat at 0% with workers: it must fail fast, here."""
    notes = tmp_path / "notes.txt"
    notes.write_text("some notes\nnot image paths\n")
    no_images = tmp_path / "no_images"
    no_images.mkdir()
    (no_images / "readme.md").write_text("photos will come\n")
    train = ["train", str(REPO / "configs/pretrain/cpu_tiny.yaml"), "data.num_workers=2",
             f"output_dir={tmp_path / 'runs'}"]
    assert pretrain_main([*train, f"data.dataset={notes}"]) == 1
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: {notes}: 2 consecutive samples from index 0 are unreadable, the first: {tmp_path / 'some notes'} "
        f"(cannot read file: [Errno 2] No such file or directory: '{tmp_path / 'some notes'}'); check the dataset "
        "path and the logged reasons")
    assert pretrain_main([*train, f"data.dataset={no_images}"]) == 1
    assert _one_error_line(capsys.readouterr().err) == (
        f"error: {no_images}: empty dataset directory (no class subfolders, no .tar shards, no images)")


def test_eval_dataset_errors_are_one_line(tmp_path, capsys):
    from evaluation.__main__ import main as eval_main

    flat = _photos(tmp_path / "flat", 2)
    assert eval_main(["knn", "--weights", "random", "--train", str(flat), "--val", str(flat),
                      "--out", str(tmp_path / "out")]) == 1
    assert _one_error_line(capsys.readouterr().err).startswith(
        f"error: --train: {flat}: holds 2 image file(s) but no class subfolders")


def test_no_error_hides_a_bug(tmp_path, monkeypatch):
    """Only user errors become one line: a programming error keeps its traceback."""
    import curate.steps.ingest

    def broken(*args, **kwargs):
        raise TypeError("a bug")

    monkeypatch.setattr(curate.steps.ingest, "ingest_sources", broken)
    with pytest.raises(TypeError, match="a bug"):
        curate_main(["ingest", _curate_config(tmp_path, [{"path": str(_photos(tmp_path / "pool", 1))}])])
