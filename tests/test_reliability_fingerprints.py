"""Issue 26 point 5: step fingerprints and output ids hash inputs and settings only, so an interrupted-and-resumed
curation run gives the same ids as an uninterrupted one for the same artefacts."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from curate.config import load_curate_config
from curate.rundir import THIS_CALL, RunDir, output_id
from curate.steps import STEPS, run_all, run_step


def test_output_id_ignores_this_call_only(tmp_path):
    base = {"shards": 2, "samples": 20}
    a = output_id("f" * 16, {**base, THIS_CALL: {"written_now": 2, "images_per_s": 11.5}})
    assert a == output_id("f" * 16, {**base, THIS_CALL: {"written_now": 0, "images_per_s": 80.1}})
    assert a == output_id("f" * 16, base)
    assert a != output_id("f" * 16, {**base, "samples": 21})  # what the step produced still counts
    assert a != output_id("e" * 16, base)
    run = RunDir(tmp_path)
    run.write_marker("shard", "f" * 16, {**base, THIS_CALL: {"written_now": 1}}, time.time())
    marker = run.read_marker("shard")
    assert marker["output"] == a and marker["summary"][THIS_CALL] == {"written_now": 1}  # still shown, not hashed


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(0)
    for i in range(24):
        pixels = rng.integers(0, 255, size=(48, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:02d}.png")
    return folder


def _config(photos: Path, runs_root: Path):
    doc = {"name": "ids", "runs_root": str(runs_root), "partitions": 2,
           "sources": [{"path": str(photos), "name": "pool"}],
           "embed": {"kind": "copydetect", "batch_size": 8, "num_workers": 0},
           "cluster": {"n_clusters": [4, 2], "use_gpu": "cpu"}, "shards": {"max_count": 8},
           "report": {"thumb_size": 32}}
    path = runs_root.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(doc))
    return load_curate_config(path)


def test_resumed_run_gives_the_ids_of_an_uninterrupted_one(photos, tmp_path):
    whole = _config(photos, tmp_path / "whole")
    run_all(whole)
    resumed = _config(photos, tmp_path / "resumed")
    run_step("ingest", resumed)
    assert run_step("embed", resumed, partitions=[0]).status == "partial"  # stopped after one partition
    assert run_step("embed", resumed).status == "done"  # resumed: embeds the other partition only
    run_all(resumed)
    a, b = RunDir(whole.run_dir), RunDir(resumed.run_dir)
    assert b.read_marker("embed")["summary"][THIS_CALL]["embedded_now"] < \
        a.read_marker("embed")["summary"][THIS_CALL]["embedded_now"]
    for step in (s.name for s in STEPS):
        ma, mb = a.read_marker(step), b.read_marker(step)
        assert (ma["fingerprint"], ma["output"]) == (mb["fingerprint"], mb["output"]), step
    assert "embedded_now=" in (a.report / "index.html").read_text()  # the report still shows how the call ran
    for shard in sorted(a.shards.glob("*.tar")):
        assert shard.read_bytes() == (b.shards / shard.name).read_bytes()
