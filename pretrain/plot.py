"""`python -m pretrain plot RUN`: the curves a user checks first, from RUN/metrics.jsonl, as one PNG.

Panels: the losses against log K (a DINO loss stuck at log K means the targets carry no signal), the teacher's
target entropy against log K (uniform near the top, collapsed near the bottom), the learning rate and teacher
temperature, and the in-training k-NN accuracy when the monitor ran.
"""

from __future__ import annotations

import math
from pathlib import Path

from dinoforge.config import load_config
from pretrain.metrics import read_metrics

PANELS = (
    ("losses", ("total_loss", "dino_loss", "ibot_loss", "koleo_loss", "cls_loss", "patch_loss")),
    ("teacher target entropy", ("teacher_entropy", "teacher_mean_entropy")),
    ("schedules", ("lr", "teacher_temp")),
    ("k-NN accuracy", ()),  # every top-1 the monitor wrote (knn/top1_k20, ...), not its timing
)


def knn_keys(records: list[dict]) -> tuple[str, ...]:
    """The monitor's accuracies in `records` (knn/top1_k20, ...), without its timing (knn/seconds)."""
    return tuple(sorted({key for record in records for key in record if key.startswith("knn/top1")}))


def check_run_file(run_dir: Path, name: str) -> None:
    """Raise FileNotFoundError saying which folder `plot` expects when `run_dir` has no file `name`."""
    expected = ("pass a pretrain run folder (output_dir/name, e.g. runs/pretrain/cpu_tiny) holding metrics.jsonl "
                "and config.yaml")
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} is not a folder: {expected}")
    if not (run_dir / name).is_file():
        # A run's subfolder (export/, checkpoints/) given for the run itself: name the run.
        parent = next((p for p in run_dir.resolve().parents if (p / name).is_file()), None)
        hint = f"; did you mean {parent}?" if parent is not None else ""
        raise FileNotFoundError(f"{run_dir} has no {name}: {expected}{hint}")


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the run's curves to `out` (default RUN/curves.png) and return its path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a cluster node
    import matplotlib.pyplot as plt

    from pretrain.train_config import TrainConfig

    run_dir = Path(run_dir)
    check_run_file(run_dir, "metrics.jsonl")
    records = read_metrics(run_dir)
    if not records:
        raise FileNotFoundError(f"{run_dir / 'metrics.jsonl'} has no logged step yet: train first, or wait for the "
                                "first log_every steps")
    # K of the targets: noted by the run at its start (every learner of train and distill); older runs: the config
    prototypes = next((int(r["prototypes"]) for r in records if "prototypes" in r), None)
    if prototypes is None and run_dir.parent.name != "students":  # a `features` student has no prototypes
        check_run_file(run_dir, "config.yaml")
        prototypes = load_config(TrainConfig, run_dir / "config.yaml").loss.dino_head.out_dim
    log_k = math.log(prototypes) if prototypes else None
    fig, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 3.6))
    for ax, (title, keys) in zip(axes, PANELS, strict=True):
        keys = keys or knn_keys(records)
        for key in keys:
            points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), int | float)]
            if points:
                ax.plot(*zip(*points, strict=True), label=key, marker="." if len(points) < 30 else None)
        if title in ("losses", "teacher target entropy") and log_k is not None:
            ax.axhline(log_k, color="grey", linestyle="--", linewidth=1, label=f"log K = {log_k:.2f}")
        if title == "schedules":
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.suptitle(f"{run_dir.name}: {len(records)} logged steps")
    fig.tight_layout()
    out = Path(out) if out else run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def plot_runs(run_dir: str | Path, out: str | Path | None = None) -> list[Path]:
    """`plot_run` of a pretrain run, or of each student of a distillation run (RUN/students/NAME/curves.png)."""
    run_dir = Path(run_dir)
    students = sorted(p for p in (run_dir / "students").glob("*") if (p / "metrics.jsonl").is_file())
    if not students:
        return [plot_run(run_dir, out)]
    if out is not None and len(students) > 1:
        raise ValueError(f"{run_dir} has {len(students)} students: --out names one file; leave it out to write "
                         "each student's curves.png in its folder")
    return [plot_run(student, out) for student in students]
