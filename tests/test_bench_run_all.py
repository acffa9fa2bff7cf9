"""bench/run_all.py (`make bench`): every bench's JSON and log in the results folder, one summary row per bench with
its declared headline, a failure's last error line, a skip's reason, and the exit status; and every bench script
declares a headline."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the bench scripts are not installed

from bench import run_all  # noqa: E402
from bench.bench_augment import compare_decoders  # noqa: E402

OK_BENCH = '''
import argparse, json, sys
parser = argparse.ArgumentParser()
parser.add_argument("--ratio", type=float, default=2.5)
args = parser.parse_args()
print("warming up")  # something before the object: the runner takes the last JSON object
print(json.dumps({"seconds": 1.0, "headline": {"metric": "speed-up of ours", "ratio": args.ratio,
                                               "baseline": "the old way"}}, indent=1))
'''
FAILING_BENCH = '''
import sys
print("starting", file=sys.stderr)
raise RuntimeError("the index ran out of memory")
'''
NEEDS_ARG_BENCH = '''
import argparse
parser = argparse.ArgumentParser()
parser.add_argument("--teacher", required=True)
parser.parse_args()
print('{"headline": {"metric": "m", "ratio": 1.0, "baseline": "b"}}')
'''


@pytest.fixture()
def fake_benches(tmp_path) -> Path:
    folder = tmp_path / "bench"
    folder.mkdir()
    for name, text in (("ok", OK_BENCH), ("broken", FAILING_BENCH), ("needs_teacher", NEEDS_ARG_BENCH)):
        (folder / f"bench_{name}.py").write_text(text)
    return folder


def rows(summary: str) -> dict[str, list[str]]:
    """bench name -> its table cells."""
    found = {}
    for line in summary.splitlines():
        if line.startswith("| ") and not line.startswith("| bench"):
            cells = [c.strip() for c in line.strip("|").split(" | ")]
            found[cells[0].split(" ")[0]] = cells
    return found


def test_every_bench_runs_and_the_summary_has_a_row_each(fake_benches, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("BENCH", raising=False)
    monkeypatch.delenv("BENCH_ARGS", raising=False)
    out = tmp_path / "results"
    (out).mkdir()
    (out / "broken.json").write_text('{"stale": true}')  # an earlier run's figures must not survive a failure
    code = run_all.main(["--bench-dir", str(fake_benches), "--out", str(out)])
    assert code == 1  # one bench failed, after the others ran
    assert json.loads((out / "ok.json").read_text())["headline"]["ratio"] == 2.5
    assert not (out / "broken.json").exists() and not (out / "needs_teacher.json").exists()
    assert "RuntimeError: the index ran out of memory" in (out / "broken.log").read_text()
    summary = (out / "summary.md").read_text()
    table = rows(summary)
    assert set(table) == {"ok", "broken", "needs_teacher"}
    ok = table["ok"]
    assert ok[1:4] == ["2.5", "speed-up of ours", "the old way"] and ok[4] == "ok"
    assert table["broken"][1] == "—" and table["broken"][4] == \
        "failed: exit 1: RuntimeError: the index ran out of memory"
    skipped = table["needs_teacher"][4]
    assert skipped.startswith("skipped:") and "the following arguments are required: --teacher" in skipped
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d\d UTC · .+ cores · .*torch .* · images decoded with pillow", summary)
    assert "failed: broken" in capsys.readouterr().out


def test_picked_benches_and_their_flags(fake_benches, tmp_path, monkeypatch):
    out = tmp_path / "results"
    monkeypatch.setenv("BENCH", "ok,needs_teacher")  # what `make bench BENCH=...` passes
    monkeypatch.setenv("BENCH_ARGS", "needs_teacher=--teacher runs/t")
    code = run_all.main(["--bench-dir", str(fake_benches), "--out", str(out), "--args", "ok=--ratio 0.75"])
    assert code == 0
    table = rows((out / "summary.md").read_text())
    assert set(table) == {"ok", "needs_teacher"}
    assert table["ok"][1] == "0.75" and table["needs_teacher"][4] == "ok"
    assert "Not run this time: broken." in (out / "summary.md").read_text()
    with pytest.raises(SystemExit):  # a misspelt name is an error, not an empty run
        run_all.main(["--bench-dir", str(fake_benches), "--out", str(out), "--only", "okk"])


def test_a_bench_given_flags_that_fails_on_them_is_a_failure_not_a_skip(fake_benches, tmp_path):
    out = tmp_path / "results"
    code = run_all.main(["--bench-dir", str(fake_benches), "--out", str(out), "--only", "needs_teacher",
                         "--args", "needs_teacher=--teacherr x"])
    assert code == 1 and rows((out / "summary.md").read_text())["needs_teacher"][4].startswith("failed: exit 2")


@pytest.mark.parametrize("script", sorted((REPO / "bench").glob("bench_*.py")), ids=lambda p: p.stem)
def test_every_bench_declares_a_headline(script):
    source = script.read_text()
    assert '"headline"' in source and "headline(" in source, f"{script.name} prints no headline for the summary"


def test_the_cheapest_bench_prints_its_headline(tmp_path):
    out = tmp_path / "results"
    code = run_all.main(["--out", str(out), "--only", "sinkhorn",
                         "--args", "sinkhorn=--rows 8 --prototypes 64 --repeats 1"])
    assert code == 0
    headline = json.loads((out / "sinkhorn.json").read_text())["headline"]
    assert headline["ratio"] > 0 and "log-domain" in headline["baseline"]


def run(decoder: str, ms: float) -> dict:
    return {"decoder": decoder, "decode_ms_per_image": 1.0,
            "recipes": {"vits14": {"shipped": "batched", "worker_ms_per_image": {"batched": ms, "per_image": 9.0}}}}


def test_the_decoder_ratio_needs_both_builds_measured():
    both = compare_decoders(run("pillow-simd 12.1.1.post0", 2.0), run("pillow 13.0.0", 3.0))
    assert both["measured"] and both["worker_speedup"] == {"vits14": 1.5}
    assert both["pillow"] == "pillow 13.0.0" and both["pillow_simd"] == "pillow-simd 12.1.1.post0"
    same = compare_decoders(run("pillow 13.0.0", 2.0), run("pillow 12.0.0", 3.0))
    assert not same["measured"] and "worker_speedup" not in same
