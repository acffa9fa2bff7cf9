"""`python -m pretrain release`: the folder's contents, loaders that verify SHA256SUMS, the same outputs in dinoforge,
transformers, timm and ONNX Runtime, byte-identical re-releases, and one-line errors that write nothing."""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_distill import PRETRAIN, STUDENT_A, STUDENT_B, distill_args, run, tiny

from dinoforge.models import load_release
from dinoforge.models.config import ModelConfig
from dinoforge.models.export_reader import load_exported_backbone
from dinoforge.models.release_format import ReleaseIntegrityError, verify_release
from dinoforge.models.vision_transformer import build_vit
from dinoforge.models.weights import export_official, save_safetensors
from evaluation.__main__ import main as evaluation_main
from pretrain.__main__ import main as pretrain_main

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-4


@pytest.fixture(scope="module")
def pretrain_run(image_folder, tmp_path_factory) -> Path:
    """A 2-block ViT-Ti/8 with 4 registers, 4 steps, its k-NN evaluated into RUN/eval (a release finds it there)."""
    out = tmp_path_factory.mktemp("runs")
    run(["train", str(PRETRAIN), *tiny(image_folder, out, "tiny", **{
        "model.depth": 2, "model.num_register_tokens": 4, "loss.dino_head.out_dim": 64,
        "loss.dino_head.hidden_dim": 32, "loss.dino_head.bottleneck_dim": 16, "optim.warmup_teacher_temp_steps": 1,
        "optim.freeze_last_layer_steps": 1})])
    folder = out / "tiny"
    assert evaluation_main(["knn", "--weights", str(folder), "--train", str(image_folder), "--val",
                            str(image_folder), "--out", str(folder / "eval"), "knn.ks=[5]",
                            "transform.resize_size=32", "transform.crop_size=32", "features.cache_dir="]) == 0
    return folder


@pytest.fixture(scope="module")
def released(pretrain_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("release") / "tiny-release"
    assert pretrain_main(["release", str(pretrain_run), "--out", str(out), "--onnx", "--name", "tiny-reg4"]) == 0
    return out


def tokens(model, x):
    with torch.no_grad():
        out = model.forward_features(x)
    return out["x_norm_clstoken"], out["x_norm_patchtokens"]


def max_diff(a, b) -> float:
    return max(float((torch.as_tensor(p) - torch.as_tensor(q)).abs().max()) for p, q in zip(a, b, strict=True))


# -- 1. contents --------------------------------------------------------------------------------------------------


def test_release_folder_holds_every_file_and_its_checksum(released, pretrain_run):
    names = sorted(p.relative_to(released).as_posix() for p in released.rglob("*") if p.is_file())
    assert names == ["MODEL_CARD.md", "SHA256SUMS", "backbone.onnx", "backbone.safetensors", "config.json",
                     "heads.safetensors", "hf/config.json", "hf/model.safetensors"]
    sums = dict(reversed(line.split("  ")) for line in (released / "SHA256SUMS").read_text().splitlines())
    assert sorted(sums) == [n for n in names if n != "SHA256SUMS"]
    for name, digest in sums.items():
        assert hashlib.sha256((released / name).read_bytes()).hexdigest() == digest, name
    if shutil.which("sha256sum"):  # the file is in sha256sum's own format
        subprocess.run(["sha256sum", "--quiet", "-c", "SHA256SUMS"], cwd=released, check=True)
    # the backbone is the run's export, byte for byte: what the run's evaluations measured
    assert (released / "backbone.safetensors").read_bytes() == \
        (pretrain_run / "export" / "teacher_backbone.safetensors").read_bytes()


def test_config_json_says_what_the_model_is_and_how_to_feed_it(released):
    config = json.loads((released / "config.json").read_text())
    assert config["format"] == "dinoforge-release" and config["name"] == "tiny-reg4"
    assert config["architecture"] == {
        "family": "dinov2_vit", "arch": "vit_tiny", "embed_dim": 192, "depth": 2, "num_heads": 3, "patch_size": 8,
        "num_register_tokens": 4, "ffn_layer": "mlp", "layerscale": True,
        "parameters": sum(p.numel() for p in load_release(released).parameters())}
    assert config["image_size"] == 48 and ModelConfig(**config["model"]).img_size == 48
    assert config["mean"] == pytest.approx([0.485, 0.456, 0.406]) and config["std"] == pytest.approx([0.229, 0.224,
                                                                                                      0.225])
    with safe_open(str(released / "heads.safetensors"), "pt") as f:
        assert config["heads"] == sorted({key.split(".")[0] for key in f.keys()}) and config["heads"]
    assert config["dinoforge"]["version"] and re.fullmatch(r"[0-9a-f]{40}(-dirty)?|unknown",
                                                           config["dinoforge"]["commit"])
    assert config["onnx"]["opset"] >= 17


def test_model_card_reports_data_recipe_compute_and_the_runs_evaluation(released, pretrain_run):
    card = (released / "MODEL_CARD.md").read_text()
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    for line in ("license: other", "library_name: transformers", "  - dinov2", "datasets:", "metrics:",
                 "  - accuracy"):
        assert line in front.splitlines(), line
    assert re.search(r"^trained: \d{4}-\d\d-\d\d$", front, re.M)  # the run recorded when it started
    assert "- images: 48" in body  # the dataset the run noted
    config_sha = hashlib.sha256((pretrain_run / "config.yaml").read_bytes()).hexdigest()
    assert f"sha256 `{config_sha}`" in body and '- `total_steps`: 4' in body
    assert "- steps: 4" in body and "- global batch: 8" in body and "- images seen: 32" in body
    assert "- device: cpu" in body
    knn = json.loads((pretrain_run / "eval" / "results_knn.json").read_text())
    assert "### k-NN" in body and f"{next(iter(knn['tables'].values()))[0]['top1']}" in body.replace(",", "")
    assert re.search(r"transformers \(hf/\): max abs difference \d\.\d\de-\d\d", body)
    assert re.search(r"onnxruntime \(backbone.onnx\): max abs difference", body)
    assert "## Known limits" in body and "a 48 px grid" in body


def test_model_card_code_runs(released, monkeypatch):
    """Every Python block of the card runs as written, with `release` pointing at the folder."""
    card = (released / "MODEL_CARD.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", card, re.S)
    assert len(blocks) >= 4  # dinoforge, torch.hub, transformers, ONNX Runtime (timm: not an official size)
    monkeypatch.chdir(released.parent)
    for block in blocks:
        code = block.replace('"path/to/dinoforge"', repr(str(REPO)))
        code = re.sub(r'^release = ".*"$', f"release = {str(released)!r}", code, flags=re.M)
        exec(compile(code, "MODEL_CARD.md", "exec"), {})


# -- 2. loaders verify --------------------------------------------------------------------------------------------


def test_loaders_load_the_released_model(released, pretrain_run):
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    expected = tokens(load_exported_backbone(pretrain_run), x)
    model = load_release(released)
    assert not model.training
    assert max_diff(tokens(model, x), expected) == 0
    hub = torch.hub.load(str(REPO), "release", source="local", weights=str(released))
    assert max_diff(tokens(hub, x), expected) == 0
    with pytest.raises(ValueError, match="vit_tiny/8 with 4 registers.*generic entry"):
        torch.hub.load(str(REPO), "dinov2_vits14_reg", source="local", weights=str(released))


@pytest.fixture
def copy_of(released, tmp_path) -> Path:
    return Path(shutil.copytree(released, tmp_path / "copy"))


def test_a_changed_file_is_refused_naming_it_and_both_digests(copy_of, image_folder, capsys):
    listed = dict(reversed(line.split("  ")) for line in (copy_of / "SHA256SUMS").read_text().splitlines())
    data = bytearray((copy_of / "backbone.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight
    (copy_of / "backbone.safetensors").write_bytes(bytes(data))
    actual = hashlib.sha256(bytes(data)).hexdigest()
    for load in (lambda: load_release(copy_of),
                 lambda: torch.hub.load(str(REPO), "release", source="local", weights=str(copy_of))):
        with pytest.raises(ReleaseIntegrityError) as info:
            load()
        assert "backbone.safetensors" in str(info.value)
        assert actual in str(info.value) and listed["backbone.safetensors"] in str(info.value)
    capsys.readouterr()
    code = evaluation_main(["knn", "--weights", str(copy_of), "--train", str(image_folder), "--val",
                            str(image_folder), "--out", str(copy_of.parent / "eval")])
    (err,) = error_lines(capsys)
    assert code == 1 and "backbone.safetensors has sha256" in err


def test_a_missing_file_is_refused_and_a_release_without_sums_loads_with_a_warning(copy_of, caplog):
    (copy_of / "MODEL_CARD.md").unlink()
    with pytest.raises(ReleaseIntegrityError, match="MODEL_CARD.md is missing"):
        load_release(copy_of)
    (copy_of / "SHA256SUMS").unlink()
    with caplog.at_level(logging.WARNING):
        assert load_release(copy_of) is not None
    assert "no SHA256SUMS" in caplog.text
    # a file the loader reads must be listed
    (copy_of / "SHA256SUMS").write_text(f"{'0' * 64}  config.json\n")
    with pytest.raises(ReleaseIntegrityError, match="backbone.safetensors not listed"):
        verify_release(copy_of)


def test_a_distillation_teacher_and_evaluation_take_a_release(released, image_folder, tmp_path):
    out = tmp_path / "eval"
    assert evaluation_main(["knn", "--weights", str(released), "--train", str(image_folder), "--val",
                            str(image_folder), "--out", str(out), "knn.ks=[5]", "transform.resize_size=48",
                            "transform.crop_size=48", "features.cache_dir="]) == 0
    meta = json.loads((out / "results_knn.json").read_text())["meta"]
    assert (meta["arch"], meta["patch_size"], meta["depth"], meta["num_register_tokens"]) == ("vit_tiny", 8, 2, 4)
    run(distill_args(image_folder, tmp_path, "from_release", released, [STUDENT_A], total_steps=2))


def test_curation_embeds_with_a_run_its_export_a_release_a_student_and_a_bare_weights_file(
        pretrain_run, released, image_folder, tmp_path):
    """`embed.kind=dinov2 embed.weights=` takes every form of our models (issue 25 point 6): the run, its export
    folder, its release and its bare backbone file (architecture from embed.*) give the same embeddings, the
    backbone's own normalised CLS token; a distilled student's folder gives its own."""
    import numpy as np

    from curate.embedding.embed import EmbedConfig, build_embedder, decode_image, embed_images

    images = sorted(image_folder.rglob("*.jpg"))[:4]
    data = [path.read_bytes() for path in images]

    def embedding(weights: Path, **arch: object) -> np.ndarray:
        cfg = EmbedConfig(kind="dinov2", weights=str(weights), image_size=32, device="cpu", num_workers=0, **arch)
        return embed_images(build_embedder(cfg), data, 4, 0, progress=False).astype(np.float32)

    from_run = embedding(pretrain_run)
    embedder = build_embedder(EmbedConfig(kind="dinov2", weights=str(pretrain_run), image_size=32, device="cpu"))
    with torch.no_grad():
        x = torch.stack([embedder.transform(decode_image(item)) for item in data])
        expected = torch.nn.functional.normalize(load_exported_backbone(pretrain_run)(x), dim=-1).numpy()
    np.testing.assert_allclose(from_run, expected, atol=2e-3)  # stored as float16
    bare = {"arch": "vit_tiny", "patch_size": 8, "depth": 2, "num_register_tokens": 4}
    for weights, arch in ((pretrain_run / "export", {}), (released, {}), (released / "backbone.safetensors", bare)):
        np.testing.assert_allclose(embedding(weights, **arch), from_run, atol=2e-3, err_msg=str(weights))
    # without embed.image_size, our models embed at the side they trained at; a bare file at official DINOv2's 224
    own = json.loads((pretrain_run / "export" / "model.json").read_text())["img_size"]
    assert own != 224
    for weights in (pretrain_run, pretrain_run / "export", released):
        assert build_embedder(EmbedConfig(kind="dinov2", weights=str(weights), device="cpu")).name.endswith(f"-{own}")
    assert build_embedder(EmbedConfig(kind="dinov2", weights=str(released / "backbone.safetensors"), device="cpu",
                                      **bare)).name.endswith("-224")
    # and `curate plan` costs the run's own architecture at that side, not the embed.* defaults (vit_small/14)
    from curate.plan.network_cost import network_cost
    from dinoforge.models.flops import vit_forward_flops_analytic

    cost = network_cost(EmbedConfig(kind="dinov2", weights=str(pretrain_run)))
    assert cost.name == f"vit_tiny/8 at {own} px"
    assert cost.flops_per_image == vit_forward_flops_analytic(embed_dim=192, depth=2, patch_size=8,
                                                              crops=[(1, 3, own, own)], num_register_tokens=4)
    run(distill_args(image_folder, tmp_path, "student", pretrain_run, [STUDENT_A], total_steps=2))
    student = tmp_path / "student" / "students" / "a"
    from_student = embedding(student)
    assert from_student.shape[0] == 4 and not np.allclose(from_student[:, :8], from_run[:, :8], atol=1e-2)


# -- 3. the same outputs everywhere -------------------------------------------------------------------------------


def test_transformers_and_onnxruntime_give_our_outputs(released):
    transformers = pytest.importorskip("transformers")
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    ours = tokens(load_release(released), x)
    hf = transformers.AutoModel.from_pretrained(str(released / "hf")).eval()
    assert type(hf).__name__ == "Dinov2WithRegistersModel"
    with torch.no_grad():
        hidden = hf(pixel_values=x).last_hidden_state
    assert max_diff((hidden[:, 0], hidden[:, 5:]), ours) <= TOL
    session = ort.InferenceSession(str(released / "backbone.onnx"), providers=["CPUExecutionProvider"])
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"pixel_values": x.numpy()}),
                       strict=True))
    assert max_diff((outputs["cls_token"], outputs["patch_tokens"]), ours) <= TOL


@pytest.fixture(scope="module")
def official_size_export(tmp_path_factory) -> Path:
    """A random ViT-S/14 with 4 registers at 56 px, written as an export folder: timm knows this architecture."""
    folder = tmp_path_factory.mktemp("vits14") / "export"
    model_cfg = ModelConfig(arch="vit_small", img_size=56, num_register_tokens=4, layerscale=1.0,
                            interpolate_antialias=True, interpolate_offset=0.0)
    torch.manual_seed(3)
    model = build_vit("vit_small", patch_size=14, img_size=56, num_register_tokens=4, init_values=1.0,
                      interpolate_antialias=True, interpolate_offset=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_safetensors(export_official(model), folder / "teacher_backbone.safetensors")
    from dataclasses import asdict

    (folder / "model.json").write_text(json.dumps(asdict(model_cfg)))
    return folder


def test_timm_gives_our_outputs_for_an_official_size(official_size_export, tmp_path):
    timm = pytest.importorskip("timm")
    out = tmp_path / "vits14-release"
    assert pretrain_main(["release", str(official_size_export), "--out", str(out)]) == 0
    card = (out / "MODEL_CARD.md").read_text()
    assert '"vit_small_patch14_reg4_dinov2"' in card and "Not recorded" in card  # an export without its run
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    ours = tokens(load_release(out), x)
    # the official hub name takes the release too, and builds it from its config.json (56 px, not 518)
    assert max_diff(tokens(torch.hub.load(str(REPO), "dinov2_vits14_reg", source="local", weights=str(out)), x),
                    ours) == 0
    model = timm.create_model("vit_small_patch14_reg4_dinov2", pretrained=True, img_size=56, num_classes=0,
                              pretrained_cfg_overlay={"file": str(out / "backbone.safetensors")}).eval()
    with torch.no_grad():
        features = model.forward_features(x)
    prefix = model.num_prefix_tokens
    assert max_diff((features[:, 0], features[:, prefix:]), ours) <= TOL


def test_timm_is_skipped_with_the_reason_for_other_sizes(released):
    card = (released / "MODEL_CARD.md").read_text()
    assert "timm: this architecture has no timm name" in card


# -- 5. reproducible ----------------------------------------------------------------------------------------------


def test_releasing_twice_gives_identical_bytes(pretrain_run, released, tmp_path):
    again = tmp_path / "tiny-release"
    assert pretrain_main(["release", str(pretrain_run), "--out", str(again), "--onnx", "--name", "tiny-reg4"]) == 0
    files = sorted(p.relative_to(released) for p in released.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    for name in files:
        assert (released / name).read_bytes() == (again / name).read_bytes(), name


# -- 6. bad input: one line, nothing written ----------------------------------------------------------------------


def error_lines(capsys) -> list[str]:
    """The lines of stderr that report an error (log lines and progress bars aside)."""
    return [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]


def one_line_error(args: list[str], capsys, code: int = 2) -> str:
    capsys.readouterr()
    assert pretrain_main(["release", *args]) == code
    (err,) = error_lines(capsys)
    assert err.startswith("error: "), err
    return err


def test_bad_sources_are_one_line_errors_that_write_nothing(pretrain_run, image_folder, tmp_path, capsys):
    out = tmp_path / "out"
    assert "is not a pretrain run, a distillation run or an export folder" in one_line_error(
        [str(image_folder), "--out", str(out)], capsys)
    assert "does not exist" in one_line_error([str(tmp_path / "nowhere"), "--out", str(out)], capsys, code=1)
    bare = tmp_path / "bare_run"
    bare.mkdir()
    shutil.copy(pretrain_run / "config.yaml", bare / "config.yaml")
    err = one_line_error([str(bare), "--out", str(out)], capsys)
    assert "no complete checkpoint and no export" in err and "python -m pretrain train" in err
    assert "has no students" in one_line_error([str(pretrain_run), "--out", str(out), "--student", "a"], capsys)
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_bad_out_and_eval_are_one_line_errors_that_write_nothing(pretrain_run, released, tmp_path, capsys):
    before = {p: p.read_bytes() for p in released.rglob("*") if p.is_file()}
    assert "is not empty" in one_line_error([str(pretrain_run), "--out", str(released)], capsys)
    assert before == {p: p.read_bytes() for p in released.rglob("*") if p.is_file()}
    out = tmp_path / "out"
    junk = tmp_path / "results_knn.json"
    for text, reason in (("{not json", "is not JSON"), ('{"task": "knn"}', "no 'metrics' object"),
                         ('{"task": "zeroshot", "metrics": {}, "tables": {}, "meta": {}}', "task 'zeroshot'")):
        junk.write_text(text)
        err = one_line_error([str(pretrain_run), "--out", str(out), "--eval", str(junk)], capsys)
        assert "is not evaluation's results JSON" in err or "is not JSON" in err
        assert reason in err
    other = json.loads((pretrain_run / "eval" / "results_knn.json").read_text())
    other["meta"]["weights_fingerprint"] = "sha256:" + "0" * 64
    junk.write_text(json.dumps(other))
    assert "measured weights sha256:000" in one_line_error([str(pretrain_run), "--out", str(out), "--eval",
                                                            str(junk)], capsys)
    assert not out.exists()


def test_force_replaces_a_release_and_a_failed_release_leaves_nothing(pretrain_run, tmp_path, monkeypatch):
    out = tmp_path / "rel"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert pretrain_main(["release", str(pretrain_run), "--out", str(out), "--force"]) == 0
    assert not (out / "stale.txt").exists() and (out / "SHA256SUMS").is_file()
    import pretrain.release as release_module

    def broken(*_args, **_kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(release_module, "render_card", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        pretrain_main(["release", str(pretrain_run), "--out", str(tmp_path / "new")])
    assert not (tmp_path / "new").exists() and [p.name for p in tmp_path.iterdir()] == ["rel"]
    with pytest.raises(RuntimeError, match="disk full"):
        pretrain_main(["release", str(pretrain_run), "--out", str(out), "--force"])
    verify_release(out)  # the earlier release is still whole


# -- distillation runs: one folder per student ----------------------------------------------------------------------


def test_a_distillation_run_releases_each_student_or_the_one_asked_for(pretrain_run, image_folder, tmp_path,
                                                                         capsys):
    run(distill_args(image_folder, tmp_path, "distilled", pretrain_run, [STUDENT_A, STUDENT_B], total_steps=2))
    source = tmp_path / "distilled"
    assert pretrain_main(["release", str(source), "--out", str(tmp_path / "all")]) == 0
    assert sorted(p.name for p in (tmp_path / "all").iterdir()) == ["a", "b"]
    for student, patch in (("a", 8), ("b", 16)):
        config = json.loads((tmp_path / "all" / student / "config.json").read_text())
        assert config["name"] == f"distilled-{student}" and config["architecture"]["patch_size"] == patch
        card = (tmp_path / "all" / student / "MODEL_CARD.md").read_text()
        assert "  - distillation" in card and "- steps: 2" in card
        assert max_diff(tokens(load_release(tmp_path / "all" / student), torch.ones(1, 3, 32, 32)),
                        tokens(load_exported_backbone(source / "students" / student), torch.ones(1, 3, 32, 32))) == 0
    assert pretrain_main(["release", str(source), "--student", "b", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "config.json").read_text())["architecture"]["patch_size"] == 16
    err = one_line_error([str(source), "--student", "c", "--out", str(tmp_path / "c")], capsys)
    assert "'c' is not a student" in err and "['a', 'b']" in err and not (tmp_path / "c").exists()


def test_slurm_plans_a_release_as_one_single_task_job(tmp_path):
    from slurm import submit

    argv = ["release", str(tmp_path / "run"), "--out", str(tmp_path / "rel"), "--onnx"]
    run_dir, (spec,) = submit.plan("pretrain", argv)
    assert run_dir == tmp_path / "run" and spec.name == "pretrain-release" and not spec.multi_task
    assert spec.argvs == [argv]
