"""bench/gpu_check.py: the one-call GPU check, run here in its quick CPU mode, and its stage plumbing (time budgets,
pytest summaries, the sizing of the training run)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the bench scripts are not installed; `bench` imports as a namespace package

from bench.gpu_check import (  # noqa: E402
    BEFORE_H200,
    Settings,
    issue27_summary,
    junit_summary,
    monitor_schedule,
    pytest_log_summary,
    run_check,
    run_stage,
    steps_that_fit,
)
from dinoforge.config import load_config  # noqa: E402
from pretrain.train_config import TrainConfig  # noqa: E402


def image_folder(root: Path, per_class: int) -> None:
    """Two classes of 64 px JPEGs that differ in colour (so a k-NN has something to find)."""
    for label, colour in enumerate(((200, 40, 40), (40, 40, 200))):
        folder = root / f"class{label}"
        folder.mkdir(parents=True)
        for i in range(per_class):
            shade = tuple(min(255, c + 5 * i) for c in colour)
            image = Image.new("RGB", (64, 64), shade)
            image.paste((255 - shade[0], 128, 128), (8 * (i % 6), 8, 8 * (i % 6) + 16, 40))
            image.save(folder / f"{i}.JPEG", quality=90)


@pytest.mark.timeout(300)
def test_quick_cpu_check_reports_every_section(tmp_path):
    data = tmp_path / "data"
    image_folder(data / "train", 12)
    image_folder(data / "val", 6)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out)}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--data", str(data), "--work", str(tmp_path / "work"), "--train-steps", "2"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=280)
    report = json.loads(done.stdout)  # stdout holds the summary alone
    assert report == json.loads((out / "gpu_check.json").read_text())
    assert done.returncode == 0 and report["ok"], (report["failed_stages"], report["stages"])
    assert report["wall_s"] <= time.monotonic() - started

    assert report["versions"]["torch"] and report["versions"]["timm"]
    assert report["imports"]["missing_required"] == []
    assert report["attention"]["sdpa"]["math"]["status"] == "works"
    for probe in (report["attention"]["xformers"], report["faiss"]):
        assert probe["status"] in ("works", "fails", "unavailable") and probe["reason"]
    assert report["attention"]["xformers"]["status"] != "works"  # CUDA only

    tests = report["pytest"]
    assert tests["failed"] == tests["errors"] == 0 and tests["passed"] + tests["skipped"] >= 1 and not tests["failures"]

    bench = report["bench"]["cpu_tiny"]
    assert bench["images_per_step"] == 2 and bench["peak_tflops_matmul"] > 0
    assert bench["model_gflops_per_step"] > bench["timm_gflops_per_step"] > 0  # ours adds teacher and heads
    for variant in ("ours", "ours_fsdp2", "timm_forward_backward"):
        entry = bench[variant]
        assert entry["images_per_s"] > 0 and entry["tflops"] > 0 and 0 < entry["mfu_vs_matmul"] < 5
        assert entry["mfu_vs_datasheet"] is None  # no data sheet for a CPU

    train = report["train"]
    assert train["steps"] == train["steps_done"] == 2 and train["exported"]
    assert math.isfinite(train["last"]["total_loss"]) and train["median_images_per_s"] > 0
    prototypes = load_config(TrainConfig, REPO / "configs/pretrain/cpu_tiny.yaml", ["data.dataset=x"]).loss.dino_head
    assert train["uniform_teacher_entropy"] == pytest.approx(math.log(prototypes.out_dim))
    (knn,) = train["knn"]
    assert knn["step"] == 1 and 0 <= knn["top1_k5"] <= 100
    assert "calibration" not in train  # --train-steps fixed the length

    assert set(report["stages"]) == {"env", "pytest", "bench_cpu_tiny", "train"}
    for stage in report["stages"].values():
        assert stage["status"] == "ok" and 0 < stage["seconds"] <= stage["budget_s"] and Path(stage["log"]).is_file()


@pytest.mark.timeout(200)
def test_quick_bench_and_profile_stages_report_issue27(tmp_path):
    """The issue-27 command's stages (bench with the FSDP2 variant that keeps parameters gathered, profile) at toy
    sizes: the step-speed table and the profile digest land in the summary, the tables and trace in the logs."""
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_check.py"), "--device", "cpu", "--quick",
                           "--work", str(tmp_path / "work"), "--stages", "bench", "profile",
                           "--bench-variants", "ours", "fsdp_keep", "timm", "--profile-variants", "ours", "timm"],
                          capture_output=True, text=True, env={**os.environ, "OUT": str(out)}, cwd=REPO, timeout=180)
    report = json.loads(done.stdout)
    assert done.returncode == 0 and report["ok"], (report["failed_stages"], report["stages"])
    assert set(report["stages"]) == {"bench_cpu_tiny", "profile_cpu_tiny"}
    table = report["issue27"]["recipes"]["cpu_tiny"]
    assert set(table["now"]) == {"ours", "ours_fsdp2_no_reshard", "timm_forward_backward"} and not table["before"]
    assert set(table["targets"]) == {"mfu", "fsdp2_vs_autocast"}  # vits14's rule (timm's MFU) for other recipes
    assert table["targets"]["fsdp2_vs_autocast"]["variant"] == "fsdp2_no_reshard_speed_vs_autocast"

    assert set(report["profile"]["cpu_tiny"]) == {"ours", "timm_forward_backward"}
    profile = report["profile"]["cpu_tiny"]["ours"]
    assert {"photometric", "dino_sinkhorn_knopp", "student_backbone", "backward", "optimizer", "ema"} <= set(
        profile["phases"])
    assert 0 < len(profile["top_kernels"]) <= 12 and profile["step_ms"] > 0 and profile["device_idle"] is None
    folder = out / "gpu_check_logs" / "profile" / "cpu_tiny"
    assert Path(profile["trace"]).is_file()
    assert (folder / "profile.md").is_file() and (folder / "profile.json").is_file()
    assert report["profile"]["cpu_tiny"]["timm_forward_backward"]["phases"].keys() == {"forward", "backward",
                                                                                       "optimizer"}


def test_issue27_table_against_the_targets():
    def entry(images_per_s, mfu):
        return {"images_per_s": images_per_s, "mfu": mfu, "peak_memory_gib": 10.0}

    bench = {"vits14": {"ours": entry(900, 0.13), "ours_fsdp2": entry(860, 0.124),
                        "timm_forward_backward": entry(937, 0.12), "fsdp2_speed_vs_autocast": 0.956},
             "vitl14": {"ours": entry(150, 0.32), "ours_fsdp2": entry(120, 0.26),
                        "ours_fsdp2_no_reshard": entry(146, 0.31), "fsdp2_speed_vs_autocast": 0.80,
                        "fsdp2_no_reshard_speed_vs_autocast": 0.97},
             "vitg14": {"ours": {"error": "OutOfMemoryError: CUDA out of memory"}}}
    summary = issue27_summary(bench)
    s, l, g = (summary["recipes"][m] for m in ("vits14", "vitl14", "vitg14"))
    assert s["targets"]["mfu"] == {"value": 0.13, "target": 0.12, "met": True}
    assert s["targets"]["fsdp2_vs_autocast"]["met"] and s["before"]["ours"] == {"images_per_s": 549, "mfu": 0.092}
    assert l["targets"]["mfu"] == {"value": 0.32, "target": 0.40, "met": False}
    assert l["targets"]["fsdp2_vs_autocast"]["variant"] == "fsdp2_no_reshard_speed_vs_autocast"
    assert l["targets"]["fsdp2_vs_autocast"]["met"]  # without resharding it is within 5%
    assert g["now"] == {} and g["targets"] == {} and set(g["before"]) == set(BEFORE_H200["vitg14"])
    assert (summary["targets_met"], summary["targets"]) == (3, 4)


def test_a_stage_past_its_budget_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "child.pid"
    script = ("import subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid)); print('started', flush=True); time.sleep(60)")
    started = time.monotonic()
    run = run_stage("sleepy", [sys.executable, "-c", script], 3, tmp_path / "sleepy.log")
    assert time.monotonic() - started < 20
    assert run.status == "timeout" and run.returncode is None and "started" in run.error
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _alive(child):
        time.sleep(0.1)
    assert not _alive(child)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie waits for its reaper and runs no more


def test_a_failing_stage_reports_its_log_tail(tmp_path):
    run = run_stage("boom", [sys.executable, "-c", "import sys; print('it broke here'); sys.exit(3)"], 30,
                    tmp_path / "boom.log")
    assert run.status == "failed" and run.returncode == 3 and "it broke here" in run.error
    assert run_stage("late", [sys.executable, "-c", "pass"], 0, tmp_path / "late.log").status == "skipped"


def test_junit_summary_counts_and_names(tmp_path):
    xml = tmp_path / "junit.xml"
    xml.write_text("""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
      <testcase classname="tests.test_a" name="test_ok" time="0.1"/>
      <testcase classname="tests.test_a" name="test_bad" time="0.1"><failure message="assert 1 == 2">tb</failure>
      </testcase>
      <testcase classname="" name="tests.test_b" time="0"><error message="collection failure">Traceback:
E   ImportError: cannot import name 'gone' from 'pretrain'</error></testcase>
      <testcase classname="" name="tests.test_d" time="0"><error message="collection failure">Traceback:
E   ModuleNotFoundError: No module named 'faiss'</error></testcase>
      <testcase classname="tests.test_c" name="test_gpu" time="0"><skipped message="needs CUDA"/></testcase>
    </testsuite></testsuites>""")
    summary = junit_summary(xml)
    assert (summary["passed"], summary["failed"], summary["errors"], summary["skipped"]) == (1, 1, 1, 1)
    assert summary["failures"] == ["tests.test_a::test_bad", "tests.test_b"]
    assert summary["failure_messages"] == {"tests.test_a::test_bad": "assert 1 == 2",
                                           "tests.test_b": "ImportError: cannot import name 'gone' from 'pretrain'"}
    assert summary["not_collected"] == {"tests.test_d": "ModuleNotFoundError: No module named 'faiss'"}  # not carried
    assert summary["skips"] == {"tests.test_c::test_gpu": "needs CUDA"}


def test_pytest_log_summary_when_the_xml_is_missing(tmp_path):
    log = tmp_path / "pytest.log"
    log.write_text("tests/test_a.py::test_ok PASSED [ 33%]\ntests/test_a.py::test_bad FAILED [ 66%]\n"
                   "tests/test_b.py::test_gpu SKIPPED (needs CUDA) [100%]\n")
    summary = pytest_log_summary(log)
    assert (summary["passed"], summary["failed"], summary["skipped"]) == (1, 1, 1)
    assert summary["failures"] == ["tests/test_a.py::test_bad"]


def test_training_steps_fit_the_budget():
    # 2 steps/s after a slow first step; 150 s budget - 20 s start-up - 25 s reserve -> 0.85 * 2 * 105 steps
    steps, rate = steps_that_fit([5.0] + [0.5] * 10, startup_s=20, budget_s=150, skip=1, reserve_s=25, low=50,
                                 high=3000)
    assert rate == pytest.approx(2.0) and steps == 178
    assert steps_that_fit([0.01] * 10, 20, 150, 1, 25, 50, 3000)[0] == 3000
    assert steps_that_fit([10.0] * 10, 20, 150, 1, 25, 50, 3000)[0] == 50
    assert steps_that_fit([], 20, 150, 1, 25, 50, 3000)[0] == 50


def test_the_last_knn_evaluation_falls_on_the_last_step():
    # the H200 run of 1,454 steps every 485 evaluated at 485 and 970 only; now 1,452 steps, every 484
    assert monitor_schedule(1454, points=3) == (1452, 484)
    assert monitor_schedule(1455, points=3) == (1455, 485)
    assert monitor_schedule(4, points=1) == (4, 4)
    assert monitor_schedule(2, points=3) == (3, 1)


def test_training_is_skipped_without_a_dataset(tmp_path):
    settings = Settings(device="cpu", quick=True, data=tmp_path / "missing", work=tmp_path / "work",
                        logs=tmp_path / "logs", budget_s=60, stages=["train"],
                        budgets={"train_calibration": 30, "train": 30})
    report = run_check(settings)
    assert not report["ok"] and report["failed_stages"] == ["train_calibration", "train"]
    assert report["stages"]["train"]["status"] == "skipped" and "small_imagenette" in report["stages"]["train"]["error"]


def test_a_profile_stage_killed_in_its_second_variant_keeps_the_first(tmp_path, monkeypatch):
    import bench.gpu_check as gpu_check

    folder = tmp_path / "profile" / "vits14"
    folder.mkdir(parents=True)
    (folder / "vits14.ours.profile.json").write_text(json.dumps(
        {"step_ms": 80.0, "phases": {"backward": {"ms_per_step": 30.0}}, "top_kernels": [], "device_idle": None}))
    monkeypatch.setattr(gpu_check, "run_stage", lambda name, *args, **kwargs: gpu_check.StageRun(name, "timeout"))
    settings = Settings(device="cuda", quick=False, data=tmp_path, work=tmp_path, logs=tmp_path, budget_s=60,
                        stages=["profile"], budgets=dict(gpu_check.BUDGETS), profile_variants=("ours", "fsdp"))
    run, section = gpu_check.stage_profile(settings, "vits14", {}, time.monotonic() + 60)
    assert run.status == "timeout"
    assert section["ours"]["step_ms"] == 80.0 and section["ours"]["phases"]["backward"]["ms_per_step"] == 30.0
    assert section["ours_fsdp2"] == {"error": "no profile written (timeout)"}
