"""Embedding throughput vs the decode-only rate of the same images; prints one JSON object.

Decode-only runs exactly the decoding `embed_images` does (same threads, same JPEG draft size) and nothing else,
so the ratio says how much of the decoding speed the embedder keeps (1.0: decoding is the bottleneck).
Images: the JPEGs of a folder (`--folder`) or the first `--n` members of a tar (default: the shared Imagenette
archive next to the repository), read into memory first so disk speed is not measured.

    python bench/bench_embed.py --n 512                                     # copydetect
    python bench/bench_embed.py --kind random_vit --arch vit_small --n 256  # a ViT-S/14 at 224 px
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.headline import headline  # noqa: E402
from bench.timing import Clock  # noqa: E402
from curate.embedding.embed import EmbedConfig, build_embedder, decode_image, embed_images  # noqa: E402
from curate.plan.costs import record_costs  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_TAR = REPO.parent / "shared" / "data" / "imagenette2-224.tar"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def read_images(folder: str | None, tar: str, n: int) -> list[bytes]:
    if folder:
        paths = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)[:n]
        return [p.read_bytes() for p in paths]
    if not Path(tar).is_file():
        raise SystemExit(f"no images: {tar} not found; pass --folder DIR or --tar FILE")
    out = []
    with tarfile.open(tar) as archive:
        for member in archive:
            if member.isfile() and member.name.lower().endswith(IMAGE_SUFFIXES):
                out.append(archive.extractfile(member).read())
                if len(out) == n:
                    break
    return out


def decode_only(images: list[bytes], draft: int | None, workers: int) -> float:
    start = time.perf_counter()
    if workers > 0:
        with ThreadPoolExecutor(workers) as pool:
            for _ in pool.map(lambda b: decode_image(b, draft), images):
                pass
    else:
        for b in images:
            decode_image(b, draft)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kind", default="copydetect", help="copydetect | random_vit | dinov2 | open_clip")
    parser.add_argument("--arch", default="vit_small")
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--weights", default="")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--folder", default=None)
    parser.add_argument("--tar", default=str(DEFAULT_TAR))
    parser.add_argument("--record", default=None, metavar="FILE", help="write the per-image CPU costs into this cost "
                        "record (bench/costs.json: what `python -m curate plan` reads)")
    args = parser.parse_args()

    cfg = EmbedConfig(kind=args.kind, arch=args.arch, patch_size=args.patch_size, image_size=args.image_size,
                      weights=args.weights, batch_size=args.batch_size, num_workers=args.num_workers,
                      device=args.device)
    embedder = build_embedder(cfg)
    images = read_images(args.folder, args.tar, args.n)
    draft = 2 * embedder.decode_size if embedder.decode_size else None
    embed_images(embedder, images[: args.batch_size], args.batch_size, args.num_workers, progress=False)  # warm-up
    clock = Clock()
    decode_s = decode_only(images, draft, args.num_workers)
    decode_cpu = clock.read()[1]
    clock = Clock()
    embed_images(embedder, images, args.batch_size, args.num_workers, progress=False)
    embed_s, embed_cpu = clock.read()
    if args.record:  # CPU seconds (all threads): core-seconds per image, what the plan spreads over a task's cores
        costs = {"decode_cpu_s_per_image": (decode_cpu / len(images), "CPU s / image",
                                            f"decoding for {embedder.name} (JPEG draft size {draft})")}
        if args.kind == "copydetect" and embedder.device.type == "cpu":
            costs["copydetect_cpu_s_per_image"] = (embed_cpu / len(images), "CPU s / image",
                                                   "copydetect embedding on CPU, decoding included")
        record_costs(args.record, costs, sys.argv)
    print(json.dumps({
        "bench": "embed", "embedder": embedder.name, "dim": embedder.dim, "device": str(embedder.device),
        "images": len(images), "batch_size": args.batch_size, "num_workers": args.num_workers,
        "torch_threads": torch.get_num_threads(),
        "decode_only_images_per_s": round(len(images) / decode_s, 1),
        "embed_images_per_s": round(len(images) / embed_s, 1),
        "decode_only_cpu_s": round(decode_cpu, 3), "embed_cpu_s": round(embed_cpu, 3),
        "ratio_embed_over_decode": round(decode_s / embed_s, 3),
        "headline": headline(f"{embedder.name} embedding rate / decode-only rate (1.0: decoding is the bottleneck)",
                             decode_s / embed_s, "decoding alone, same images, threads and draft size"),
    }))


if __name__ == "__main__":
    main()
