"""Training checkpoints as torch.distributed.checkpoint (DCP) directories, resumable on any number of processes.

Layout under `root` (the run's `checkpoints/`):
    step_00001000/          one complete DCP checkpoint (`.metadata` + one data file per writing rank)
    step_00001000.tmp-<id>  a checkpoint being written, renamed to step_%08d only once every rank has finished
    latest                  text file naming the newest complete directory, replaced atomically (os.replace)

Each checkpoint holds `integrity.json` (pretrain.checkpoint_manifest): its files' sizes, written before it is
published, and their SHA-256, added by a background thread. Loading checks it first: a damaged checkpoint is a
DamagedCheckpointError naming the file, and resuming (no step asked) falls back to the newest intact one.

The reference writes one file per rank that cannot be merged or resharded; DCP stores every tensor with its
global shape, so a checkpoint written by N processes loads into M (each rank reads only its own shards).
DCP stores non-tensor values with pickle: load only checkpoints your own runs wrote.
"""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import threading
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from dinoforge.collectives import barrier, current_rank
from dinoforge.launch import is_distributed
from pretrain.checkpoint_manifest import (
    DamagedCheckpoint,
    DamagedCheckpointError,
    hash_in_background,
    verify,
    write_sizes,
)

logger = logging.getLogger(__name__)

STEP_DIR = re.compile(r"step_(\d{8,})")
LATEST = "latest"
# DCP warns on every call without a process group that it assumes a single process; that is our intent.
_NO_PROCESS_GROUP_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


class ModelState:
    """A module's parameters and buffers for DCP (the `Stateful` protocol).

    Under FSDP2 the entries are the sharded DTensors (each rank saves and loads only its shards); without FSDP they
    are plain tensors. Keys are the module's own state-dict keys; loading is strict.
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return get_model_state_dict(self.module)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_model_state_dict(self.module, state_dict, options=StateDictOptions(strict=True))


class OptimizerState:
    """An optimizer's state for DCP, keyed by parameter names of `module` (not by position), so it reshards.

    Parameters that never received a gradient (a mask token without masking, the head of a disabled loss) have no
    state in the saved optimizer; they get none after loading either, exactly as in the run that saved it.
    """

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.module = module
        self.optimizer = optimizer
        self._saved: set[str] | None = None
        self._stateless: list[str] = []

    def expect_saved_keys(self, keys: set[str]) -> None:
        """Called by `Checkpointer.load` with this entry's flattened keys in the checkpoint (`state.<fqn>.<key>`)."""
        self._saved = keys

    def state_dict(self) -> dict[str, Any]:
        state = get_optimizer_state_dict(self.module, self.optimizer)
        if self._saved is not None:  # loading: torch fills every parameter's state; request only the saved ones
            saved = self._saved
            self._stateless = [fqn for fqn, values in state["state"].items()
                               if not any(f"state.{fqn}.{key}" in saved for key in values)]
            state["state"] = {fqn: v for fqn, v in state["state"].items() if fqn not in self._stateless}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._stateless:
            logger.info("no optimizer state saved for %s (no gradient before the save); they start without",
                        self._stateless)
        # strict=False lets exactly those parameters go without state; every other one was loaded above
        options = StateDictOptions(strict=not self._stateless)
        self._saved, self._stateless = None, []
        set_optimizer_state_dict(self.module, self.optimizer, state_dict, options=options)


class RNGState:
    """This process's random generators: torch (CPU, and the current CUDA device), Python `random`, NumPy.

    Each rank saves its own states under `rank_<r>`, as tensors (nothing pickled). Resumed on more processes than
    saved them, the new ranks find no state and keep their current generators (seed them per rank before loading);
    that is logged. `Checkpointer.load` tells this object which states the checkpoint holds before loading.
    """

    def __init__(self) -> None:
        self._saved: set[str] | None = None

    def expect_saved_keys(self, keys: set[str]) -> None:
        """Called by `Checkpointer.load` with this entry's flattened keys in the checkpoint (`rank_0.torch`...)."""
        self._saved = keys

    @staticmethod
    def _capture() -> dict[str, Tensor]:
        _, mt_state, gauss_next = random.getstate()
        np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
        if np_name != "MT19937":
            raise RuntimeError(f"unsupported NumPy global generator {np_name!r}")
        states = {
            "torch": torch.get_rng_state(),
            "python_mt": torch.tensor(mt_state, dtype=torch.int64),
            "python_gauss": torch.tensor([gauss_next is not None, gauss_next or 0.0], dtype=torch.float64),
            "numpy_mt": torch.from_numpy(np_keys.astype(np.int64)),
            "numpy_pos": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
            "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
        }
        if torch.cuda.is_available():
            states["cuda"] = torch.cuda.get_rng_state()
        return states

    def state_dict(self) -> dict[str, Any]:
        key = f"rank_{current_rank()}"
        states = self._capture()
        if self._saved is not None:  # loading: ask only for what the checkpoint holds for this rank
            states = {name: t for name, t in states.items() if f"{key}.{name}" in self._saved}
            if not states:
                logger.warning("checkpoint has no RNG state for rank %d (saved by fewer processes); keeping this "
                               "process's current generators", current_rank())
                return {}
        return {key: states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved = None
        states = next(iter(state_dict.values()), {})
        if "torch" in states:
            torch.set_rng_state(states["torch"])
        if "cuda" in states:
            torch.cuda.set_rng_state(states["cuda"])
        if "python_mt" in states:
            has_gauss, gauss = states["python_gauss"].tolist()
            random.setstate((3, tuple(states["python_mt"].tolist()), gauss if has_gauss else None))
        if "numpy_mt" in states:
            pos, has_gauss = states["numpy_pos"].tolist()
            np.random.set_state(("MT19937", states["numpy_mt"].numpy().astype(np.uint32), pos, has_gauss,
                                 float(states["numpy_gauss"].item())))


def export_full_state_dict(module: nn.Module) -> dict[str, Tensor]:
    """The consolidated fp32 state dict on CPU on rank 0 ({} on other ranks); call it on every rank.

    Gathers FSDP2 shards one tensor at a time (rank 0 holds the result on CPU, never the GPUs), for the teacher
    export and releases. Tensors never alias the live model.
    """
    state = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if current_rank() != 0:
        return {}
    # plain CPU tensors come back as the live ones; DTensor shards never alias a gathered full tensor
    live = {t.data_ptr() for t in module.state_dict().values()
            if isinstance(t, Tensor) and not isinstance(t, DTensor) and t.device.type == "cpu"}
    out = {}
    for key, value in state.items():
        dtype = torch.float32 if value.is_floating_point() else value.dtype
        out[key] = value.detach().to(device="cpu", dtype=dtype, copy=value.data_ptr() in live)
    return out


def _is_complete(path: Path) -> bool:
    """A DCP directory is complete once its coordinator wrote `.metadata` (which DCP does last)."""
    return path.is_dir() and (path / ".metadata").is_file()


def _fsync_dir(path: Path) -> None:
    """Make renames inside `path` durable (a crash right after must not resurrect the old name)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) cannot open directories; the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _shared_nonce() -> str:
    """A random id chosen by rank 0 and known to every rank (they all write into the same temporary directory)."""
    nonce = [uuid.uuid4().hex[:12]]
    if is_distributed():
        dist.broadcast_object_list(nonce, src=0)
    return nonce[0]


class Checkpointer:
    """Writes `root/step_%08d` DCP checkpoints atomically, keeps the newest `keep_last`, and loads them in place.

    `app_state` maps names (no dots) to `ModelState`, `OptimizerState`, `RNGState` or plain dicts of tensors and
    scalars. Plain values must be identical on every rank (DCP writes one copy of replicated entries); after
    `load` the dicts hold the saved values (nested dicts are updated in place, top-level scalars replaced).
    Every method must be called on every rank; the filesystem must be shared by all ranks.
    """

    def __init__(self, root: Path | str, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be at least 1, got {keep_last}")
        self.root = Path(root)
        self.keep_last = keep_last
        self.damaged: list[DamagedCheckpoint] = []  # what the last `load` passed over, newest first
        self._hashers: dict[str, threading.Thread] = {}  # directory name -> the thread hashing its files

    def wait_for_hashes(self) -> None:
        """Wait until every published checkpoint's manifest holds its hashes."""
        for name in list(self._hashers):
            self._settle(name)

    def _settle(self, name: str) -> None:
        """Let the hashing of `name` finish before the directory is replaced or deleted."""
        thread = self._hashers.pop(name, None)
        if thread is not None:
            thread.join()

    def step_dir(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending (temporary and foreign directories ignored)."""
        if not self.root.is_dir():
            return []
        found = []
        for path in self.root.iterdir():
            match = STEP_DIR.fullmatch(path.name)
            if match and _is_complete(path):
                found.append(int(match.group(1)))
        return sorted(found)

    def latest_step(self) -> int | None:
        """The step `latest` names; if it is missing or dangling (a crash between the rename and the pointer update,
        a hand-deleted directory), the newest complete checkpoint; None when there is none."""
        pointer = self.root / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            match = STEP_DIR.fullmatch(name)
            if match and _is_complete(self.root / name):
                return int(match.group(1))
            logger.warning("%s names %r, which is not a complete checkpoint; using the newest complete one",
                           pointer, name)
        steps = self.steps()
        return steps[-1] if steps else None

    # -- saving -----------------------------------------------------------------------------------------------------

    def save(self, step: int, app_state: dict[str, Any]) -> Path:
        """Write `app_state` as checkpoint `step` and point `latest` at it; returns the checkpoint directory."""
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        self._check_names(app_state)
        final = self.step_dir(step)
        if current_rank() == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_temporaries()
        nonce = _shared_nonce()  # also orders every rank after the cleanup above
        tmp = self.root / f"{final.name}.tmp-{nonce}"
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_NO_PROCESS_GROUP_WARNING)
            dcp.save(app_state, checkpoint_id=tmp)
        barrier()  # every rank's shards are on disk before the directory becomes visible under its final name
        if current_rank() == 0:
            self._publish(tmp, final, nonce)
            self._prune(keep=final.name)
            logger.info("saved checkpoint %s", final)
        barrier()
        return final

    def _publish(self, tmp: Path, final: Path, nonce: str) -> None:
        manifest = write_sizes(tmp)  # part of the checkpoint before it is visible under its final name
        self._settle(final.name)
        replaced = None
        if final.exists():  # the same step saved again (e.g. right after a resume): swap, then drop the old one
            replaced = final.with_name(f"{final.name}.tmp-replaced-{nonce}")
            os.rename(final, replaced)
        os.rename(tmp, final)
        pointer_tmp = self.root / f"{LATEST}.tmp-{nonce}"
        with open(pointer_tmp, "w") as f:
            f.write(final.name + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(pointer_tmp, self.root / LATEST)
        _fsync_dir(self.root)
        if replaced is not None:
            shutil.rmtree(replaced)
        self._hashers[final.name] = hash_in_background(final, manifest)

    def _remove_temporaries(self) -> None:
        """Delete what crashed saves left behind: `*.tmp-*` directories and pointer files."""
        for path in self.root.iterdir():
            if ".tmp-" not in path.name:
                continue
            logger.warning("removing %s, left by an interrupted checkpoint save", path)
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()

    def _prune(self, keep: str) -> None:
        """Keep the `keep_last` highest steps, and always `keep` (the checkpoint just written)."""
        steps = self.steps()
        for step in steps[: max(len(steps) - self.keep_last, 0)]:
            path = self.step_dir(step)
            if path.name != keep:
                self._settle(path.name)
                shutil.rmtree(path)
                logger.info("pruned checkpoint %s (keep_last=%d)", path, self.keep_last)

    # -- loading ----------------------------------------------------------------------------------------------------

    def load(self, app_state: dict[str, Any], step: int | None = None) -> int:
        """Load checkpoint `step` in place into `app_state`, resharding as needed; returns the step loaded.

        Without `step`: the latest, or when it is damaged the newest intact one before it (each one passed over is
        logged and listed in `self.damaged`). A damaged `step` asked for is a DamagedCheckpointError naming the file.
        """
        self._check_names(app_state)
        self.damaged = []
        if step is not None:
            self._load_step(app_state, step)
            return step
        latest = self.latest_step()
        if latest is None:
            raise FileNotFoundError(f"no complete checkpoint under {self.root} (expected step_XXXXXXXX "
                                    "directories); start without resuming or point to another run")
        for candidate in [latest, *(s for s in reversed(self.steps()) if s < latest)]:
            try:
                self._load_step(app_state, candidate)
            except DamagedCheckpointError as err:
                logger.warning("checkpoint %s is damaged, trying the one before: %s", self.step_dir(candidate), err)
                self.damaged.append(DamagedCheckpoint(candidate, err.path or self.step_dir(candidate), str(err)))
                continue
            if self.damaged:
                logger.warning("resumed from step %d, the newest intact checkpoint; passed over %s", candidate,
                               ", ".join(str(d.path) for d in self.damaged))
            return candidate
        raise DamagedCheckpointError(
            f"every checkpoint under {self.root} is damaged ({'; '.join(d.problem for d in self.damaged)}); move "
            "them aside to start the run again, or restore them from a copy", self.root)

    def _load_step(self, app_state: dict[str, Any], step: int) -> None:
        path = self.step_dir(step)
        if not _is_complete(path):
            raise FileNotFoundError(f"{path} is not a complete checkpoint; complete steps: {self.steps()}")
        verify(path)
        metadata = path / ".metadata"
        try:
            saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
        except Exception as err:  # unpickling damaged bytes raises nearly any type (UnpicklingError, EOFError...)
            raise DamagedCheckpointError(f"checkpoint file {metadata} cannot be read ({type(err).__name__}: {err})",
                                         metadata) from None
        self._match_entries(app_state, saved, path)
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NO_PROCESS_GROUP_WARNING)
                dcp.load(app_state, checkpoint_id=path)
        except CheckpointException as err:
            if "read_data" not in str(err):  # planning failed: the checkpoint does not fit this model
                raise
            causes = "; ".join(f"rank {rank}: {failure[0]}" for rank, failure in err.failures.items())
            raise DamagedCheckpointError(f"checkpoint {path} cannot be read ({causes[:300]})", path) from None
        logger.info("loaded checkpoint %s", path)

    @staticmethod
    def _check_names(app_state: dict[str, Any]) -> None:
        bad = [name for name in app_state if not isinstance(name, str) or "." in name or not name]
        if bad:
            raise ValueError(f"app_state names must be non-empty strings without dots (DCP joins paths with '.'): "
                             f"{bad}")

    @staticmethod
    def _match_entries(app_state: dict[str, Any], saved: set[str], path: Path) -> None:
        """Every requested entry must exist in the checkpoint; entries with `expect_saved_keys` (RNGState,
        OptimizerState) learn which of their keys it holds, to request only those."""
        saved_names = {key.split(".", 1)[0] for key in saved}
        missing = sorted(name for name in app_state if name not in saved_names)
        if missing:
            raise KeyError(f"checkpoint {path} has no entries {missing}; it holds {sorted(saved_names)}")
        for name, value in app_state.items():
            if hasattr(value, "expect_saved_keys"):
                prefix = name + "."
                value.expect_saved_keys({key[len(prefix):] for key in saved if key.startswith(prefix)})

