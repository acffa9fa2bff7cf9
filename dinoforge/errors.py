"""Error classes that stages catch without importing what raises them: `from dinoforge.errors import
CheckpointError` costs nothing, while `dinoforge.models` (which raises it) imports torch."""

from __future__ import annotations


class CheckpointError(ValueError):
    """A weights file or state dict that cannot be loaded as asked."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint's keys or shapes differ from the model's; the attributes list every difference."""

    def __init__(self, message: str, missing: list[str], unexpected: list[str],
                 mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> None:
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched
