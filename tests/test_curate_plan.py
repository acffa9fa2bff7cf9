"""`python -m curate plan`: work, time and memory per step against formulas written out by hand for a small config,
the array shapes the Slurm launcher would submit, scaling with --images and --gpus, the cost record, and the
one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from curate.__main__ import main
from curate.config import load_curate_config
from curate.plan.costs import MEASURED_BY, load_costs, record_costs
from curate.plan.gpu_speeds import GPUS, GpuSpeed
from curate.plan.model import PlanRequest, Rates, array_shape, plan_curation

REPO = Path(__file__).resolve().parents[1]
N, PARTITIONS, GPUS_, CORES = 1000, 4, 2, 4
COSTS = {"ingest_cpu_s_per_image": 1e-3, "manifest_disk_bytes_per_row": 100, "manifest_memory_bytes_per_row": 200,
         "manifest_read_cpu_s_per_row": 1e-6, "shard_write_s_per_byte": 1e-8, "image_bytes_mean": 10_000,
         "decode_cpu_s_per_image": 2e-3, "copydetect_cpu_s_per_image": 4e-3}
GPU = GpuSpeed("test GPU", memory_gb=16, fp32_tflops=10, bf16_tflops=100, bandwidth_tbs=1)
MANIFEST_S = N * 1e-6 / CORES  # every task reads the whole manifest, spread over its cores
MANIFEST_MEM = N * 200


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("costs") / "costs.json"
    record_costs(path, {name: (value, "unit", "what") for name, value in COSTS.items()}, ["bench/bench_x.py"])
    return path


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    """A small run: a ViT-Ti/16 at 64 px, exact index, two k-means levels (training sample capped at 50 points per
    centroid), every image selected."""
    path = tmp_path_factory.mktemp("cfg") / "small.yaml"
    path.write_text(yaml.safe_dump({
        "name": "small", "partitions": PARTITIONS, "sources": [{"path": "pool"}], "ingest": {"num_workers": 2},
        "embed": {"kind": "random_vit", "arch": "vit_tiny", "patch_size": 16, "image_size": 64},
        "index": {"kind": "flat"}, "select": {"method": "all"},
        "cluster": {"n_clusters": [8, 2], "resampling_steps": [0, 10], "sample_size": [1, 2],
                    "max_points_per_centroid": 50}}))
    return path


def plan(config: Path, record: Path, images: int = N, gpus: int = GPUS_, overrides: tuple[str, ...] = ()):
    cfg = load_curate_config(config, list(overrides))
    request = PlanRequest(images=images, gpus=gpus, gpu=GPU, cpus_per_gpu=CORES)
    rates = Rates(load_costs(record), GPU, CORES, record)
    steps = plan_curation(cfg, request, rates, lambda step: array_shape(str(config), list(overrides), step))
    return {p.step: p for p in steps}


def test_embed_is_vit_flops_by_hand_and_decoding_on_the_task_cores(config, record):
    p = plan(config, record)["embed"]
    d, h, depth, patches = 192, 768, 12, (64 // 16) ** 2  # ViT-Ti/16 at 64 px
    tokens = 1 + patches
    macs = patches * 3 * 16 * 16 * d + depth * (tokens * (4 * d * d + 2 * d * h) + 2 * tokens * tokens * d)
    assert p.gpu_flops == pytest.approx(N * 2 * macs)
    per_task = N // PARTITIONS
    forward = per_task * 2 * macs / (100e12 * 0.4)
    decode = per_task * 2e-3 / CORES
    assert decode > forward  # this tiny network is decoding-bound: the task takes the slower of the two
    assert p.task_s == pytest.approx(MANIFEST_S + decode)
    assert p.host_bytes == pytest.approx(MANIFEST_MEM + 2 * per_task * d)
    # fp32 weights: blocks (qkv, proj, MLP, two norms, two LayerScales), patch embedding, cls, 17 positions, mask, norm
    params = depth * (12 * d * d + 15 * d) + (3 * 16 * 16 * d + d) + d + tokens * d + d + 2 * d
    assert p.gpu_bytes == pytest.approx(4 * params)
    assert p.disk_bytes == pytest.approx(2 * N * d)
    assert p.read_bytes == pytest.approx(N * 10_000)
    assert p.wall_s == pytest.approx(2 * p.task_s + MANIFEST_S)  # 4 tasks on 2 GPUs: two waves, then the closing


def test_dedup_flat_graph_is_quadratic_and_each_task_holds_one_partition_in_its_index(config, record):
    p = plan(config, record)["dedup"]
    d, per_task = 192, N // PARTITIONS
    assert p.gpu_flops == pytest.approx(PARTITIONS * 2 * per_task * N * d)
    assert p.task_s == pytest.approx(MANIFEST_S + 2 * per_task * N * d / (10e12 * 0.7))
    assert p.gpu_bytes == pytest.approx(4 * N // PARTITIONS * d)  # one partition's rows in the index at a time
    assert p.host_bytes == pytest.approx(MANIFEST_MEM + 4 * N // PARTITIONS * d)  # rows read from the store
    assert p.read_bytes == pytest.approx(PARTITIONS * 2 * N * d)


@pytest.mark.parametrize("kind, code", [("ivf", 2 * 192), ("ivfpq", 16)])
def test_dedup_ivf_holds_float16_rows_or_codes_the_cells_and_its_training_sample(config, record, kind, code):
    p = plan(config, record, overrides=(f"index.kind={kind}", "index.nlist=10", "index.pq_m=16"))["dedup"]
    d, train = 192, 10 * 64 if kind == "ivf" else 256 * 39  # 64 rows per cell; PQ codebooks want 39 per code
    train = min(N, train)
    # the float32 centroids, then the float32 training sample or, once it is freed, one partition's rows (float16 or
    # codes) and their int64 ids, whichever is larger
    peak = 4 * 10 * d + max(N // PARTITIONS * (code + 8), 4 * train * d)
    assert p.host_bytes == pytest.approx(MANIFEST_MEM + peak)
    assert p.gpu_bytes == pytest.approx(peak)


def test_cluster_flops_follow_the_kmeans_sample_sizes(config, record):
    p = plan(config, record)["cluster"]
    d = 192
    level1 = 2 * d * 8 * (20 * 400 + 1000)  # trained on 8 x 50 of the 1000 points, then all 1000 assigned
    level2 = 2 * d * 2 * (20 * 8 + 8)  # the 8 centroids of level 1
    resampling = 10 * (2 * d * 2 * (20 * 4 + 4) + 2 * d * 2 * 8)  # k-means on 2 x 2 of the 8, then all re-assigned
    assert p.gpu_flops == pytest.approx(level1 + level2 + resampling)
    assert p.task_s == pytest.approx(MANIFEST_S + p.gpu_flops / (10e12 * 0.7))
    assert p.host_bytes == pytest.approx(MANIFEST_MEM + 4 * d * 400)  # the training sample; the pool is streamed


def test_ingest_and_shard_take_the_measured_cpu_costs(config, record):
    steps = plan(config, record)
    ingest, shard = steps["ingest"], steps["shard"]
    assert ingest.task_s == pytest.approx(N * 1e-3 / 2)  # ingest.num_workers=2 processes
    assert ingest.disk_bytes == pytest.approx(N * 100)
    assert ingest.host_bytes == pytest.approx(MANIFEST_MEM)
    assert shard.task_s == pytest.approx(MANIFEST_S + N // PARTITIONS * 10_000 * 1e-8)
    assert shard.disk_bytes == pytest.approx(N * 10_000)


def test_array_shapes_are_what_the_launcher_submits(config, record):
    from slurm.submit import plan as launcher_plan

    steps = plan(config, record, overrides=("partitions=6",))
    for name, p in steps.items():
        _, specs = launcher_plan("curate", [name, str(config), "partitions=6"])
        assert (p.shape.tasks, p.shape.closing) == (len(specs[0].argvs), len(specs) - 1), name
    assert steps["embed"].shape.describe() == "array of 6 (2 at once, 3 waves) + 1 closing"
    assert steps["cluster"].shape.describe() == "1 task"


def test_scaling_with_images_and_gpus(config, record):
    base, double = plan(config, record), plan(config, record, images=2 * N)
    assert double["ingest"].task_s == pytest.approx(2 * base["ingest"].task_s)  # linear
    assert double["dedup"].gpu_flops == pytest.approx(4 * base["dedup"].gpu_flops)  # exact graph: quadratic
    wide = plan(config, record, gpus=4)  # all 4 partitions at once: one wave instead of two
    assert wide["embed"].wall_s == pytest.approx(base["embed"].wall_s - base["embed"].task_s)
    assert wide["embed"].task_s == pytest.approx(base["embed"].task_s)
    assert wide["cluster"].wall_s == pytest.approx(base["cluster"].wall_s)  # one task: more GPUs do not help


def test_cost_record_refresh_keeps_other_entries_and_names_the_machine(tmp_path):
    path = tmp_path / "costs.json"
    record_costs(path, {"a": (1.0, "s", "first")}, ["bench/bench_one.py", "--n", "5"])
    record_costs(path, {"b": (2.0, "s", "second")}, ["/abs/bench/bench_two.py"])
    costs = load_costs(path)
    assert (costs["a"].value, costs["b"].value) == (1.0, 2.0)
    assert costs["a"].command == "python bench/bench_one.py --n 5"
    assert costs["b"].command == "python bench/bench_two.py"
    assert costs["a"].measured_on.cores >= 1 and costs["a"].measured_on.torch
    with pytest.raises(ValueError, match="must be > 0"):
        record_costs(path, {"c": (0.0, "s", "zero")}, ["bench/bench_one.py"])


def test_committed_record_has_every_cost_the_plan_reads():
    record = json.loads((REPO / "bench" / "costs.json").read_text())
    assert set(MEASURED_BY) <= set(record["costs"])
    for entry in record["costs"].values():
        assert set(entry["measured_on"]) == {"cpu", "cores", "torch", "faiss", "python", "date"}


def test_output_separates_measured_from_stated(config, record, capsys):
    assert main(["plan", str(config), "--images", "1e3", "--gpus", "2", "--costs", str(record)]) == 0
    out = capsys.readouterr().out
    assert "measured (" in out and "stated (datasheet): H100-SXM5-80GB" in out and "assumed: 40%" in out
    for name in COSTS:
        assert f"    {name} = " in out
    assert "array of 4 (2 at once, 2 waves) + 1 closing" in out


@pytest.mark.parametrize("args, message", [
    (["--images", "many"], "error: --images 'many': give a whole number, e.g. --images 1e9"),
    (["--images", "-5"], "error: --images -5: give the pool size as a positive count, e.g. --images 1e9"),
    (["--gpus", "0"], "error: --gpus 0: give the number of GPUs as a positive count, e.g. --gpus 64"),
    (["--gpu-kind", "tpu"], f"error: unknown GPU kind 'tpu': use one of {', '.join(GPUS)} (--gpu-kind)"),
])
def test_bad_values_are_one_line(config, record, capsys, args, message):
    base = ["plan", str(config), "--images", "1e3", "--gpus", "2", "--costs", str(record)]
    assert main(base + args) == 2
    assert capsys.readouterr().err == message + "\n"


def test_missing_cost_record_says_which_bench_to_run(config, tmp_path, capsys):
    assert main(["plan", str(config), "--images", "1e3", "--gpus", "2", "--costs", str(tmp_path / "none.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "python bench/bench_ingest.py --record bench/costs.json" in err


def test_missing_cost_entry_names_its_bench(config, tmp_path, capsys):
    partial = tmp_path / "partial.json"
    record_costs(partial, {"image_bytes_mean": (1e4, "bytes / image", "size")}, ["bench/bench_ingest.py"])
    assert main(["plan", str(config), "--images", "1e3", "--gpus", "2", "--costs", str(partial)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no manifest_read_cpu_s_per_row" in err and "bench_ingest.py" in err


def test_seeded_config_asks_for_the_seed_count(config, record, capsys):
    argv = ["plan", str(config), "select.method=auto", "seeds=[{path: seeds}]", "--images", "1e3", "--gpus", "2",
            "--costs", str(record)]
    assert main(argv) == 2
    assert capsys.readouterr().err == ("error: this config retrieves around seed sets: give their image count with "
                                       "--seeds N (e.g. --seeds 1e6)\n")
    assert main([*argv, "--seeds", "10"]) == 0


def test_billion_config_plans_with_the_committed_record(capsys, monkeypatch):
    """The README's command: DINOv2's scale on 64 H100s, from the record measured on this repository's machine."""
    monkeypatch.chdir(REPO)
    assert main(["plan", "configs/curate/billion.yaml", "--images", "1e9", "--gpus", "64"]) == 0
    out = capsys.readouterr().out
    assert "1,000,000,000 images on 64 x H100-SXM5-80GB" in out and "array of 64 (64 at once, 1 wave)" in out
