"""Tensors on the wire: raw little-endian bytes with a dtype and a shape, never pickle.

Large tensors travel as a stream of `TensorChunk`s of at most `CHUNK_BYTES`. The
receiving side (`ChunkAssembler`) checks every chunk against the tensor specs it
expects, so a size, offset or type read from the wire is never trusted.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from tandem.v1 import tensor_pb2

# 1 MiB chunks: well under gRPC's default 4 MiB message limit, large enough that the
# per-message overhead is negligible (docs/machine-facts.md: streaming 1 MiB chunks is
# the fast path).
CHUNK_BYTES = 1 << 20

_TO_NUMPY: dict[tensor_pb2.DType, np.dtype] = {
    tensor_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    tensor_pb2.DTYPE_FLOAT16: np.dtype("<f2"),
    tensor_pb2.DTYPE_INT8: np.dtype("i1"),
    tensor_pb2.DTYPE_UINT8: np.dtype("u1"),
    tensor_pb2.DTYPE_INT32: np.dtype("<i4"),
    tensor_pb2.DTYPE_INT64: np.dtype("<i8"),
}
_FROM_NUMPY: dict[np.dtype, tensor_pb2.DType] = {v: k for k, v in _TO_NUMPY.items()}


class WireError(ValueError):
    """Malformed tensor data from the wire; maps to INVALID_ARGUMENT."""


@dataclass(frozen=True)
class TensorSpec:
    """What a named tensor must look like: the receiver's expectation."""

    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    # False: a 1-D tensor of *at most* shape[0] elements (a variable-size encoding);
    # its chunks declare the actual length, which is checked against the bound.
    exact: bool = True

    def accepts(self, shape: tuple[int, ...]) -> bool:
        if self.exact:
            return shape == self.shape
        return len(shape) == 1 and 0 <= shape[0] <= self.shape[0]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def to_proto(self) -> tensor_pb2.TensorSpec:
        return tensor_pb2.TensorSpec(name=self.name, dtype=dtype_to_proto(self.dtype), shape=self.shape)


def dtype_to_proto(dtype: np.dtype) -> tensor_pb2.DType:
    try:
        return _FROM_NUMPY[np.dtype(dtype)]
    except KeyError:
        raise WireError(f"dtype {dtype} has no wire encoding") from None


def dtype_from_proto(value: tensor_pb2.DType) -> np.dtype:
    try:
        return _TO_NUMPY[value]
    except KeyError:
        name = tensor_pb2.DType.Name(value) if value in tensor_pb2.DType.values() else str(value)
        raise WireError(f"unsupported dtype {name}") from None


def specs_of(arrays: Mapping[str, np.ndarray]) -> dict[str, TensorSpec]:
    return {name: TensorSpec(name, a.dtype, tuple(a.shape)) for name, a in arrays.items()}


def spec_from_proto(msg: tensor_pb2.TensorSpec, limit_bytes: int) -> TensorSpec:
    """A spec sent by a peer, checked for sanity before anything is allocated for it."""
    if not msg.name:
        raise WireError("tensor spec without a name")
    if any(d < 0 for d in msg.shape):
        raise WireError(f"tensor {msg.name!r}: negative dimension in shape {list(msg.shape)}")
    spec = TensorSpec(msg.name, dtype_from_proto(msg.dtype), tuple(msg.shape))
    if spec.nbytes > limit_bytes:
        raise WireError(f"tensor {msg.name!r}: {spec.nbytes} bytes exceeds the limit of {limit_bytes}")
    return spec


def _contiguous(array: np.ndarray) -> np.ndarray:
    """C-contiguous, keeping the shape (np.ascontiguousarray turns 0-d into 1-d)."""
    array = np.asarray(array)
    return array if array.flags.c_contiguous else array.copy(order="C")


def _raw(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, for any shape, zero-size and 0-d included."""
    return array.reshape(-1).view(np.uint8).data


# ---- whole tensors -------------------------------------------------------------

MAX_DIMS = 32  # numpy's own limit is 64; no model here comes near either


def to_proto(array: np.ndarray) -> tensor_pb2.Tensor:
    array = _contiguous(array)
    return tensor_pb2.Tensor(dtype=dtype_to_proto(array.dtype), shape=array.shape, data=array.tobytes())


def from_proto(msg: tensor_pb2.Tensor, max_bytes: int = 64 << 20) -> np.ndarray:
    """Decode a whole tensor, checking that its byte length matches dtype and shape."""
    dtype = dtype_from_proto(msg.dtype)
    if len(msg.shape) > MAX_DIMS:
        raise WireError(f"a tensor has at most {MAX_DIMS} dimensions, got {len(msg.shape)}")
    if any(d < 0 for d in msg.shape):
        raise WireError(f"negative dimension in shape {list(msg.shape)}")
    if any(d > max_bytes for d in msg.shape):
        raise WireError(f"shape {list(msg.shape)[:8]} exceeds the limit of {max_bytes} bytes")
    expected = math.prod(msg.shape) * dtype.itemsize
    if expected > max_bytes:
        raise WireError(f"tensor of {expected} bytes exceeds the limit of {max_bytes}")
    if len(msg.data) != expected:
        raise WireError(f"tensor data is {len(msg.data)} bytes; shape {list(msg.shape)} of {dtype} needs {expected}")
    return np.frombuffer(msg.data, dtype=dtype).reshape(tuple(msg.shape))


# ---- chunked tensors -----------------------------------------------------------


def iter_chunks(
    arrays: Mapping[str, np.ndarray], chunk_bytes: int = CHUNK_BYTES, skip: int = 0
) -> Iterator[tensor_pb2.TensorChunk]:
    """Split named tensors into chunks of at most `chunk_bytes`, in sorted name order,
    made as they are asked for; the first `skip` chunks are left out (a resume)."""
    for name in sorted(arrays):
        array = _contiguous(arrays[name])
        data = _raw(array)
        count = max(1, -(-len(data) // chunk_bytes))
        if skip >= count:
            skip -= count
            continue
        dtype = dtype_to_proto(array.dtype)
        offset, skip = skip * chunk_bytes, 0
        while True:
            piece = data[offset : offset + chunk_bytes]
            yield tensor_pb2.TensorChunk(
                name=name, dtype=dtype, shape=array.shape, offset=offset, data=piece.tobytes()
            )
            offset += len(piece)
            if offset >= len(data):
                break


def chunk_count(arrays: Mapping[str, np.ndarray], chunk_bytes: int = CHUNK_BYTES) -> int:
    """How many chunks `iter_chunks` yields for `arrays`."""
    return sum(max(1, -(-int(a.nbytes) // chunk_bytes)) for a in arrays.values())


class ChunkAssembler:
    """Rebuilds named tensors from chunks, validating each chunk against `expected`.

    Chunks of one tensor must arrive in order (offset == bytes received so far).
    Tensors may come in any order but each only once; with `in_order`, they must come
    in sorted name order, each whole before the next (as `iter_chunks` sends them).
    Memory is bounded by the expected specs, whatever the peer sends: a tensor's
    buffer is allocated once, at its declared size, when its first chunk arrives.
    Subclasses put the data elsewhere by overriding `_begin`, `_write` and `result`.
    """

    def __init__(self, expected: Mapping[str, TensorSpec], in_order: bool = False) -> None:
        self._expected = dict(expected)
        self._in_order = in_order
        self._declared: dict[str, TensorSpec] = {}  # the exact spec of each tensor begun
        self._received: dict[str, int] = {}
        self._buffers: dict[str, bytearray] = {}
        self._done: set[str] = set()
        self._current = ""  # in order: the tensor being received ("": none)
        self.bytes_received = 0

    def add(self, chunk: tensor_pb2.TensorChunk) -> None:
        spec = self._expected.get(chunk.name)
        if spec is None:
            raise WireError(f"unexpected tensor {chunk.name!r}")
        if chunk.name in self._done:
            raise WireError(f"tensor {chunk.name!r} sent twice")
        dtype = dtype_from_proto(chunk.dtype)
        if dtype != spec.dtype:
            raise WireError(f"tensor {chunk.name!r}: dtype {dtype} where {spec.dtype} is expected")
        shape = tuple(chunk.shape)
        declared = self._declared.get(chunk.name)
        if declared is None:
            if not spec.accepts(shape):
                bound = list(spec.shape) if spec.exact else f"at most {list(spec.shape)}"
                raise WireError(f"tensor {chunk.name!r}: shape {list(shape)} where {bound} is expected")
            if self._in_order and (self._current or any(name > chunk.name for name in self._declared)):
                raise WireError(f"tensor {chunk.name!r} out of order: tensors come in sorted name order, "
                                 "each whole before the next")
            declared = self._declared[chunk.name] = TensorSpec(spec.name, spec.dtype, shape)
            self._received[chunk.name] = 0
            self._begin(chunk.name, declared)
            self._current = chunk.name
        elif shape != declared.shape:
            raise WireError(f"tensor {chunk.name!r}: shape changed from {list(declared.shape)} to {list(shape)}")
        received = self._received[chunk.name]
        if chunk.offset != received:
            raise WireError(f"tensor {chunk.name!r}: chunk at offset {chunk.offset}, expected {received}")
        if received + len(chunk.data) > declared.nbytes:
            raise WireError(f"tensor {chunk.name!r}: data overruns its {declared.nbytes} bytes")
        if not chunk.data and declared.nbytes:
            raise WireError(f"tensor {chunk.name!r}: empty chunk")
        self._write(chunk.name, received, chunk.data)
        self._received[chunk.name] = received + len(chunk.data)
        self.bytes_received += len(chunk.data)
        if self._received[chunk.name] == declared.nbytes:
            self._done.add(chunk.name)
            self._current = ""

    def _begin(self, name: str, spec: TensorSpec) -> None:
        self._buffers[name] = bytearray(spec.nbytes)

    def _write(self, name: str, offset: int, data: bytes) -> None:
        self._buffers[name][offset : offset + len(data)] = data

    def missing(self) -> list[str]:
        """Tensors not yet complete."""
        return sorted(set(self._expected) - self._done)

    @property
    def declared(self) -> dict[str, TensorSpec]:
        """The exact spec of every tensor begun (variable-size ones at their sent length)."""
        return dict(self._declared)

    def result(self) -> dict[str, np.ndarray]:
        """The complete tensors; raises WireError if any is missing or truncated."""
        missing = self.missing()
        if missing:
            raise WireError(f"update incomplete: missing or truncated tensors {missing}")
        # Views of the received buffers (writable, no copy).
        return {
            name: np.frombuffer(self._buffers[name], dtype=spec.dtype).reshape(spec.shape)
            for name, spec in self._declared.items()
        }


def tensor_header(name: str, dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """What `state_sha256` hashes of a tensor before its bytes."""
    return f"{name}\0{np.dtype(dtype).str}\0{','.join(map(str, shape))}\0".encode()


def state_sha256(arrays: Mapping[str, np.ndarray]) -> str:
    """Content hash of named tensors: names, dtypes, shapes and bytes, in sorted order.

    Independent of file formats and chunking, so the cloud and an agent that
    reconstructs the same tensors compute the same hash.
    """
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = _contiguous(arrays[name])
        digest.update(tensor_header(name, array.dtype, array.shape))
        digest.update(_raw(array))
    return digest.hexdigest()
