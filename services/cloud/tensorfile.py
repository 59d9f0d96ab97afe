"""Safetensors files: written atomically and durably, hashed on the way; read piece by
piece with pread, never loaded whole, never mapped, so serving a model costs the
coordinator a chunk of memory, not a model."""

from __future__ import annotations

import hashlib
import json
import math
import os
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from tandem import wire
from tandem.files import replace_durably
from tandem.v1 import tensor_pb2
from tandem.wire import TensorSpec, tensor_header

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


_SAFETENSORS_DTYPES = {"<f4": "F32", "<f2": "F16", "|i1": "I8", "|u1": "U8", "<i4": "I32", "<i8": "I64"}

Pieces = Callable[[str], Iterable[np.ndarray]]


def safetensors_header(specs: Mapping[str, TensorSpec], size: int = 0) -> bytes:
    """A safetensors file's first bytes for `specs`, their data laid out in sorted name
    order. `size` pads the result to that many bytes (trailing spaces, which the format
    allows), so that a header can be rewritten in space reserved for a larger one."""
    entries: dict[str, object] = {}
    offset = 0
    for name in sorted(specs):
        spec = specs[name]
        entries[name] = {"dtype": _SAFETENSORS_DTYPES[spec.dtype.str], "shape": list(spec.shape),
                         "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the format aligns the data to 8 bytes
    if size:
        if len(header) + 8 > size:
            raise ValueError(f"a header of {len(header) + 8} bytes does not fit in {size}")
        header += b" " * (size - 8 - len(header))
    return len(header).to_bytes(8, "little") + header


def write_tensor_pieces(path: Path, specs: Mapping[str, TensorSpec], pieces: Pieces) -> tuple[int, str]:
    """Write a safetensors file atomically and durably from each tensor's pieces (C-order
    slices, produced as they are written); returns its size and the tensors' content
    hash (tandem.wire.state_sha256), computed on the way.

    Nothing model-sized is built: the safetensors library's `save` would first make the
    whole file one bytes object. What we write is read back with the library
    (`read_tensors`), and a test holds the two equal.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # writers never share one
    digest = hashlib.sha256()
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    size = 0
    try:
        with os.fdopen(os.dup(fd), "wb", buffering=1 << 20) as out:
            size += out.write(safetensors_header(specs))
            for name in sorted(specs):
                spec = specs[name]
                digest.update(tensor_header(name, spec.dtype, spec.shape))
                written = 0
                for piece in pieces(name):
                    data = np.ascontiguousarray(piece, dtype=spec.dtype).reshape(-1).view(np.uint8).data
                    out.write(data)
                    digest.update(data)
                    written += len(data)
                if written != spec.nbytes:
                    raise ValueError(f"tensor {name!r}: {written} bytes written, its shape needs {spec.nbytes}")
                size += written
        os.fsync(fd)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)
    replace_durably(tmp, path)
    return size, digest.hexdigest()


def write_tensors(path: Path, arrays: Mapping[str, np.ndarray]) -> tuple[int, str]:
    """Write named arrays as a safetensors file, atomically and durably; returns its size
    and the arrays' content hash (tandem.wire.state_sha256), computed on the way."""
    arrays = {name: a if a.flags.c_contiguous else a.copy(order="C") for name, a in arrays.items()}
    specs = {name: TensorSpec(name, a.dtype, tuple(a.shape)) for name, a in arrays.items()}
    return write_tensor_pieces(path, specs, lambda name: [arrays[name]])


def read_tensors(path: Path) -> dict[str, np.ndarray]:
    """Tensors from a safetensors file: no pickle is ever involved."""
    return load_file(str(path))


@dataclass(frozen=True)
class _Entry:
    spec: wire.TensorSpec
    start: int  # absolute file offsets
    end: int


class TensorFile:
    """The tensors of one safetensors file (as written by `write_tensors`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= MAX_HEADER_BYTES:
                raise ValueError(f"{path}: not a safetensors file")
            header = json.loads(f.read(size))
        base = self._base = 8 + size
        self._entries: dict[str, _Entry] = {}
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            dtype = np.dtype(_DTYPES[meta["dtype"]])
            spec = wire.TensorSpec(name, dtype, tuple(meta["shape"]))
            start, end = meta["data_offsets"]
            if end - start != spec.nbytes:
                raise ValueError(f"{path}: tensor {name!r} has {end - start} bytes, its shape needs {spec.nbytes}")
            self._entries[name] = _Entry(spec, base + start, base + end)

    def data_end(self) -> int:
        """The offset just past the last tensor's bytes: the file's size when it is whole."""
        return max((e.end for e in self._entries.values()), default=self._base)

    @property
    def specs(self) -> dict[str, wire.TensorSpec]:
        return {name: entry.spec for name, entry in self._entries.items()}

    @property
    def nbytes(self) -> int:
        return sum(e.spec.nbytes for e in self._entries.values())

    def chunk_count(self, chunk_bytes: int = wire.CHUNK_BYTES) -> int:
        return sum(max(1, math.ceil(e.spec.nbytes / chunk_bytes)) for e in self._entries.values())

    def chunks(self, prefix: str = "", chunk_bytes: int = wire.CHUNK_BYTES) -> Iterator[tensor_pb2.TensorChunk]:
        """The same chunks `wire.iter_chunks` makes of these tensors, read as they go."""
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for name in sorted(self._entries):
                entry = self._entries[name]
                dtype = wire.dtype_to_proto(entry.spec.dtype)
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


def size_problem(path: Path, size: int | None) -> str | None:
    """Why the file at `path` cannot be the one written (missing, or not `size` bytes),
    from one stat; None when it may be. The reason names no path: it may go to a peer."""
    try:
        found = os.stat(path).st_size
    except FileNotFoundError:
        return "its file is missing"
    except OSError as exc:
        return f"its file cannot be read ({exc.strerror})"
    if size is not None and found != size:
        return f"its file is {found} bytes, {size} were written"
    return None


def content_sha256(path: Path) -> str:
    """The content hash (tandem.wire.state_sha256) of a safetensors file's tensors, read
    piece by piece: a slice of memory, not a model. ValueError for a file that is not
    whole or whose header does not parse or add up."""
    try:
        file = TensorFile(path)
        digest = hashlib.sha256()
        specs = file.specs  # built anew at each look-up
        for name in sorted(specs):
            spec = specs[name]
            digest.update(tensor_header(name, spec.dtype, spec.shape))
            for _, piece in file.slices(name, slice_bytes=4 << 20):
                digest.update(piece.data)
        end, size = file.data_end(), os.stat(path).st_size
    except OSError as exc:  # a tensor cut short
        raise ValueError(f"its file cannot be read whole ({exc.strerror or 'truncated'})") from None
    except (ValueError, KeyError, TypeError, IndexError, AttributeError):  # a header that does not parse
        raise ValueError("its header is not a valid safetensors header") from None
    if end != size:
        raise ValueError(f"its tensors end at byte {end} of {size}")
    return digest.hexdigest()


def content_problem(path: Path, sha256: str, size: int | None = None) -> str | None:
    """Why the safetensors file at `path` is not the one recorded (its tensors' content
    hash `sha256`, the file `size` in bytes), or None when it is."""
    problem = size_problem(path, size)
    if problem is not None:
        return problem
    try:
        found = content_sha256(path)
    except ValueError as exc:
        return str(exc)
    if found != sha256:
        return f"its tensors hash to {found[:16]}..., not the recorded {sha256[:16]}..."
    return None


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
