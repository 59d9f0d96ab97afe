"""Reading safetensors files piece by piece with pread: never loaded whole, never
mapped, so serving a model costs the coordinator a chunk of memory, not a model."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandem import codec
from tandem.v1 import tensor_pb2

_DTYPES = {"F32": "<f4", "F16": "<f2", "I8": "i1", "U8": "u1", "I32": "<i4", "I64": "<i8"}
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class _Entry:
    spec: codec.TensorSpec
    start: int  # absolute file offsets
    end: int


class TensorFile:
    """The tensors of one safetensors file (as written by `cloud.store.write_tensors`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= MAX_HEADER_BYTES:
                raise ValueError(f"{path}: not a safetensors file")
            header = json.loads(f.read(size))
        base = 8 + size
        self._entries: dict[str, _Entry] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = np.dtype(_DTYPES[meta["dtype"]])
            spec = codec.TensorSpec(name, dtype, tuple(meta["shape"]))
            start, end = meta["data_offsets"]
            if end - start != spec.nbytes:
                raise ValueError(f"{path}: tensor {name!r} has {end - start} bytes, its shape needs {spec.nbytes}")
            self._entries[name] = _Entry(spec, base + start, base + end)

    @property
    def specs(self) -> dict[str, codec.TensorSpec]:
        return {name: entry.spec for name, entry in self._entries.items()}

    @property
    def nbytes(self) -> int:
        return sum(e.spec.nbytes for e in self._entries.values())

    def chunk_count(self, chunk_bytes: int = codec.CHUNK_BYTES) -> int:
        return sum(max(1, math.ceil(e.spec.nbytes / chunk_bytes)) for e in self._entries.values())

    def chunks(self, prefix: str = "", chunk_bytes: int = codec.CHUNK_BYTES) -> Iterator[tensor_pb2.TensorChunk]:
        """The same chunks `codec.iter_chunks` makes of these tensors, read as they go."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for name in sorted(self._entries):
                entry = self._entries[name]
                dtype = codec.dtype_to_proto(entry.spec.dtype)
                offset = 0
                while True:
                    length = min(chunk_bytes, entry.spec.nbytes - offset)
                    data = os.pread(fd, length, entry.start + offset) if length else b""
                    if len(data) != length:
                        raise OSError(f"{self.path}: truncated tensor {name!r}")
                    yield tensor_pb2.TensorChunk(name=prefix + name, dtype=dtype, shape=entry.spec.shape,
                                                 offset=offset, data=data)
                    offset += length
                    if offset >= entry.spec.nbytes:
                        break
        finally:
            os.close(fd)

    def slices(self, name: str, slice_bytes: int = 1 << 20) -> Iterator[tuple[int, np.ndarray]]:
        """(index of the first element, a writable flat piece) for one tensor, in order."""
        entry = self._entries[name]
        itemsize = entry.spec.dtype.itemsize
        count = entry.spec.nbytes // itemsize
        step = max(1, slice_bytes // itemsize)
        with open(self.path, "rb", buffering=0) as f:
            for first in range(0, count, step):
                n = min(step, count - first)
                data = os.pread(f.fileno(), n * itemsize, entry.start + first * itemsize)
                if len(data) != n * itemsize:
                    raise OSError(f"{self.path}: truncated tensor {name!r}")
                yield first, np.frombuffer(bytearray(data), dtype=entry.spec.dtype)
