"""`python -m evaluation` end to end on real Imagenette photos with a random-init vit_tiny."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from test_eval_support import imagenette_file_list, one_torch_thread

from dinoforge.config import load_config
from dinoforge.data.errors import DatasetError
from dinoforge.models.config import ModelConfig
from dinoforge.models.loading import load_backbone
from evaluation.__main__ import main
from evaluation.config import TASK_SCHEMAS, BackboneConfig, KnnEvalConfig, LinearEvalConfig
from evaluation.evaluate import align_labels, model_transform
from evaluation.feature_set import FeatureSet

REPO = Path(__file__).resolve().parents[1]
TINY_112 = ["model.arch=vit_tiny", "model.patch_size=16", "model.img_size=112", "transform.resize_size=128",
            "transform.crop_size=112", "features.num_workers=0", "features.batch_size=50"]
TINY_64 = ["model.arch=vit_tiny", "model.patch_size=16", "model.img_size=64", "transform.resize_size=72",
           "transform.crop_size=64", "features.num_workers=0", "features.batch_size=50"]


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def imagenette(tmp_path_factory) -> dict[str, Path]:
    """File lists: 50 photos per class from Imagenette train and from val (500 + 500), and small 10 / 5 ones."""
    tmp = tmp_path_factory.mktemp("lists")
    return {
        "train": imagenette_file_list(tmp / "train50.txt", "train", 50),
        "val": imagenette_file_list(tmp / "val50.txt", "val", 50),
        "train_small": imagenette_file_list(tmp / "train10.txt", "train", 10, offset=100),
        "val_small": imagenette_file_list(tmp / "val5.txt", "val", 5, offset=100),
    }


def read_json(out: Path, task: str) -> dict:
    return json.loads((out / f"results_{task}.json").read_text())


def test_knn_on_imagenette_is_above_chance_and_the_same_twice(imagenette, tmp_path, capsys):
    args = ["knn", "--weights", "random", "--train", str(imagenette["train"]), "--val", str(imagenette["val"]),
            *TINY_112, "knn.ks=[10,20]"]
    assert main([*args, "--out", str(tmp_path / "a"), f"features.cache_dir={tmp_path / 'cache'}"]) == 0
    printed = capsys.readouterr().out
    first = read_json(tmp_path / "a", "knn")
    markdown = (tmp_path / "a" / "results_knn.md").read_text()
    assert markdown.strip() in printed and "| full" in markdown
    # Random-init vit_tiny, 112 px, 500 val photos of 10 classes: measured top-1 (k=20) 26.4% with model.seed=0
    # (26.2% and 28.6% with seeds 1 and 2). Chance is 10%, with a binomial sd of 1.3 points at n=500.
    assert first["metrics"]["top1_k20"] > 20.0
    assert first["metrics"]["top5_k20"] > first["metrics"]["top1_k20"]
    meta = first["meta"]
    assert (meta["n_train"], meta["n_val"], meta["num_classes"], meta["feature_dim"]) == (500, 500, 10, 192)
    assert meta["decode_errors"] == {"train": 0, "val": 0} and meta["weights_fingerprint"].startswith("random:")
    saved = load_config(KnnEvalConfig, tmp_path / "a" / "config.yaml")
    assert saved.model.arch == "vit_tiny" and saved.knn.ks == [10, 20] and saved.train == str(imagenette["train"])
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2

    # Recomputed from the photos (no cache): the same numbers.
    assert main([*args, "--out", str(tmp_path / "b"), "features.cache_dir="]) == 0
    second = read_json(tmp_path / "b", "knn")
    assert second["metrics"] == first["metrics"] and second["tables"] == first["tables"]


def test_weights_file_gives_the_same_result_as_the_model_it_came_from(imagenette, tmp_path):
    from dinoforge.models import export_official, save_safetensors

    model = load_backbone(BackboneConfig(arch="vit_tiny", patch_size=16, img_size=64, seed=5))
    weights = save_safetensors(export_official(model), tmp_path / "tiny.safetensors")
    data = ["--train", str(imagenette["train_small"]), "--val", str(imagenette["val_small"]), *TINY_64,
            "features.cache_dir=", "knn.ks=[5]"]
    assert main(["knn", "--weights", str(weights), "--out", str(tmp_path / "file"), *data]) == 0
    assert main(["knn", "--weights", "random", "model.seed=5", "--out", str(tmp_path / "random"), *data]) == 0
    from_file, from_seed = read_json(tmp_path / "file", "knn"), read_json(tmp_path / "random", "knn")
    assert from_file["metrics"] == from_seed["metrics"]
    assert from_file["meta"]["weights_fingerprint"].startswith("sha256:")


def test_linear_cli_reports_the_chosen_head_and_the_grid(imagenette, tmp_path, capsys):
    out = tmp_path / "linear"
    code = main(["linear", "--config", str(REPO / "configs/eval/linear.yaml"), "--weights", "random",
                 "--train", str(imagenette["train_small"]), "--val", str(imagenette["val_small"]), "--out", str(out),
                 *TINY_64, "features.cache_dir=", "linear.learning_rates=[0.01,0.1]", "linear.epochs=3",
                 "linear.batch_size=32", "linear.holdout_fraction=0.2"])
    assert code == 0
    result = read_json(out, "linear")
    grid = result["details"]["grid"]
    assert len(grid) == 2 * 2 * 2 and sum(row["chosen"] for row in grid) == 1
    chosen = next(row for row in grid if row["chosen"])
    assert chosen["holdout_top1"] == max(row["holdout_top1"] for row in grid)
    assert result["tables"]["Linear probe"][0]["head"] == chosen["head"]
    assert result["details"]["split"] == {"fit": 80, "holdout": 20, "val": 50}
    assert 0.0 <= result["metrics"]["top1"] <= result["metrics"]["top5"] <= 100.0
    assert "### Grid (chosen on a holdout of the train split)" in capsys.readouterr().out
    assert load_config(LinearEvalConfig, out / "config.yaml").linear.learning_rates == [0.01, 0.1]


def test_logreg_cli_reports_the_chosen_C(imagenette, tmp_path):
    out = tmp_path / "logreg"
    code = main(["logreg", "--weights", "random", "--train", str(imagenette["train_small"]),
                 "--val", str(imagenette["val_small"]), "--out", str(out), *TINY_64, "features.cache_dir=",
                 "logreg.c_log10_min=-2", "logreg.c_log10_max=2", "logreg.c_steps=3", "logreg.max_iter=100"])
    assert code == 0
    result = read_json(out, "logreg")
    assert [row["C"] for row in result["details"]["grid"]] == pytest.approx([0.01, 1.0, 100.0])
    assert result["details"]["chosen"]["C"] in {0.01, 1.0, 100.0}
    assert (out / "results_logreg.md").read_text().count("|") > 10


def test_config_mistakes_are_reported_with_the_key(imagenette, tmp_path, capsys):
    assert main(["knn", "--weights", "random", "--train", "x", "--val", "y", "knn.kz=[5]"]) == 2
    assert "unknown config key 'knn.kz'; did you mean 'knn.ks'?" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["knn", "--weights", "random", "--train", str(imagenette["train_small"])])
    assert exit_info.value.code == 2 and "--val not given" in capsys.readouterr().err


def test_paths_holding_the_wrong_thing_are_one_line_errors(imagenette, tmp_path, capsys):
    """Weights, datasets and output paths that exist but cannot serve: `error: ...`, exit 1, no traceback."""
    from dinoforge.config import save_config
    from pretrain.train_config import TrainConfig

    killed = tmp_path / "killed_run"  # a pretraining run stopped before its end: checkpoints, no export yet
    save_config(load_config(TrainConfig, REPO / "configs/pretrain/cpu_tiny.yaml", ["data.dataset=x"]), killed)
    (killed / "checkpoints").mkdir()
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "empty").mkdir()
    data = ["--train", str(imagenette["train_small"]), "--val", str(imagenette["val_small"]), *TINY_64,
            "features.cache_dir="]
    cases = [
        (["--weights", str(tmp_path / "missing.pth")], f"weights file not found: {tmp_path / 'missing.pth'}"),
        (["--weights", str(killed)], f"pretrain run {killed} has no export yet (no export/teacher_backbone.safetensors;"
                                     f" the run stopped before its end?): run `python -m pretrain export {killed}`"),
        (["--weights", str(tmp_path / "empty")], f"{tmp_path / 'empty'}: no teacher_backbone.safetensors in it"),
        (["--weights", str(tmp_path / "notes.txt")], f"{tmp_path / 'notes.txt'}: unknown weights format '.txt'"),
        (["--weights", "random", "--train", str(tmp_path / "empty")], f"--train: {tmp_path / 'empty'}: empty dataset"),
        (["--weights", "random", "--val", str(tmp_path / "empty" / "x.bin")], "--val: dataset path does not exist"),
        (["--weights", "random", "--out", str(tmp_path / "notes.txt" / "out")], "Not a directory"),
    ]
    for flags, message in cases:
        assert main(["knn", *data, "--out", str(tmp_path / "out"), *flags]) == 1, flags
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_shipped_configs_load_strictly():
    for task, schema in TASK_SCHEMAS.items():
        cfg = load_config(schema, REPO / "configs" / "eval" / f"{task}.yaml")
        assert cfg.model.patch_size == 14 and cfg.transform.crop_size == 224


def test_our_models_are_evaluated_at_the_side_they_trained_at(tmp_path):
    """transform sizes 0 (the schema's default): one of our models at its own img_size (resize keeps 256/224), a
    weights file or random init at the protocol's 256/224; a size given is kept."""
    export = tmp_path / "run" / "export"
    export.mkdir(parents=True)
    (export / "teacher_backbone.safetensors").write_bytes(b"")
    (export / "model.json").write_text(json.dumps(asdict(ModelConfig(arch="vit_tiny", patch_size=8, img_size=48))))

    def sizes(*overrides: str) -> tuple[int, int]:
        transform = model_transform(load_config(KnnEvalConfig, None, list(overrides))).transform
        return transform.resize_size, transform.crop_size

    assert sizes(f"model.weights={tmp_path / 'run'}") == (55, 48)
    assert sizes(f"model.weights={export}") == (55, 48)
    assert sizes(f"model.weights={tmp_path / 'run'}", "transform.crop_size=32") == (37, 32)
    assert sizes(f"model.weights={tmp_path / 'run'}", "transform.resize_size=64") == (64, 48)
    assert sizes("model.weights=random") == (256, 224)
    assert sizes("model.weights=w.pth") == (256, 224)


class _Named:
    def __init__(self, classes):
        self.classes = classes


def test_val_labels_follow_class_names_when_val_lacks_a_class():
    """ImageFolder numbers classes by sorted folder name: a val split without class 'b' numbers 'c' as 1."""
    train = FeatureSet(labels=torch.tensor([0, 1, 2]), block_cls=torch.zeros(3, 1, 2),
                       patch_mean=torch.zeros(3, 2))
    val = FeatureSet(labels=torch.tensor([0, 1]), block_cls=torch.zeros(2, 1, 2),
                     patch_mean=torch.zeros(2, 2))
    _, aligned, num_classes = align_labels(_Named(["a", "b", "c"]), _Named(["a", "c"]), train, val)
    assert aligned.labels.tolist() == [0, 2] and num_classes == 3
    with pytest.raises(DatasetError, match="val classes absent from the train split: \\['z'\\] \\(1 in all; "
                                           "train-only classes: \\['b'\\]\\)"):
        align_labels(_Named(["a", "b"]), _Named(["a", "z"]), train, val)
