"""Evaluation results: one JSON file and one Markdown table per evaluation, in the output directory.

The JSON holds every number at full precision (the release's model card reads it); the Markdown renders the
same tables for people, with accuracies in percent to two decimals.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

TASK_TITLES = {"knn": "k-NN", "linear": "Linear probe", "logreg": "Logistic regression"}


@dataclass
class EvalResult:
    task: str  # knn | linear | logreg
    metrics: dict[str, float]  # headline numbers, accuracies in %
    tables: dict[str, list[dict[str, Any]]]  # titled tables, the main one first
    details: dict[str, Any] = field(default_factory=dict)  # chosen hyperparameters, skipped settings, ...
    meta: dict[str, Any] = field(default_factory=dict)  # weights, datasets, sample counts, decode errors, seed, ...


def results_paths(out_dir: str | Path, task: str) -> tuple[Path, Path]:
    out = Path(out_dir)
    return out / f"results_{task}.json", out / f"results_{task}.md"


def write_results(result: EvalResult, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `results_<task>.json` and `results_<task>.md` into `out_dir`; return their paths."""
    json_path, md_path = results_paths(out_dir, result.task)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(asdict(result), indent=2, sort_keys=False) + "\n")
    md_path.write_text(render_markdown(result))
    return json_path, md_path


def read_results(path: str | Path) -> EvalResult:
    data = json.loads(Path(path).read_text())
    return EvalResult(**data)


def render_markdown(result: EvalResult) -> str:
    meta = result.meta
    title = TASK_TITLES.get(result.task, result.task)
    model = f"{meta['arch']}/{meta['patch_size']}, " if "arch" in meta and "patch_size" in meta else ""
    lines = [f"## {title}: {model}weights `{meta.get('weights', '?')}`", ""]
    facts = [f"train `{meta['train']}` ({meta.get('n_train', '?')} images)" if "train" in meta else "",
             f"val `{meta['val']}` ({meta.get('n_val', '?')} images)" if "val" in meta else "",
             f"{meta['num_classes']} classes" if "num_classes" in meta else "",
             f"seed {meta['seed']}" if "seed" in meta else ""]
    if any(facts):
        lines += ["; ".join(f for f in facts if f), ""]
    for i, (name, rows) in enumerate(result.tables.items()):
        if i:
            lines += [f"### {name}", ""]
        lines += [markdown_table(rows), ""]
    return "\n".join(lines)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A GitHub Markdown table with the keys of the first row as columns."""
    if not rows:
        return "(no rows)"
    columns = list(rows[0])
    body = [[_cell(col, row.get(col, "")) for col in columns] for row in rows]
    header = [col.replace("_", " ") for col in columns]
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |",
           "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |" for r in body]
    return "\n".join(out)


def _cell(column: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        return f"{value:.2f}" if "top" in column else f"{value:.4g}"
    return str(value)
