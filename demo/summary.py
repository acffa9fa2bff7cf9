"""`python -m demo summary ...`: the table `make demo` ends with, read from the artefacts the stages wrote.

Every number comes from a file: curation counts from the run's manifest.parquet, k-NN from evaluation's
results_knn.json, parameters from each export's backbone.safetensors, and each release is verified against its
SHA256SUMS (every file hashed) before it is listed. Nothing is timed here, so an interrupted and resumed demo ends with
the same summary as one that ran straight through. Writes DIR/summary.md and DIR/summary.json and prints the former.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from safetensors import safe_open

from curate.manifest import mask_of, read_manifest
from dinoforge.atomic import atomic_write_json, atomic_write_text
from dinoforge.models.export_reader import read_model_folder
from dinoforge.models.release_format import read_sha256sums, verify_release
from evaluation.results import read_results

KNN_K = 20  # the column the table shows (evaluation's DINOv2 protocol reports k = 10, 20, ...)


@dataclass
class Curation:
    run: str
    images_in: int  # pool inputs, every file read
    rejected: dict[str, int]  # reason (without its details) -> count
    exact_duplicates: int
    near_duplicates: int
    decontaminated: int
    selected: int
    not_selected: int
    report: str
    planted: dict[str, int] = field(default_factory=dict)  # the generated dataset's own counts, to compare


@dataclass
class Model:
    label: str
    arch: str
    parameters: int | None
    knn_top1: float | None
    weights: str
    curves: str | None = None


@dataclass
class Release:
    folder: str
    files: int  # files listed in SHA256SUMS, each verified


@dataclass
class Summary:
    out: str
    data: str
    curation: Curation
    models: list[Model]
    releases: list[Release]
    knn_skipped: str | None = None


def rejection_reason(reason: str) -> str:
    """The kind of a rejection ("too small"), without its details ("10x14, shortest side < 16")."""
    return reason.split(":", 1)[0].strip()


def curation_counts(run: Path, data: Path | None = None) -> Curation:
    """Counts of the pool's rows in the curation run's manifest (pool rows only: eval and seed rows are references)."""
    table = read_manifest(run / "manifest.parquet")
    pool = mask_of(table, role="pool")
    status = np.asarray(table.column("status").to_pylist(), dtype=object)[pool]
    reasons = np.asarray(table.column("reason").to_pylist(), dtype=object)[pool]
    kinds = np.asarray(table.column("duplicate_kind").to_pylist(), dtype=object)[pool]
    rejected = Counter(rejection_reason(reason or "unknown") for reason in reasons[status == "rejected"])
    planted = {}
    generated = data / "MANIFEST.json" if data else None
    if generated and generated.is_file():
        counts = json.loads(generated.read_text())["counts"]
        planted = {k: counts[k] for k in ("pool", "corrupt", "tiny", "exact_copies", "near_duplicates", "contaminants")}
    return Curation(run=str(run), images_in=int(pool.sum()), rejected=dict(sorted(rejected.items())),
                    exact_duplicates=int(((status == "duplicate") & (kinds == "exact")).sum()),
                    near_duplicates=int(((status == "duplicate") & (kinds == "near")).sum()),
                    decontaminated=int((status == "contaminated").sum()), selected=int((status == "selected").sum()),
                    not_selected=int((status == "not_selected").sum()), report=str(run / "report" / "index.html"),
                    planted=planted)


def parameter_count(folder: Path) -> int:
    """Parameters of the backbone exported in `folder` (a run, a student's folder or a release)."""
    with safe_open(read_model_folder(folder, verify=False).backbone, framework="pt") as weights:
        return sum(int(np.prod(weights.get_slice(key).get_shape())) for key in weights.keys())


def knn_top1(results: Path) -> tuple[float, str, str]:
    """(top-1 at k = KNN_K, the evaluated architecture, the weights) from an evaluation output folder."""
    path = results / "results_knn.json"
    if not path.is_file():
        raise FileNotFoundError(f"no k-NN results at {path}: run `python -m evaluation knn ... --out {results}` first")
    result = read_results(path)
    key = f"top1_k{KNN_K}"
    if key not in result.metrics:
        raise KeyError(f"{results}/results_knn.json has no {key} (it has {sorted(result.metrics)}): evaluate with "
                       f"knn.ks including {KNN_K}")
    meta = result.meta
    arch = meta.get("arch", "?")
    if meta.get("depth"):  # a ViT; the pixel baseline has no blocks
        arch = f"{arch}/{meta['patch_size']}, {meta['depth']} blocks"
    return result.metrics[key], arch, meta.get("weights", "?")


def model_row(label: str, results: Path | None, run: Path | None) -> Model:
    """One table row: a trained model (its run gives parameters and curves) or a baseline (results only)."""
    top1, arch, weights = knn_top1(results) if results else (None, "", "")
    if run is not None:
        arch = arch or read_model_folder(run, verify=False).model.arch
        curves = run / "curves.png"
        return Model(label, arch, parameter_count(run), top1, weights or str(run),
                     str(curves) if curves.is_file() else None)
    return Model(label, arch, None, top1, weights)


def release_row(folder: Path) -> Release:
    sums = read_sha256sums(folder)
    if sums is None:
        raise FileNotFoundError(f"{folder} is not a finished release: no SHA256SUMS in it")
    verify_release(folder, read=list(sums))
    return Release(str(folder), len(sums))


def render(summary: Summary) -> str:
    """The summary as Markdown: curation counts, the model table, where the artefacts are."""
    c = summary.curation
    planted = c.planted

    def row(what: str, count: int, planted_key: str | None = None, planted_count: int | None = None) -> str:
        expected = planted_count if planted_count is not None else planted.get(planted_key or "", None)
        return f"| {what} | {count:,} |" + (f" {expected:,} |" if planted and expected is not None else
                                             (" |" if planted else ""))

    head = "| curation | images |" + (" planted |" if planted else "")
    rule = "|---|---:|" + ("---:|" if planted else "")
    rejected_planted = planted.get("corrupt", 0) + planted.get("tiny", 0) if planted else None
    lines = [f"# dinoforge demo: {summary.out}", "", f"data: {summary.data}", "", head, rule,
             row("images in (pool)", c.images_in, "pool"),
             row("rejected", sum(c.rejected.values()), planted_count=rejected_planted)]
    lines += [row(f"- {reason}", n) for reason, n in c.rejected.items()]
    lines += [row("exact duplicates", c.exact_duplicates, "exact_copies"),
              row("near duplicates", c.near_duplicates, "near_duplicates"),
              row("decontaminated (copies of val images)", c.decontaminated, "contaminants"),
              row("selected into the shards", c.selected)]
    if c.not_selected:
        lines.append(row("not selected", c.not_selected))
    lines += ["", f"| model | arch | parameters | val k-NN top-1 (k={KNN_K}) |", "|---|---|---:|---:|"]
    for m in summary.models:
        params = f"{m.parameters / 1e6:.2f}M" if m.parameters else ""
        knn = f"{m.knn_top1:.1f}%" if m.knn_top1 is not None else "skipped"
        lines.append(f"| {m.label} | {m.arch} | {params} | {knn} |")
    if summary.knn_skipped:
        lines += ["", summary.knn_skipped]
    lines += ["", "| artefact | where |", "|---|---|"]
    lines += [f"| release ({r.files} files, SHA256SUMS verified) | {r.folder} |" for r in summary.releases]
    lines.append(f"| curation report | {c.report} |")
    lines += [f"| curves, {m.label} | {m.curves} |" for m in summary.models if m.curves]
    return "\n".join(lines) + "\n"


def write_summary(summary: Summary, out: Path) -> str:
    text = render(summary)
    atomic_write_text(out / "summary.md", text)
    atomic_write_json(out / "summary.json", asdict(summary))
    return text
