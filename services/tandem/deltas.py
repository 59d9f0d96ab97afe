"""Whole-model deltas on the wire: every tensor of a model encoded with one codec.

The sender encodes a dict of float32 tensors into component arrays; the receiver
derives what to expect from the model's specs and the codec alone, assembles the
chunks against those bounds, then decodes and checks every tensor.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tandem import wire
from tandem.compression import Codec, component_limits, decode, encode, sparse


def expected(specs: Mapping[str, wire.TensorSpec], codec: Codec, prefix: str = "") -> dict[str, wire.TensorSpec]:
    """Component specs for a model's delta under `codec`, optionally prefixed ("<v>/")."""
    out: dict[str, wire.TensorSpec] = {}
    for name, spec in specs.items():
        for component, (dtype, length, exact) in component_limits(name, spec.shape, codec).items():
            key = prefix + component
            out[key] = wire.TensorSpec(key, dtype, (length,), exact=exact)
    return out


def encode_all(arrays: Mapping[str, np.ndarray], codec: Codec) -> dict[str, np.ndarray]:
    components: dict[str, np.ndarray] = {}
    for name, array in arrays.items():
        components.update(encode(name, np.asarray(array, dtype=np.float32), codec))
    return components


# The change one tensor undergoes: dense, or sparse as (ascending flat indices, values).
Change = np.ndarray | tuple[np.ndarray, np.ndarray]


def decode_change(name: str, components: Mapping[str, np.ndarray], shape: tuple[int, ...], codec: Codec) -> Change:
    """Like decode, but top-k stays sparse."""
    if codec.kind == "topk":
        return sparse(name, components, shape, codec)
    return decode(name, components, shape, codec)


def apply_change(piece: np.ndarray, first: int, change: Change) -> None:
    """piece += change, for the elements [first, first + piece.size) of the flattened tensor.

    The one way a published version is built from its predecessor, by the cloud slice by
    slice and by agents whole: the same float32 additions on the same elements, so
    both sides end with the same bytes (and the same sha256).
    """
    flat = piece.reshape(-1)
    if isinstance(change, tuple):
        idx, values = change
        lo, hi = np.searchsorted(idx, [first, first + flat.size])
        flat[idx[lo:hi] - first] += values[lo:hi]
    else:
        flat += change.reshape(-1)[first : first + flat.size]


def nbytes(components: Mapping[str, np.ndarray]) -> int:
    return sum(int(a.nbytes) for a in components.values())
