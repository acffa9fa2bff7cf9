"""bench/bench_dedup.py: the query-fraction mode searches the same rows on both sides and still runs every step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench" / "bench_dedup.py"
sys.path.insert(0, str(REPO))  # the bench scripts are not installed; `bench` imports as a namespace package

from bench.bench_dedup import query_rows  # noqa: E402


def test_query_rows_are_all_rows_or_a_sorted_sample():
    assert np.array_equal(query_rows(10, 1.0, 0), np.arange(10))
    rows = query_rows(1000, 0.05, 0)
    assert len(rows) == 50 and len(np.unique(rows)) == 50 and np.all(np.diff(rows) > 0)
    assert np.array_equal(rows, query_rows(1000, 0.05, 0))
    with pytest.raises(ValueError, match="query-fraction"):
        query_rows(10, 0.0, 0)


@pytest.mark.parametrize("fraction", [1.0, 0.25])
def test_bench_prints_one_json_object(fraction):
    out = subprocess.run([sys.executable, str(BENCH), "--n", "4000", "--repeats", "1", "--use-gpu", "cpu",
                          "--query-fraction", str(fraction)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["queries"] == round(4000 * fraction)
    assert result["exact_duplicates"] > 0 and result["near_duplicates"] > 0
    # 5% of rows are planted copies; a quarter of the queries still finds about a quarter of them or more
    assert result["edges"] >= fraction * 0.05 * 4000 * 0.9


def test_index_mode_reports_recall_and_time_of_each_index():
    out = subprocess.run([sys.executable, str(BENCH), "--index", "all", "--rows", "3000", "--dim", "32",
                          "--repeats", "1", "--use-gpu", "cpu", "--query-fraction", "0.5", "--clusters", "20",
                          "--nprobe", "16", "--k", "16"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    indexes = result["indexes"]
    assert set(indexes) == {"flat", "ivf", "ivfpq"} and result["extrapolated"]
    assert indexes["flat"]["recall"] == 1.0 and indexes["flat"]["time_ratio"] == 1.0
    assert indexes["flat"]["pairs"] > 50  # the planted copies found from half of the rows
    for kind in ("ivf", "ivfpq"):
        r = indexes[kind]
        assert r["nprobe"] == 16 and r["recall"] >= r["recall_one_way"] >= 0.9
        # the full-size time: build + search / query fraction
        assert r["full_s"] == pytest.approx(r["build_s"] + r["search_s"] / 0.5, abs=2e-3)
    assert result["headline"]["ratio"] == pytest.approx(indexes["ivf"]["time_ratio"], abs=1e-3)
