"""On-disk cache of extracted features, keyed by the weights' hash, the dataset and everything else that matters.

A cache entry is one safetensors file (tensors only: nothing is unpickled on load) named
`<dataset name>-<key hash>.safetensors`; its metadata holds the full key so that an entry can be traced back.
Entries are written by rank 0 to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist
from safetensors.torch import load_file, save_file

from dinoforge.atomic import atomic_path
from dinoforge.collectives import current_rank, current_world_size
from dinoforge.data.dataset_spec import split_kind_prefix
from evaluation.feature_set import FeatureSet

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the extraction changes in a way the key does not capture


def dataset_fingerprint(spec: str, dataset: Any) -> dict[str, Any]:
    """What identifies a dataset's content cheaply: its resolved path, modification time, size and classes.

    Editing files inside an ImageFolder without adding or removing any is not detected; clear the cache then.
    """
    kind, path = split_kind_prefix(spec)
    fingerprint: dict[str, Any] = {"spec": spec, "size": len(dataset)}
    local = Path(path).expanduser()
    if local.exists():
        fingerprint["spec"] = f"{kind + ':' if kind else ''}{local.resolve()}"
        fingerprint["mtime_ns"] = local.stat().st_mtime_ns
    classes = getattr(dataset, "classes", None)
    if classes:
        fingerprint["classes_sha256"] = hashlib.sha256("\n".join(classes).encode()).hexdigest()[:16]
    return fingerprint


def cache_path(cache_dir: str | Path, dataset_spec: str, key: dict[str, Any]) -> Path:
    """The cache file for `key` (a JSON-serialisable dict)."""
    digest = hashlib.sha256(json.dumps({**key, "format": CACHE_FORMAT}, sort_keys=True).encode()).hexdigest()[:20]
    stem = Path(dataset_spec.rstrip("/")).name or "dataset"
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:60]
    return Path(cache_dir).expanduser() / f"{stem}-{digest}.safetensors"


def cached_features(cache_file: Path | None, key: dict[str, Any], extract: Callable[[], FeatureSet]) -> FeatureSet:
    """Features from `cache_file` when rank 0 has it, else from `extract()` (then saved by rank 0).

    Collective when a process group is initialised: rank 0 decides hit or miss for everyone, so every rank
    takes the same path; on a hit every rank reads the file (the cache directory must be shared by the ranks).
    """
    if cache_file is None:
        return extract()
    hit = [cache_file.is_file()]
    if current_world_size() > 1:
        dist.broadcast_object_list(hit, src=0)
    if hit[0]:
        if not cache_file.is_file():
            raise FileNotFoundError(
                f"rank {current_rank()} cannot see the feature cache file {cache_file} that rank 0 found; put "
                "features.cache_dir on a file system shared by all processes, or disable it with features.cache_dir=''"
            )
        logger.info("features from cache %s", cache_file)
        return load_features(cache_file)
    features = extract()
    if current_rank() == 0:
        save_features(cache_file, features, key)
        logger.info("features cached in %s", cache_file)
    return features


def save_features(path: Path, features: FeatureSet, key: dict[str, Any]) -> None:
    tensors = {"labels": features.labels.contiguous(), "block_cls": features.block_cls.contiguous(),
               "patch_mean": features.patch_mean.contiguous()}
    metadata = {"key": json.dumps(key, sort_keys=True), "decode_errors": str(features.decode_errors),
                "format": str(CACHE_FORMAT)}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def load_features(path: Path) -> FeatureSet:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    tensors = load_file(str(path))
    missing = {"labels", "block_cls", "patch_mean"} - set(tensors)
    if missing:
        raise ValueError(f"feature cache file {path} lacks {sorted(missing)}; delete it to re-extract")
    return FeatureSet(labels=tensors["labels"], block_cls=tensors["block_cls"], patch_mean=tensors["patch_mean"],
                      decode_errors=int(metadata.get("decode_errors", 0)))
