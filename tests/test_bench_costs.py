"""The benches that write the cost record `python -m curate plan` reads (`--record FILE`): each writes its own
entries, with the machine and the command, and leaves the others as they were."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def run_bench(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                         check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ingest_and_embed_benches_refresh_their_own_entries(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    record = tmp_path / "costs.json"
    result = run_bench("bench_ingest.py", "--folder", str(folder), "--n", "12", "--manifest-rows", "500",
                       "--record", str(record))
    assert result["headline"]["ratio"] > 1  # ingest does more than hash the bytes
    ingest = json.loads(record.read_text())["costs"]
    assert set(ingest) == {"ingest_cpu_s_per_image", "manifest_disk_bytes_per_row", "manifest_memory_bytes_per_row",
                           "manifest_read_cpu_s_per_row", "shard_write_s_per_byte", "image_bytes_mean"}
    sizes = [p.stat().st_size for p in folder.iterdir()]
    assert ingest["image_bytes_mean"]["value"] == float(f"{np.mean(sizes):.4g}")
    assert ingest["ingest_cpu_s_per_image"]["command"].startswith("python bench/bench_ingest.py --folder")
    run_bench("bench_embed.py", "--folder", str(folder), "--n", "12", "--device", "cpu", "--record", str(record))
    both = json.loads(record.read_text())["costs"]
    assert both.keys() == ingest.keys() | {"decode_cpu_s_per_image", "copydetect_cpu_s_per_image"}
    assert all(both[name] == entry for name, entry in ingest.items())  # the ingest entries stay as they were
    assert both["decode_cpu_s_per_image"]["measured_on"]["cores"] >= 1
