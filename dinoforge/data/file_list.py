"""The file-list format: one image per line (`path [label]`), or CSV rows (`path,label`, optional header).

Relative paths are relative to the list's folder; blank lines and lines starting with `#` are skipped; a missing
label is -1. The label is the last whitespace-separated token when it is an integer, so paths may hold spaces.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

from dinoforge.data.errors import DatasetError

FILE_LIST_SUFFIXES = (".txt", ".csv", ".lst", ".list")
_PATH_AND_LABEL = re.compile(r"^(.*\S)\s+(-?\d+)$")
_HEADER_NAMES = ("path", "file", "filename", "image")


@dataclass(frozen=True)
class FileListEntry:
    """One listed image: where it was listed, the path as written, the path to read, and its label (-1: none)."""

    line: int
    entry: str
    path: Path
    label: int


def is_file_list(path: str | Path) -> bool:
    return str(path).lower().endswith(FILE_LIST_SUFFIXES)


def read_file_list(list_path: str | Path) -> list[FileListEntry]:
    """The entries of a file list; `DatasetError` for a list that is not UTF-8 text or has a malformed line."""
    path = Path(list_path)
    if not path.is_file():
        raise FileNotFoundError(f"file list not found: {list_path}")
    try:
        rows = _read_csv_rows(path) if path.suffix.lower() == ".csv" else _read_text_rows(path)
    except UnicodeDecodeError as err:
        raise DatasetError(f"{list_path}: not a file list (not UTF-8 text: {err.reason} at byte {err.start}); "
                           "expected one 'path [label]' per line") from None
    entries = []
    for line_no, file, label in rows:
        if not file:
            raise DatasetError(f"{list_path}:{line_no}: empty path")
        entries.append(FileListEntry(line_no, file, path.parent / file, label))  # an absolute `file` stays absolute
    return entries


def _parse_label(text: str, where: str) -> int:
    try:
        label = int(text)
    except ValueError:
        raise DatasetError(f"{where}: label {text!r} is not an integer class index") from None
    if label < -1:
        raise DatasetError(f"{where}: label {label} is negative (use -1 or leave it out for 'unknown')")
    return label


def _read_text_rows(path: Path) -> list[tuple[int, str, int]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            match = _PATH_AND_LABEL.match(line)
            if match:
                rows.append((line_no, match[1], _parse_label(match[2], f"{path}:{line_no}")))
            else:
                rows.append((line_no, line, -1))
    return rows


def _read_csv_rows(path: Path) -> list[tuple[int, str, int]]:
    rows = []
    with open(path, encoding="utf-8", newline="") as f:
        for line_no, row in enumerate(csv.reader(f), start=1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if line_no == 1 and row[0].strip().lower() in _HEADER_NAMES:
                continue
            if len(row) > 2:
                raise DatasetError(f"{path}:{line_no}: expected 'path' or 'path,label', got {len(row)} columns")
            label = _parse_label(row[1].strip(), f"{path}:{line_no}") if len(row) == 2 and row[1].strip() else -1
            rows.append((line_no, row[0].strip(), label))
    return rows
