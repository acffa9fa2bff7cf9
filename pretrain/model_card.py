"""MODEL_CARD.md of a release: Hugging Face front-matter, then what the model is, how to load it in each library,
its data, recipe, compute, evaluations and limits. Pure text from the facts given: the same facts give the same
bytes (no clock, no paths of the machine that wrote it)."""

from __future__ import annotations

import json
from typing import Any

from evaluation.results import TASK_TITLES, EvalResult, markdown_table
from pretrain.release_facts import TrainingFacts

# the config keys a reader wants to see of a recipe (the full resolved config is in the run; its digest is given)
RECIPE_KEYS = ("total_steps", "precision", "data.batch_size_per_rank", "data.multicrop.global_crops_size",
               "data.multicrop.local_crops_size", "data.multicrop.local_crops_number", "optim.base_lr",
               "optim.lr_scaling", "optim.warmup_steps", "optim.weight_decay", "optim.momentum_teacher",
               "loss.dino_loss_weight", "loss.ibot_loss_weight", "loss.koleo_loss_weight", "loss.centering",
               "objective", "teacher.weights", "teacher.arch", "ema_momentum")


def render_card(name: str, config: dict[str, Any], facts: TrainingFacts, license_id: str,
                timm_name: str | None, checks: dict[str, Any]) -> str:
    """The card's text. `config` is the release's config.json; `checks` the output comparisons made at release."""
    return "\n".join([
        _front_matter(name, facts, license_id),
        f"# {name}",
        "",
        _summary(config, facts),
        "",
        "## Files",
        "",
        _files(config),
        "",
        "## How to load it",
        "",
        _loading(name, config, timm_name),
        "",
        "## Training data",
        "",
        _data(facts),
        "",
        "## Recipe",
        "",
        _recipe(facts),
        "",
        "## Compute",
        "",
        _compute(facts),
        "",
        "## Evaluation",
        "",
        _evaluations(facts),
        "",
        "## Checks made at release",
        "",
        _checks(checks),
        "",
        "## Known limits",
        "",
        _limits(config, facts),
        "",
    ])


def _front_matter(name: str, facts: TrainingFacts, license_id: str) -> str:
    dataset = facts.data.get("curation_run") or _dataset_name(facts.data.get("dataset", ""))
    lines = ["---", f"license: {license_id}", "library_name: transformers", "pipeline_tag: image-feature-extraction",
             "tags:", "  - dinoforge", "  - dinov2", "  - vision-transformer", "  - self-supervised"]
    if facts.kind == "distill":
        lines.append("  - distillation")
    if dataset:
        lines += ["datasets:", f"  - {dataset}"]
    if facts.evaluations or facts.monitor:
        lines += ["metrics:", "  - accuracy"]
    if facts.started_at:
        lines.append(f"trained: {facts.started_at[:10]}")  # the run's own record of when it started
    return "\n".join([*lines, "---", ""])


def _dataset_name(spec: str) -> str:
    path = spec.split(":", 1)[-1].rstrip("/")
    parts = [p for p in path.split("/") if p and p not in ("train", "shards")]
    return parts[-1] if parts else ""


def _summary(config: dict, facts: TrainingFacts) -> str:
    a = config["architecture"]
    how = {"pretrain": "pretrained with DINOv2's self-distillation (DINO + iBOT + KoLeo)",
           "distill": "distilled from a frozen teacher", "export": "exported from a dinoforge run"}[facts.kind]
    registers = f", {a['num_register_tokens']} registers" if a["num_register_tokens"] else ""
    return (f"A Vision Transformer backbone ({a['arch']}, patch {a['patch_size']}, width {a['embed_dim']}, depth "
            f"{a['depth']}, {a['num_heads']} heads{registers}, {a['ffn_layer']} FFN, LayerScale "
            f"{'on' if a['layerscale'] else 'off'}; {a['parameters']:,} parameters), {how} with dinoforge "
            f"{config['dinoforge']['version']} (commit `{config['dinoforge']['commit']}`). It turns an image into a "
            f"global embedding (the CLS token) and one embedding per {a['patch_size']}x{a['patch_size']} patch, at "
            f"{config['image_size']} px (normalisation mean {config['mean']}, std {config['std']}).")


def _files(config: dict) -> str:
    rows = [("`backbone.safetensors`", "the backbone, official DINOv2 key layout"),
            ("`config.json`", "architecture, image size, normalisation, code version")]
    if config.get("heads"):
        rows.append(("`heads.safetensors`", f"the training heads: {', '.join(config['heads'])}"))
    rows.append(("`hf/`", "the same weights as a Hugging Face transformers model"))
    if config.get("onnx"):
        rows.append(("`backbone.onnx`", "the backbone for ONNX Runtime"))
    rows += [("`MODEL_CARD.md`", "this card"), ("`SHA256SUMS`", "the SHA-256 of every other file (`sha256sum -c`)")]
    return "\n".join(["| file | what |", "|---|---|", *(f"| {f} | {w} |" for f, w in rows)])


def _loading(name: str, config: dict, timm_name: str | None) -> str:
    size = config["image_size"]
    blocks = [
        "Every snippet reads the release from the folder `release` (this folder); dinoforge's own loaders check "
        "SHA256SUMS first and refuse a changed file.",
        "",
        "dinoforge:",
        "```python",
        f'release = "{name}"',
        "from dinoforge.models import load_release",
        "model = load_release(release)  # eval mode",
        "import torch",
        f"x = torch.randn(1, 3, {size}, {size})  # an image normalised with config.json's mean and std",
        "out = model.forward_features(x)  # x_norm_clstoken [1, D], x_norm_patchtokens [1, N, D]",
        "```",
        "",
        "torch.hub (from a dinoforge checkout; nothing is downloaded):",
        "```python",
        f'release = "{name}"',
        "import torch",
        'model = torch.hub.load("path/to/dinoforge", "release", source="local", weights=release)',
        "```",
        "",
        "Hugging Face transformers:",
        "```python",
        f'release = "{name}"',
        "import torch",
        "from transformers import AutoModel",
        'model = AutoModel.from_pretrained(f"{release}/hf").eval()',
        f"tokens = model(pixel_values=torch.randn(1, 3, {size}, {size})).last_hidden_state  # CLS, registers, patches",
        "```",
        "",
    ]
    if timm_name:
        blocks += [
            "timm:",
            "```python",
            f'release = "{name}"',
            "import timm",
            f'model = timm.create_model("{timm_name}", pretrained=True, img_size={size}, num_classes=0,',
            '                          pretrained_cfg_overlay={"file": f"{release}/backbone.safetensors"}).eval()',
            "```",
            "",
        ]
    else:
        blocks += ["timm: this architecture has no timm name (timm knows the official DINOv2 sizes only).", ""]
    if config.get("onnx"):
        outputs = ", ".join(config["onnx"]["outputs"])
        blocks += [
            "ONNX Runtime:",
            "```python",
            f'release = "{name}"',
            "import numpy as np",
            "import onnxruntime as ort",
            'session = ort.InferenceSession(f"{release}/backbone.onnx", providers=["CPUExecutionProvider"])',
            f'x = np.zeros((1, 3, {size}, {size}), np.float32)',
            f'outputs = session.run(None, {{"pixel_values": x}})  # {outputs}',
            "```",
            "",
        ]
    return "\n".join(blocks).rstrip()


def _data(facts: TrainingFacts) -> str:
    data = facts.data
    if not data:
        return "Not recorded: this release was made from an export folder without its run."
    lines = [f"- source: `{data['dataset']}`"]
    if "images" in data:
        lines.append(f"- images: {data['images']:,}")
    if data.get("curation_run"):
        lines.append(f"- curated by dinoforge curation run `{data['curation_run']}`")
    if data.get("manifest_sha256"):
        lines.append(f"- curation manifest sha256: `{data['manifest_sha256']}` (one row per input image, with its "
                     "verdict)")
    return "\n".join(lines)


def _recipe(facts: TrainingFacts) -> str:
    if not facts.config:
        return "Not recorded: this release was made from an export folder without its run."
    lines = [f"The run's resolved config.yaml has sha256 `{facts.config_sha256}`. Key settings:", ""]
    for key in RECIPE_KEYS:
        value: Any = facts.config
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None and value != "":
            lines.append(f"- `{key}`: {json.dumps(value)}")
    students = facts.config.get("students")
    if students:
        lines.append(f"- students of the run: {', '.join(s.get('name', '?') for s in students)}")
    return "\n".join(lines)


def _compute(facts: TrainingFacts) -> str:
    c = facts.compute
    if not c:
        return "Not recorded."
    labels = [("steps", "steps", "{:,}"), ("global_batch", "global batch", "{:,}"),
              ("images_seen", "images seen", "{:,}"), ("device", "device", "{}"),
              ("world_size", "processes", "{}"), ("precision", "precision", "{}"),
              ("images_per_s", "throughput (median, images/s)", "{}"),
              ("median_step_s", "median step time (s)", "{}")]
    lines = [f"- {label}: {fmt.format(c[key])}" for key, label, fmt in labels if key in c]
    if "train_seconds" in c:
        seconds = c["train_seconds"]
        span = (f"{seconds / 3600:.1f} hours" if seconds >= 3600 else f"{seconds / 60:.1f} minutes" if seconds >= 120
                else f"{seconds} seconds")
        lines.append(f"- training time: {span} (steps x median step time)")
    return "\n".join(lines)


def _evaluations(facts: TrainingFacts) -> str:
    parts = []
    for result in facts.evaluations:
        meta = result.meta
        where = "; ".join(f for f in (f"train `{meta['train']}`" if "train" in meta else "",
                                      f"val `{meta['val']}` ({meta.get('n_val', '?')} images)" if "val" in meta
                                      else "", f"{meta['image_size']} px" if "image_size" in meta else "") if f)
        title = TASK_TITLES.get(result.task, result.task)
        parts += [f"### {title}" + (f" ({where})" if where else ""), "", markdown_table(next(iter(
            result.tables.values()))) if result.tables else _metric_lines(result), ""]
    if facts.monitor:
        values = ", ".join(f"{k.removeprefix('knn/')} {v:.2f}%" for k, v in facts.monitor.items() if k != "step")
        parts += [f"In-training k-NN monitor at step {facts.monitor['step']}: {values}.", ""]
    if not parts:
        return "No evaluation was given (`--eval RESULTS.json`) or found in the run (RUN/eval/results_*.json)."
    return "\n".join(parts).rstrip()


def _metric_lines(result: EvalResult) -> str:
    return "\n".join(f"- {k}: {v:.2f}" for k, v in result.metrics.items())


def _checks(checks: dict[str, Any]) -> str:
    lines = []
    for library, check in checks.items():
        if "skipped" in check:
            lines.append(f"- {library}: not checked ({check['skipped']})")
        else:
            lines.append(f"- {library}: max abs difference {check['max_abs_diff']:.2e} from dinoforge on CLS and patch "
                         f"tokens ({check['detail']})")
    return "\n".join(lines) if lines else "None."


def _limits(config: dict, facts: TrainingFacts) -> str:
    size = config["image_size"]
    lines = [f"- Its position embeddings are a {size} px grid: at other sizes they are interpolated, and each library "
             "interpolates its own way, so outputs there differ slightly between libraries.",
             "- A feature extractor: it has no classifier; the evaluations above train one on its frozen features."]
    images = facts.data.get("images")
    if images is not None:
        lines.append(f"- It saw {images:,} distinct training images: its features know what those show, and may "
                     "transfer poorly to other domains.")
    if not facts.evaluations:
        lines.append("- No held-out evaluation came with this release.")
    if not config.get("heads"):
        lines.append("- No training heads: it cannot teach with the `dino` distillation objective (use `features`).")
    onnx = config.get("onnx")
    if onnx and not onnx.get("dynamic_image_size"):
        lines.append(f"- backbone.onnx takes {size} px images only (fixed spatial size).")
    return "\n".join(lines)
