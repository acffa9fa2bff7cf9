"""The headline every bench script puts in its JSON object: the one ratio `bench/run_all.py` copies into
bench/results/summary.md, what it measures and the baseline it is against (measured in the same run), so the runner
never guesses which of a bench's numbers matters."""

from __future__ import annotations

import math
from collections.abc import Iterable


def headline(metric: str, ratio: float | None, baseline: str) -> dict:
    """`{"metric", "ratio", "baseline"}`; `ratio` None when this run could not measure it (the metric says why)."""
    return {"metric": metric, "ratio": None if ratio is None else round(float(ratio), 3), "baseline": baseline}


def geometric_mean(values: Iterable[float]) -> float | None:
    """The mean of ratios measured on several recipes or models (None for none): a 2x and a 0.5x cancel out."""
    values = [float(v) for v in values]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else None
