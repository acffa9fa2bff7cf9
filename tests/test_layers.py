"""The layers of DESIGN.md, enforced on the import graph (module-level, `if TYPE_CHECKING` and function-local
imports alike, read with `ast`): each package imports only the packages below it, no two modules need each other
(a cycle hidden behind TYPE_CHECKING or a local import still means that: move the shared concept down, as
`pretrain.lr_scaling` for optim <-> schedules), and curation's ingest stays free of torch and faiss (it runs in
CPU-only array tasks and must start fast)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

# package -> the project packages it may import (besides itself)
ALLOWED = {
    "dinoforge": set(),
    "curate": {"dinoforge"},
    "evaluation": {"dinoforge"},
    "pretrain": {"dinoforge", "evaluation"},
    "slurm": {"dinoforge", "curate", "pretrain", "evaluation"},
    "demo": {"dinoforge", "curate", "pretrain", "evaluation"},  # make demo's own steps: read every stage's artefacts
}
PACKAGES = tuple(ALLOWED)
ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES if (ROOT / package).is_dir()
            for p in sorted((ROOT / package).rglob("*.py"))}


def imported_modules(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules that `path` imports: `import a.b`, `from a import b` (b a module or a name of a)."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package this module is in
                package = name.split(".")[: len(name.split(".")) - node.level + is_package]
                base = ".".join([*package, *([base] if base else [])])
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(path, name, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_the_checker_finds_cycles():
    graph = {"p.a": {"p.b"}, "p.b": {"p.a"}, "p.c": {"p.a"}}
    assert find_cycles(graph) == [["p.a", "p.b"]]
    assert find_cycles({"p.a": {"p.b"}, "p.b": set()}) == []


def test_type_checking_imports_are_edges(tmp_path):
    probe = tmp_path / "schedules.py"
    probe.write_text("from typing import TYPE_CHECKING\n"
                     "if TYPE_CHECKING:\n    from pretrain.optim import OptimConfig\n")
    modules = {"pretrain.optim": probe, "pretrain.schedules": probe}
    assert imported_modules(probe, "pretrain.schedules", modules) == {"pretrain.optim"}


@pytest.mark.parametrize("package", ["pretrain"])
def test_no_import_cycles_in(package):
    graph = import_graph()
    cycles = [c for c in find_cycles(graph) if any(m.split(".")[0] == package for m in c)]
    assert not cycles, f"import cycles among {package}'s modules: {cycles}"


def test_no_import_cycles_in_the_project():
    cycles = find_cycles(import_graph())
    assert not cycles, f"import cycles: {cycles}"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_the_layers_below_them(package):
    violations = [f"{module} imports {imported}"
                  for module, imports in sorted(import_graph().items()) if module.split(".")[0] == package
                  for imported in sorted(imports)
                  if imported.split(".")[0] not in ALLOWED[package] | {package}]
    assert not violations, f"{package} may import only {sorted(ALLOWED[package]) or 'no project package'}:\n" + \
        "\n".join(violations)


def test_function_level_imports_are_edges(tmp_path):
    probe = tmp_path / "m.py"
    probe.write_text("import os\n\ndef f():\n    from pretrain.train import train\n    import curate.sources.ingest\n")
    modules = {"pretrain.train": probe, "curate.sources.ingest": probe, "evaluation.m": probe}
    assert imported_modules(probe, "evaluation.m", modules) == {"pretrain.train", "curate.sources.ingest"}


INGEST_WITHOUT_HEAVY_IMPORTS = """
import sys
from curate.__main__ import main
try:
    main(sys.argv[1:])
except SystemExit as exit:
    assert exit.code in (0, None), exit.code
heavy = sorted(m for m in ("torch", "faiss", "torchvision") if m in sys.modules)
assert not heavy, f"imported {heavy}"
"""


@pytest.mark.parametrize("args", [["ingest", "--help"], ["ingest", "{config}"]])
def test_ingest_imports_neither_torch_nor_faiss(args, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (16, 16), (i * 80, 0, 0)).save(images / f"{i}.png")
    config = tmp_path / "curate.yaml"
    config.write_text(f"name: layers\nruns_root: {tmp_path / 'runs'}\nsources:\n  - {{path: {images}}}\n")
    argv = [a.format(config=config) for a in args]
    result = subprocess.run([sys.executable, "-c", INGEST_WITHOUT_HEAVY_IMPORTS, *argv], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
