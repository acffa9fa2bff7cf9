"""One-call GPU check: versions and kernel paths, `pytest -m gpu`, a bf16 training-step bench of the S, L and g
recipes (our step under autocast, our step under FSDP2, timm's ViT), a profile of their steps (stage `profile`, not
run by default) and a short real training run with k-NN at its end. Each stage runs in its own process group with its
own time budget, so a hanging stage is killed and reported ("timeout") while the others still run; one JSON summary
goes to stdout and, when OUT is set, to $OUT/gpu_check.json.

    bash bench/gpu_check.sh                                        # on the GPU machine (README "GPU check")
    python bench/gpu_check.py --device cpu --quick --data DIR      # every stage at toy sizes on a CPU

The training run is sized by a calibration run of the same command: its steps per second and start-up time give
the number of steps that fit the stage's budget. With the bench stage the summary's `issue27` section sets the step
speed against the issue's targets and the numbers measured before its changes (`BEFORE_H200`). Standard library
only: the driver must report even when torch or a wheel does not import.

    bash bench/gpu_check.sh --stages env bench profile --bench-variants ours fsdp fsdp_keep timm   # issue 27
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_MODELS = ("vits14", "vitl14", "vitg14")
TAIL_CHARS = 2000

# Seconds per stage on the GPU machine. The training run, last, gets what the others leave of the overall budget: ~150
# s of the ~465 that bench/gpu_check.sh leaves the driver by default (`train` is that nominal share).
BUDGETS = {"env": 30, "pytest": 60, "bench_vits14": 40, "bench_vitl14": 50, "bench_vitg14": 70,
           "profile_vits14": 25, "profile_vitl14": 30, "profile_vitg14": 55, "train_calibration": 45, "train": 150}
MONITOR_POINTS = 3  # k-NN evaluations along the training run: a curve, not one number
QUICK_BUDGETS = {"env": 60, "pytest": 60, "bench_cpu_tiny": 90, "profile_cpu_tiny": 90, "train_calibration": 60,
                 "train": 60}
# bench/bench_train.py's variants and their keys in its JSON
VARIANT_KEYS = {"ours": "ours", "fsdp": "ours_fsdp2", "fsdp_keep": "ours_fsdp2_no_reshard",
                "compiled": "ours_compiled", "timm": "timm_forward_backward"}
BENCH_VARIANTS = tuple(VARIANT_KEYS)
DEFAULT_BENCH_VARIANTS = ("ours", "fsdp", "timm")  # the bench budgets above are for these three
PROFILE_STEPS = 2  # profiled steps after one warm-up: a ViT-S/14 trace of 3 steps is tens of MB
# The profile budgets: start-up and one variant, plus PROFILE_VARIANT_S for each further variant (its build, 3 steps,
# the parsing of the profiler's events and the trace).
PROFILE_VARIANT_S = {"profile_vits14": 15, "profile_vitl14": 20, "profile_vitg14": 35, "profile_cpu_tiny": 30}
# Issue 27's starting point on one H200 (bf16, the recipes' per-GPU batch; README "GPU check"): images/s and MFU
# against the data sheet's 989 TFLOP/s, per recipe and variant (the keys of bench_train.py's JSON).
BEFORE_H200 = {
    "vits14": {"ours": (549, 0.092), "ours_fsdp2": (482, 0.081), "timm_forward_backward": (937, 0.119)},
    "vitl14": {"ours": (117, 0.249), "ours_fsdp2": (86, 0.183), "timm_forward_backward": (116, 0.199)},
    "vitg14": {"ours": (36.7, 0.282), "ours_fsdp2": (23.0, 0.177), "timm_forward_backward": (28.6, 0.183)},
}
MFU_TARGETS = {"vitl14": 0.40, "vitg14": 0.40}  # vits14's target is timm's MFU in the same run
FSDP2_TARGET = 0.95  # FSDP2 on one rank within 5% of autocast


@dataclass
class Settings:
    """What the stages run: the GPU sizes, or toy sizes with `quick` (a CPU test of the whole driver)."""

    device: str
    quick: bool
    data: Path
    work: Path
    logs: Path
    budget_s: float
    stages: list[str]
    python: str = sys.executable
    train_steps: int = 0  # 0: from the calibration run
    budgets: dict[str, float] = field(default_factory=dict)
    models: tuple[str, ...] = BENCH_MODELS
    variants: tuple[str, ...] = DEFAULT_BENCH_VARIANTS
    profile_variants: tuple[str, ...] = ("ours",)

    @property
    def bench_models(self) -> tuple[str, ...]:
        return ("cpu_tiny",) if self.quick else self.models


@dataclass
class StageRun:
    """How one stage process ended."""

    name: str
    status: str  # ok | failed | timeout | skipped
    seconds: float = 0.0
    budget_s: float = 0.0
    returncode: int | None = None
    log: str = ""
    error: str = ""

    def summary(self) -> dict:
        out = {"status": self.status, "seconds": round(self.seconds, 1), "budget_s": round(self.budget_s, 1),
               "returncode": self.returncode, "log": self.log}
        if self.error:
            out["error"] = self.error
        return out


def log_tail(path: Path, chars: int = TAIL_CHARS) -> str:
    """The end of a stage log without progress-bar redraws."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
    return "\n".join(line for line in lines if line.strip())[-chars:]


def _kill_group(proc: subprocess.Popen, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL, to the stage's whole process group (data-loader workers, pytest children)."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, grace_s)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def run_stage(name: str, argv: list[str], budget_s: float, log: Path, env: dict[str, str] | None = None) -> StageRun:
    """Run `argv` in the repository with at most `budget_s` seconds; stdout and stderr go to `log`."""
    if budget_s < 1:
        return StageRun(name, "skipped", budget_s=budget_s, error="no time left in the overall budget")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as out:
        out.write("$ " + " ".join(argv) + "\n")
        out.flush()
        try:
            proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as e:
            return StageRun(name, "failed", budget_s=budget_s, log=str(log), error=f"could not start: {e}")
        try:
            returncode = proc.wait(timeout=budget_s)
            timed_out = False
        except subprocess.TimeoutExpired:
            timed_out, returncode = True, None
        except BaseException:  # Ctrl-C: take the stage's processes down with the driver
            _kill_group(proc, grace_s=1.0)
            raise
        finally:
            if proc.poll() is None:
                _kill_group(proc, grace_s=1.0)
            else:
                _reap_group(proc)
    seconds = time.monotonic() - start
    if timed_out:
        return StageRun(name, "timeout", seconds, budget_s, None, str(log),
                        f"killed after its budget of {budget_s:.0f} s; log tail:\n{log_tail(log)}")
    if returncode != 0:
        return StageRun(name, "failed", seconds, budget_s, returncode, str(log), log_tail(log))
    return StageRun(name, "ok", seconds, budget_s, returncode, str(log))


def _reap_group(proc: subprocess.Popen) -> None:
    """A stage that exited may leave children of its group behind (e.g. a worker that missed its shutdown)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


# -- pytest ---------------------------------------------------------------------------------------------------------


def gpu_test_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "pytest.mark.gpu" in p.read_text(errors="replace"))


def _first_line(text: str | None) -> str:
    lines = (text or "").strip().splitlines()
    return lines[0][:300] if lines else ""


# Not carried to the GPU machine (README "GPU check"): a test module that cannot import them is reported apart.
NOT_CARRIED = ("faiss", "xformers", "open_clip", "submitit")
MISSING_MODULE = re.compile(r"^E\s+ModuleNotFoundError: No module named '([\w.]+)'", re.MULTILINE)


def _reason(element: ET.Element) -> str:
    """pytest's message, or for a collection error the last `E` line of its traceback (the actual error)."""
    said = [line[1:].strip() for line in (element.text or "").splitlines() if line.startswith("E ")]
    message = element.get("message") or ""
    if said and (not message or message == "collection failure"):
        return said[-1][:300]
    return _first_line(message or element.text)


def junit_summary(path: Path) -> dict:
    """Counts and names of the failed and erroring tests of a JUnit XML (collection errors included), skip reasons,
    and test modules that did not import for want of a module that is not carried (`not_collected`)."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures: list[str] = []
    messages: dict[str, str] = {}
    skips: dict[str, str] = {}
    not_collected: dict[str, str] = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = "::".join(part for part in (case.get("classname"), case.get("name")) if part)
        for tag, key in (("failure", "failed"), ("error", "errors"), ("skipped", "skipped")):
            found = case.find(tag)
            if found is None:
                continue
            reason = _reason(found)
            missing = MISSING_MODULE.search(found.text or "") if key == "errors" else None
            if missing and missing.group(1).split(".")[0] in NOT_CARRIED:
                not_collected[name] = reason
            elif key == "skipped":
                counts[key] += 1
                skips[name] = reason
            else:
                counts[key] += 1
                failures.append(name)
                messages[name] = reason
            break
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "failure_messages": messages, "skips": skips,
            "not_collected": not_collected}


PYTEST_LINE = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)")


def pytest_log_summary(log: Path) -> dict:
    """The same counts from pytest's verbose lines, for a run killed before it wrote its XML."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures = []
    key = {"PASSED": "passed", "XPASS": "passed", "FAILED": "failed", "ERROR": "errors", "SKIPPED": "skipped",
           "XFAIL": "skipped"}
    for line in log_tail(log, chars=10**6).splitlines():
        match = PYTEST_LINE.match(line.strip())
        if match:
            counts[key[match.group(2)]] += 1
            if match.group(2) in ("FAILED", "ERROR"):
                failures.append(match.group(1))
    return {**counts, "failures": failures, "from_log": True}


def stage_pytest(s: Settings, env: dict, deadline: float) -> tuple[StageRun, dict]:
    files = ["tests/test_vit.py"] if s.quick else gpu_test_files()
    xml = s.logs / "pytest_gpu.xml"
    xml.unlink(missing_ok=True)
    argv = [s.python, "-m", "pytest", "-m", "gpu", "-v", "-p", "no:cacheprovider", f"--junitxml={xml}",
            "--continue-on-collection-errors", *files]
    if _has_module(s.python, "pytest_timeout", env):  # one hanging test fails alone instead of taking the stage down
        argv += ["--timeout", "40"]
    run = run_stage("pytest", argv, _budget(s, "pytest", deadline), s.logs / "pytest.log", env)
    section = junit_summary(xml) if xml.exists() else pytest_log_summary(s.logs / "pytest.log")
    section["files"] = files
    # pytest's status 1 means failed tests or collection errors (counted here), 5 that none ran; neither is a
    # crash of pytest itself, so the counts decide
    if run.status == "failed" and run.returncode in (1, 5) and xml.exists():
        run.status, run.error = "ok", ""
    if run.status == "ok" and section["failed"] + section["errors"]:
        run.status = "failed"
        run.error = f"{section['failed']} failed, {section['errors']} errors: {', '.join(section['failures'])}"
    return run, section


def _has_module(python: str, name: str, env: dict) -> bool:
    probe = subprocess.run([python, "-c", f"import importlib.util as u; exit(u.find_spec({name!r}) is None)"],
                           env=env, cwd=REPO, capture_output=True)
    return probe.returncode == 0


# -- env and bench --------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def stage_env(s: Settings, env: dict, deadline: float) -> tuple[StageRun, dict]:
    out = s.logs / "env.json"
    out.unlink(missing_ok=True)
    argv = [s.python, "bench/gpu_env.py", "--device", s.device, "--json-out", str(out)]
    run = run_stage("env", argv, _budget(s, "env", deadline), s.logs / "env.log", env)
    return run, _read_json(out)


def _bench_argv(s: Settings, model: str, variants: list[str], out: Path, rounds: int) -> list[str]:
    argv = [s.python, "bench/bench_train.py", "--device", s.device, "--recipe", "--models", model,
            "--variants", *variants, "--json-out", str(out)]
    if s.quick:  # bf16 is emulated (slowly) on most CPUs
        return argv + ["--precision", "fp32", "--images", "2", "--rounds", "1", "model.depth=2"]
    return argv + ["--precision", "bf16", "--rounds", str(rounds)]


def stage_bench(s: Settings, model: str, env: dict, deadline: float) -> tuple[StageRun, dict]:
    name = f"bench_{model}"
    out = s.logs / f"{name}.json"
    out.unlink(missing_ok=True)
    argv = _bench_argv(s, model, list(s.variants), out, rounds=5)
    # the budgets are for the three default variants; each one more (a model build and 7 steps) scales them
    budget = s.budgets[name] * max(1.0, len(s.variants) / len(DEFAULT_BENCH_VARIANTS))
    run = run_stage(name, argv, _budget(s, name, deadline, budget), s.logs / f"{name}.log", env)
    report = _read_json(out)
    section = report.get("results", {}).get(model, {})
    if section:
        section["device_name"] = report.get("device_name")
    failed = {k: v["error"] for k, v in section.items() if isinstance(v, dict) and "error" in v}
    if run.status == "ok" and failed:
        run.status, run.error = "failed", "; ".join(f"{k}: {v}" for k, v in failed.items())
    return run, section


def stage_profile(s: Settings, model: str, env: dict, deadline: float) -> tuple[StageRun, dict]:
    """bench_train.py --profile (no timing rounds) of the profiled variants on one recipe: per variant its phases,
    top kernels, syncs and idle gaps in the summary; traces, profile.json and profile.md in the logs' profile/."""
    name = f"profile_{model}"
    out = s.logs / f"{name}.json"
    out.unlink(missing_ok=True)
    variants = list(s.profile_variants)
    argv = _bench_argv(s, model, variants, out, rounds=0)
    argv[argv.index("--rounds") + 1] = "0"  # the quick arguments time one round
    argv[argv.index("--json-out"):argv.index("--json-out")] = [
        "--profile", str(s.logs / "profile" / model), "--profile-steps", "1" if s.quick else str(PROFILE_STEPS)]
    budget = s.budgets[name] + PROFILE_VARIANT_S[name] * (len(variants) - 1)
    run = run_stage(name, argv, _budget(s, name, deadline, budget), s.logs / f"{name}.log", env)
    results = _read_json(out).get("results", {}).get(model, {})
    section = {}
    for variant in variants:
        # a stage killed in a later variant leaves the earlier ones' tables in their own files
        entry = results.get(VARIANT_KEYS[variant]) or {
            "profile": _read_json(s.logs / "profile" / model / f"{model}.{variant}.profile.json")
            or {"error": f"no profile written ({run.status})"}}
        section[VARIANT_KEYS[variant]] = profile_digest(
            entry.get("profile", {"error": entry.get("error", "no profile written")}))
    failed = {k: v["error"] for k, v in section.items() if "error" in v}
    if run.status == "ok" and failed:
        run.status, run.error = "failed", "; ".join(f"{k}: {v}" for k, v in failed.items())
    return run, section


def profile_digest(profile: dict, kernels: int = 12, gaps: int = 5) -> dict:
    """The summary's share of a profile: phases, syncs and idle time whole, the top kernels and longest gaps."""
    if "error" in profile:
        return {"error": profile["error"]}
    digest = {key: profile.get(key) for key in ("step_ms", "busy_ms_per_step", "phases", "host_syncs_per_step",
                                                "trace")}
    digest["top_kernels"] = profile.get("top_kernels", [])[:kernels]
    idle = profile.get("device_idle")
    digest["device_idle"] = {**idle, "gaps": idle.get("gaps", [])[:gaps]} if idle else None
    return digest


def issue27_summary(bench: dict) -> dict:
    """Issue 27's step-speed table: per recipe, each variant's images/s and MFU now and before (BEFORE_H200), and
    its targets (vits14's MFU at least timm's; vitl14 and vitg14 at 40%; FSDP2 on one rank within 5% of
    autocast, with or without resharding after forward), each with its value and whether it is met."""
    table: dict = {}
    for model, section in bench.items():
        now = {variant: {"images_per_s": entry.get("images_per_s"), "mfu": entry.get("mfu"),
                         "peak_memory_gib": entry.get("peak_memory_gib")}
               for variant, entry in section.items() if isinstance(entry, dict) and "images_per_s" in entry}
        before = {variant: {"images_per_s": ips, "mfu": mfu}
                  for variant, (ips, mfu) in BEFORE_H200.get(model, {}).items()}
        targets: dict = {}
        ours = now.get("ours", {}).get("mfu")
        if ours is not None:
            wanted = MFU_TARGETS.get(model, now.get("timm_forward_backward", {}).get("mfu"))
            if wanted is not None:
                targets["mfu"] = {"value": ours, "target": wanted, "met": ours >= wanted}
        speeds = {key: section[key] for key in ("fsdp2_speed_vs_autocast", "fsdp2_no_reshard_speed_vs_autocast")
                  if isinstance(section.get(key), (int, float))}
        if speeds:
            best = max(speeds, key=speeds.get)
            targets["fsdp2_vs_autocast"] = {"value": speeds[best], "variant": best, "target": FSDP2_TARGET,
                                            "met": speeds[best] >= FSDP2_TARGET, **speeds}
        table[model] = {"now": now, "before": before, "targets": targets}
    met = [t["met"] for section in table.values() for t in section["targets"].values()]
    return {"recipes": table, "targets_met": sum(met), "targets": len(met)}


# -- training run ---------------------------------------------------------------------------------------------------


def train_command(s: Settings, name: str, steps: int, extra: list[str]) -> list[str]:
    """`python -m pretrain train` of the one-GPU recipe for small datasets (gpu_small: ViT-S/8, 112 px, batch 256)
    for `steps` steps instead of its epochs, or of cpu_tiny at toy sizes with `quick`. The lr warm-up and the
    last-layer freeze keep gpu_small's fractions of the run (10% and 1%; its temperatures are constant)."""
    workers = 0 if s.quick else max(1, min(14, (os.cpu_count() or 4) - 2))
    config = "configs/pretrain/cpu_tiny.yaml" if s.quick else "configs/pretrain/gpu_small.yaml"
    values = [f"name={name}", f"output_dir={s.work / 'train'}", f"data.dataset={s.data / 'train'}",
              f"data.num_workers={workers}", "checkpoint_every=0", "epochs=0",
              f"optim.warmup_steps={max(1, steps // 10)}", f"optim.freeze_last_layer_steps={steps // 100}"]
    if s.quick:
        values += ["model.depth=2", "data.batch_size_per_rank=4"]
    return [s.python, "-m", "pretrain", "train", config, *values, *extra]


def read_metrics(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(training rows, k-NN rows) of a run's metrics.jsonl."""
    rows = []
    with contextlib.suppress(OSError):
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError):
                rows.append(json.loads(line))
    train = [r for r in rows if "total_loss" in r]
    knn = [r for r in rows if any(str(k).startswith("knn/") for k in r)]
    return train, knn


def steps_that_fit(step_seconds: list[float], startup_s: float, budget_s: float, skip: int, reserve_s: float,
                   low: int, high: int) -> tuple[int, float]:
    """(steps, steps per second): how many steps fit `budget_s` after the start-up of a run and `reserve_s` for its
    end (k-NN, export), at the rate of the calibration steps after the first `skip` (which include warm-up);
    with a 15% margin, within [low, high]."""
    timed = step_seconds[skip:] or step_seconds
    if not timed or sum(timed) <= 0:
        return low, float("nan")
    rate = len(timed) / sum(timed)
    steps = int(0.85 * rate * (budget_s - startup_s - reserve_s))
    return max(low, min(high, steps)), rate


def monitor_schedule(steps: int, points: int) -> tuple[int, int]:
    """(steps, k-NN interval): the run shortened to a whole number of `points` intervals, so that the last k-NN is
    the trained model's (the monitor evaluates every `interval` steps)."""
    steps = max(points, steps - steps % points)
    return steps, steps // points


def _config_out_dim(run_dir: Path) -> int | None:
    """The DINO head's prototype count from the run's resolved config (log of it is the entropy of uniform
    targets), when PyYAML is there to read it."""
    try:
        import yaml

        return int(yaml.safe_load((run_dir / "config.yaml").read_text())["loss"]["dino_head"]["out_dim"])
    except Exception:  # any reason: the summary only loses one reference number
        return None


def summarise_training(run_dir: Path, steps: int) -> dict:
    train, knn = read_metrics(run_dir)
    keys = ("total_loss", "dino_loss", "ibot_loss", "koleo_loss", "teacher_entropy", "lr")
    out: dict = {"run_dir": str(run_dir), "steps": steps,
                 "steps_done": int(train[-1]["step"]) + 1 if train else 0,
                 "exported": (run_dir / "export").is_dir()}
    if train:
        out["first"] = {k: train[0][k] for k in ("step", *keys) if k in train[0]}
        out["last"] = {k: train[-1][k] for k in ("step", *keys) if k in train[-1]}
        later = train[1:] or train  # the first logged step includes warm-up and the first batch's wait
        for key in ("images_per_s", "mfu", "data_time_s", "step_time_s"):
            values = [r[key] for r in later if isinstance(r.get(key), (int, float))]
            if values:
                out[f"median_{key}"] = statistics.median(values)
        out["peak_memory_gib"] = max(r.get("peak_memory_gib", 0.0) for r in train)
        out["skipped_steps"] = train[-1].get("skipped_steps", 0)
    out_dim = _config_out_dim(run_dir)
    if out_dim:
        out["uniform_teacher_entropy"] = math.log(out_dim)
    out["knn"] = [{k.removeprefix("knn/"): v for k, v in r.items() if k == "step" or k.startswith("knn/")}
                  for r in knn]
    return out


def stage_train(s: Settings, env: dict, deadline: float) -> tuple[dict[str, StageRun], dict]:
    """A calibration run (a few logged steps, no checkpoint) sizes the real run, which ends with a k-NN on the
    dataset's val split through the in-training monitor."""
    runs: dict[str, StageRun] = {}
    if not (s.data / "train").is_dir() or not (s.data / "val").is_dir():
        reason = (f"no dataset at {s.data} (train/ and val/ ImageFolders); make it with "
                  f"python ../shared/tools/small_imagenette.py {s.data} or pass --data")
        for name in ("train_calibration", "train"):
            runs[name] = StageRun(name, "skipped", budget_s=s.budgets[name], error=reason)
        return runs, {}
    shutil.rmtree(s.work / "train", ignore_errors=True)  # a leftover checkpoint would be resumed
    section: dict = {"dataset": str(s.data)}
    steps = s.train_steps
    if not steps:
        calibration = 3 if s.quick else 20
        argv = train_command(s, "calibration", calibration + 1,
                             [f"total_steps={calibration + 1}", f"stop_after_steps={calibration}", "log_every=1"])
        run = run_stage("train_calibration", argv, _budget(s, "train_calibration", deadline),
                        s.logs / "train_calibration.log", env)
        runs["train_calibration"] = run
        rows, _ = read_metrics(s.work / "train" / "calibration")
        step_seconds = [r["step_time_s"] for r in rows if "step_time_s" in r]
        if run.status != "ok" or not step_seconds:
            runs["train"] = StageRun("train", "skipped", budget_s=s.budgets["train"],
                                     error="the calibration run failed")
            return runs, section
        startup = max(0.0, run.seconds - sum(step_seconds))
        steps, rate = steps_that_fit(step_seconds, startup, _train_budget(deadline), skip=1 if s.quick else 5,
                                     reserve_s=5 if s.quick else 20 * MONITOR_POINTS, low=2 if s.quick else 50,
                                     high=4 if s.quick else 20000)
        section["calibration"] = {"steps": calibration, "steps_per_s": rate, "startup_s": startup,
                                  "median_images_per_s": statistics.median(r["images_per_s"] for r in rows)}
    steps, every = monitor_schedule(steps, points=1 if s.quick else MONITOR_POINTS)
    monitor = ([f"monitor.train={s.data / 'train'}", f"monitor.val={s.data / 'val'}", f"monitor.every_n_steps={every}",
                "monitor.num_workers=0", "monitor.image_size=48", "monitor.k=[5]", "monitor.batch_size=32"]
               if s.quick else
               [f"monitor.train={s.data / 'train'}", f"monitor.val={s.data / 'val'}", f"monitor.every_n_steps={every}",
                "monitor.num_workers=8", "monitor.image_size=112", "monitor.batch_size=256"])
    argv = train_command(s, "run", steps, [f"total_steps={steps}", f"log_every={max(1, steps // 40)}", *monitor])
    run = run_stage("train", argv, _train_budget(deadline), s.logs / "train.log", env)
    section.update(summarise_training(s.work / "train" / "run", steps))
    if run.status == "ok" and not (section["steps_done"] == steps and section["exported"] and section["knn"]):
        run.status, run.error = "failed", "the run ended without all its steps, its export or its k-NN"
    runs["train"] = run
    section["command"] = " ".join(argv[1:])
    return runs, section


# -- driver ---------------------------------------------------------------------------------------------------------


def _budget(s: Settings, name: str, deadline: float, budget: float | None = None) -> float:
    return max(0.0, min(s.budgets[name] if budget is None else budget, deadline - time.monotonic() - 2.0))


def _train_budget(deadline: float) -> float:
    """The training run, last, takes what is left of the overall budget."""
    return max(0.0, deadline - time.monotonic() - 2.0)


def stage_env_vars() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH", "")
    if str(REPO) not in path.split(os.pathsep):  # the checkout is not installed on the GPU machine
        env["PYTHONPATH"] = os.pathsep.join(p for p in (path, str(REPO)) if p)
    env.update(PYTHONUNBUFFERED="1", TQDM_DISABLE="1")
    return env


def run_check(s: Settings) -> dict:
    started = time.monotonic()
    deadline = started + s.budget_s
    env = stage_env_vars()
    stages: dict[str, StageRun] = {}
    report: dict = {"check": "gpu_check", "ok": False, "device": s.device, "quick": s.quick,
                    "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "budget_s": s.budget_s}
    if "env" in s.stages:
        stages["env"], found = stage_env(s, env, deadline)
        for key in ("versions", "imports", "attention", "faiss"):
            report[key] = found.get(key, {"status": stages["env"].status})
    if "pytest" in s.stages:
        stages["pytest"], report["pytest"] = stage_pytest(s, env, deadline)
    if "bench" in s.stages:
        report["bench"] = {}
        for model in s.bench_models:
            stages[f"bench_{model}"], report["bench"][model] = stage_bench(s, model, env, deadline)
        report["issue27"] = issue27_summary(report["bench"])
    if "profile" in s.stages:
        report["profile"] = {}
        for model in s.bench_models:
            stages[f"profile_{model}"], report["profile"][model] = stage_profile(s, model, env, deadline)
    if "train" in s.stages:
        runs, report["train"] = stage_train(s, env, deadline)
        stages.update(runs)
    report["stages"] = {name: run.summary() for name, run in stages.items()}
    report["failed_stages"] = [name for name, run in stages.items() if run.status != "ok"]
    report["ok"] = not report["failed_stages"]
    report["wall_s"] = round(time.monotonic() - started, 1)
    return report


def nvidia_gpu_visible() -> bool:
    """Whether the NVIDIA driver lists a GPU (without importing torch, which may be what is broken)."""
    gpus = Path("/proc/driver/nvidia/gpus")
    return (gpus.is_dir() and any(gpus.iterdir())) or Path("/dev/nvidia0").exists()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: cuda when the NVIDIA driver lists a GPU, else a note to use --device cpu --quick")
    parser.add_argument("--quick", action="store_true", help="toy sizes: the whole driver in about a minute on CPU")
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("GPU_CHECK_DATA", "data/imagenette112")),
                        help="ImageFolder root with train/ and val/ (env GPU_CHECK_DATA; default data/imagenette112)")
    parser.add_argument("--work", type=Path, default=Path("runs/gpu_check"), help="run directories and logs")
    parser.add_argument("--budget-s", type=float, default=470.0, help="the whole check, in seconds")
    parser.add_argument("--train-steps", type=int, default=0, help="fixed length of the training run (0: calibrate)")
    parser.add_argument("--stages", nargs="+", choices=["env", "pytest", "bench", "profile", "train"],
                        default=["env", "pytest", "bench", "train"])
    parser.add_argument("--bench-models", nargs="+", choices=BENCH_MODELS, default=list(BENCH_MODELS),
                        help="the recipes the bench and profile stages step (default: all three)")
    parser.add_argument("--bench-variants", nargs="+", choices=BENCH_VARIANTS, default=list(DEFAULT_BENCH_VARIANTS),
                        help="bench_train.py's variants in the bench stage (each beyond three adds a third to its "
                             "budgets)")
    parser.add_argument("--profile-variants", nargs="+", choices=BENCH_VARIANTS, default=["ours"],
                        help="the variants the profile stage profiles (default: ours)")
    parser.add_argument("--json-out", type=Path, default=None, help="default: $OUT/gpu_check.json when OUT is set")
    args = parser.parse_args(argv)
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    json_out = args.json_out or (out_dir / "gpu_check.json" if out_dir else None)
    if args.device == "auto":
        if not nvidia_gpu_visible():
            emit({"check": "gpu_check", "ok": False, "device": None,
                  "error": "no NVIDIA GPU visible; on a CPU run: bench/gpu_check.py --device cpu --quick"}, json_out)
            return 2
        args.device = "cuda"
    work = (args.work if args.work.is_absolute() else REPO / args.work).resolve()
    data = (args.data if args.data.is_absolute() else REPO / args.data).resolve()
    logs = out_dir / "gpu_check_logs" if out_dir else work / "logs"
    settings = Settings(device=args.device, quick=args.quick, data=data, work=work, logs=logs,
                        budget_s=args.budget_s, stages=args.stages, train_steps=args.train_steps,
                        budgets=dict(QUICK_BUDGETS if args.quick else BUDGETS), models=tuple(args.bench_models),
                        variants=tuple(args.bench_variants), profile_variants=tuple(args.profile_variants))
    report = run_check(settings)
    emit(report, json_out)
    return 0 if report["ok"] else 1


def strict_json(value):
    """`value` with NaN and infinities as null: JSON has no such numbers and strict readers refuse them."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def emit(report: dict, json_out: Path | None) -> None:
    """The summary on stdout (its only output there) and in `json_out`."""
    text = json.dumps(strict_json(report), indent=2, allow_nan=False)
    if json_out:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(text + "\n")
    print(text, flush=True)


if __name__ == "__main__":
    sys.exit(main())
