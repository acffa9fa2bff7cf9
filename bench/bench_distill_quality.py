"""Does distillation pay on CPU? The CPU recipe's teacher (cpu_tiny, 4-block ViT-Ti/8) taught to a student with half its
parameters (configs/distill/cpu_tiny.yaml: 2 blocks) against the same student pretrained from scratch by
`pretrain train` for the same time. Prints one JSON object.

usage: python bench/bench_distill_quality.py --teacher RUN [--data DIR] [--minutes 10] [--objectives dino features]
                                             [--steps N] [--out DIR] [--parallel --cores-per-run 2]
RUN: a trained cpu_tiny run or export (`python -m pretrain train configs/pretrain/cpu_tiny.yaml ...`). `dino` learns
from its heads; `features` from its backbone file alone (a head-less teacher, architecture from teacher.* keys).
Equal time: each configuration's seconds per step are measured first (30 steps each, back to back, in this run), and
each run gets the step count that fills `--minutes` at that rate (`--steps N` instead: every run N steps). k-NN
(k=20) on [CLS] at 48 px, the whole train split as the bank, the whole val split as queries; random init and raw
pixels beside them.
--parallel (a machine with cores to spare): the runs train side by side, each pinned to its own `--cores-per-run` cores
(CPU affinity, OMP_NUM_THREADS, no GPU), so each still trains on that many CPU cores and none waits for another.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from bench.bench_cpu_recipe import DEFAULT_DATA, PIXEL_SIDE, backbone_knn, pixel_knn  # noqa: E402
from bench.headline import headline  # noqa: E402
from dinoforge.config import load_config  # noqa: E402
from dinoforge.models.config import ModelConfig  # noqa: E402
from pretrain.distill_config import DistillConfig  # noqa: E402
from pretrain.metrics import read_metrics  # noqa: E402
from pretrain.run_length import scale_schedule  # noqa: E402
from pretrain.train_config import TrainConfig  # noqa: E402

DISTILL = REPO / "configs" / "distill" / "cpu_tiny.yaml"
PRETRAIN = REPO / "configs" / "pretrain" / "cpu_tiny.yaml"
CALIBRATION_STEPS = 30


def teacher_overrides(objective: str, teacher: Path) -> list[str]:
    """`dino`: the run or export with its heads; `features`: its bare backbone file and the architecture keys."""
    if objective == "dino":
        return [f"teacher.weights={teacher}", "objective=dino"]
    export = teacher / "export" if (teacher / "export").is_dir() else teacher
    model = ModelConfig(**json.loads((export / "model.json").read_text()))
    return [f"teacher.weights={export / 'teacher_backbone.safetensors'}", "objective=features",
            f"teacher.arch={model.arch}", f"teacher.depth={model.depth}", f"teacher.patch_size={model.patch_size}",
            f"teacher.img_size={model.img_size}", f"teacher.layerscale={model.layerscale}",
            "data.multicrop.local_crops_number=0"]  # the features objective reads the global crops only


def parse_variant(spec: str) -> tuple[str, str, list[str]]:
    """`NAME=OBJECTIVE[:KEY=VALUE,...]` -> (name, objective, overrides)."""
    name, _, rest = spec.partition("=")
    objective, _, changes = rest.partition(":")
    if not name or objective not in ("dino", "features"):
        raise SystemExit(f"error: --variant {spec!r}: expected NAME=dino|features[:KEY=VALUE,...]")
    return name, objective, [c for c in changes.split(",") if c]


def scratch_overrides(student: ModelConfig) -> list[str]:
    """The distillation recipe's student architecture, pretrained by the CPU recipe from random init."""
    return [f"model.arch={student.arch}", f"model.depth={student.depth}", f"model.patch_size={student.patch_size}",
            f"model.img_size={student.img_size}"]


def command(kind: str, overrides: list[str]) -> list[str]:
    recipe = DISTILL if kind == "distill" else PRETRAIN
    return [sys.executable, "-m", "pretrain", kind, str(recipe), *overrides]


def length_overrides(kind: str, base: list[str], steps: int) -> list[str]:
    """`total_steps=steps` with the recipe's warm-ups at the same fractions."""
    schema, recipe = (DistillConfig, DISTILL) if kind == "distill" else (TrainConfig, PRETRAIN)
    cfg = load_config(schema, recipe, base)
    optim = scale_schedule(cfg.optim, steps / cfg.total_steps)
    return [f"total_steps={steps}", f"optim.warmup_steps={optim.warmup_steps}",
            f"optim.freeze_last_layer_steps={optim.freeze_last_layer_steps}",
            f"optim.warmup_teacher_temp_steps={optim.warmup_teacher_temp_steps}"]


def start(kind: str, base: list[str], steps: int, out: Path, name: str, cores: list[int] | None = None,
          log_every: int = 10):
    """Start one `pretrain train|distill` through its CLI (pinned to `cores`, without a GPU, when given); -> a
    function that waits for it and returns the folder holding its export and its wall seconds."""
    overrides = [*base, *length_overrides(kind, base, steps), f"output_dir={out}", f"name={name}",
                 "checkpoint_every=0", f"log_every={log_every}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    pin = None
    if cores is not None:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(len(cores)))

        def pin() -> None:  # in the child, before exec: it and its data workers run on `cores` only
            os.sched_setaffinity(0, cores)

    started = time.perf_counter()
    proc = subprocess.Popen(command(kind, overrides), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, preexec_fn=pin)

    def finish() -> tuple[Path, float]:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"pretrain {kind} failed:\n{err[-4000:]}")
        seconds = time.perf_counter() - started
        if kind == "distill":
            cfg = load_config(DistillConfig, DISTILL, overrides)
            return out / name / "students" / cfg.students[0].name, seconds
        return out / name, seconds

    return finish


def start_all(runs: dict, steps: dict[str, int], out: Path, parallel: bool, cores_per_run: int,
              log_every: int = 10) -> dict:
    """Every run of `runs` (name -> (kind, overrides)) for its steps: side by side on their own cores (this process
    then keeps the cores left), or, run by run, when waited for; -> name -> its wait function."""
    if not parallel:
        return {name: (lambda kind=kind, base=base, name=name: start(kind, base, steps[name], out, name,
                                                                       log_every=log_every)())
                for name, (kind, base) in runs.items()}
    waits = {name: start(kind, base, steps[name], out, name, list(range(i * cores_per_run, (i + 1) * cores_per_run)),
                         log_every)
             for i, (name, (kind, base)) in enumerate(runs.items())}
    left = sorted(os.sched_getaffinity(0) - set(range(len(runs) * cores_per_run)))
    if left:
        os.sched_setaffinity(0, left)
        torch.set_num_threads(len(left))
    return waits


def train_all(runs: dict, steps: dict[str, int], out: Path, parallel: bool, cores_per_run: int,
              log_every: int = 10) -> dict:
    """`start_all`, waited for; -> name -> (folder, wall seconds)."""
    return {name: wait() for name, wait in start_all(runs, steps, out, parallel, cores_per_run, log_every).items()}


def seconds_per_step(folder: Path) -> float:
    """The median time of the steps a calibration run logged (every step; the first five, start-up and warm-up,
    left out): robust to a few steps slowed by something else on the machine."""
    return statistics.median(r["step_time_s"] for r in read_metrics(folder) if "step_time_s" in r and r["step"] >= 5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, required=True, help="a trained cpu_tiny run or export folder")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with train/ and val/")
    parser.add_argument("--minutes", type=float, default=10.0, help="training time of every run")
    parser.add_argument("--steps", type=int, default=0, help="every run this many steps instead of --minutes")
    parser.add_argument("--objectives", nargs="+", default=["dino", "features"], choices=["dino", "features"])
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OBJECTIVE[:KEY=VALUE,...]",
                        help="one more distillation run, e.g. dino_lr2=dino:optim.base_lr=0.006 (repeatable)")
    parser.add_argument("--parallel", action="store_true", help="runs side by side, each on its own cores")
    parser.add_argument("--cores-per-run", type=int, default=2)
    args = parser.parse_args()
    every_core = os.sched_getaffinity(0)
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_distill_quality-"))
    train_split, val = str(args.data / "train"), str(args.data / "val")
    data = [f"data.dataset={train_split}"]
    student = load_config(DistillConfig, DISTILL, [*data, "teacher.weights=unused"]).students[0].model
    runs = {f"distill_{o}": ("distill", [*data, *teacher_overrides(o, args.teacher)]) for o in args.objectives}
    for spec in args.variant:
        name, objective, changes = parse_variant(spec)
        runs[f"distill_{name}"] = ("distill", [*data, *teacher_overrides(objective, args.teacher), *changes])
    runs["scratch"] = ("train", [*data, *scratch_overrides(student)])
    if args.parallel and len(runs) * args.cores_per_run > len(every_core):
        raise SystemExit(f"error: --parallel needs {len(runs)} x {args.cores_per_run} cores, this process has "
                         f"{len(every_core)}")

    if args.steps:
        steps = dict.fromkeys(runs, args.steps)
    else:
        calibration = train_all(runs, dict.fromkeys(runs, CALIBRATION_STEPS), out / "calibration", args.parallel,
                                args.cores_per_run, log_every=1)
        steps = {name: max(CALIBRATION_STEPS, round(args.minutes * 60 / seconds_per_step(folder)))
                 for name, (folder, _) in calibration.items()}

    waits = start_all(runs, steps, out, args.parallel, args.cores_per_run)
    # the baselines while the runs train (side by side), or before them
    export = args.teacher / "export" if (args.teacher / "export").is_dir() else args.teacher
    teacher_model = ModelConfig(**json.loads((export / "model.json").read_text()))
    knn = {"teacher": backbone_knn(teacher_model, str(args.teacher), train_split, val, out / "eval_teacher"),
           "student_random_init": backbone_knn(student, "random", train_split, val, out / "eval_random"),
           f"pixels_{PIXEL_SIDE}": pixel_knn(student, train_split, val, out / "eval_pixels")}
    result: dict = {"teacher": str(args.teacher), "minutes": args.minutes, "parallel": args.parallel, "runs": {},
                    "knn_k20": knn, "student": {"arch": student.arch, "depth": student.depth,
                                                "patch_size": student.patch_size}}
    finished = {name: wait() for name, wait in waits.items()}
    for name, (_, seconds) in finished.items():
        result["runs"][name] = {"steps": steps[name], "train_s": round(seconds, 1)}
    os.sched_setaffinity(0, every_core)  # every run is done: evaluate on every core
    torch.set_num_threads(len(every_core))
    workers = min(8, len(every_core))
    for name, (folder, _) in finished.items():
        result["runs"][name]["knn_top1"] = backbone_knn(student, str(folder), train_split, val, out / f"eval_{name}",
                                                        workers)
        knn[name] = result["runs"][name]["knn_top1"]
    for name in runs:
        if name.startswith("distill_"):
            result[f"{name}_over_teacher"] = round(knn[name] / knn["teacher"], 4)
            result[f"{name}_minus_scratch"] = round(knn[name] - knn["scratch"], 2)
    first = next(name for name in runs if name.startswith("distill_"))
    result["headline"] = headline(f"k-NN top-1 of the student, {first} / pretrained from scratch (equal time)",
                                  knn[first] / knn["scratch"], "the same student pretrained from scratch, same time")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
