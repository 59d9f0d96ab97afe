"""Reading safetensors files piece by piece with pread: never loaded whole, never
mapped, so serving a model costs the coordinator a chunk of memory, not a model."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tandem import codec
from tandem.v1 import tensor_pb2

_DTYPES = {"F32": "<f4", "F16": "<f2", "I8": "i1", "U8": "u1", "I32": "<i4", "I64": "<i8"}
MAX_HEADER_BYTES = 100 << 20


def pread_array(fd: int, out: np.ndarray, offset: int) -> None:
    """Fill the C-contiguous `out` with the bytes of `fd` from `offset`."""
    view = out.reshape(-1).view(np.uint8).data
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n <= 0:
            raise OSError(f"file descriptor {fd}: {len(view) - done} bytes short at offset {offset + done}")
        done += n


def pwrite_array(fd: int, array: np.ndarray, offset: int) -> None:
    """Write the bytes of the C-contiguous `array` to `fd` at `offset`."""
    view = array.reshape(-1).view(np.uint8).data
    while view:
        n = os.pwrite(fd, view, offset)
        offset += n
        view = view[n:]


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

    def read(self, name: str) -> np.ndarray:
        """One whole tensor, read into memory of its own (writable)."""
        entry = self._entries[name]
        out = np.empty(entry.spec.shape, entry.spec.dtype)
        with open(self.path, "rb", buffering=0) as f:
            pread_array(f.fileno(), out, entry.start)
        return out

    def arrays(self) -> Mapping[str, np.ndarray]:
        """Every tensor by name, each read when it is looked up: what `compression`
        decodes one tensor at a time, without the whole file in memory."""
        return _Lazy(self)

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


class _Lazy(Mapping[str, np.ndarray]):
    def __init__(self, file: TensorFile) -> None:
        self._file = file

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._file._entries:
            raise KeyError(name)
        return self._file.read(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._file._entries)

    def __len__(self) -> int:
        return len(self._file._entries)
