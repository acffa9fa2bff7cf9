"""The cost record: per-item costs measured by the bench scripts, each with the machine it was measured on.

`python -m curate plan` turns these into times; the benches write them (`--record FILE`). The file is JSON:

    {"schema": 1,
     "costs": {"ingest_cpu_s_per_image": {"value": 0.0012, "unit": "CPU s / image",
                                           "what": "hash + probe + manifest row of one image (ingest step)",
                                           "command": "python bench/bench_ingest.py --n 512 --record bench/costs.json",
                                           "measured_on": {"cpu": "...", "cores": 2, "torch": "2.5.1",
                                                           "faiss": "1.9.0", "python": "3.11.9",
                                                           "date": "2026-12-05 13:40 UTC"}},
               ...}}

One entry per cost, each with its own machine and date, so a bench refreshes its own entries and leaves the others
as they were (the record may then mix machines; the plan prints each cost's machine). CPU costs are process CPU
seconds (all threads), i.e. core-seconds, which a shared machine inflates less than wall time.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import platform
import shlex
from dataclasses import asdict, dataclass
from pathlib import Path

from dinoforge.atomic import atomic_write_json
from dinoforge.machine import cpu_model, usable_cores

SCHEMA = 1
DEFAULT_RECORD = Path("bench/costs.json")  # relative to the repository root, where commands run

# Every cost the plan reads, and the bench run that measures it (named in the error when one is missing).
MEASURED_BY = {
    "ingest_cpu_s_per_image": "python bench/bench_ingest.py --record bench/costs.json",
    "manifest_disk_bytes_per_row": "python bench/bench_ingest.py --record bench/costs.json",
    "manifest_memory_bytes_per_row": "python bench/bench_ingest.py --record bench/costs.json",
    "manifest_read_cpu_s_per_row": "python bench/bench_ingest.py --record bench/costs.json",
    "shard_write_s_per_byte": "python bench/bench_ingest.py --record bench/costs.json",
    "image_bytes_mean": "python bench/bench_ingest.py --record bench/costs.json",
    "decode_cpu_s_per_image": "python bench/bench_embed.py --record bench/costs.json",
    "copydetect_cpu_s_per_image": "python bench/bench_embed.py --record bench/costs.json",
}


class CostRecordError(ValueError):
    """The cost record is missing, unreadable or lacks a cost; the message says which bench to run."""


@dataclass(frozen=True)
class Machine:
    """Where a cost was measured."""

    cpu: str
    cores: int
    torch: str
    faiss: str
    python: str
    date: str

    def describe(self) -> str:
        """The machine without the date (entries measured on it at different times share it)."""
        return f"{self.cpu}, {self.cores} cores, torch {self.torch}, faiss {self.faiss}, Python {self.python}"


@dataclass(frozen=True)
class Cost:
    value: float
    unit: str
    what: str
    command: str
    measured_on: Machine


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def this_machine() -> Machine:
    """This machine as a cost record names it (cores: those this process may use)."""
    faiss = _version("faiss-cpu")
    if faiss == "absent":
        faiss = _version("faiss-gpu")
    return Machine(cpu=cpu_model(), cores=usable_cores(), torch=_version("torch"), faiss=faiss,
                   python=platform.python_version(),
                   date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"))


def load_costs(path: str | Path = DEFAULT_RECORD) -> dict[str, Cost]:
    """name -> Cost of the record at `path`; CostRecordError saying how to make one when it is missing or bad."""
    path = Path(path)
    if not path.is_file():
        raise CostRecordError(f"no cost record at {path}: measure one with `{MEASURED_BY['ingest_cpu_s_per_image']}` "
                              f"and `{MEASURED_BY['decode_cpu_s_per_image']}`, or pass --costs FILE")
    try:
        doc = json.loads(path.read_text())
        if doc.get("schema") != SCHEMA:
            raise CostRecordError(f"{path}: schema {doc.get('schema')!r}, this code reads schema {SCHEMA}; "
                                  "re-measure it with the benches (--record)")
        return {name: Cost(float(e["value"]), e["unit"], e["what"], e["command"], Machine(**e["measured_on"]))
                for name, e in doc["costs"].items()}
    except CostRecordError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CostRecordError(f"{path} is not a cost record ({type(err).__name__}: {err}); re-measure it with "
                              "the benches (--record)") from None


def require(costs: dict[str, Cost], name: str, path: str | Path = DEFAULT_RECORD) -> Cost:
    """The cost `name`; CostRecordError naming the bench that measures it when the record lacks it."""
    if name not in costs:
        how = MEASURED_BY.get(name, "the bench that measures it")
        raise CostRecordError(f"{path} has no {name}: measure it with `{how}`")
    return costs[name]


def record_costs(path: str | Path, entries: dict[str, tuple[float, str, str]], argv: list[str]) -> None:
    """Write or refresh `entries` (name -> (value, unit, what)) in the record at `path`, measured now on this
    machine by the bench run `argv` (sys.argv: the script, then its flags); the other entries stay as they were."""
    path = Path(path)
    script = Path(argv[0])
    command = shlex.join(["python", f"{script.parent.name}/{script.name}", *argv[1:]])
    doc = json.loads(path.read_text()) if path.is_file() else {"schema": SCHEMA, "costs": {}}
    if doc.get("schema") != SCHEMA:
        doc = {"schema": SCHEMA, "costs": {}}  # an old format: start over rather than mix units
    machine = asdict(this_machine())
    for name, (value, unit, what) in entries.items():
        if not value > 0:
            raise ValueError(f"cost {name}={value!r}: a measured cost must be > 0")
        doc["costs"][name] = {"value": float(f"{value:.4g}"), "unit": unit, "what": what, "command": command,
                              "measured_on": machine}
    doc["costs"] = dict(sorted(doc["costs"].items()))
    atomic_write_json(path, doc)
