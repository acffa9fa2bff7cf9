"""What a model card says about a trained model, read from its run: training data, recipe, compute and evaluations.

Every fact comes from a file of the run (config.yaml, metrics.jsonl, checkpoints, the curated shard index) or from
evaluation's results JSON; a fact the run does not record is left out, never guessed.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dinoforge.config import ConfigError
from dinoforge.data.dataset_spec import split_kind_prefix
from dinoforge.data.shard_index import index_path, read_index
from dinoforge.hashing import file_sha256, path_sha256
from evaluation.results import TASK_TITLES, EvalResult
from pretrain.checkpoint import Checkpointer
from pretrain.metrics import read_metrics


@dataclass
class TrainingFacts:
    """The facts of one trained model (a pretrain run's teacher or one student of a distillation run)."""

    kind: str  # pretrain | distill | export (an export folder without its run)
    config: dict[str, Any] = field(default_factory=dict)  # the run's resolved config.yaml
    config_sha256: str = ""
    data: dict[str, Any] = field(default_factory=dict)
    compute: dict[str, Any] = field(default_factory=dict)
    monitor: dict[str, float] = field(default_factory=dict)  # the in-training k-NN monitor's last values
    evaluations: list[EvalResult] = field(default_factory=list)
    started_at: str = ""  # from metrics.jsonl, when the run recorded it


def training_facts(run: Path | None, model_dir: Path | None, kind: str) -> TrainingFacts:
    """Facts of the model trained in `run` whose metrics and checkpoints are in `model_dir` (the run itself, or
    RUN/students/NAME of a distillation run); an export folder without its run has none."""
    if run is None or model_dir is None:
        return TrainingFacts(kind="export")
    config_file = run / "config.yaml"
    config = yaml.safe_load(config_file.read_text()) or {}
    records = read_metrics(model_dir) if (model_dir / "metrics.jsonl").is_file() else []
    notes = [r for r in records if "device" in r]
    facts = TrainingFacts(kind=kind, config=config, config_sha256=file_sha256(config_file),
                          data=_data_facts(config, notes), compute=_compute_facts(config, model_dir, records, notes),
                          monitor=_monitor(records), started_at=str(notes[0]["started_at"]) if notes else "")
    folders = [run] if model_dir == run else [run, model_dir]
    facts.evaluations = [result for folder in folders for result in _found_evaluations(folder)]
    return facts


def _data_facts(config: dict, notes: list[dict]) -> dict[str, Any]:
    spec = str((config.get("data") or {}).get("dataset", ""))
    facts: dict[str, Any] = {"dataset": spec}
    images = next((int(n["dataset_images"]) for n in reversed(notes) if "dataset_images" in n), None)
    if images is not None:
        facts["images"] = images
    _, path = split_kind_prefix(spec)
    index = index_path(path) if spec else None
    if index is not None and index.is_file():  # curated shards: the curation run and its manifest
        shard_index = read_index(path)
        facts["images"] = shard_index.total_samples
        facts["curation_run"] = shard_index.extra.get("run", "")
        manifest = index.parent.parent / "manifest.parquet"  # a link to a folder of partition files
        if manifest.exists():
            facts["manifest"] = str(manifest)
            facts["manifest_sha256"] = path_sha256(manifest)
    return facts


def _compute_facts(config: dict, model_dir: Path, records: list[dict], notes: list[dict]) -> dict[str, Any]:
    steps = Checkpointer(model_dir / "checkpoints").latest_step() if (model_dir / "checkpoints").is_dir() else None
    losses = [r for r in records if "step_time_s" in r]
    if steps is None and losses:
        steps = int(losses[-1]["step"]) + 1
    facts: dict[str, Any] = {}
    if steps is not None:
        facts["steps"] = steps
    if notes:
        facts.update(device=notes[-1]["device"], world_size=int(notes[-1]["world_size"]),
                     precision=notes[-1].get("precision", ""))
    data, optim = config.get("data") or {}, config.get("optim") or {}
    if steps is not None and notes and "batch_size_per_rank" in data:
        global_batch = int(data["batch_size_per_rank"]) * int(notes[-1]["world_size"]) * \
            int(optim.get("accumulation_steps", 1))
        facts.update(global_batch=global_batch, images_seen=steps * global_batch)
    if losses:
        step_s = statistics.median(float(r["step_time_s"]) for r in losses)
        facts["median_step_s"] = round(step_s, 4)
        facts["images_per_s"] = round(statistics.median(float(r["images_per_s"]) for r in losses), 1)
        if steps is not None:
            facts["train_seconds"] = round(steps * step_s)  # from the median step; start-up left out
    return facts


def _monitor(records: list[dict]) -> dict[str, float]:
    last = [r for r in records if any(k.startswith("knn/") for k in r)]
    if not last:
        return {}
    return {"step": int(last[-1]["step"]), **{k: float(v) for k, v in last[-1].items() if k.startswith("knn/")}}


def _found_evaluations(folder: Path) -> list[EvalResult]:
    """Results kept with the run: RUN/eval/results_*.json (`python -m evaluation knn ... --out RUN/eval`)."""
    return [read_evaluation(p) for p in sorted((folder / "eval").glob("results_*.json"))]


def read_evaluation(path: str | Path) -> EvalResult:
    """Evaluation's results JSON (`python -m evaluation ... ` writes results_<task>.json), or a one-line error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--eval {path}: no such file (evaluation writes results_<task>.json in its --out)")
    try:
        doc = json.loads(path.read_text())
    except ValueError as err:
        raise ConfigError(f"--eval {path} is not JSON ({err}): give a results_<task>.json written by "
                          "`python -m evaluation`") from None
    problems = [] if isinstance(doc, dict) else ["not an object"]
    if not problems:
        if doc.get("task") not in TASK_TITLES:
            problems.append(f"task {doc.get('task')!r} is not one of {sorted(TASK_TITLES)}")
        for key in ("metrics", "tables", "meta"):
            if not isinstance(doc.get(key), dict):
                problems.append(f"no {key!r} object")
        if not problems and not all(isinstance(v, int | float) for v in doc["metrics"].values()):
            problems.append("'metrics' values are not numbers")
    if problems:
        raise ConfigError(f"--eval {path} is not evaluation's results JSON ({'; '.join(problems)}): give a "
                          "results_<task>.json written by `python -m evaluation`")
    return EvalResult(**{k: doc[k] for k in ("task", "metrics", "tables", "details", "meta") if k in doc})


def check_evaluated_weights(result: EvalResult, origin: str, backbone_sha256: str) -> None:
    """An evaluation that names the weights it measured must have measured these: a card never shows another model's
    numbers."""
    fingerprint = str(result.meta.get("weights_fingerprint", ""))
    if fingerprint and fingerprint != f"sha256:{backbone_sha256}":
        raise ConfigError(f"--eval {origin} measured weights {fingerprint}, not this model's backbone "
                          f"(sha256:{backbone_sha256}): evaluate this run (`python -m evaluation {result.task} "
                          f"--weights RUN ...`) and pass that results file")
