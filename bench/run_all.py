"""Run the bench scripts (`bench/bench_*.py`, each at its default size unless given flags) one after the other, keep
each one's JSON object and log in bench/results/, and write bench/results/summary.md: one row per bench with the
headline ratio it declares (what it measures, the value, the baseline measured in the same run), the machine and
the date. Exit status 1 when a bench failed (after running the others), else 0; a skipped bench is not a failure.

usage: python bench/run_all.py [--only augment,sinkhorn] [--args 'NAME=FLAGS' ...] [--timeout S] [--out DIR]
  `make bench` runs this; `make bench BENCH=augment,sinkhorn BENCH_ARGS='augment=--images 20;dedup=--n 100000'`
  picks benches and gives them flags (the environment variables BENCH and BENCH_ARGS are --only's and --args'
  defaults; NAME is the script's name without `bench_`).
At the default sizes the whole set takes hours on a 2-core CPU machine: bench_dedup (1M rows) about 2 hours,
bench_curation_value about 40 minutes, bench_cpu_recipe, bench_recipe_replicas and bench_distill tens of minutes
each; the others minutes or less.
A bench that exits with a usage error for a required argument when it was given no flags (bench_distill_quality
needs `--teacher RUN`, a trained cpu_tiny run) is listed as skipped with the reason, not run and not a failure.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = REPO / "bench"
RESULTS = BENCH_DIR / "results"
USAGE_ERROR = 2  # argparse's exit status for a command line it refuses


@dataclass
class Outcome:
    """One bench's row: status ok | failed | skipped, its headline when it printed one, why when it did not."""

    name: str
    status: str
    seconds: float = 0.0
    headline: dict | None = None
    note: str = ""
    flags: list[str] = field(default_factory=list)


def discover(bench_dir: Path = BENCH_DIR) -> dict[str, Path]:
    """name -> script of every bench_NAME.py in `bench_dir`, sorted by name."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(bench_dir.glob("bench_*.py"))}


def parse_flags(specs: list[str]) -> dict[str, list[str]]:
    """`NAME=FLAGS` items (several in one item separated by `;`) -> name -> argv list (shell-style quoting)."""
    flags: dict[str, list[str]] = {}
    for spec in (part.strip() for item in specs for part in item.split(";")):
        if not spec:
            continue
        name, sep, rest = spec.partition("=")
        if not sep or not name.strip():
            raise SystemExit(f"error: --args {spec!r}: expected NAME=FLAGS, e.g. augment='--images 20'")
        flags.setdefault(name.strip().removeprefix("bench_"), []).extend(shlex.split(rest))
    return flags


def last_json_object(text: str) -> dict | None:
    """The JSON object a bench printed: all of stdout, or (when something else was printed first) the last object
    starting at the beginning of a line."""
    text = text.strip()
    starts = [0] + [i + 1 for i, c in enumerate(text) if c == "\n" and text[i + 1:i + 2] == "{"]
    for start in reversed(starts):
        try:
            found = json.loads(text[start:])
        except json.JSONDecodeError:
            continue
        return found if isinstance(found, dict) else None
    return None


def last_error_line(log: Path) -> str:
    """The last non-empty line of a bench's stderr (a traceback ends with the exception), or a placeholder."""
    lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(nothing on stderr)"


def run_bench(name: str, script: Path, flags: list[str], out: Path, timeout: float | None) -> Outcome:
    """Run one bench script with this interpreter; its stdout JSON -> out/NAME.json, its stderr -> out/NAME.log."""
    json_path, log_path = out / f"{name}.json", out / f"{name}.log"
    json_path.unlink(missing_ok=True)  # a failed run must not leave an earlier run's figures looking current
    started = time.perf_counter()
    with log_path.open("w") as log:
        # A session of its own: a timeout then stops the bench's own children too (training runs, data workers).
        proc = subprocess.Popen([sys.executable, str(script), *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=log,
                                text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(name, "failed", time.perf_counter() - started, note=f"timed out after {timeout:.0f} s",
                           flags=flags)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        reason = last_error_line(log_path)
        if proc.returncode == USAGE_ERROR and not flags and "required" in reason:
            return Outcome(name, "skipped", seconds, note=f"{reason} (give it with --args '{name}=FLAGS' or "
                                                          f"BENCH_ARGS)", flags=flags)
        return Outcome(name, "failed", seconds, note=f"exit {proc.returncode}: {reason}", flags=flags)
    result = last_json_object(stdout)
    if result is None:
        (out / f"{name}.stdout").write_text(stdout)
        return Outcome(name, "failed", seconds, note=f"printed no JSON object (stdout in {name}.stdout)", flags=flags)
    json_path.write_text(json.dumps(result, indent=1) + "\n")
    headline = result.get("headline")
    if not isinstance(headline, dict) or not {"metric", "ratio", "baseline"} <= set(headline):
        return Outcome(name, "failed", seconds, note="its JSON has no headline {metric, ratio, baseline}",
                       flags=flags)
    return Outcome(name, "ok", seconds, headline=headline, flags=flags)


def machine() -> str:
    """One line: CPU model and cores, GPUs, torch and the PIL build (the decoder the benches ran with)."""
    sys.path.insert(0, str(REPO))
    from dinoforge.machine import cpu_model, usable_cores  # torch-free

    cores, usable = os.cpu_count() or 0, usable_cores()
    parts = [f"{cpu_model()}, {usable} cores" + (f" (of {cores})" if usable != cores else "")]
    gpus = ""
    if shutil.which("nvidia-smi"):
        query = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True)
        names = [n.strip() for n in query.stdout.splitlines() if n.strip()] if query.returncode == 0 else []
        gpus = f"{len(names)} x {names[0]}" if names else ""
    parts.append(gpus or "no GPU")
    try:
        parts.append(f"torch {importlib.metadata.version('torch')}")
    except importlib.metadata.PackageNotFoundError:
        parts.append("no torch")
    from dinoforge.data.decode import decoder_name  # torch-free

    parts.append(f"images decoded with {decoder_name()}")
    return " · ".join(parts)


def cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def ratio_text(headline: dict) -> str:
    ratio = headline.get("ratio")
    return "not measured" if ratio is None else f"{ratio:.3g}"


def summary(outcomes: list[Outcome], machine_line: str, date: str, not_run: list[str]) -> str:
    """summary.md: the machine and date, then one table row per bench run."""
    lines = ["# Benchmarks", "", f"{date} · {machine_line}", "",
             "Each ratio is against its baseline measured in the same run of that bench; the JSON objects and logs "
             "are beside this file (NAME.json, NAME.log).", "",
             "| bench | ratio | what | baseline | status | time |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        h = o.headline or {}
        name = o.name + (f" `{shlex.join(o.flags)}`" if o.flags else "")
        status = o.status + (f": {o.note}" if o.note else "")
        lines.append(f"| {cell(name)} | {cell(ratio_text(h)) if h else '—'} | {cell(h.get('metric', '—'))} | "
                     f"{cell(h.get('baseline', '—'))} | {cell(status)} | {o.seconds:.0f} s |")
    if not_run:
        lines += ["", f"Not run this time: {', '.join(not_run)}."]
    return "\n".join(lines) + "\n"


def run_all(names: list[str], benches: dict[str, Path], flags: dict[str, list[str]], out: Path,
            timeout: float | None) -> list[Outcome]:
    """Every bench of `names` in order, printing a line as each ends; the summary is rewritten after each one."""
    out.mkdir(parents=True, exist_ok=True)
    outcomes: list[Outcome] = []
    machine_line = machine()
    not_run = [n for n in benches if n not in names]
    for name in names:
        print(f"== {name} {shlex.join(flags.get(name, []))}".rstrip(), flush=True)
        outcome = run_bench(name, benches[name], flags.get(name, []), out, timeout)
        outcomes.append(outcome)
        shown = f"{ratio_text(outcome.headline)} ({outcome.headline['metric']})" if outcome.headline else outcome.note
        print(f"   {outcome.status} in {outcome.seconds:.0f} s: {shown}", flush=True)
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        (out / "summary.md").write_text(summary(outcomes, machine_line, date, not_run))
    return outcomes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", default=os.environ.get("BENCH", ""),
                        help="comma-separated bench names (default: $BENCH, else all)")
    parser.add_argument("--args", action="append", default=[os.environ.get("BENCH_ARGS", "")], metavar="NAME=FLAGS",
                        help="flags for one bench, e.g. augment='--images 20' (repeatable; `;` separates several)")
    parser.add_argument("--timeout", type=float, default=0, help="seconds per bench before it is stopped (0: none)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--bench-dir", type=Path, default=BENCH_DIR, help=argparse.SUPPRESS)  # tests' fake benches
    args = parser.parse_args(argv)
    benches = discover(args.bench_dir)
    names = [n.strip().removeprefix("bench_") for n in args.only.split(",") if n.strip()] or list(benches)
    flags = parse_flags(args.args)
    unknown = sorted({*names, *flags} - set(benches))
    if unknown:
        parser.error(f"no bench named {', '.join(unknown)} (there are: {', '.join(benches)})")
    outcomes = run_all(names, benches, flags, args.out, args.timeout or None)
    failed = [o.name for o in outcomes if o.status == "failed"]
    print(f"summary: {args.out / 'summary.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
