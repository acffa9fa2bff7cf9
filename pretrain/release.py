"""`python -m pretrain release SOURCE --out DIR`: a model folder others can trust and load with their own tools.

SOURCE is a pretrain run, a distillation run (one student, or each in its own folder) or an export folder. The folder
is built beside DIR under a temporary name and renamed into place when complete, so a release is whole or absent.
Its files depend on the run only (no clock, no machine paths): releasing a run twice gives identical bytes.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from torch import nn

from dinoforge.atomic import atomic_write_text
from dinoforge.config import ConfigError
from dinoforge.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from dinoforge.hashing import file_sha256
from dinoforge.models import release_format as fmt
from dinoforge.models.config import ModelConfig, build_backbone
from dinoforge.models.export_reader import BACKBONE_FILE, HEADS_FILE, MODEL_CONFIG_FILE
from dinoforge.models.weights import load_pretrained
from dinoforge.provenance import code_version
from pretrain.model_card import render_card
from pretrain.release_facts import TrainingFacts, check_evaluated_weights, read_evaluation, training_facts
from pretrain.teacher import STUDENTS_DIR

logger = logging.getLogger(__name__)

# official DINOv2 sizes under their timm names (timm knows no other size of this family)
TIMM_NAMES = {"vit_small": "vit_small_patch14", "vit_base": "vit_base_patch14", "vit_large": "vit_large_patch14",
              "vit_giant2": "vit_giant_patch14"}
OFFICIAL_DEPTHS = {"vit_small": 12, "vit_base": 12, "vit_large": 24, "vit_giant2": 40}
OFFICIAL_FFN = {"vit_small": "mlp", "vit_base": "mlp", "vit_large": "mlp", "vit_giant2": "swiglufused"}


@dataclass(frozen=True)
class ReleaseSource:
    """One model to release: its export folder and, when known, the run that trained it."""

    name: str
    export: Path
    run: Path | None  # the run folder (config.yaml)
    model_dir: Path | None  # where its metrics.jsonl and checkpoints are: the run, or RUN/students/NAME
    kind: str  # pretrain | distill | export


def release_sources(source: str | Path, student: str | None = None) -> list[ReleaseSource]:
    """The models SOURCE holds: a pretrain run's teacher, a distillation run's students (or `student`), or the model of
    an export folder. A run that has checkpoints but no export is exported first (as `pretrain export` does)."""
    path = Path(source).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"release source {path} does not exist or is not a folder: give a pretrain run, a "
                                "distillation run or an export folder")
    if (path / BACKBONE_FILE).is_file() and (path / MODEL_CONFIG_FILE).is_file():
        run, model_dir, kind = _run_of_export(path)
        if student is not None:
            raise ConfigError(f"--student {student}: {path} is an export folder of one model, not a distillation run")
        return [ReleaseSource((run or path.parent).name if path.name == "export" else path.name, path, run, model_dir,
                              kind)]
    if not (path / "config.yaml").is_file():
        raise ConfigError(f"{path} is not a pretrain run, a distillation run or an export folder (no config.yaml, no "
                          f"{BACKBONE_FILE}): `python -m pretrain train|distill` writes runs, `export` exports them")
    config = yaml.safe_load((path / "config.yaml").read_text()) or {}
    if "students" in config:
        names = [s.get("name") for s in config.get("students") or []]
        if student is not None and student not in names:
            raise ConfigError(f"--student {student!r} is not a student of {path} (its students: {names})")
        chosen = [student] if student is not None else names
        missing = [n for n in chosen if not _has_export(path / STUDENTS_DIR / n / "export")]
        if missing:
            _export_or_explain(path, "distill")
        return [ReleaseSource(f"{path.name}-{n}", path / STUDENTS_DIR / n / "export", path, path / STUDENTS_DIR / n,
                              "distill") for n in chosen]
    if student is not None:
        raise ConfigError(f"--student {student}: {path} is a pretrain run, which has no students")
    if not _has_export(path / "export"):
        _export_or_explain(path, "train")
    return [ReleaseSource(path.name, path / "export", path, path, "pretrain")]


def _has_export(folder: Path) -> bool:
    return (folder / BACKBONE_FILE).is_file() and (folder / MODEL_CONFIG_FILE).is_file()


def _run_of_export(export: Path) -> tuple[Path | None, Path | None, str]:
    """RUN/export -> (RUN, RUN, pretrain); RUN/students/NAME/export -> (RUN, RUN/students/NAME, distill)."""
    if export.name != "export":
        return None, None, "export"
    owner = export.parent
    if owner.parent.name == STUDENTS_DIR and (owner.parent.parent / "config.yaml").is_file():
        return owner.parent.parent, owner, "distill"
    if (owner / "config.yaml").is_file():
        return owner, owner, "pretrain"
    return None, None, "export"


def _export_or_explain(run: Path, command: str) -> None:
    """Export a run that has a complete checkpoint but no export; one without either is an error saying what to do."""
    from pretrain.checkpoint import Checkpointer

    roots = [run / "checkpoints"] if command == "train" else sorted((run / STUDENTS_DIR).glob("*/checkpoints"))
    if not roots or any(Checkpointer(r).latest_step() is None for r in roots):
        raise ConfigError(f"{run} has no complete checkpoint and no export to release: `python -m pretrain {command} "
                          f"CONFIG` writes checkpoints (and the export when the run ends), `python -m pretrain export "
                          f"{run}` exports a checkpoint")
    logger.info("%s has no export yet: exporting its latest checkpoint (python -m pretrain export)", run)
    if command == "train":
        from pretrain.export import export_run

        export_run(run)
    else:
        from pretrain.distill import export_students

        export_students(run)


def release(source: str | Path, out: str | Path, *, name: str | None = None, evals: list[str] = (),
            onnx: bool = False, force: bool = False, student: str | None = None,
            license_id: str = "other") -> list[Path]:
    """Release the model(s) of `source` into `out` (a distillation run's students each into `out/NAME` unless
    `student` picks one); returns the release folders."""
    out = Path(out).expanduser()
    _check_out(out, force)
    sources = release_sources(source, student)
    results = [(e, read_evaluation(e)) for e in evals]  # bad --eval files fail before anything is written
    if len(sources) == 1:
        targets = [out]
    else:
        if name is not None:
            raise ConfigError(f"--name {name}: {source} has {len(sources)} students, each released under its own "
                              "name; pass --student NAME to release one under --name")
        if results:
            raise ConfigError("--eval: with several students, say which student the results are for (--student NAME)")
        targets = [out / s.export.parent.name for s in sources]
    written = []
    for item, target in zip(sources, targets, strict=True):
        written.append(write_release(item, target, name or item.name, results, onnx, force, license_id))
    return written


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file: give a folder for the release")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ConfigError(f"--out {out} is not empty: choose a new folder, or pass --force to replace its contents")


def write_release(item: ReleaseSource, out: Path, name: str, evals: list, onnx: bool, force: bool,
                  license_id: str) -> Path:
    """Write one release folder atomically (see the module docstring)."""
    model_cfg = ModelConfig(**json.loads((item.export / MODEL_CONFIG_FILE).read_text()))
    facts = training_facts(item.run, item.model_dir, item.kind)
    backbone_sha = file_sha256(item.export / BACKBONE_FILE)
    for origin, result in evals:
        check_evaluated_weights(result, str(origin), backbone_sha)
    found = [r for r in facts.evaluations if r.meta.get("weights_fingerprint") in (None, f"sha256:{backbone_sha}")]
    if len(found) < len(facts.evaluations):
        logger.warning("%d evaluation(s) in the run measured other weights: left out of the card",
                       len(facts.evaluations) - len(found))
    facts.evaluations = [*found, *(r for _, r in evals)]
    model = build_backbone(model_cfg, drop_path=False)
    load_pretrained(model, item.export / BACKBONE_FILE)
    model.eval()

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        _write_contents(staging, item, name, model, model_cfg, facts, onnx, license_id)
        _swap_into_place(staging, out, force)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info("released %s to %s", name, out)
    return out


def _write_contents(folder: Path, item: ReleaseSource, name: str, model: nn.Module, model_cfg: ModelConfig,
                    facts: TrainingFacts, onnx: bool, license_id: str) -> None:
    from dinoforge.models.hf_export import write_hf_folder

    shutil.copyfile(item.export / BACKBONE_FILE, folder / fmt.BACKBONE_FILE)  # the bytes the run's evaluations read
    heads = []
    if (item.export / HEADS_FILE).is_file():
        shutil.copyfile(item.export / HEADS_FILE, folder / fmt.HEADS_FILE)
        from safetensors import safe_open

        with safe_open(str(folder / fmt.HEADS_FILE), "pt") as f:
            heads = sorted({key.split(".", 1)[0] for key in f.keys()})
    config = release_config(name, model, model_cfg, facts, heads)
    write_hf_folder(model, folder / fmt.HF_DIR)
    checks = {"transformers (hf/)": compare_with_transformers(model, folder / fmt.HF_DIR, config["image_size"])}
    if onnx:
        from pretrain.onnx_export import export_onnx

        report = export_onnx(model, folder / fmt.ONNX_FILE, config["image_size"])
        config["onnx"] = {k: report[k] for k in ("opset", "inputs", "outputs", "dynamic_axes", "dynamic_image_size")}
        checks["onnxruntime (backbone.onnx)"] = {
            "max_abs_diff": report["max_abs_diff"],
            "detail": f"onnxruntime {report['onnxruntime_version']}, sizes {report['image_sizes_checked']}"}
    atomic_write_text(folder / fmt.CONFIG_FILE, json.dumps(config, indent=2, sort_keys=True) + "\n")
    card = render_card(name, config, facts, license_id, timm_name(model_cfg), checks)
    atomic_write_text(folder / fmt.CARD_FILE, card)
    fmt.write_sha256sums(folder)


def _swap_into_place(staging: Path, out: Path, force: bool) -> None:
    """Rename the finished folder to `out`; with `force` the old contents go only once the new ones are in place."""
    old = None
    if out.is_dir():
        if any(out.iterdir()) and not force:
            raise ConfigError(f"--out {out} is not empty: choose a new folder, or pass --force to replace it")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old)


def release_config(name: str, model: nn.Module, model_cfg: ModelConfig, facts: TrainingFacts,
                   heads: list[str]) -> dict:
    """config.json: how to build the model (`model`), what it is (`architecture`), how to feed it, which code."""
    multicrop = (facts.config.get("data") or {}).get("multicrop") or {}
    layerscale = bool(model_cfg.layerscale)
    return {
        "format": fmt.RELEASE_FORMAT,
        "format_version": 1,
        "name": name,
        "model": asdict(model_cfg),
        "architecture": {
            "family": "dinov2_vit", "arch": model_cfg.arch, "embed_dim": model.embed_dim,
            "depth": len(model.blocks), "num_heads": model.num_heads, "patch_size": model.patch_size,
            "num_register_tokens": model.num_register_tokens, "ffn_layer": model_cfg.ffn_layer,
            "layerscale": layerscale, "parameters": sum(p.numel() for p in model.parameters()),
        },
        "image_size": model_cfg.img_size,
        "mean": list(multicrop.get("mean", IMAGENET_MEAN)),
        "std": list(multicrop.get("std", IMAGENET_STD)),
        "heads": heads,
        "dinoforge": code_version(),
    }


def timm_name(model_cfg: ModelConfig) -> str | None:
    """timm's name of this architecture: the official DINOv2 sizes (patch 14, full depth, 0 or 4 registers)."""
    if (model_cfg.arch not in TIMM_NAMES or model_cfg.patch_size != 14
            or model_cfg.depth not in (0, OFFICIAL_DEPTHS[model_cfg.arch])
            or model_cfg.num_register_tokens not in (0, 4) or not model_cfg.layerscale
            or model_cfg.ffn_layer != OFFICIAL_FFN[model_cfg.arch]):
        return None
    registers = "_reg4" if model_cfg.num_register_tokens else ""
    return f"{TIMM_NAMES[model_cfg.arch]}{registers}_dinov2"


def compare_with_transformers(model: nn.Module, hf_dir: Path, image_size: int) -> dict:
    """Our model against transformers reading `hf_dir`, on one seeded image at the release's size."""
    try:
        from transformers import AutoModel
    except ImportError:
        return {"skipped": "transformers is not installed where the release was made"}
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    hf = AutoModel.from_pretrained(str(hf_dir)).eval()
    with torch.no_grad():
        ours = model.forward_features(x)
        tokens = hf(pixel_values=x).last_hidden_state
    registers = model.num_register_tokens
    diff = max(float((ours["x_norm_clstoken"] - tokens[:, 0]).abs().max()),
               float((ours["x_norm_patchtokens"] - tokens[:, 1 + registers:]).abs().max()))
    if diff > 1e-4:
        raise RuntimeError(f"transformers reads {hf_dir} with outputs {diff:.2e} away from ours (> 1e-4): the "
                           "Hugging Face conversion is wrong for this architecture; nothing was released")
    import transformers

    return {"max_abs_diff": diff, "detail": f"transformers {transformers.__version__}, {image_size} px"}
