"""Ingest: read every configured source, hash and probe every input, and build the manifest (one row per input)."""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import pyarrow as pa
from tqdm import tqdm

from curate.manifest import new_manifest
from curate.partition import partition_of
from curate.sources.decode import DecodeLimits, ImageProbe, probe_image
from curate.sources.readers import LINK_POLICIES, RawInput, SourceError, make_uid, read_source
from dinoforge.data.dataset_spec import TAR_SUFFIXES
from dinoforge.data.file_list import FILE_LIST_SUFFIXES

log = logging.getLogger(__name__)


@dataclass
class SourceConfig:
    """One image source. `path` is relative to the working directory unless absolute."""

    path: str = ""
    kind: str = "auto"  # auto | folder | tar | webdataset | filelist
    name: str = ""  # unique label, part of every uid; defaults to the last path component
    # Symbolic links followed in a folder: inside (those resolving inside `path`; others are rejected rows, unread),
    # all (wherever they point: a pool assembled from links), none (every link is a rejected row). A file list's
    # entries are followed unless none; tar members that are links are always rejected.
    follow_symlinks: str = "inside"

    def __post_init__(self) -> None:
        if self.follow_symlinks not in LINK_POLICIES:
            raise ValueError(f"follow_symlinks={self.follow_symlinks!r} (source {self.path!r}): use one of "
                             f"{', '.join(LINK_POLICIES)}")


@dataclass
class IngestConfig:
    """How inputs are read and what counts as an acceptable image."""

    limits: DecodeLimits = field(default_factory=DecodeLimits)
    max_bytes: int = 256 << 20  # larger files are rejected without being read into memory
    num_workers: int = 0  # processes probing images in parallel (0: in the main process)
    chunksize: int = 32  # inputs sent to a worker at a time


def source_name(src: SourceConfig) -> str:
    """The configured name, or the last path component without brace pattern or archive/list suffix."""
    if src.name:
        return src.name
    last = src.path.rstrip("/").split("/")[-1] or src.path
    stem = last.split("{")[0].rstrip("-_.") or last
    for suffix in (*TAR_SUFFIXES, *FILE_LIST_SUFFIXES):
        if stem.lower().endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def check_source_names(role_sources: Iterable[tuple[str, SourceConfig]]) -> None:
    """Source names become part of uids, so they must be unique across pool, seed and eval sources."""
    seen: dict[str, str] = {}
    for role, src in role_sources:
        if not src.path:
            raise SourceError(f"a {role} source has an empty `path`")
        name = source_name(src)
        if name in seen:
            raise SourceError(f"two sources are named {name!r} ({seen[name]} and {src.path}): give each a unique "
                              "`name:` in the config")
        seen[name] = src.path


def ingest_sources(role_sources: list[tuple[str, SourceConfig]], cfg: IngestConfig, n_partitions: int) -> pa.Table:
    """Read, hash and probe every input of every (role, source); return the manifest table."""
    check_source_names(role_sources)
    rows: list[dict] = []
    start = time.perf_counter()
    for role, src in role_sources:
        name = source_name(src)
        before = len(rows)
        inputs = read_source(src.path, src.kind, name, cfg.max_bytes, src.follow_symlinks)
        bar = tqdm(_probe_all(inputs, cfg), desc=f"ingest {role}:{name}", unit="img", mininterval=2.0)
        for raw, sha, probe in bar:
            rows.append(_row(role, raw, sha, probe, n_partitions))
        if len(rows) == before:  # a wrong path, or a copy that has not finished: stop before any step runs on it
            raise SourceError(f"{role} source {name!r}: {src.path} holds no inputs (an empty folder, tar or file list)")
        reasons = Counter(r["reject_reason"] is not None for r in rows[before:])
        log.info("ingest %s source %s (%s): %d inputs, %d rejected", role, name, src.path, len(rows) - before,
                 reasons[True])
    _dedupe_uids(rows, n_partitions)
    elapsed = time.perf_counter() - start
    log.info("ingest: %d inputs in %.1fs (%.0f inputs/s)", len(rows), elapsed, len(rows) / max(elapsed, 1e-9))
    return new_manifest(rows)


def _probe_all(inputs: Iterator[RawInput], cfg: IngestConfig) -> Iterator[tuple[RawInput, str | None, ImageProbe]]:
    """(input, sha256, probe) in input order, probing in worker processes when configured."""
    if cfg.num_workers <= 0:
        for raw in inputs:
            yield (raw, *_hash_and_probe(raw.data, cfg.limits))
        return
    # Only the bytes travel to workers; the RawInput (minus data) stays here, in order, waiting for its result.
    pending: list[RawInput] = []

    def payloads() -> Iterator[tuple[bytes | None, DecodeLimits]]:
        for raw in inputs:
            pending.append(raw)
            yield raw.data, cfg.limits

    ctx = multiprocessing.get_context("spawn")  # fork would copy torch/faiss state of the parent
    with ctx.Pool(cfg.num_workers) as pool:
        for i, (sha, probe) in enumerate(pool.imap(_hash_and_probe_star, payloads(), chunksize=cfg.chunksize)):
            raw = pending[i]
            pending[i] = None  # type: ignore[call-overload]  # free the bytes as soon as they are probed
            yield raw, sha, probe


def _hash_and_probe_star(args: tuple[bytes | None, DecodeLimits]) -> tuple[str | None, ImageProbe]:
    return _hash_and_probe(*args)


def _hash_and_probe(data: bytes | None, limits: DecodeLimits) -> tuple[str | None, ImageProbe]:
    if data is None:  # the reader already rejected it
        return None, ImageProbe()
    return hashlib.sha256(data).hexdigest(), probe_image(data, limits)


def _row(role: str, raw: RawInput, sha: str | None, probe: ImageProbe, n_partitions: int) -> dict:
    uid = make_uid(raw.source, raw.locator)
    return {
        "uid": uid, "role": role, "source": raw.source, "locator": raw.locator, "file": raw.file,
        "member": raw.member, "offset": raw.offset, "partition": partition_of(uid, n_partitions),
        "size": len(raw.data) if raw.data is not None else None, "sha256": sha, "format": probe.format,
        "width": probe.width, "height": probe.height, "mode": probe.mode,
        "reject_reason": raw.reject_reason or probe.reject_reason,
    }


def _dedupe_uids(rows: list[dict], n_partitions: int) -> None:
    """A file list may name one file twice: both are inputs, so the repeat gets the uid of "<locator>#<n>"."""
    seen: Counter[str] = Counter()
    for row in rows:
        uid = row["uid"]
        seen[uid] += 1
        if seen[uid] > 1:
            row["uid"] = make_uid(row["source"], f"{row['locator']}#{seen[uid]}")
            row["partition"] = partition_of(row["uid"], n_partitions)
