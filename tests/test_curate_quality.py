"""Issue 5, point 9: dedup and retrieval quality on real photos (Imagenette + Imagewoof from ../shared/data).

Copy detection uses the `copydetect` embedder (weight-free; design and rejected candidates in
curate/embedding/copydetect.py) at its recommended threshold. 300 photos get one planted copy each (JPEG quality 30-90
and a 0.5-2x resize always; 90% crop, horizontal flip and a mild colour change each with probability 1/2) in a pool of
3,000 photos; recall is the share of copies that land in their original's component, precision the share of correct
pairs among all pairs that share a component. The draw here (seed 2024) differs from the one the descriptor was tuned
on.
Measured on this draw: recall 0.993, precision 0.997 at cosine 0.8 (the one false pair: two burst shots of a dog
show); every exact copy found.

Pool photos named ILSVRC2012_val_* are left out: they come from ImageNet's validation split and some are natural
near-duplicates of train photos (e.g. a Border terrier photo present twice with a different crop), which would be
scored as false positives although they are real copies.

Retrieval: 100 Imagenette val seeds, a pool of 1,000 other Imagenette + 1,000 Imagewoof val photos, N=4 per seed. No
weight-free embedding we measured retrieves Imagenette by content: copydetect 57%, random-init ViT-Ti 58-68%,
random-init ResNet-18 60-66%, colour / gradient / LBP histograms at 64-128 px 55-70% (chance: 50%), and our own cpu_tiny
SSL teacher after 600 steps on 2 cores 60%; `test_seed_set_retrieval_with_our_cpu_tiny_export` (150 steps on the 20
classes' train photos, exported, at its 48 px) 56.3% (55.0% at 224 px, the default before embed.image_size followed our
models). (LBP at 224 px reaches 93-97%, but only because Imagenette is stored at 224 px and Imagewoof at 112 px: a
storage cue, not content.) So the embedding this test uses stands in for DINOv2 weights: a small CNN trained in the
test, with labels, on the 20 classes' train photos, which the seeds and the pool never come from; every photo goes
through Imagewoof's 112 px first, so storage size is no cue. It retrieves 93.1% Imagenette (3 epochs at width 16, about
1.5 minutes on 2 cores; width 32 and 4 epochs: 92.3% in 5.5). Some misses are expected: one Imagenette class (English
springer) is a dog. `test_retrieval_with_dinov2_weights` runs the same check with real DINOv2 weights
(DINOFORGE_DINOV2_WEIGHTS=path [DINOFORGE_DINOV2_ARCH=vit_small]).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from curate_photos import dataset_root
from supervised_embedder import train_supervised_embedder

from curate.dedup.config import COPYDETECT_THRESHOLDS
from curate.dedup.kernels import exact_duplicates, near_duplicates
from curate.dedup.planted import plant_copy
from curate.embedding.embed import EmbedConfig, Embedder, build_embedder, embed_images
from curate.selection.retrieve import RetrieveConfig, retrieve
from dinoforge.config import load_config
from pretrain.run_length import scale_schedule
from pretrain.train_config import TrainConfig

REPO = Path(__file__).resolve().parents[1]

N_COPIES = 300
N_EXACT = 20


def _photos(name: str, split: str) -> list[Path]:
    root = dataset_root(name) / split
    return sorted(p for p in root.rglob("*.JPEG") if not p.name.startswith("ILSVRC2012_val_"))


@pytest.fixture(scope="module")
def planted() -> dict:
    """3,000 pool photos + 300 planted copies + 20 byte-identical copies, with ground truth."""
    rng = random.Random(2024)
    nette = rng.sample(_photos("imagenette", "train"), 2000)
    woof = rng.sample(_photos("imagewoof", "train"), 1000)
    data = [p.read_bytes() for p in nette + woof]
    uids = [f"{p.parent.parent.parent.name}/{p.parent.name}/{p.stem}" for p in nette + woof]
    n_pool = len(data)
    originals = rng.sample(range(n_pool), N_COPIES + N_EXACT)
    partner = {}
    for c, o in enumerate(originals[:N_COPIES]):
        data.append(plant_copy(data[o], rng))
        uids.append(f"copy/{c:04d}")
        partner[len(data) - 1] = o
    exact = {}
    for c, o in enumerate(originals[N_COPIES:]):
        data.append(data[o])
        uids.append(f"exact/{c:04d}")
        exact[len(data) - 1] = o
    return {"data": data, "uids": uids, "partner": partner, "exact": exact}


def test_exact_copies_are_always_found(planted):
    import hashlib

    sha = [hashlib.sha256(d).hexdigest() for d in planted["data"]]
    dup_of = exact_duplicates(sha, planted["uids"])
    found = {int(i) for i in np.nonzero(dup_of >= 0)[0]}
    # Every byte copy is paired with its original; the smaller uid is kept ('exact/...' sorts before 'image...').
    for copy, original in planted["exact"].items():
        assert dup_of[original] == copy and dup_of[copy] == -1
    assert len(found) == N_EXACT


def test_planted_copies_recall_and_precision(planted):
    keep = [i for i in range(len(planted["data"])) if i not in planted["exact"]]  # exact copies go first
    embedder = build_embedder(EmbedConfig(kind="copydetect", device="cpu"))
    emb = embed_images(embedder, [planted["data"][i] for i in keep], batch_size=64, num_workers=2, progress=False)
    uids = [planted["uids"][i] for i in keep]
    _, component = near_duplicates(emb, uids, k=64, threshold=COPYDETECT_THRESHOLDS[0], use_gpu="cpu")
    row = {orig: pos for pos, orig in enumerate(keep)}
    found = sum(component[row[c]] == component[row[o]] for c, o in planted["partner"].items())
    _, sizes = np.unique(component, return_counts=True)
    predicted_pairs = int((sizes * (sizes - 1) // 2).sum())
    recall = found / N_COPIES
    precision = found / max(predicted_pairs, 1)
    print(f"copy detection at cosine {COPYDETECT_THRESHOLDS[0]}: recall {recall:.3f}, precision {precision:.3f} "
          f"({found} of {N_COPIES} copies, {predicted_pairs} predicted pairs)")
    assert recall >= 0.95
    assert precision >= 0.99


# --- retrieval -----------------------------------------------------------------------------------------------------


def _imagenette_share(embedder: Embedder, seed_count: int = 100) -> float:
    """Share of Imagenette among the images 100 Imagenette val seeds retrieve (N=4 each) from 1,000 other Imagenette
    val photos mixed with 1,000 Imagewoof val photos; asserts the manifest-facing outputs on the way."""
    rng = random.Random(7)
    by_class: dict[str, list[Path]] = {}
    for p in _photos("imagenette", "val"):
        by_class.setdefault(p.parent.name, []).append(p)
    seeds = [p for cls in sorted(by_class) for p in rng.sample(by_class[cls], seed_count // len(by_class))]
    nette = rng.sample(sorted(set(_photos("imagenette", "val")) - set(seeds)), 1000)
    woof = rng.sample(_photos("imagewoof", "val"), 1000)
    pool = nette + woof
    pool_emb = embed_images(embedder, [p.read_bytes() for p in pool], 64, 2, progress=False)
    seed_emb = embed_images(embedder, [p.read_bytes() for p in seeds], 64, 2, progress=False)
    mask, reasons, score = retrieve(pool_emb, seed_emb, [p.stem for p in seeds],
                                    cfg=RetrieveConfig(mode="sample", n_per_seed=4, use_gpu="cpu"))
    assert mask.sum() >= 2 * len(seeds)  # neighbours overlap, but most seeds bring new images
    assert all(r.startswith("seed:") for r in np.asarray(reasons, dtype=object)[mask])
    assert np.isfinite(score[mask]).all() and np.isnan(score[~mask]).all()
    selected = np.nonzero(mask)[0]
    share = float(np.mean(selected < len(nette)))
    print(f"{embedder.name}: {len(selected)} retrieved, {share:.3f} Imagenette")
    return share


@pytest.mark.slow
def test_seed_set_retrieves_imagenette_with_a_supervised_embedding():
    """Semantic retrieval with the small supervised CNN of tests/supervised_embedder.py (about 1.5 minutes)."""
    train = {name: _photos(name, "train") for name in ("imagenette", "imagewoof")}
    paths = train["imagenette"] + train["imagewoof"]
    classes = sorted({p.parent.name for p in paths})
    labels = [classes.index(p.parent.name) for p in paths]
    assert len(classes) == 20
    assert _imagenette_share(train_supervised_embedder(paths, labels)) >= 0.8


# A short cpu_tiny run: self-supervised, on the 20 classes' train photos (never the seeds' or the pool's val split).
SSL_STEPS = 150


@pytest.mark.slow
def test_seed_set_retrieval_with_our_cpu_tiny_export(tmp_path):
    """Issue 25.6: the same retrieval with one of our own runs' exports as `embed.kind: dinov2` embedding. A cpu_tiny
    run of SSL_STEPS steps (about 2.5 minutes on 2 cores) is trained through `python -m pretrain train` on a file list
    of the Imagenette + Imagewoof train photos and exported; its share is printed, as the supervised stand-in's is.
    Not held to a bar: at this length it retrieves no better than a random-init ViT (module docstring)."""
    file_list = tmp_path / "pool_train.txt"
    file_list.write_text("".join(f"{p}\n" for name in ("imagenette", "imagewoof") for p in _photos(name, "train")))
    recipe = REPO / "configs" / "pretrain" / "cpu_tiny.yaml"
    cfg = load_config(TrainConfig, recipe, [f"data.dataset={file_list}"])
    optim = scale_schedule(cfg.optim, SSL_STEPS / cfg.total_steps)
    done = subprocess.run(
        [sys.executable, "-m", "pretrain", "train", str(recipe), f"data.dataset={file_list}", f"output_dir={tmp_path}",
         "name=ssl", "checkpoint_every=0", f"total_steps={SSL_STEPS}", f"optim.warmup_steps={optim.warmup_steps}",
         f"optim.freeze_last_layer_steps={optim.freeze_last_layer_steps}"],
        cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    export = tmp_path / "ssl" / "export"
    embedder = build_embedder(EmbedConfig(kind="dinov2", weights=str(export)))
    assert embedder.dim == 192 and embedder.name.endswith("-48")  # at the side it trained at (embed_image_size)
    _imagenette_share(embedder)  # asserts the retrieval's outputs and prints the in-domain share


@pytest.mark.skipif(not os.environ.get("DINOFORGE_DINOV2_WEIGHTS"), reason="set DINOFORGE_DINOV2_WEIGHTS to a DINOv2 "
                    "weights file to measure semantic retrieval")
def test_retrieval_with_dinov2_weights():
    cfg = EmbedConfig(kind="dinov2", weights=os.environ["DINOFORGE_DINOV2_WEIGHTS"],
                      arch=os.environ.get("DINOFORGE_DINOV2_ARCH", "vit_small"), patch_size=14)
    assert _imagenette_share(build_embedder(cfg)) >= 0.8
