"""bench/bench_curation_value.py's own rules on tiny synthetic photos (seconds): the pool and its planted copies, the
seeds, the equal-size seeded random subset, counting the copies left, the curated files read from a manifest, the
curation command line (loaded strictly by the curate config) and the JSON object with its verdict."""

from __future__ import annotations

import io
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bench scripts are not installed

from bench.bench_curation_value import (  # noqa: E402
    CURATE_CONFIG,
    Pool,
    build_pool,
    composition,
    curate_overrides,
    parse_args,
    pool_files,
    random_subset,
    report,
    verdict,
    write_file_list,
)
from bench.run_all import USAGE_ERROR  # noqa: E402
from curate.config import load_curate_config
from curate.dedup.planted import plant_copy
from curate.manifest import INGEST_SCHEMA, RETRIEVE_SCHEMA, derive_status, new_manifest, set_columns, write_manifest


def photo(path: Path, value: int, size: int = 24) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(value).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory) -> tuple[Path, Path]:
    """Imagenette-like (2 classes: 6 train, 4 val photos each) and Imagewoof-like (2 classes, 5 train each) trees."""
    root = tmp_path_factory.mktemp("data")
    nette, woof = root / "nette", root / "woof"
    for c in range(2):
        for i in range(6):
            photo(nette / "train" / f"n0{c}" / f"t{i}.JPEG", 100 * c + i)
        for i in range(4):
            photo(nette / "val" / f"n0{c}" / f"v{i}.JPEG", 1000 + 100 * c + i)
        for i in range(5):
            photo(woof / "train" / f"w0{c}" / f"t{i}.JPEG", 2000 + 100 * c + i)
    return nette, woof


@pytest.fixture
def pool(datasets, tmp_path) -> Pool:
    nette, woof = datasets
    return build_pool(nette, woof, tmp_path, per_class=0, n_copies=3, n_seeds=4, seed=0)


def test_pool_holds_both_train_splits_and_the_planted_copies(pool, datasets):
    nette, _ = datasets
    assert composition(pool.images, pool) == {"images": 12 + 10 + 3, "imagenette": 12, "imagewoof": 10,
                                             "planted_copies_left": 3}
    assert len(pool.planted) == 3 and pool.planted <= set(pool.images)
    assert pool.images == sorted(pool.images)
    val_bytes = {p.read_bytes() for p in (nette / "val").rglob("*.JPEG")}
    for copy in pool.planted:  # altered copies, never a val file itself, named without a hint of the original
        assert copy.read_bytes() not in val_bytes and copy.name.startswith("copy-")
        Image.open(copy).load()
    assert not any("val" in p.parts for p in pool.images)


def test_seeds_are_imagenette_train_photos_evenly_over_classes(pool, datasets):
    nette, _ = datasets
    assert len(pool.seeds) == 4
    assert all(p.is_relative_to(nette / "train") for p in pool.seeds)
    assert sorted(p.parent.name for p in pool.seeds) == ["n00", "n00", "n01", "n01"]


def test_pool_per_class_draws_that_many_of_every_class(datasets, tmp_path):
    nette, woof = datasets
    small = build_pool(nette, woof, tmp_path, per_class=2, n_copies=1, n_seeds=2, seed=0)
    assert composition(small.images, small) == {"images": 9, "imagenette": 4, "imagewoof": 4,
                                               "planted_copies_left": 1}


def test_the_same_seed_plants_the_same_copies(datasets, tmp_path):
    nette, woof = datasets
    a = build_pool(nette, woof, tmp_path / "a", 0, 3, 4, seed=5)
    b = build_pool(nette, woof, tmp_path / "b", 0, 3, 4, seed=5)
    assert [p.read_bytes() for p in sorted(a.planted)] == [p.read_bytes() for p in sorted(b.planted)]
    assert a.seeds == b.seeds


def test_plant_copy_alters_and_reencodes(datasets):
    nette, _ = datasets
    data = next((nette / "val").rglob("*.JPEG")).read_bytes()
    copy = plant_copy(data, random.Random(0))
    assert copy != data and Image.open(io.BytesIO(copy)).format == "JPEG"


def test_random_subset_has_the_curated_size_a_fixed_seed_and_no_repeats(pool):
    subset = random_subset(pool.images, 7, seed=0)
    assert len(subset) == len(set(subset)) == 7 and set(subset) <= set(pool.images)
    assert random_subset(pool.images, 7, seed=0) == subset
    assert random_subset(pool.images, len(pool.images), seed=0) == pool.images
    with pytest.raises(ValueError):
        random_subset(pool.images, len(pool.images) + 1, seed=0)


def test_random_subset_draws_planted_copies_like_any_pool_image(pool):
    """Over many seeds the copies' share of a subset is their share of the pool (3 of 25): nothing favours or avoids
    them."""
    drawn = sum(composition(random_subset(pool.images, 10, seed=s), pool)["planted_copies_left"] for s in range(400))
    assert drawn / 400 == pytest.approx(10 * 3 / 25, rel=0.15)


def test_copies_left_counts_each_planted_copy_once(pool):
    planted = sorted(pool.planted)
    others = [p for p in pool.images if p not in pool.planted]
    assert composition(others, pool)["planted_copies_left"] == 0
    assert composition(planted[:1] + others[:2], pool) == {"images": 3, "imagenette": 2, "imagewoof": 0,
                                                          "planted_copies_left": 1}


def test_selected_files_are_the_pool_rows_curation_selected(tmp_path):
    def row(i: int, role: str) -> dict:
        return {**dict.fromkeys(INGEST_SCHEMA.names), "uid": f"u{i}", "role": role, "source": role,
                "locator": f"{i}.jpg", "file": f"/p/{i}.jpg", "partition": 0, "size": 1, "sha256": str(i),
                "format": "JPEG", "width": 8, "height": 8, "mode": "RGB"}

    table = new_manifest([row(0, "pool"), row(1, "pool"), row(2, "pool"), row(3, "seed"), row(4, "eval")])
    table = derive_status(set_columns(table, {"selected": [True, False, True, None, None],
                                              "selected_by": ["all", None, "all", None, None],
                                              "retrieval_score": [None] * 5}, RETRIEVE_SCHEMA))
    write_manifest(table, tmp_path / "manifest.parquet")
    assert pool_files(tmp_path) == [Path("/p/0.jpg"), Path("/p/2.jpg")]


def test_curation_command_line_loads_strictly_with_dedup_by_copy_detection(tmp_path):
    overrides = curate_overrides(tmp_path / "pool.txt", tmp_path / "seeds.txt", tmp_path / "val", tmp_path / "ssl",
                                 tmp_path / "runs", ["retrieve.n_per_seed=7", "embed.image_size=64"])
    cfg = load_curate_config(CURATE_CONFIG, overrides)
    assert cfg.embed.kind == "dinov2" and cfg.embed.weights == str(tmp_path / "ssl")
    assert cfg.dedup_embed is not None and cfg.dedup_embed.kind == "copydetect"  # copies: never the SSL embedding
    assert [s.path for s in cfg.evals] == [str(tmp_path / "val")]
    assert [s.path for s in cfg.sources] == [str(tmp_path / "pool.txt")]
    assert (cfg.retrieve.n_per_seed, cfg.embed.image_size) == (7, 64)  # the settings come last and win


def test_file_list_names_every_path_once_a_line(tmp_path):
    paths = [tmp_path / "a.jpg", tmp_path / "b c.jpg"]
    assert write_file_list(paths, tmp_path / "l.txt").read_text().splitlines() == [str(p) for p in paths]


@pytest.mark.parametrize(("curated", "rand", "copies", "wins"), [
    (40.0, 39.0, 0, True), (39.0, 40.0, 0, False), (40.0, 40.0, 0, False), (41.0, 39.0, 1, False)])
def test_verdict_needs_a_higher_knn_and_no_copy_left(curated, rand, copies, wins):
    result = verdict(curated, rand, copies)
    assert result["curation_wins"] is wins
    assert (result["why_not"] == "") is wins


def test_report_fields_ratio_and_total_time(pool):
    curated = {"images": 10, "imagenette": 8, "imagewoof": 2, "planted_copies_left": 0, "knn_k20": 42.0}
    rand = {"images": 10, "imagenette": 5, "imagewoof": 4, "planted_copies_left": 1, "knn_k20": 40.0}
    result = json.loads(json.dumps(report(pool, curated, rand, 100, 50, ["retrieve.n_per_seed=4"],
                                          {"ssl": 1.5, "curate": 2.0}, {"random_init": 30.0}, 2)))
    assert result["knn_gain_points"] == 2.0 and result["knn_ratio"] == pytest.approx(1.05)
    assert result["curation_wins"] is True and result["planted_copies_decontaminated"] == 2
    assert result["pool"] == {"images": 25, "seeds": 4, "imagenette": 12, "imagewoof": 10,
                              "planted_copies_left": 3}
    assert result["seconds"] == {"ssl": 1.5, "curate": 2.0, "total": 3.5}
    assert result["headline"]["ratio"] == pytest.approx(1.05)
    assert set(result["headline"]) == {"metric", "ratio", "baseline"}
    assert result["baselines_knn_k20"] == {"random_init": 30.0}
    assert (result["curated"], result["random"], result["steps"], result["ssl_steps"]) == (curated, rand, 100, 50)


def test_missing_data_is_a_usage_error_that_run_all_skips(tmp_path, capsys):
    """run_all lists a bench that exits 2 with "required" on its last stderr line as skipped, not failed."""
    with pytest.raises(SystemExit) as exit_:
        parse_args(["--data", str(tmp_path / "none"), "--woof", str(tmp_path / "none")])
    assert exit_.value.code == USAGE_ERROR
    assert "required" in capsys.readouterr().err.strip().splitlines()[-1]
