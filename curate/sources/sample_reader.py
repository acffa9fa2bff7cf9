"""Re-reading ingested samples (embedding, shards, report) from where the manifest says they are: a file, a member
of an uncompressed tar at its byte offset, or a member of a compressed tar."""

from __future__ import annotations

import tarfile
from collections import OrderedDict
from pathlib import Path

from dinoforge.data.tar_reader import read_span


class SampleReader:
    """Reads the bytes of ingested samples again (embedding, shards, report), keeping a few archives open."""

    def __init__(self, max_open: int = 16) -> None:
        self._open: OrderedDict[str, object] = OrderedDict()
        self._max_open = max_open

    def read(self, file: str, member: str | None, offset: int | None, size: int) -> bytes:
        """The `size` bytes of a sample located by (file, member, offset) as recorded in the manifest."""
        try:
            if member is None:
                return Path(file).read_bytes()
            if offset is not None:
                data = read_span(self._handle(file, lambda: open(file, "rb")), offset, size)
            else:  # compressed tar: no random access, tarfile scans the archive once and caches its index
                tar = self._handle(file, lambda: tarfile.open(file, "r:*"))
                handle = tar.extractfile(member)
                data = handle.read() if handle is not None else b""
        except (OSError, tarfile.TarError, KeyError) as err:
            raise OSError(f"cannot re-read sample {member or ''} from {file}: {err}; the source changed after "
                          "ingest? Rerun ingest (delete the run's _SUCCESS.ingest) to refresh the manifest") from err
        if len(data) != size:
            raise OSError(f"sample {member or file} in {file}: read {len(data)} bytes, manifest says {size}; the "
                          "source changed after ingest. Rerun ingest to refresh the manifest")
        return data

    def _handle(self, file: str, opener):
        if file in self._open:
            self._open.move_to_end(file)
            return self._open[file]
        handle = opener()
        self._open[file] = handle
        if len(self._open) > self._max_open:
            _, oldest = self._open.popitem(last=False)
            oldest.close()
        return handle

    def close(self) -> None:
        for handle in self._open.values():
            handle.close()
        self._open.clear()

    def __enter__(self) -> SampleReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
