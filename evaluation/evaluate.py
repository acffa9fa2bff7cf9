"""One evaluation from its config: backbone -> datasets -> features (cached) -> classifier -> results files.

The CLI (`python -m evaluation`) and the Slurm launcher are thin wrappers around `run_evaluation`.
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from dinoforge.collectives import current_rank, current_world_size
from dinoforge.config import save_config
from dinoforge.data.datasets import build_dataset
from dinoforge.data.errors import DatasetError
from dinoforge.data.transforms import make_eval_transform
from dinoforge.launch import resolve_device
from dinoforge.models.export_reader import exported_model_config
from dinoforge.models.loading import RANDOM_WEIGHTS, is_run_directory, load_backbone, weights_fingerprint
from dinoforge.models.pixel_baseline import PIXELS_WEIGHTS
from evaluation.config import (
    TASK_SCHEMAS,
    BackboneConfig,
    EvalRunConfig,
    KnnEvalConfig,
    LinearEvalConfig,
    LogregEvalConfig,
)
from evaluation.feature_cache import cache_path, cached_features, dataset_fingerprint
from evaluation.feature_set import FeatureSet
from evaluation.features import extract_features
from evaluation.knn import knn_evaluate_report
from evaluation.linear import linear_probe
from evaluation.logreg import logistic_regression
from evaluation.results import EvalResult, write_results

logger = logging.getLogger(__name__)


def task_of(cfg: EvalRunConfig) -> str:
    for task, schema in TASK_SCHEMAS.items():
        if type(cfg) is schema:
            return task
    raise TypeError(f"not an evaluation config: {type(cfg).__name__}; use one of {sorted(TASK_SCHEMAS)}")


def output_dir(cfg: EvalRunConfig) -> Path:
    """`out`, or runs/eval/<name> (name defaults to <task>_<weights file stem>)."""
    if cfg.out:
        return Path(cfg.out).expanduser()
    weights = RANDOM_WEIGHTS if cfg.model.weights == RANDOM_WEIGHTS else Path(cfg.model.weights).stem
    return Path("runs/eval") / (cfg.name or f"{task_of(cfg)}_{weights}")


DEFAULT_CROP = 224  # DINOv2's evaluation protocol: resize 256, centre crop 224


def model_transform(cfg: EvalRunConfig) -> EvalRunConfig:
    """`cfg` with its transform's 0 sizes resolved: the crop is the side one of our runs, exports or releases trained
    at (a 48 px cpu_tiny is evaluated at 48, not 224), else DEFAULT_CROP; the resize keeps the protocol's 256/224."""
    transform = cfg.transform
    if transform.crop_size and transform.resize_size:
        return cfg
    crop = transform.crop_size or (exported_model_config(cfg.model.weights).img_size
                                   if is_run_directory(cfg.model.weights) else DEFAULT_CROP)
    resize = transform.resize_size or round(crop * 256 / DEFAULT_CROP)
    return replace(cfg, transform=replace(transform, crop_size=crop, resize_size=resize))


def run_evaluation(cfg: EvalRunConfig) -> EvalResult | None:
    """Evaluate `cfg.model` on cfg.train / cfg.val; rank 0 writes and returns the result, other ranks None.

    Under an initialised process group every rank must call this (feature extraction is shared); the
    classifier then runs on rank 0 alone.
    """
    task = task_of(cfg)
    for key in ("train", "val"):
        if not getattr(cfg, key):
            raise ValueError(f"{key} dataset not set: pass --{key} DATA (ImageFolder dir, file list or WebDataset)")
    started = time.time()
    device = resolve_device(cfg.features.device)
    fingerprint = weights_fingerprint(cfg.model)  # first: a wrong weights path fails before anything is written
    cfg = model_transform(cfg)
    out = output_dir(cfg)
    if current_rank() == 0:
        save_config(cfg, out)
    model = load_backbone(cfg.model).to(device)
    model_facts = loaded_model_facts(cfg.model, model)
    transform = make_eval_transform(cfg.transform)
    n_blocks = max(cfg.linear.n_last_blocks) if isinstance(cfg, LinearEvalConfig) else 1
    datasets = {split: build_dataset(getattr(cfg, split), transform=transform, with_labels=True)
                for split in ("train", "val")}
    features = {split: _split_features(model, ds, getattr(cfg, split), split, cfg, fingerprint, n_blocks, device)
                for split, ds in datasets.items()}
    del model  # the classifiers need the device memory, not the backbone
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    train, val, num_classes = align_labels(datasets["train"], datasets["val"], features["train"], features["val"])
    if current_rank() != 0:
        return None
    runner = {"knn": _knn, "linear": _linear, "logreg": _logreg}[task]
    result = runner(cfg, train, val, num_classes, device)
    result.meta = {
        "weights": cfg.model.weights, "weights_fingerprint": fingerprint, **model_facts, "train": cfg.train,
        "val": cfg.val, "n_train": len(train),
        "n_val": len(val), "num_classes": num_classes, "feature_dim": train.dim,
        "decode_errors": {"train": train.decode_errors, "val": val.decode_errors},
        "rejected_files": {split: _rejected_count(ds) for split, ds in datasets.items()},
        "image_size": cfg.transform.crop_size, "seed": cfg.seed, "world_size": current_world_size(),
        "device": str(device), "seconds": round(time.time() - started, 1),
    }
    json_path, md_path = write_results(result, out)
    logger.info("results written to %s and %s", json_path, md_path)
    return result


def loaded_model_facts(model_cfg: BackboneConfig, model: nn.Module) -> dict:
    """The architecture that was evaluated. A pretrain run directory brings its own model config (its export's
    model.json), which replaces the evaluation config's architecture fields: report the run's, not those. The
    raw-pixel baseline is no ViT: its arch is `pixels`."""
    if model_cfg.weights == PIXELS_WEIGHTS:
        return {"arch": PIXELS_WEIGHTS, "patch_size": model.patch_size, "depth": 0, "num_register_tokens": 0}
    built = exported_model_config(model_cfg.weights) if is_run_directory(model_cfg.weights) else model_cfg
    return {"arch": built.arch, "patch_size": model.patch_size, "depth": len(model.blocks),
            "num_register_tokens": built.num_register_tokens}


def align_labels(train_set: Dataset, val_set: Dataset, train: FeatureSet, val: FeatureSet
                 ) -> tuple[FeatureSet, FeatureSet, int]:
    """Val labels in the train set's class numbering, and the number of classes.

    ImageFolder numbers classes by sorted folder name, so a val folder missing a class would shift every label
    after it; when both datasets name their classes, val labels are mapped through the names.
    """
    for name, fs in (("train", train), ("val", val)):
        bad = int((fs.labels < 0).sum())
        if bad:
            raise DatasetError(f"{bad} {name} samples have no label (label < 0); evaluation datasets need labels")
    train_classes, val_classes = getattr(train_set, "classes", None), getattr(val_set, "classes", None)
    if train_classes and val_classes and list(train_classes) != list(val_classes):
        unknown = sorted(set(val_classes) - set(train_classes))
        if unknown:
            only_train = sorted(set(train_classes) - set(val_classes))
            raise DatasetError(f"val classes absent from the train split: {unknown[:10]} ({len(unknown)} in all; "
                               f"train-only classes: {only_train[:10]}); the two splits must share class names")
        lookup = torch.tensor([list(train_classes).index(c) for c in val_classes])
        val = FeatureSet(lookup[val.labels], val.block_cls, val.patch_mean, val.decode_errors)
    num_classes = len(train_classes) if train_classes else int(max(train.labels.max(), val.labels.max())) + 1
    return train, val, num_classes


def _rejected_count(dataset: Dataset) -> int:
    """Files the reader did not take (hidden files, wrong extensions...); it logs each one with its reason."""
    return len(getattr(getattr(dataset, "source", None), "rejected", None) or [])


def _split_features(model: nn.Module, dataset: Dataset, spec: str, split: str, cfg: EvalRunConfig,
                    fingerprint: str, n_blocks: int, device: torch.device) -> FeatureSet:
    fc = cfg.features
    precision = fc.autocast_dtype if device.type == "cuda" else "float32"
    key = {"weights": fingerprint, "model": {k: v for k, v in asdict(cfg.model).items() if k != "weights"},
           "dataset": dataset_fingerprint(spec, dataset), "transform": asdict(cfg.transform),
           "n_last_blocks": n_blocks, "precision": precision}
    cache_file = cache_path(fc.cache_dir, spec, key) if fc.cache_dir else None

    def extract() -> FeatureSet:
        return extract_features(model, dataset, n_last_blocks=n_blocks, batch_size=fc.batch_size,
                                num_workers=fc.num_workers, device=device, autocast_dtype=fc.autocast_dtype,
                                desc=f"{split} features")

    return cached_features(cache_file, key, extract)


def _knn(cfg: KnnEvalConfig, train: FeatureSet, val: FeatureSet, num_classes: int,
         device: torch.device) -> EvalResult:
    kc = cfg.knn
    report = knn_evaluate_report(train.cls, train.labels, val.cls, val.labels, ks=kc.ks, temperature=kc.temperature,
                                 n_per_class=kc.n_per_class, n_tries=kc.n_tries, seed=cfg.seed,
                                 num_classes=num_classes, device=device, train_chunk_size=kc.train_chunk_size,
                                 test_chunk_size=kc.test_chunk_size)
    return EvalResult(task="knn", metrics=report["metrics"], tables={"k-NN": report["rows"]},
                      details={"temperature": kc.temperature, "skipped": report["skipped"]})


def _linear(cfg: LinearEvalConfig, train: FeatureSet, val: FeatureSet, num_classes: int,
            device: torch.device) -> EvalResult:
    r = linear_probe(train, val, num_classes, cfg.linear, seed=cfg.seed, device=device)
    chosen = r["chosen"]
    main = [{"head": chosen["head"], "lr": chosen["lr"], "n_blocks": chosen["n_blocks"], "avgpool": chosen["avgpool"],
             "holdout_top1": chosen["holdout_top1"], "val_top1": r["metrics"]["top1"],
             "val_top5": r["metrics"]["top5"]}]
    grid = [{k: row[k] for k in ("head", "holdout_top1", "chosen")} for row in r["grid"]]
    return EvalResult(task="linear", metrics=r["metrics"],
                      tables={"Linear probe": main, "Grid (chosen on a holdout of the train split)": grid},
                      details={"chosen": chosen, "grid": r["grid"], "split": r["split"]})


def _logreg(cfg: LogregEvalConfig, train: FeatureSet, val: FeatureSet, num_classes: int,
            device: torch.device) -> EvalResult:
    r = logistic_regression(train.cls, train.labels, val.cls, val.labels, num_classes, cfg.logreg, seed=cfg.seed,
                            device=device)
    main = [{"C": r["chosen"]["C"], "holdout_top1": r["chosen"]["holdout_top1"], "val_top1": r["metrics"]["top1"],
             "val_top5": r["metrics"]["top5"]}]
    grid = [{k: row[k] for k in ("C", "holdout_top1", "chosen")} for row in r["grid"]]
    return EvalResult(task="logreg", metrics=r["metrics"],
                      tables={"Logistic regression": main, "C sweep (chosen on a holdout of the train split)": grid},
                      details={"chosen": r["chosen"], "grid": r["grid"], "split": r["split"]})
