"""Every command line in README.md's code blocks runs and leaves the artefact the README names, so the README cannot
drift from the code.

Shell blocks are split into command lines (continuations joined, comments stripped); each must match exactly one
entry of RUNNERS, the table of how a README command is run here. Placeholders (/path/to/images, runs/curate/NAME, ...)
become tiny real artefacts; CPU-sized overrides are appended (a few steps, tiny crops and heads). Commands run from a
scratch working folder that links `configs/`, so the README's relative paths (runs/..., release/...) land there; what
one command makes (a pretrain run, a release) is made once per module by running the README's own command, and the
commands that read it run after. Python blocks run as written, in that folder, with stand-in weight files.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHELL_INFOS = {"", "sh", "bash", "shell"}
SKIPPED_INFOS = {"text"}  # diagrams, folder layouts and printed output: nothing to run
TIMEOUT_S = 600

# -- the README, parsed ---------------------------------------------------------------------------------------------


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """(info string, body) of every ``` fenced block."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```\s*$", text, re.M | re.S)]


def shell_commands(body: str) -> list[str]:
    """The command lines of a shell block: continuation lines joined, `# comments` stripped, quoting normalised."""
    joined = re.sub(r"\\\n\s*", " ", body)
    commands = []
    for line in joined.splitlines():
        tokens = shlex.split(line, comments=True)
        if tokens:
            commands.append(shlex.join(tokens))
    return commands


def readme_shell_commands() -> list[str]:
    return [cmd for info, body in fenced_blocks(README.read_text()) if info in SHELL_INFOS
            for cmd in shell_commands(body)]


def readme_python_blocks() -> list[str]:
    return [body for info, body in fenced_blocks(README.read_text()) if info == "python"]


# -- tiny stand-ins -------------------------------------------------------------------------------------------------

# What each README placeholder becomes: paths inside the scratch folder (see Workspace).
PLACEHOLDERS = {
    "/path/to/images": "images/train", "/path/to/train": "images/train", "/path/to/val": "images/val",
    "runs/curate/NAME/": "runs/curate/mine/", "path/to/dinoforge": str(REPO),
}
# An unsubstituted placeholder left in a command that is run: a README placeholder the table does not know.
LEFTOVER = re.compile(r"/path/to/|\b(NAME|DIR|RUN|DATA|WEIGHTS|CONFIG|SOURCE)\b")

# A few steps of tiny crops, heads and batches: seconds of CPU per run.
TRAIN_TINY = [
    "total_steps=2", "log_every=1", "checkpoint_every=2", "data.batch_size_per_rank=4", "data.num_workers=0",
    "data.multicrop.global_crops_size=32", "data.multicrop.local_crops_size=16", "data.multicrop.local_crops_number=2",
    "optim.warmup_steps=1", "optim.freeze_last_layer_steps=1", "peak_tflops=1.0",
]
HEADS_TINY = [f"loss.{head}.{key}={value}" for head in ("dino_head", "ibot_head")
              for key, value in (("out_dim", 64), ("hidden_dim", 32), ("bottleneck_dim", 16))]
# The GPU recipes' ViT-S/L/g at 224 px, shrunk to a 1-block ViT-Ti/16 at 32 px; `epochs` would size the run instead.
GPU_RECIPE_TINY = ["epochs=0", "model.arch=vit_tiny", "model.patch_size=16", "model.img_size=32", "model.depth=1",
                   *HEADS_TINY, *TRAIN_TINY]
CPU_TINY = ["model.depth=1", *HEADS_TINY, *TRAIN_TINY]
STUDENT_TINY = ("students=[{name: vit_tiny_d2, model: {arch: vit_tiny, depth: 1, patch_size: 8, img_size: 48, "
                "layerscale: 1.0}, loss: {dino_head: {hidden_dim: 32, bottleneck_dim: 16}}}]")
DISTILL_TINY = [*TRAIN_TINY, STUDENT_TINY]
FEATURES_TINY = ["features.cache_dir=", "features.num_workers=0", "features.batch_size=8"]
KNN_TINY = ["transform.resize_size=32", "transform.crop_size=32", "knn.ks=[3]", *FEATURES_TINY]
LINEAR_TINY = ["transform.resize_size=32", "transform.crop_size=32", "linear.epochs=1", "linear.learning_rates=[0.001]",
               "linear.n_last_blocks=[1]", "linear.avgpool=[false]", *FEATURES_TINY]
KNN14_TINY = ["transform.resize_size=28", "transform.crop_size=28", "knn.ks=[3]", *FEATURES_TINY]  # patch 14
CURATE_TINY = ["partitions=2", "cluster.n_clusters=[4,2]", "ingest.num_workers=0", "embed.num_workers=0"]

# The folders configs/curate/*.yaml name, filled with tiny images (cpu_demo's seed class is n03888257).
CURATE_DATA = ["data/imagenette2-224/train/n03888257", "data/imagenette2-224/train/n01440764",
               "data/imagenette2-224/val/n03888257", "data/imagewoof2-112/train/n02086240",
               "data/imagewoof2-112/val/n02086240"]


def write_images(folder: Path, n: int, label: int, seed: int) -> None:
    """n small JPEGs of one class: a bright square in one channel, elsewhere noise (no two alike, so dedup keeps
    most of them)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.integers(0, 255, size=(48, 48, 3), dtype=np.uint8)
        x, y = rng.integers(0, 24, size=2)
        pixels[y : y + 24, x : x + 24, label % 3] = 230
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def official_checkpoint(path: Path) -> None:
    """A stand-in for dinov2_vits14_pretrain.pth: a random ViT-S/14 in the official hub layout."""
    import torch

    from dinoforge.models import vit_small

    torch.manual_seed(0)
    torch.save(vit_small(patch_size=14, img_size=518, init_values=1.0).state_dict(), path)


# -- how each README command runs -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Runner:
    """How README commands matching `pattern` (a full match) are run, and what they must leave behind."""

    key: str
    pattern: str
    how: str
    append: tuple[str, ...] = ()  # CPU-sized overrides appended to the command
    needs: tuple[str, ...] = ()  # runners whose artefacts this command reads (run first, once per module)
    expect: tuple[str, ...] = ()  # files the command must leave, relative to its working folder
    slow: bool = False
    own_folder: bool = False  # runs in a folder of its own (its output would clash with another's), inputs linked
    mapped: str = ""  # not run: the name of the check that covers it (see MAPPED)
    prints: tuple[str, ...] = ()  # what its output must hold


SUBMIT = r"python -m slurm submit "
RUNNERS = [
    Runner("demo", r"make demo( DATA=\S+| SLURM=1)?", "tests/test_demo.py runs the demo's stage commands",
           mapped="demo"),
    Runner("make_test", r"make test( .*PYTEST_ARGS=.*)?", "CI itself: .ci/run is `make test`", mapped="make_test"),
    Runner("gpu_check", r"make gpu-check", "make gpu-check GPU_CHECK_ARGS='--device cpu --quick ...' (its CPU form)",
           slow=True, mapped="gpu_check"),
    Runner("curate_demo", r"python -m curate run configs/curate/cpu_demo\.yaml",
           "as written, on tiny data/imagenette2-224 and data/imagewoof2-112 folders",
           append=(*CURATE_TINY, "retrieve.min_seeds_per_cluster=1"),
           expect=("runs/curate/cpu_demo/shards/index.json", "runs/curate/cpu_demo/manifest.parquet",
                   "runs/curate/cpu_demo/report/index.html")),
    Runner("curate_plan", r"python -m curate plan configs/curate/billion\.yaml --images 1e9 --gpus 64( .*)?",
           "as written (it reads bench/costs.json)",
           prints=("1,000,000,000 images on 64", "embed ", "dedup ", "cluster ", "total ", "measured")),
    Runner("curate_mine", r"python -m curate run configs/curate/cpu_demo\.yaml name=mine .*",
           "as written, /path/to/images -> a tiny ImageFolder", append=CURATE_TINY,
           expect=("runs/curate/mine/shards/index.json", "runs/curate/mine/manifest.parquet")),
    Runner("curate_slurm", SUBMIT + r"curate configs/curate/imagenette\.yaml .*--profile gpu_cluster.*",
           "--local (the jobs' code in process); on the local Slurm cluster in the slurm-marked test",
           append=(*CURATE_TINY, "dedup.k=4"), own_folder=True,
           expect=("runs/curate/imagenette/shards/index.json",)),
    Runner("pretrain", r"python -m pretrain train configs/pretrain/cpu_tiny\.yaml data\.dataset=\S+",
           "as written, on a tiny ImageFolder, 2 steps of a 1-block model", append=CPU_TINY,
           expect=("runs/pretrain/cpu_tiny/export/teacher_backbone.safetensors",
                   "runs/pretrain/cpu_tiny/checkpoints/latest", "runs/pretrain/cpu_tiny/metrics.jsonl")),
    Runner("pretrain_gpu_small", r"python -m pretrain train configs/pretrain/gpu_small\.yaml .*name=mine",
           "on CPU, model and run shrunk, on the curated shards", append=GPU_RECIPE_TINY, needs=("curate_mine",),
           slow=True, expect=("runs/pretrain/mine/export/teacher_backbone.safetensors",)),
    Runner("pretrain_torchrun", r"torchrun --nproc_per_node \d+ -m pretrain train configs/pretrain/vits14\.yaml .*",
           "2 processes with gloo (python -m torch.distributed.run --standalone), model and run shrunk",
           append=GPU_RECIPE_TINY, needs=("curate_mine",), slow=True,
           expect=("runs/pretrain/vits14/export/teacher_backbone.safetensors",)),
    Runner("pretrain_slurm", SUBMIT + r"pretrain configs/pretrain/vitl14\.yaml .*--profile gpu_cluster.*",
           "--local; on the local Slurm cluster in the slurm-marked test", append=GPU_RECIPE_TINY,
           needs=("curate_mine",), own_folder=True, slow=True,
           expect=("runs/pretrain/vitl14/export/teacher_backbone.safetensors",)),
    Runner("plot", r"python -m pretrain plot runs/pretrain/cpu_tiny", "as written", needs=("pretrain",),
           expect=("runs/pretrain/cpu_tiny/curves.png",)),
    Runner("distill", r"python -m pretrain distill configs/distill/cpu_tiny\.yaml teacher\.weights=\S+ "
           r"data\.dataset=\S+",
           "as written, 2 steps, the student shrunk to one block", append=DISTILL_TINY, needs=("pretrain",),
           expect=("runs/distill/cpu_tiny/students/vit_tiny_d2/export/teacher_backbone.safetensors",)),
    Runner("distill_slurm", SUBMIT + r"pretrain distill configs/distill/cpu_tiny\.yaml .*--profile gpu_cluster",
           "--local; on the local Slurm cluster in the slurm-marked test", append=DISTILL_TINY, needs=("pretrain",),
           own_folder=True, expect=("runs/distill/cpu_tiny/students/vit_tiny_d2/export/teacher_backbone.safetensors",)),
    Runner("knn", r"python -m evaluation knn --weights runs/pretrain/cpu_tiny --train \S+ --val \S+",
           "as written, at 32 px", append=KNN_TINY, needs=("pretrain",),
           expect=("runs/eval/knn_cpu_tiny/results_knn.json", "runs/eval/knn_cpu_tiny/results_knn.md")),
    Runner("linear", r"python -m evaluation linear --weights runs/distill/cpu_tiny/students/vit_tiny_d2 .*",
           "as written, one epoch at one learning rate", append=LINEAR_TINY, needs=("distill",),
           expect=("runs/eval/linear_vit_tiny_d2/results_linear.json",)),
    Runner("knn_slurm", SUBMIT + r"evaluation knn --weights release/cpu_tiny .*--profile gpu_cluster.*",
           "--local; on the local Slurm cluster in the slurm-marked test", append=KNN_TINY, needs=("release",),
           own_folder=True, expect=("runs/eval/knn/results_knn.json",)),
    Runner("knn_official", r"python -m evaluation knn --weights dinov2_vits14_pretrain\.pth .*",
           "a random ViT-S/14 in the hub layout stands in for the file, at 28 px", append=KNN14_TINY,
           needs=("official",), expect=("runs/eval/knn_dinov2_vits14_pretrain/results_knn.json",)),
    Runner("release", r"python -m pretrain release runs/pretrain/cpu_tiny --out release/cpu_tiny --onnx",
           "as written", needs=("pretrain",),
           expect=tuple(f"release/cpu_tiny/{name}" for name in (
               "backbone.safetensors", "heads.safetensors", "config.json", "hf/config.json", "hf/model.safetensors",
               "backbone.onnx", "MODEL_CARD.md", "SHA256SUMS"))),
    Runner("release_slurm", SUBMIT + r"pretrain release runs/distill/cpu_tiny --out release/vit_tiny_d2 .*",
           "--local; on the local Slurm cluster in the slurm-marked test", needs=("distill",), own_folder=True,
           slow=True, expect=("release/vit_tiny_d2/backbone.safetensors", "release/vit_tiny_d2/SHA256SUMS")),
]
BY_KEY = {runner.key: runner for runner in RUNNERS}
# Stand-ins that no README command makes: built by the workspace itself.
STAND_INS = {"official": "dinov2_vits14_pretrain.pth"}


def runner_for(command: str) -> Runner:
    matches = [r for r in RUNNERS if re.fullmatch(r.pattern, command)]
    assert len(matches) == 1, f"README command {command!r} matches {[r.key for r in matches] or 'no'} runner(s) " \
                              "in RUNNERS: add (or narrow) an entry saying how the test runs it"
    return matches[0]


def readme_command(key: str) -> str:
    return next(cmd for cmd in readme_shell_commands() if re.fullmatch(BY_KEY[key].pattern, cmd))


def argv_for(command: str, runner: Runner, slurm: bool = False) -> list[str]:
    """The argument vector that runs a README command here: placeholders substituted, CPU-sized overrides appended,
    `python` this interpreter, torchrun 2 gloo processes; a Slurm submission in process (`--local`) or, with `slurm`,
    on the local cluster (its profile, the cluster's shape, waiting for the jobs)."""
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    argv = shlex.split(command)
    leftover = [token for token in argv if LEFTOVER.search(token)]
    assert not leftover, f"placeholders without a stand-in in {command!r}: {leftover} (add them to PLACEHOLDERS)"
    if argv[0] == "torchrun":
        argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", *argv[1:]]
        argv[argv.index("--nproc_per_node") + 1] = "2"
    elif argv[0] == "python":
        argv = [sys.executable, *argv[1:]]
    argv += runner.append
    if argv[1:4] == ["-m", "slurm", "submit"]:
        if not slurm:
            return [*argv, "--local"]
        # the local cluster has one node, no GPU and short limits: its own profile and shape instead of the README's
        for flag in ("--nodes", "--gpus-per-node", "--timeout-min", "--array-parallelism"):
            if flag in argv:
                del argv[argv.index(flag) : argv.index(flag) + 2]
        argv[argv.index("--profile") + 1] = "local"
        argv += ["--tasks-per-node", "1", "--wait", "--wait-timeout", "400"]
    return argv


def run(argv: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{shlex.join(argv)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}"
    return done


class Workspace:
    """A scratch working folder with `configs/` linked, tiny images and curation data; runs README commands there,
    each building what it needs first, each at most once."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: set[str] = set()
        (root / "configs").symlink_to(REPO / "configs")
        (root / "bench").symlink_to(REPO / "bench")  # bench/costs.json, the cost record curate plan reads
        for label in range(2):
            write_images(root / "images" / "train" / f"class{label}", 8, label, seed=label)
            write_images(root / "images" / "val" / f"class{label}", 4, label, seed=10 + label)
        for i, folder in enumerate(CURATE_DATA):
            write_images(root / folder, 6, i, seed=20 + i)

    def build(self, key: str) -> None:
        if key in self.done:
            return
        if key in STAND_INS:
            official_checkpoint(self.root / STAND_INS[key])
        else:
            runner = BY_KEY[key]
            for need in runner.needs:
                self.build(need)
            cwd = self.own_folder(runner, "local") if runner.own_folder else self.root
            done = run(argv_for(readme_command(key), runner), cwd)
            assert_artefacts(runner, cwd)
            missing = [text for text in runner.prints if text not in done.stdout]
            assert not missing, f"{runner.key}: its output lacks {missing}:\n{done.stdout[-3000:]}"
        self.done.add(key)

    def own_folder(self, runner: Runner, suffix: str) -> Path:
        """A working folder for one command: configs, images, data and its inputs linked from the workspace."""
        folder = self.root.parent / f"{self.root.name}-{runner.key}-{suffix}"
        folder.mkdir()
        links = ["configs", "bench", "images", "data", *(output_of(BY_KEY[n]) if n in BY_KEY else STAND_INS[n]
                                                 for n in runner.needs)]
        for link in links:
            (folder / link).parent.mkdir(parents=True, exist_ok=True)
            (folder / link).symlink_to(self.root / link)
        return folder


def output_of(runner: Runner) -> str:
    """The run or release folder a command makes: its expected files' common top two or three levels."""
    parts = Path(runner.expect[0]).parts
    return str(Path(*parts[:2])) if parts[0] == "release" else str(Path(*parts[:3]))


def assert_artefacts(runner: Runner, cwd: Path) -> None:
    missing = [path for path in runner.expect if not (cwd / path).exists()]  # a manifest is a folder link
    assert not missing, f"{runner.key}: the command exited 0 but left no {missing}"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Workspace:
    return Workspace(tmp_path_factory.mktemp("readme"))


# -- the table covers the README ------------------------------------------------------------------------------------


def test_every_readme_command_has_exactly_one_runner():
    commands = readme_shell_commands()
    assert len(commands) >= 10, "README parsing found too few commands"
    for command in commands:
        runner_for(command)


def test_every_runner_matches_a_readme_command():
    """No stale rows: a command removed from the README leaves the table too. A row that runs its command matches
    exactly one (the workspace runs it once, by key)."""
    commands = readme_shell_commands()
    counts = {r.key: sum(bool(re.fullmatch(r.pattern, cmd)) for cmd in commands) for r in RUNNERS}
    assert not [key for key, n in counts.items() if n == 0], f"RUNNERS entries that match no README command: {counts}"
    shared = [r.key for r in RUNNERS if not r.mapped and counts[r.key] > 1]
    assert not shared, f"RUNNERS entries that run one command but match several: {shared}"


def test_readme_code_blocks_are_shell_python_or_text():
    """A block in another language would be skipped silently: name it shell, python or text."""
    infos = {info for info, _ in fenced_blocks(README.read_text())}
    assert infos <= SHELL_INFOS | SKIPPED_INFOS | {"python"}, infos


def test_shell_command_extraction():
    body = "# a comment line\npython -m a b \\\n    c=1   # why\nmake x 'y=[{p: q}]'\n\n"
    assert shell_commands(body) == ["python -m a b c=1", "make x 'y=[{p: q}]'"]


# -- running them ---------------------------------------------------------------------------------------------------


def command_params(slurm: bool) -> list:
    params = []
    for command in readme_shell_commands():
        try:
            runner = runner_for(command)
        except AssertionError:
            continue  # reported by test_every_readme_command_has_exactly_one_runner
        if slurm and not runner.pattern.startswith(SUBMIT):
            continue
        marks = [pytest.mark.slow] if runner.slow else []
        params.append(pytest.param(command, marks=marks, id=runner.key))
    return params


@pytest.mark.parametrize("command", command_params(slurm=False))
def test_readme_command_runs(command: str, workspace: Workspace):
    runner = runner_for(command)
    if runner.mapped:
        MAPPED[runner.mapped](workspace)
        return
    workspace.build(runner.key)


@pytest.mark.slurm
@pytest.mark.timeout(900)
@pytest.mark.parametrize("command", command_params(slurm=True))
def test_readme_slurm_command_runs_on_the_local_cluster(command: str, workspace: Workspace, slurm_cluster):
    runner = runner_for(command)
    for need in runner.needs:
        workspace.build(need)
    cwd = workspace.own_folder(runner, "slurm")
    done = run(argv_for(command, runner, slurm=True), cwd)
    assert "jobs completed" in done.stdout, done.stdout[-2000:]
    assert_artefacts(runner, cwd)


@pytest.mark.parametrize("block", [pytest.param(b, id=f"python{i}") for i, b in enumerate(readme_python_blocks())])
def test_readme_python_block_runs(block: str, workspace: Workspace):
    """As written, in the workspace: release/cpu_tiny from the README's release command, dinov2_vits14_pretrain.pth a
    random stand-in, the hub repository this checkout."""
    workspace.build("release")
    workspace.build("official")
    for placeholder, value in PLACEHOLDERS.items():
        block = block.replace(placeholder, value)
    run([sys.executable, "-c", block], workspace.root)


# -- commands covered elsewhere -------------------------------------------------------------------------------------


def demo_is_tested(workspace: Workspace) -> None:
    """`make demo` runs for minutes: tests/test_demo.py runs its stage targets at a reduced size (the default data and
    DATA=folder), tests/test_slurm_demo.py with SLURM=1."""
    demo, slurm = (REPO / "tests" / name for name in ("test_demo.py", "test_slurm_demo.py"))
    assert re.search(r"^demo:", (REPO / "Makefile").read_text(), re.M), "the Makefile has no demo target"
    text = demo.read_text()
    assert re.search(r"^def test_", text, re.M) and '"demo-summary"' in text, "tests/test_demo.py runs no demo"
    for stage in ("-m curate run", "-m pretrain train", "-m pretrain distill", "-m evaluation knn",
                  "-m pretrain release"):
        assert stage in text, f"tests/test_demo.py does not check the demo's `{stage}` stage"
    assert 'f"DATA={data}"' in text, "tests/test_demo.py runs no demo with DATA="
    assert '"SLURM=1"' in slurm.read_text(), "tests/test_slurm_demo.py runs no demo with SLURM=1"


def make_test_is_ci(workspace: Workspace) -> None:
    """`make test` is the suite this file belongs to: CI's entry point runs it."""
    assert "make test" in (REPO / ".ci" / "run").read_text()
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^test:", makefile, re.M) and "PYTEST_ARGS" in makefile


def gpu_check_on_cpu(workspace: Workspace) -> None:
    """`make gpu-check` needs a GPU; its CPU form runs the same script (env and a 2-step training stage)."""
    out = workspace.root / "gpu_check_out"
    args = (f"--device cpu --quick --data {workspace.root / 'images'} --work {workspace.root / 'gpu_check'} "
            "--train-steps 2 --stages env train")
    run(["make", "--no-print-directory", "gpu-check", f"GPU_CHECK_ARGS={args}"], REPO, env={"OUT": str(out)})
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"], (report.get("failed_stages"), report.get("stages"))


MAPPED = {"demo": demo_is_tested, "make_test": make_test_is_ci, "gpu_check": gpu_check_on_cpu}
