"""A count of unreadable samples shared by a dataset and its DataLoader worker processes (needs torch)."""

from __future__ import annotations

import torch
import torch.utils.data


class DecodeErrorCounter:
    """A count of unreadable samples shared by a dataset and its DataLoader worker processes.

    Workers are separate processes, so a plain integer attribute would only count the main process's errors. The
    count lives in a shared-memory tensor, which torch's multiprocessing shares with workers started by fork or
    spawn; each worker adds to its own slot, so no lock is needed. Ordinary copies (pickle, deepcopy) get their
    own memory, starting from the current counts.
    """

    SLOTS = 256  # slot 0: the main process; slot 1 + worker id (mod 255): DataLoader workers

    def __init__(self, value: int = 0) -> None:
        self._slots = torch.zeros(self.SLOTS, dtype=torch.int64).share_memory_()
        self._slots[0] = value

    @property
    def value(self) -> int:
        return int(self._slots.sum())

    def add(self, n: int = 1) -> None:
        worker = torch.utils.data.get_worker_info()
        slot = 0 if worker is None else 1 + worker.id % (self.SLOTS - 1)
        self._slots[slot] += n

    def __repr__(self) -> str:
        return f"DecodeErrorCounter({self.value})"
