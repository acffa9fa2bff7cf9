"""Where training metrics go: console (rank 0), `metrics.jsonl` (one line per logged step) and TensorBoard."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from torch import Tensor

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Append-only metric sink of the main process; other ranks hold a no-op instance."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported lazily: tensorboard is slow to import

            self._writer = SummaryWriter(log_dir=str(Path(run_dir) / "tb"))

    def log(self, step: int, metrics: dict[str, Any]) -> dict[str, float]:
        """Record `metrics` (tensors become floats) for `step`; returns the floats written."""
        values = {k: _to_float(v) for k, v in metrics.items()}
        if not self.enabled:
            return values
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}, allow_nan=True) + "\n")
        if self._writer is not None:
            for key, value in values.items():
                if math.isfinite(value):
                    self._writer.add_scalar(key, value, step)
        return values

    def note(self, step: int, fields: dict[str, Any]) -> None:
        """Record facts about the run that are not numbers (e.g. the attention kernel and why) in metrics.jsonl."""
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps({"step": step, **fields}) + "\n")

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


def read_metrics(run_dir: str | Path) -> list[dict[str, float]]:
    """The records of `run_dir/metrics.jsonl` merged per step, in step order; a later value of a key wins (a step
    logged again after a resume, or the k-NN monitor's line for a step already logged)."""
    by_step: dict[int, dict] = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_step.setdefault(int(record["step"]), {}).update(record)
    return [by_step[s] for s in sorted(by_step)]


def format_console(step: int, total: int, values: dict[str, float], keys: tuple[str, ...]) -> str:
    shown = " ".join(f"{k}={values[k]:.4g}" for k in keys if k in values)
    return f"step {step}/{total} {shown}"


def _to_float(value: Any) -> float:
    if isinstance(value, Tensor):
        return float(value.detach().float().item())
    return float(value)
