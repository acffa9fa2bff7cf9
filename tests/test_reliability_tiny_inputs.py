"""Issue 26 point 0: a file of 1 to 3 bytes is a rejection with a reason in every stage, and a warm-up longer than the
run is a one-line config error naming both keys."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from curate.sources.decode import DecodeLimits, probe_image
from curate.sources.ingest import IngestConfig, SourceConfig, ingest_sources
from dinoforge.config import ConfigError
from dinoforge.data.datasets import build_dataset
from dinoforge.data.decode import ImageDecodeError, decode_image
from pretrain.optim import OptimConfig
from pretrain.schedules import TrainingSchedules

REPO = Path(__file__).resolve().parents[1]
# (bytes, reason start): BM is the start of a BMP header, the others start a JPEG and a PNG signature but too short
TINY = [(b"a", "not an image"), (b"ab", "not an image"), (b"abc", "not an image"), (b"BM", "corrupt BMP"),
        (b"\xff\xd8", "not an image"), (b"\x89PN", "not an image")]


def _jpeg(size=(64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (40, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(("data", "reason"), TINY)
def test_decoder_rejects_tiny_files_with_a_reason(data, reason):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data)
    assert err.value.reason.startswith(reason)
    assert probe_image(data, DecodeLimits()).reject_reason == err.value.reason  # ingest: the same reason


def test_ingest_rejects_a_three_byte_file(tmp_path):
    (tmp_path / "x.jpg").write_bytes(b"abc")
    (tmp_path / "good.jpg").write_bytes(_jpeg())
    rows = ingest_sources([("pool", SourceConfig(str(tmp_path)))], IngestConfig(), n_partitions=1).to_pylist()
    reasons = {r["locator"]: r["reject_reason"] for r in rows}
    assert reasons["good.jpg"] is None
    assert reasons["x.jpg"].startswith("not an image")


def test_training_reader_skips_a_three_byte_file(tmp_path):
    (tmp_path / "cls").mkdir()
    (tmp_path / "cls" / "a.jpg").write_bytes(b"abc")
    (tmp_path / "cls" / "b.jpg").write_bytes(_jpeg())
    dataset = build_dataset(str(tmp_path))
    image, label = dataset[0]  # a.jpg is unreadable: replaced by its readable neighbour
    assert image.size == (64, 48) and label == 0 and dataset.decode_errors == 1


def test_warmup_longer_than_run_names_both_keys():
    with pytest.raises(ConfigError, match=r"optim\.warmup_steps=110 .*total_steps=2"):
        TrainingSchedules.from_config(OptimConfig(warmup_steps=110), total_steps=2, global_batch=32)
    TrainingSchedules.from_config(OptimConfig(warmup_steps=2), total_steps=2, global_batch=32)  # exactly the run


def test_cli_warmup_longer_than_run_is_one_line(tmp_path):
    (tmp_path / "data" / "cls").mkdir(parents=True)
    for i in range(4):
        (tmp_path / "data" / "cls" / f"{i}.jpg").write_bytes(_jpeg())
    done = subprocess.run(
        [sys.executable, "-m", "pretrain", "train", "configs/pretrain/cpu_tiny.yaml", "total_steps=2",
         f"data.dataset={tmp_path / 'data'}", f"output_dir={tmp_path / 'runs'}", "data.num_workers=0"],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "optim.warmup_steps" in last and "total_steps" in last
