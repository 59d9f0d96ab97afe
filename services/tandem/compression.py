"""Lossy and lossless encodings of model deltas, as named component arrays.

A tensor is encoded into a few 1-D *component* arrays (`w`, or `w#q` + `w#scale`, or
`w#idx` + `w#val` [+ `w#scale`]) that travel like any other tensor. `component_limits`
says what a receiver must expect, so sizes are bounded before anything arrives, and
`decode` re-checks everything it reads: nothing from the wire is trusted.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

KINDS = ("none", "fp16", "int8", "topk")
FORMS = "none, fp16, int8, topk:F or topk:F+int8 (F a fraction, 0 < F <= 1)"

# One float32 scale per 4096 values costs 0.1% of the int8 payload, while a single
# outlier only coarsens the quantisation of its own block.
INT8_BLOCK = 4096

_F32 = np.dtype("<f4")
_F16 = np.dtype("<f2")
_I8 = np.dtype("i1")
_U8 = np.dtype("u1")
_FP16_MAX = 65504.0
_VARINT_MAX_BYTES = 5  # 35 bits: enough for any index of a tensor below 32 Gi elements


class CompressionError(ValueError):
    """Malformed encoded data from the wire; the server maps it to INVALID_ARGUMENT."""


@dataclass(frozen=True)
class Codec:
    """How one tensor is encoded; `str()` gives the canonical text `parse_codec` reads."""

    kind: str
    fraction: float = 1.0  # topk only: fraction of elements kept
    int8: bool = False  # topk only: values quantised to int8 (else float16)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown codec kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "topk":
            if not (0.0 < self.fraction <= 1.0):  # also rejects NaN
                raise ValueError(f"topk fraction must be in (0, 1], got {self.fraction!r}")
        elif self.fraction != 1.0 or self.int8:
            raise ValueError(f"codec {self.kind!r} takes no fraction or int8 option")

    def __str__(self) -> str:
        if self.kind != "topk":
            return self.kind
        return f"topk:{self.fraction!r}" + ("+int8" if self.int8 else "")

    @property
    def lossless(self) -> bool:
        return self.kind == "none"


def parse_codec(text: str) -> Codec:
    """Parse `none`, `fp16`, `int8`, `topk:F` or `topk:F+int8`; anything else is a ValueError."""
    if text in ("none", "fp16", "int8"):
        return Codec(text)
    if text.startswith("topk:"):
        body = text[len("topk:") :]
        int8 = body.endswith("+int8")
        if int8:
            body = body[: -len("+int8")]
        try:
            fraction = float(body)
        except ValueError:
            fraction = math.nan
        if 0.0 < fraction <= 1.0 and body.strip() == body:
            return Codec("topk", fraction, int8)
    raise ValueError(f"invalid codec {text!r}; expected {FORMS}")


def kept(codec: Codec, size: int) -> int:
    """Number of values a codec sends for a tensor of `size` elements."""
    if codec.kind != "topk" or size == 0:
        return size
    return min(size, max(1, math.ceil(codec.fraction * size)))


def component_limits(name: str, shape: tuple[int, ...], codec: Codec) -> dict[str, tuple[np.dtype, int, bool]]:
    """Components the receiver must expect for tensor `name`: name -> (dtype, length, exact).

    exact=False means "at most `length` elements" (the variable-size varint stream).
    """
    if "#" in name:
        raise ValueError(f"tensor name {name!r} must not contain '#' (it separates component names)")
    n = math.prod(shape)
    if codec.kind in ("none", "fp16"):
        return {name: (_F32 if codec.kind == "none" else _F16, n, True)}
    if codec.kind == "int8":
        return {f"{name}#q": (_I8, n, True), f"{name}#scale": (_F32, -(-n // INT8_BLOCK), True)}
    k = kept(codec, n)
    limits: dict[str, tuple[np.dtype, int, bool]] = {
        f"{name}#idx": (_U8, _VARINT_MAX_BYTES * k, False),
        f"{name}#val": (_I8 if codec.int8 else _F16, k, True),
    }
    if codec.int8:
        limits[f"{name}#scale"] = (_F32, 1, True)
    return limits


# ---- encoding ------------------------------------------------------------------


def _finite_range(x: np.ndarray) -> None:
    """Reject NaN/inf input early: the receiver would reject its encoding anyway."""
    if x.size and not (np.isfinite(x.max()) and np.isfinite(x.min())):
        raise ValueError("cannot encode a tensor with NaN or infinite values")


def _quantise(x: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Round x / scale to int8 in [-127, 127]; `x` is 2-D (blocks x values), one scale per block."""
    divisor = np.where(scale > 0, scale, np.float32(1))[:, None]
    q = x / divisor
    np.rint(q, out=q)
    np.clip(q, -127, 127, out=q)  # a subnormal scale loses precision; keep the int8 range
    return q.astype(_I8)


def _int8_dense(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = flat.size
    full = n // INT8_BLOCK
    blocks = flat[: full * INT8_BLOCK].reshape(full, INT8_BLOCK)
    tail = flat[full * INT8_BLOCK :]
    scales = np.empty(-(-n // INT8_BLOCK), dtype=_F32)
    # max and -min instead of abs().max(): no 40 MB temporary for a 10M tensor
    scales[:full] = np.maximum(blocks.max(axis=1), -blocks.min(axis=1)) / np.float32(127)
    if tail.size:
        scales[full] = np.abs(tail).max() / np.float32(127)
    if not np.isfinite(scales).all():
        raise ValueError("cannot encode a tensor with NaN or infinite values")
    q = np.empty(n, dtype=_I8)
    q[: full * INT8_BLOCK] = _quantise(blocks, scales[:full]).reshape(-1)
    q[full * INT8_BLOCK :] = _quantise(tail[None, :], scales[full:]).reshape(-1)
    return q, scales


def _varint_encode(values: np.ndarray) -> np.ndarray:
    """Unsigned LEB128 of each value (uint64, < 2**35), concatenated."""
    lengths = np.ones(values.size, dtype=np.int64)
    for j in range(1, _VARINT_MAX_BYTES):
        lengths += values >= (1 << (7 * j))
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]) if values.size else 0, dtype=_U8)
    for j in range(_VARINT_MAX_BYTES):
        has = lengths > j
        byte = (values[has] >> np.uint64(7 * j)) & np.uint64(0x7F)
        byte |= np.where(lengths[has] > j + 1, np.uint64(0x80), np.uint64(0))
        out[starts[has] + j] = byte.astype(_U8)
    return out


_SCAN = 1 << 20  # elements per slice when scanning a large tensor for candidates


def _top_indices(flat: np.ndarray, k: int) -> np.ndarray:
    """Ascending indices of the k largest |x| (NaN/inf, if any, sort last and are kept).

    For a large tensor with a small k, a threshold from a sample picks a few times k
    candidates slice by slice, so no full-size |x| or index array is ever allocated
    (a 10M-element tensor would need 40 MB and 80 MB for those); the exact top k is
    then taken among the candidates. If the sample misjudges, the exact path runs.
    """
    n = flat.size
    if k == n:
        return np.arange(n, dtype=np.int64)
    if n > 4 * _SCAN and k * 4 < n:
        rng = np.random.default_rng(n)
        sample = np.abs(flat[rng.integers(0, n, 65536)])
        threshold = np.quantile(sample, max(0.0, 1.0 - 3.0 * k / n))
        # A sparse tensor (an aggregate of sparse updates) may have a zero threshold:
        # then the candidates are its non-zeros, topped up with zeros if too few.
        strict = threshold <= 0
        candidates = np.concatenate([
            start + np.flatnonzero(np.abs(flat[start : start + _SCAN]) > 0 if strict
                                   else np.abs(flat[start : start + _SCAN]) >= threshold)
            for start in range(0, n, _SCAN)
        ])
        if strict and candidates.size < k:
            return np.sort(np.concatenate([candidates, _first_zeros(flat, k - candidates.size)]))
        if k <= candidates.size <= 10 * k:
            chosen = np.argpartition(np.abs(flat[candidates]), candidates.size - k)[candidates.size - k :]
            return np.sort(candidates[chosen])
    mag = np.abs(flat)
    return np.sort(np.argpartition(mag, n - k)[n - k :])


def _first_zeros(flat: np.ndarray, count: int) -> np.ndarray:
    """Indices of the first `count` zeros of `flat`, scanned slice by slice."""
    found: list[np.ndarray] = []
    for start in range(0, flat.size, _SCAN):
        if count <= 0:
            break
        zeros = start + np.flatnonzero(flat[start : start + _SCAN] == 0)[:count]
        found.append(zeros)
        count -= zeros.size
    return np.concatenate(found) if found else np.empty(0, np.int64)


def encode(name: str, array: np.ndarray, codec: Codec) -> dict[str, np.ndarray]:
    """Encode a float32 tensor of any shape into 1-D C-contiguous component arrays."""
    component_limits(name, (), codec)  # validates the name
    flat = np.ascontiguousarray(array, dtype=_F32).reshape(-1)
    if codec.kind == "none":
        _finite_range(flat)
        return {name: flat.copy() if np.may_share_memory(flat, array) else flat}
    if codec.kind == "fp16":
        _finite_range(flat)
        # values beyond float16's range would become inf, which decode rejects
        return {name: np.clip(flat, -_FP16_MAX, _FP16_MAX).astype(_F16)}
    if codec.kind == "int8":
        q, scales = _int8_dense(flat)
        return {f"{name}#q": q, f"{name}#scale": scales}
    if flat.size >= 1 << (7 * _VARINT_MAX_BYTES):
        raise ValueError(f"tensor {name!r} has too many elements for {_VARINT_MAX_BYTES}-byte indices")
    _finite_range(flat)  # the sampled top-k path would silently skip NaN
    idx = _top_indices(flat, kept(codec, flat.size))
    vals = flat[idx]
    if not np.isfinite(vals).all():
        raise ValueError("cannot encode a tensor with NaN or infinite values")
    gaps = np.diff(idx, prepend=0).astype(np.uint64)  # first index absolute, then gaps
    out = {f"{name}#idx": _varint_encode(gaps)}
    if codec.int8:
        scale = np.array([np.abs(vals).max() / np.float32(127) if vals.size else 0], dtype=_F32)
        out[f"{name}#val"] = _quantise(vals[None, :], scale).reshape(-1)
        out[f"{name}#scale"] = scale
    else:
        out[f"{name}#val"] = np.clip(vals, -_FP16_MAX, _FP16_MAX).astype(_F16)
    return out


# ---- decoding ------------------------------------------------------------------


def _checked(name: str, components: Mapping[str, np.ndarray], shape: tuple[int, ...], codec: Codec) -> dict[str, np.ndarray]:
    """The components of tensor `name`, each checked against its expected dtype and length.

    Keys of other tensors are ignored, so one mapping can hold a whole update; a key
    in this tensor's namespace (`name` or `name#...`) that the codec does not use is extra.
    """
    limits = component_limits(name, shape, codec)
    mine = {key for key in components if key == name or key.startswith(f"{name}#")}
    missing, extra = sorted(set(limits) - mine), sorted(mine - set(limits))
    if missing or extra:
        raise CompressionError(f"tensor {name!r} ({codec}): missing components {missing}, unexpected {extra}")
    checked: dict[str, np.ndarray] = {}
    for key, (dtype, length, exact) in limits.items():
        value = components[key]
        if not isinstance(value, np.ndarray) or value.ndim != 1:
            raise CompressionError(f"component {key!r} must be a 1-D array")
        if value.dtype != dtype:
            raise CompressionError(f"component {key!r}: dtype {value.dtype} where {dtype} is expected")
        if exact and value.size != length:
            raise CompressionError(f"component {key!r}: {value.size} elements where {length} are expected")
        if not exact and value.size > length:
            raise CompressionError(f"component {key!r}: {value.size} elements exceeds the limit of {length}")
        checked[key] = value
    return checked


def _check_scales(key: str, scales: np.ndarray) -> None:
    if not np.isfinite(scales).all():
        raise CompressionError(f"component {key!r}: NaN or infinite scale")
    if (scales < 0).any():
        raise CompressionError(f"component {key!r}: negative scale")


def _varint_decode(key: str, data: np.ndarray, count: int) -> np.ndarray:
    """Decode exactly `count` LEB128 values (uint64) from `data`, already bounded in length."""
    if data.size and data[-1] & 0x80:
        raise CompressionError(f"component {key!r}: truncated varint stream")
    ends = np.flatnonzero(data < 0x80)
    if ends.size != count:
        raise CompressionError(f"component {key!r}: {ends.size} indices where {count} are expected")
    lengths = np.diff(ends, prepend=-1)
    if count and lengths.max() > _VARINT_MAX_BYTES:
        raise CompressionError(f"component {key!r}: varint longer than {_VARINT_MAX_BYTES} bytes")
    starts = ends - lengths + 1
    values = np.zeros(count, dtype=np.uint64)
    for j in range(_VARINT_MAX_BYTES):
        has = lengths > j
        values[has] |= (data[starts[has] + j] & 0x7F).astype(np.uint64) << np.uint64(7 * j)
    return values


def decode(name: str, components: Mapping[str, np.ndarray], shape: tuple[int, ...], codec: Codec) -> np.ndarray:
    """Rebuild the float32 tensor of `shape`; any malformed component is a CompressionError."""
    parts = _checked(name, components, shape, codec)
    n = math.prod(shape)
    if codec.kind == "none":
        flat = parts[name].astype(_F32)
        if n and not (np.isfinite(flat.max()) and np.isfinite(flat.min())):
            raise CompressionError(f"component {name!r}: NaN or infinite value")
        return flat.reshape(shape)
    if codec.kind == "fp16":
        flat = parts[name].astype(_F32)
        if not np.isfinite(flat).all():
            raise CompressionError(f"component {name!r}: NaN or infinite value")
        return flat.reshape(shape)
    if codec.kind == "int8":
        scales = parts[f"{name}#scale"]
        _check_scales(f"{name}#scale", scales)
        flat = parts[f"{name}#q"].astype(_F32)
        full = n // INT8_BLOCK
        with np.errstate(over="ignore"):  # overflow is checked just below
            if full:
                blocks = flat[: full * INT8_BLOCK].reshape(full, INT8_BLOCK)  # a view: scaled in place
                blocks *= scales[:full, None]
            if n > full * INT8_BLOCK:
                flat[full * INT8_BLOCK :] *= scales[full]
        if n and not (np.isfinite(flat.max()) and np.isfinite(flat.min())):
            raise CompressionError(f"component {name + '#scale'!r}: scaled values overflow to infinity")
        return flat.reshape(shape)
    idx, vals = _sparse(name, parts, n, codec)
    flat = np.zeros(n, dtype=_F32)
    flat[idx] = vals
    return flat.reshape(shape)


def _sparse(name: str, parts: Mapping[str, np.ndarray], n: int, codec: Codec) -> tuple[np.ndarray, np.ndarray]:
    """The checked (indices, float32 values) of a top-k encoding."""
    k = kept(codec, n)
    gaps = _varint_decode(f"{name}#idx", parts[f"{name}#idx"], k)
    if k > 1 and not gaps[1:].all():
        raise CompressionError(f"component {name + '#idx'!r}: duplicate index (indices must be strictly increasing)")
    if k and gaps.max() >= n:
        raise CompressionError(f"component {name + '#idx'!r}: index out of range for {n} elements")
    idx = np.cumsum(gaps)  # every gap < n, k <= n: no uint64 overflow below 2**32 elements
    if k and (idx[-1] >= n or (k > 1 and (idx[1:] <= idx[:-1]).any())):
        raise CompressionError(f"component {name + '#idx'!r}: index out of range for {n} elements")
    vals = parts[f"{name}#val"].astype(_F32)
    if codec.int8:
        scale = parts[f"{name}#scale"]
        _check_scales(f"{name}#scale", scale)
        with np.errstate(over="ignore"):  # overflow is checked just below
            vals *= scale[0]
        if not np.isfinite(vals).all():
            raise CompressionError(f"component {name + '#scale'!r}: scaled values overflow to infinity")
    elif not np.isfinite(vals).all():
        raise CompressionError(f"component {name + '#val'!r}: NaN or infinite value")
    return idx.astype(np.int64), vals


def accumulate(
    total: np.ndarray, name: str, components: Mapping[str, np.ndarray], codec: Codec, weight: float
) -> None:
    """total += weight * decode(...), without a dense temporary for top-k encodings
    (dense ones are scaled in place: decode always returns a fresh array)."""
    if codec.kind != "topk":
        dense = decode(name, components, total.shape, codec)
        if weight != 1:
            dense *= np.float32(weight)
        total += dense
        return
    idx, vals = _sparse(name, _checked(name, components, total.shape, codec), total.size, codec)
    flat = total.reshape(-1)  # a view: `total` is C-contiguous
    flat[idx] += np.float32(weight) * vals


def sparse(
    name: str, components: Mapping[str, np.ndarray], shape: tuple[int, ...], codec: Codec
) -> tuple[np.ndarray, np.ndarray]:
    """A top-k encoding as (ascending flat indices, float32 values), checked as decode does."""
    if codec.kind != "topk":
        raise ValueError(f"codec {codec} is not sparse")
    return _sparse(name, _checked(name, components, shape, codec), math.prod(shape), codec)


def validate(name: str, components: Mapping[str, np.ndarray], shape: tuple[int, ...], codec: Codec) -> float:
    """Check an encoding as decode does (without building the dense tensor for top-k);
    returns the largest magnitude it decodes to."""
    if codec.kind == "topk":
        _, vals = _sparse(name, _checked(name, components, shape, codec), math.prod(shape), codec)
    else:
        vals = decode(name, components, shape, codec)
    return float(max(vals.max(), -vals.min())) if vals.size else 0.0


# ---- error feedback ------------------------------------------------------------


class ErrorFeedback:
    """Keeps what compression left out and adds it to the next delta (per tensor).

    `codec` may be changed between rounds (e.g. a per-round automatic choice); the
    residual carries over. A tensor absent from `residual` has a zero residual, which is
    always the case after a lossless round.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.residual: dict[str, np.ndarray] = {}

    def compress(self, deltas: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Encode delta + residual per tensor: (wire components, the dense tensors the receiver rebuilds)."""
        wire: dict[str, np.ndarray] = {}
        decoded: dict[str, np.ndarray] = {}
        for name, delta in deltas.items():
            x = np.array(delta, dtype=_F32, order="C")  # our own copy, reused as the residual
            previous = self.residual.get(name)
            if previous is not None:
                if previous.shape != x.shape:
                    raise ValueError(f"tensor {name!r}: shape {x.shape} differs from its residual's {previous.shape}")
                x += previous
            parts = encode(name, x, self.codec)
            wire.update(parts)
            if self.codec.lossless:
                decoded[name] = x
                self.residual.pop(name, None)
                continue
            decoded[name] = decode(name, parts, x.shape, self.codec)
            x -= decoded[name]
            self.residual[name] = x
        return wire, decoded

    def state(self) -> dict[str, np.ndarray]:
        """A copy of the residuals, for persisting."""
        return {name: r.copy() for name, r in self.residual.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace the residuals with a persisted state (copied, as float32)."""
        residual = {name: np.array(r, dtype=_F32, order="C") for name, r in state.items()}
        for name, r in residual.items():
            if r.size and not np.isfinite(r).all():
                raise ValueError(f"residual {name!r} has NaN or infinite values")
        self.residual = residual
