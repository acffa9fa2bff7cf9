"""The release folder (`python -m pretrain release`) and its loader: every file it holds is listed with its SHA-256
in SHA256SUMS (the `sha256sum` format, so `sha256sum -c SHA256SUMS` checks it too), and nothing is loaded from a
release whose files differ from that list.

    DIR/config.json            {"format": "dinoforge-release", "model": <ModelConfig>, "architecture": ..., ...}
    DIR/backbone.safetensors   the backbone, official DINOv2 keys
    DIR/heads.safetensors      its DINO / iBOT heads, when it has them
    DIR/hf/, DIR/backbone.onnx, DIR/MODEL_CARD.md, DIR/SHA256SUMS
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from pathlib import Path

from torch import nn

from dinoforge.atomic import atomic_write_text
from dinoforge.errors import CheckpointError
from dinoforge.hashing import file_sha256
from dinoforge.models.config import ModelConfig, build_backbone
from dinoforge.models.weights import load_pretrained

logger = logging.getLogger(__name__)

RELEASE_FORMAT = "dinoforge-release"
CONFIG_FILE = "config.json"
BACKBONE_FILE = "backbone.safetensors"
HEADS_FILE = "heads.safetensors"
CARD_FILE = "MODEL_CARD.md"
ONNX_FILE = "backbone.onnx"
HF_DIR = "hf"
SUMS_FILE = "SHA256SUMS"


class ReleaseIntegrityError(CheckpointError):
    """A release file differs from SHA256SUMS (changed, missing or unlisted)."""


def is_release(path: str | Path) -> bool:
    """A folder written by `python -m pretrain release` (or made by hand in its format)."""
    config = Path(path).expanduser() / CONFIG_FILE
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("format") == RELEASE_FORMAT
    except (ValueError, AttributeError):
        return False


def write_sha256sums(folder: str | Path) -> Path:
    """SHA256SUMS over every other file under `folder` (relative POSIX paths, sorted): written last."""
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != SUMS_FILE)
    lines = [f"{file_sha256(p)}  {p.relative_to(folder).as_posix()}\n" for p in files]
    return atomic_write_text(folder / SUMS_FILE, "".join(lines))


def read_sha256sums(folder: str | Path) -> dict[str, str] | None:
    """{relative path: hex digest} of `folder/SHA256SUMS`, or None when the folder has none."""
    path = Path(folder) / SUMS_FILE
    if not path.is_file():
        return None
    sums = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64:
            raise ReleaseIntegrityError(f"{path}:{number} is not a `sha256sum` line (<64 hex digits>  <file>): "
                                        f"{line[:80]!r}")
        sums[name.removeprefix("*")] = digest.lower()
    return sums


def verify_release(folder: str | Path, read: Iterable[str] = (CONFIG_FILE, BACKBONE_FILE)) -> None:
    """Check a release against its SHA256SUMS before loading: every listed file must exist, and the files about to be
    `read` must be listed and have their listed digest. A release without SHA256SUMS (made by hand) is loaded with a
    warning. Raises ReleaseIntegrityError naming the file and both digests."""
    folder = Path(folder)
    sums = read_sha256sums(folder)
    if sums is None:
        logger.warning("release %s has no %s: its files are loaded unverified (a release made by hand?)", folder,
                       SUMS_FILE)
        return
    for name, digest in sums.items():
        if not (folder / name).is_file():
            raise ReleaseIntegrityError(f"release {folder}: {name} is missing ({SUMS_FILE} lists sha256 {digest}); "
                                        "the release is incomplete: get it again")
    unlisted = [name for name in read if name not in sums]
    if unlisted:
        raise ReleaseIntegrityError(f"release {folder}: {', '.join(unlisted)} not listed in {SUMS_FILE}, so it cannot "
                                    "be verified: get the release again")
    for name in read:
        actual = file_sha256(folder / name)
        if actual != sums[name]:
            raise ReleaseIntegrityError(f"release {folder}: {name} has sha256 {actual} but {SUMS_FILE} says "
                                        f"{sums[name]}: the file changed after release; get the release again")


def read_release_config(folder: str | Path) -> dict:
    """The release's config.json (unverified: `load_release` verifies first)."""
    path = Path(folder).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a release: no {CONFIG_FILE} in it (`python -m pretrain release` "
                                "writes one)")
    config = json.loads(path.read_text())
    if config.get("format") != RELEASE_FORMAT:
        raise CheckpointError(f"{path} is not a dinoforge release config (format {config.get('format')!r}, "
                              f"expected {RELEASE_FORMAT!r})")
    return config


def release_model_config(folder: str | Path) -> ModelConfig:
    """The architecture of a release, as the ModelConfig every stage builds from."""
    return ModelConfig(**read_release_config(folder)["model"])


def load_release(folder: str | Path) -> nn.Module:
    """The backbone of a release, built from its config.json, weights loaded strictly, in eval mode; its files are
    checked against SHA256SUMS first."""
    folder = Path(folder).expanduser()
    model_cfg = release_model_config(folder)  # a folder that is no release: say so before talking about checksums
    verify_release(folder)
    backbone = build_backbone(model_cfg, drop_path=False)
    load_pretrained(backbone, folder / BACKBONE_FILE)
    logger.info("loaded release %s", folder)
    return backbone.eval()
