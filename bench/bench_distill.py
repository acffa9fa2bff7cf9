"""One teacher pass for several students: a 3-student distillation run against three 1-student runs of the same
students, as student-images per second (each student-step of a batch counts its images). Prints one JSON object.

usage: python bench/bench_distill.py [--teacher RUN] [--data DIR] [--steps 30] [--out DIR]
RUN: a run or export with heads (default: a cpu_tiny-shaped teacher trained for 2 steps here: the speed does not
depend on what it learned). The students are configs/distill/cpu_tiny.yaml's (2-block ViT-Ti/8) at depths 1, 2 and 3.
Step times are the medians logged after the first 5 steps (start-up and warm-up left out), on the recipe's crops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from bench.bench_cpu_recipe import DEFAULT_DATA  # noqa: E402
from bench.headline import headline  # noqa: E402
from dinoforge.config import load_config  # noqa: E402
from pretrain.distill_config import DistillConfig  # noqa: E402
from pretrain.metrics import read_metrics  # noqa: E402

DISTILL = REPO / "configs" / "distill" / "cpu_tiny.yaml"
PRETRAIN = REPO / "configs" / "pretrain" / "cpu_tiny.yaml"
DEPTHS = (1, 2, 3)
WARMUP_STEPS = 5


def student(depth: int) -> str:
    return (f"{{name: d{depth}, model: {{arch: vit_tiny, depth: {depth}, patch_size: 8, img_size: 48, layerscale: "
            f"1.0}}, loss: {{dino_head: {{hidden_dim: 512, bottleneck_dim: 128}}}}}}")


def pretrain(command: str, recipe: Path, overrides: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-m", "pretrain", command, str(recipe), *overrides], cwd=REPO,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"pretrain {command} failed:\n{proc.stderr[-4000:]}")


def step_seconds(folder: Path) -> float:
    return statistics.median(r["step_time_s"] for r in read_metrics(folder)
                             if "step_time_s" in r and r["step"] >= WARMUP_STEPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder (its train/ when it has one)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides of every run")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="bench_distill-"))
    images = args.data / "train" if (args.data / "train").is_dir() else args.data
    data = f"data.dataset={images}"
    teacher = args.teacher
    if teacher is None:
        pretrain("train", PRETRAIN, [data, f"output_dir={out}", "name=teacher", "total_steps=2", "optim.warmup_steps=1",
                                     "optim.freeze_last_layer_steps=1", "checkpoint_every=0", *args.set])
        teacher = out / "teacher"
    common = [data, f"teacher.weights={teacher}", f"output_dir={out}", f"total_steps={args.steps}", "log_every=1",
              "checkpoint_every=0", "optim.warmup_steps=1", *args.set]
    pretrain("distill", DISTILL, [*common, "name=together", f"students=[{','.join(student(d) for d in DEPTHS)}]"])
    together = statistics.median(step_seconds(out / "together" / "students" / f"d{d}") for d in DEPTHS)
    alone = {}
    for depth in DEPTHS:
        pretrain("distill", DISTILL, [*common, f"name=alone_d{depth}", f"students=[{student(depth)}]"])
        alone[f"d{depth}"] = step_seconds(out / f"alone_d{depth}" / "students" / f"d{depth}")
    batch = load_config(DistillConfig, DISTILL, [*common, "students=[{name: x}]"]).data.batch_size_per_rank
    student_images = len(DEPTHS) * batch
    result = {
        "students": [f"vit_tiny/8 depth {d}" for d in DEPTHS], "steps": args.steps, "batch": batch,
        "together_step_s": round(together, 4), "alone_step_s": {k: round(v, 4) for k, v in alone.items()},
        "together_student_images_per_s": round(student_images / together, 1),
        "alone_student_images_per_s": round(student_images / sum(alone.values()), 1),
        "speedup_together_vs_alone": round(sum(alone.values()) / together, 3),
        "headline": headline(f"student-images/s, {len(DEPTHS)} students under one teacher pass",
                             sum(alone.values()) / together, f"{len(DEPTHS)} one-student runs of the same students"),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
