"""`make demo`'s stages at a reduced size (`slow`): every stage runs through its public command line from the
Makefile, the summary's numbers are the artefacts' own, a second run redoes nothing, a demo killed (kill -9) and
interrupted (Ctrl-C) mid-stage ends with the summary of one that ran straight through, and a bad DATA stops at the
first stage with one line.

The sizes: 24 images a class, a 24-step teacher and a 12-step student, checkpoints every 8 steps (so an interruption
can land between two). Each process is stopped on an event the test sees (a checkpoint on disk), never on a timer.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
REDUCED = ["DEMO_STEPS=24", "DISTILL_STEPS=12", "DEMO_WARMUP=4", "DEMO_CHECKPOINT_EVERY=8",
           "DEMO_DATA_ARGS=--per-class 24 --val-per-class 8"]
STAGE_COMMANDS = ("-m dinoforge.data.demo_images", "-m curate run", "-m pretrain train", "-m pretrain distill",
                  "-m evaluation knn", "-m pretrain release", "-m pretrain plot", "-m demo summary")
WAIT_S = 900  # a generous bound on one reduced demo: only reached when something hangs


def make_command(demo: Path, *extra: str) -> list[str]:
    # demo-summary is `make demo` without its venv step: the suite already runs in the environment it would make
    return ["make", "--no-print-directory", "demo-summary", f"PY={sys.executable}", f"DEMO={demo}", *REDUCED, *extra]


def run_make(demo: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(make_command(demo, *extra), cwd=REPO, capture_output=True, text=True, timeout=WAIT_S)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """One demo that runs straight through."""
    demo = tmp_path_factory.mktemp("demo") / "straight"
    proc = run_make(demo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return demo, proc


def test_every_stage_runs_through_its_command_line(straight):
    _, proc = straight
    for command in STAGE_COMMANDS:
        assert command in proc.stdout, f"{command} not run by make demo"
    assert "| curation | images | planted |" in proc.stdout  # the summary is printed


def test_curation_counts_are_the_manifests(straight):
    demo, _ = straight
    summary = json.loads((demo / "summary.json").read_text())["curation"]
    manifest = pq.read_table(demo / "curate" / "demo" / "manifest.parquet").to_pylist()
    pool = [row for row in manifest if row["role"] == "pool"]
    status = Counter(row["status"] for row in pool)
    assert summary["images_in"] == len(pool)
    assert summary["selected"] == status["selected"] and summary["decontaminated"] == status["contaminated"]
    assert sum(summary["rejected"].values()) == status["rejected"]
    kinds = Counter(row["duplicate_kind"] for row in pool if row["status"] == "duplicate")
    assert (summary["exact_duplicates"], summary["near_duplicates"]) == (kinds["exact"], kinds["near"])
    # ... and they are what the generator planted: every corrupt and tiny file rejected, every exact copy found,
    # every copy of a val image removed (a near copy may also match a val image, so at least as many).
    planted = json.loads((demo / "data" / "MANIFEST.json").read_text())["counts"]
    assert summary["planted"]["pool"] == planted["pool"] == len(pool)
    assert status["rejected"] == planted["corrupt"] + planted["tiny"]
    assert kinds["exact"] == planted["exact_copies"] and kinds["near"] >= planted["near_duplicates"] * 0.9
    assert status["contaminated"] >= planted["contaminants"]
    assert Path(summary["report"]).is_file()


def test_models_and_releases_are_read_from_their_files(straight):
    demo, _ = straight
    summary = json.loads((demo / "summary.json").read_text())
    rows = {m["label"]: m for m in summary["models"]}
    results = {"teacher": "teacher", "student vit_tiny_d2, distilled": "student",
               "teacher arch, random init": "random_teacher", "student arch, random init": "random_student",
               "raw pixels, 16x16": "pixels"}
    assert set(rows) == set(results)
    for label, folder in results.items():
        metrics = json.loads((demo / "eval" / folder / "results_knn.json").read_text())["metrics"]
        assert rows[label]["knn_top1"] == metrics["top1_k20"]
    for label, run in (("teacher", demo / "teacher"), ("student vit_tiny_d2, distilled",
                                                        demo / "distill" / "students" / "vit_tiny_d2")):
        weights = load_file(run / "export" / "teacher_backbone.safetensors")
        assert rows[label]["parameters"] == sum(t.numel() for t in weights.values())
        assert Path(rows[label]["curves"]) == run / "curves.png" and (run / "curves.png").is_file()
    assert rows["student vit_tiny_d2, distilled"]["parameters"] < rows["teacher"]["parameters"]
    assert [Path(r["folder"]).name for r in summary["releases"]] == ["teacher", "vit_tiny_d2"]
    for release in summary["releases"]:
        sums = Path(release["folder"]) / "SHA256SUMS"
        assert release["files"] == len(sums.read_text().splitlines())
        check = subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=sums.parent, capture_output=True)
        assert check.returncode == 0, check.stdout
        assert (sums.parent / "backbone.onnx").is_file()


def test_a_second_demo_redoes_nothing_and_prints_the_same_summary(straight):
    demo, _ = straight
    before = (demo / "summary.md").read_text()
    proc = run_make(demo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ran = [c for c in STAGE_COMMANDS[:-1] if c in proc.stdout]
    assert not ran, f"a second make demo ran {ran} again"
    assert (demo / "summary.md").read_text() == before and before in proc.stdout


def test_a_changed_release_file_stops_the_summary(straight, tmp_path):
    demo, _ = straight
    release = demo / "release" / "teacher"
    card = release / "MODEL_CARD.md"
    original = card.read_bytes()
    try:
        card.write_bytes(original + b"\n")
        proc = run_make(demo)
    finally:
        card.write_bytes(original)
    assert proc.returncode != 0
    assert "MODEL_CARD.md has sha256" in proc.stderr and "Traceback" not in proc.stderr


def _wait_for(path: Path, proc: subprocess.Popen) -> None:
    """Until `path` exists (the event the test stops the demo on); fails if the demo ends first."""
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        assert proc.poll() is None, f"the demo ended (rc {proc.returncode}) before {path} appeared"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.2)


def _interrupt(demo: Path, event: Path, sig: signal.Signals) -> None:
    """Start the demo in its own process group, and send `sig` to the whole group once `event` exists."""
    # Ctrl-C reaches the demo even when the suite runs as a background job, whose children inherit SIGINT ignored
    proc = subprocess.Popen(make_command(demo), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        _wait_for(event, proc)
        os.killpg(proc.pid, sig)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0  # it did not get to finish


def _comparable(demo: Path) -> dict:
    return json.loads((demo / "summary.json").read_text().replace(str(demo), "DEMO"))


def test_killed_and_interrupted_demo_ends_with_the_same_summary(straight, tmp_path):
    reference, _ = straight
    demo = tmp_path / "interrupted"
    # kill -9 while the teacher trains (after its first checkpoint), Ctrl-C while the student does
    _interrupt(demo, demo / "teacher" / "checkpoints" / "step_00000008", signal.SIGKILL)
    assert not (demo / "teacher" / "export").exists()
    _interrupt(demo, demo / "distill" / "students" / "vit_tiny_d2" / "checkpoints" / "step_00000008", signal.SIGINT)
    assert not (demo / "summary.md").exists()
    proc = run_make(demo)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "-m curate run" not in proc.stdout  # finished stages are not redone
    assert _comparable(demo) == _comparable(reference)


@pytest.mark.parametrize("kind", ["missing", "no_images"])
def test_bad_data_stops_at_the_first_stage_with_one_line(tmp_path, kind):
    data = tmp_path / "photos"
    if kind == "no_images":
        data.mkdir()
        (data / "notes.txt").write_text("no pictures here")
    proc = run_make(tmp_path / "demo", f"DATA={data}")
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"DATA={data}" in errors[0] and "Traceback" not in proc.stderr
    assert "-m curate" not in proc.stdout


def test_own_folder_without_labels_runs_and_says_why_knn_is_skipped(tmp_path):
    """DATA=a flat folder: curation, training, distillation and release run; every k-NN row says it was skipped."""
    from dinoforge.data.demo_images import write_demo_images

    generated = tmp_path / "generated"
    write_demo_images(generated, per_class=12, val_per_class=2, size=48)
    data = tmp_path / "holiday"  # flat: no class sub-folders
    data.mkdir()
    for i, image in enumerate(sorted((generated / "train").rglob("*.*"))):
        image.rename(data / f"{i:04d}{image.suffix}")
    demo = tmp_path / "demo"
    proc = run_make(demo, f"DATA={data}", "DEMO_STEPS=8", "DISTILL_STEPS=8")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["knn_skipped"].startswith("k-NN skipped") and "class sub-folders" in summary["knn_skipped"]
    assert [m["label"] for m in summary["models"]] == ["teacher", "student vit_tiny_d2, distilled"]
    assert all(m["knn_top1"] is None and m["parameters"] for m in summary["models"])
    assert summary["curation"]["images_in"] == 120 and summary["curation"]["decontaminated"] == 0
    assert "k-NN skipped" in proc.stdout and str(data) in summary["data"]
    assert len(summary["releases"]) == 2
