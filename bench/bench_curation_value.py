"""Curation pays (issue 25.5): pretraining `cpu_tiny` on a curated set beats the same training on a random subset of the
same pool and size, and the curated set holds none of the evaluation photos planted in the pool. Prints one JSON object.

The pool: Imagenette train + Imagewoof train (all of both by default) and `--copies` altered copies of Imagenette val
photos (curate.dedup.planted: re-encoded, resized, sometimes cropped / mirrored / recoloured). Seeds: `--seeds`
Imagenette train photos, evenly over its classes. Phases, each timed:
1. ssl: a short `cpu_tiny` run (`--ssl-steps`) on the pool itself, the only embedding curation gets (no labels, no
   outside weights);
2. curate: `python -m curate run configs/curate/imagenette.yaml` on the pool with that run's export as
   `embed.kind=dinov2`, the copydetect embedding for dedup and decontamination against Imagenette val, and the
   retrieval settings of CURATE_SETTINGS (or --curate-set);
3. the random baseline: as many pool images as curation selected, drawn with `--seed` from the pool as given
   (planted copies included);
4. train: `cpu_tiny` for `--steps` steps on each set (the curated one through its shards, as a user would);
5. eval: k-NN (k=20, [CLS], 48 px) on the whole Imagenette val with the whole Imagenette train as bank
   (bench_cpu_recipe.backbone_knn), and the same for random init and raw pixels (unless --no-baselines).
Curation wins when its k-NN is higher and no planted copy is left in its set.

usage: python bench/bench_curation_value.py [--pool-per-class N] [--copies N] [--seeds N] [--ssl-steps N]
       [--steps N] [--curate-set KEY=VALUE ...] [--no-baselines] [--seed S] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from bench.bench_cpu_recipe import (  # noqa: E402
    CACHE,
    DEFAULT_DATA,
    PIXEL_SIDE,
    K,
    backbone_knn,
    pixel_knn,
    pretrain_cpu_tiny,
)
from bench.headline import headline  # noqa: E402
from curate.dedup.planted import plant_copy  # noqa: E402
from dinoforge.data.formats import IMAGE_SUFFIXES  # noqa: E402

T = TypeVar("T")

DEFAULT_WOOF = CACHE / "data" / "imagewoof2-112"  # where the tests unpack the shared Imagewoof
CURATE_CONFIG = REPO / "configs" / "curate" / "imagenette.yaml"
# Retrieval settings measured to pick Imagenette out of the pool with the pool's own 400-step SSL run (docs/curation.md,
# "Curation pays"): DINOv2's cluster retrieval for small seed sets: each of 50 k-means clusters of the pool holding more
# than 3 seeds gives its 300 images nearest the seeds' mean; 62-66% Imagenette over k-means seeds (the pool: 50%),
# against 61% for the 20 nearest per seed and 57-59% for smaller or larger clusters.
CURATE_SETTINGS = ("cluster.n_clusters=[50,5]", "retrieve.mode=cluster", "retrieve.min_seeds_per_cluster=3",
                   "retrieve.m_per_cluster=300")
SSL_STEPS = 400
STEPS = 2400
COPIES = 300
SEEDS = 100


@dataclass
class Pool:
    """The pool's images (planted copies included) in a fixed order, the origin of each, and the seed photos."""

    images: list[Path]
    origin: dict[Path, str]  # imagenette | imagewoof | planted
    seeds: list[Path]

    @property
    def planted(self) -> set[Path]:
        return {p for p, o in self.origin.items() if o == "planted"}


@dataclass
class Phases:
    """Wall seconds of each phase, in order."""

    seconds: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[..., T], *args: object) -> T:
        """fn(*args), timed under `name` (progress to stderr)."""
        print(f"[curation_value] {name} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        value = fn(*args)
        self.seconds[name] = round(time.perf_counter() - started, 1)
        print(f"[curation_value] {name}: {self.seconds[name]:.0f} s", file=sys.stderr, flush=True)
        return value


def class_photos(root: Path) -> dict[str, list[Path]]:
    """class folder name -> its image files, sorted."""
    return {c.name: sorted(p for p in c.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            for c in sorted(root.iterdir()) if c.is_dir()}


def draw_per_class(by_class: dict[str, list[Path]], per_class: int, rng: random.Random) -> list[Path]:
    """`per_class` photos of every class drawn with `rng` (0: all of them), in sorted order."""
    drawn: list[Path] = []
    for photos in by_class.values():
        drawn += photos if per_class <= 0 or per_class >= len(photos) else rng.sample(photos, per_class)
    return sorted(drawn)


def plant_copies(originals: Sequence[Path], folder: Path, rng: random.Random) -> list[Path]:
    """One altered copy of each original, written to folder/copy-NNNNN.jpg (names say nothing of the original)."""
    folder.mkdir(parents=True, exist_ok=True)
    copies = []
    for i, original in enumerate(originals):
        copy = folder / f"copy-{i:05d}.jpg"
        copy.write_bytes(plant_copy(original.read_bytes(), rng))
        copies.append(copy)
    return copies


def build_pool(nette: Path, woof: Path, out: Path, per_class: int, n_copies: int, n_seeds: int, seed: int) -> Pool:
    """Imagenette train + Imagewoof train (`per_class` of each class, 0: all), `n_copies` planted copies of
    Imagenette val photos, and `n_seeds` Imagenette train photos as seeds (evenly over its classes)."""
    rng = random.Random(seed)
    nette_train = class_photos(nette / "train")
    origin = {p: "imagenette" for p in draw_per_class(nette_train, per_class, rng)}
    origin |= {p: "imagewoof" for p in draw_per_class(class_photos(woof / "train"), per_class, rng)}
    val = [p for photos in class_photos(nette / "val").values() for p in photos]
    origin |= {p: "planted" for p in plant_copies(rng.sample(val, n_copies), out / "planted", rng)}
    seeds = draw_per_class(nette_train, max(1, n_seeds // len(nette_train)), rng)[:n_seeds]
    return Pool(sorted(origin), origin, seeds)


def write_file_list(paths: Sequence[Path], path: Path) -> Path:
    """A file list (`dinoforge.data.file_list`, one path a line) that every stage reads as a dataset."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{p}\n" for p in paths))
    return path


def random_subset(images: Sequence[Path], size: int, seed: int) -> list[Path]:
    """`size` images drawn uniformly without replacement with `seed` (the baseline curation is measured against)."""
    if size > len(images):
        raise ValueError(f"a random subset of {size} images from a pool of {len(images)}")
    return sorted(random.Random(seed).sample(list(images), size))


def composition(paths: Sequence[Path], pool: Pool) -> dict[str, int]:
    """How many of `paths` came from each origin; `planted_copies_left`: the planted val copies among them."""
    counts = {"images": len(paths), "imagenette": 0, "imagewoof": 0, "planted_copies_left": 0}
    for p in paths:
        origin = pool.origin[p]
        counts["planted_copies_left" if origin == "planted" else origin] += 1
    return counts


def curate_overrides(pool_list: Path, seeds_list: Path, val: Path, ssl_export: Path, out: Path,
                     settings: Sequence[str]) -> list[str]:
    """The curation run's command-line overrides of CURATE_CONFIG: our pool, seeds and eval set, the SSL export as
    the retrieval embedding at its training resolution, then `settings` (they win)."""
    return ["name=curated", f"runs_root={out}", "partitions=4", "ingest.num_workers=2",
            f"sources=[{{path: {pool_list}, name: pool}}]", f"seeds=[{{path: {seeds_list}, name: seeds}}]",
            f"evals=[{{path: {val}, name: imagenette_val}}]",
            "embed.kind=dinov2", f"embed.weights={ssl_export}", "embed.image_size=48", "embed.num_workers=2",
            *settings]


def run_curation(overrides: Sequence[str]) -> Path:
    """`python -m curate run CURATE_CONFIG overrides` (as a user would); -> the run directory."""
    proc = subprocess.run([sys.executable, "-m", "curate", "run", str(CURATE_CONFIG), *overrides], cwd=REPO,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"curate run failed:\n{proc.stderr[-4000:]}")
    runs_root = next(o.split("=", 1)[1] for o in overrides if o.startswith("runs_root="))
    return Path(runs_root) / "curated"


def pool_files(run_dir: Path, status: str = "selected") -> list[Path]:
    """The pool files of a curation run with `status` in its manifest (selected: those its shards hold)."""
    from curate.manifest import read_manifest

    table = read_manifest(run_dir / "manifest.parquet")
    rows = zip(table.column("role").to_pylist(), table.column("status").to_pylist(),
               table.column("file").to_pylist(), strict=True)
    return sorted(Path(f) for role, row_status, f in rows if role == "pool" and row_status == status)


def verdict(knn_curated: float, knn_random: float, copies_left: int) -> dict:
    """Whether curation paid: a higher k-NN than the random subset's and no planted copy left."""
    wins = knn_curated > knn_random and copies_left == 0
    why = []
    if knn_curated <= knn_random:
        why.append(f"k-NN {knn_curated:.2f} <= random subset's {knn_random:.2f}")
    if copies_left:
        why.append(f"{copies_left} planted val copies left in the curated set")
    return {"curation_wins": wins, "why_not": "; ".join(why)}


def report(pool: Pool, curated: dict, rand: dict, steps: int, ssl_steps: int, settings: Sequence[str],
           seconds: dict[str, float], baselines: dict | None = None, decontaminated: int | None = None) -> dict:
    """The JSON object: the pool, both sets (composition, copies left, k-NN), the differences and the verdict;
    `decontaminated`: the planted copies curation marked contaminated (the rest it may still have left out)."""
    result = {"pool": {"images": len(pool.images), "seeds": len(pool.seeds),
                       **{k: v for k, v in composition(pool.images, pool).items() if k != "images"}},
              "planted_copies_decontaminated": decontaminated, "ssl_steps": ssl_steps, "steps": steps,
              "curate_settings": list(settings),
              "curated": curated, "random": rand,
              "knn_gain_points": round(curated["knn_k20"] - rand["knn_k20"], 2),
              "knn_ratio": round(curated["knn_k20"] / rand["knn_k20"], 3),
              **verdict(curated["knn_k20"], rand["knn_k20"], curated["planted_copies_left"])}
    if baselines:
        result["baselines_knn_k20"] = baselines
    result["seconds"] = {**seconds, "total": round(sum(seconds.values()), 1)}
    result["headline"] = headline(
        f"k-NN (k={K}) top-1 on Imagenette val, cpu_tiny {steps} steps on the curated set / on a random pool subset "
        f"of its size ({curated['images']} images; planted val copies left: curated {curated['planted_copies_left']}, "
        f"random {rand['planted_copies_left']})", curated["knn_k20"] / rand["knn_k20"],
        "the same training on a random subset of the same pool, same size, seeded")
    return result


def run(args: argparse.Namespace) -> dict:
    out: Path = args.out
    phases = Phases()
    pool = phases.run("pool", build_pool, args.data, args.woof, out, args.pool_per_class, args.copies, args.seeds,
                      args.seed)
    pool_list = write_file_list(pool.images, out / "pool.txt")
    ssl_run, _, _ = phases.run("ssl", pretrain_cpu_tiny, pool_list, out / "ssl", args.ssl_steps)
    overrides = curate_overrides(pool_list, write_file_list(pool.seeds, out / "seeds.txt"), args.data / "val",
                                 ssl_run / "export", out / "curate", args.curate_set)
    run_dir = phases.run("curate", run_curation, overrides)
    curated_files = pool_files(run_dir)
    decontaminated = len(pool.planted & set(pool_files(run_dir, "contaminated")))
    random_files = random_subset(pool.images, len(curated_files), args.seed)
    random_list = write_file_list(random_files, out / "random.txt")
    print(f"[curation_value] curated {composition(curated_files, pool)}; random {composition(random_files, pool)}",
          file=sys.stderr, flush=True)
    curated_run, cfg, _ = phases.run("train_curated", pretrain_cpu_tiny, run_dir / "shards", out / "train",
                                     args.steps, (), (), "curated")
    random_run, _, _ = phases.run("train_random", pretrain_cpu_tiny, random_list, out / "train", args.steps, (), (),
                                  "random")
    train, val = str(args.data / "train"), str(args.data / "val")
    sets = {}
    for name, files, run_path in (("curated", curated_files, curated_run), ("random", random_files, random_run)):
        knn = phases.run(f"eval_{name}", backbone_knn, cfg.model, str(run_path), train, val, out / f"eval_{name}")
        sets[name] = {**composition(files, pool), "knn_k20": round(knn, 2)}
    baselines = None
    if not args.no_baselines:
        baselines = {"random_init": round(phases.run("eval_random_init", backbone_knn, cfg.model, "random", train,
                                                     val, out / "eval_random_init"), 2),
                     f"pixels_{PIXEL_SIDE}": round(phases.run("eval_pixels", pixel_knn, cfg.model, train, val,
                                                              out / "eval_pixels"), 2)}
    result = report(pool, sets["curated"], sets["random"], args.steps, args.ssl_steps, args.curate_set,
                    phases.seconds, baselines, decontaminated)
    result["out"] = str(out)
    return result


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Imagenette: train/ and val/ class folders")
    parser.add_argument("--woof", type=Path, default=DEFAULT_WOOF, help="Imagewoof: train/ class folders")
    parser.add_argument("--pool-per-class", type=int, default=0, help="pool photos per class (0: all)")
    parser.add_argument("--copies", type=int, default=COPIES, help="planted copies of Imagenette val photos")
    parser.add_argument("--seeds", type=int, default=SEEDS, help="seed photos from Imagenette train")
    parser.add_argument("--ssl-steps", type=int, default=SSL_STEPS, help="the pool's own SSL run (the embedding)")
    parser.add_argument("--steps", type=int, default=STEPS, help="pretraining steps on each set")
    parser.add_argument("--curate-set", nargs="*", default=list(CURATE_SETTINGS), metavar="KEY=VALUE",
                        help="curation settings (overrides of configs/curate/imagenette.yaml)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the k-NN of random init and raw pixels")
    parser.add_argument("--seed", type=int, default=0, help="draws the pool, copies, seeds and the random subset")
    parser.add_argument("--out", type=Path, default=None, help="where everything goes (default: a temporary folder)")
    args = parser.parse_args(argv)
    for root, split in ((args.data, "val"), (args.data, "train"), (args.woof, "train")):
        if not (root / split).is_dir():
            parser.error(f"{root / split} is not a folder: the shared Imagenette and Imagewoof are required "
                         "(unpacked by the tests under ~/.cache/dinoforge/data; or pass --data and --woof)")
    args.out = args.out or Path(tempfile.mkdtemp(prefix="bench_curation_value-"))
    return args


def main() -> None:
    print(json.dumps(run(parse_args()), indent=1))


if __name__ == "__main__":
    main()
