"""Uploads written to disk as they arrive.

An update (or a published model) can be as large as the model, and many arrive at
once. `Spool` checks every chunk as `wire.ChunkAssembler` does, but writes it
straight into a safetensors file and hashes it on the way, so receiving one costs
the coordinator a chunk of memory, whatever its size. The file is laid out as the
data arrives: tensors in sorted name order, each whole before the next (as
`wire.iter_chunks` and `TensorFile.chunks` send them); the header's space is
reserved for the largest update the expected specs allow and written last.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from cloud.tensorfile import TensorFile, safetensors_header
from tandem import wire
from tandem.files import replace_durably


class Spool(wire.ChunkAssembler):
    """One upload on its way to `path`; `finish` makes it a complete, durable file."""

    def __init__(self, path: Path, expected: Mapping[str, wire.TensorSpec]) -> None:
        super().__init__(expected, in_order=True)
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        # Variable-size tensors may arrive shorter than their bound, which only shortens
        # the header's numbers: the bound's header always has room for the real one.
        self._header_size = len(safetensors_header(expected))
        self._end = self._header_size
        self._digest = hashlib.sha256()
        self._moved = False

    def _begin(self, name: str, spec: wire.TensorSpec) -> None:
        self._digest.update(wire.tensor_header(name, spec.dtype, spec.shape))

    def _write(self, name: str, offset: int, data: bytes) -> None:
        # Nothing counts until the whole chunk is written: after a failed write (a full
        # disk), the same chunk sent again lands in the same place.
        view, at = memoryview(data), self._end
        while view:
            written = os.pwrite(self._fd, view, at)
            at += written
            view = view[written:]
        self._end = at
        self._digest.update(data)

    def content_sha256(self) -> str:
        """`wire.state_sha256` of everything received (the whole update once complete)."""
        return self._digest.hexdigest()

    def finish(self) -> TensorFile:
        """Write the header and make the file durable; WireError if anything is missing."""
        missing = self.missing()
        if missing:
            raise wire.WireError(f"update incomplete: missing or truncated tensors {missing}")
        header = safetensors_header(self.declared, size=self._header_size)
        os.pwrite(self._fd, header, 0)
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        return TensorFile(self.path)

    def result(self) -> dict[str, np.ndarray]:
        raise TypeError("a spool's tensors are on disk: finish() it and read them from the file")

    def move(self, path: Path) -> None:
        """Give the finished file its final name, durably."""
        replace_durably(self.path, path)
        self.path = path
        self._moved = True

    def discard(self) -> None:
        """Close and delete the file, unless it was moved to its final name."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if not self._moved:
            self.path.unlink(missing_ok=True)
