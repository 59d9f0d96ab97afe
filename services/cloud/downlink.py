"""A closing round's change to the global model: the server strategy's step, and how
it travels down to agents that hold the base (lossless whole versions, or encoded
deltas with the cloud's own error-feedback residual)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from cloud.strategies import Strategy
from cloud.tensorfile import TensorFile
from tandem import compression, deltas
from tandem.compression import Codec


def next_change(
    optimizer: Strategy, codec: Codec, mean: Mapping[str, np.ndarray], previous: TensorFile | None,
    residual: dict[str, np.ndarray],
) -> tuple[Callable[[str], deltas.Change], dict[str, np.ndarray] | None, int]:
    """The change from the base to the new global model, as a function of the tensor's
    name that the new version's writer calls once per tensor, and the change's
    encoding for agents that hold the base.

    With a lossless downlink every tensor's change is made as it is written, so the
    close holds one tensor at a time. With a lossy one the cloud publishes exactly
    what agents reconstruct, base + decode(encode(step + residual)), and keeps what
    was left out as its own error-feedback residual (read from the last job state,
    `previous`, slice by slice; the new one is left in `residual`). That happens in
    place on the step, and top-k changes stay sparse: the close holds one
    model-sized buffer.
    """
    if codec.lossless:
        return lambda name: _finite(name, optimizer.step_one(name, mean[name])), None, 0
    step = optimizer.step(mean)
    for name, total in step.items():
        _finite(name, total)
    components: dict[str, np.ndarray] = {}
    changes: dict[str, deltas.Change] = {}
    for name, target in step.items():
        if previous is not None and f"res/{name}" in previous.specs:
            flat = target.reshape(-1)
            for first, piece in previous.slices(f"res/{name}"):
                flat[first : first + piece.size] += piece
        encoded = compression.encode(name, target, codec)
        change: deltas.Change = deltas.decode_change(name, encoded, target.shape, codec)
        if isinstance(change, tuple):  # target -= change: what is left is the new residual
            target.reshape(-1)[change[0]] -= change[1]
        else:
            target -= change
        residual[name] = target
        changes[name] = change
        components.update(encoded)
    return changes.__getitem__, components, deltas.nbytes(components)


def _finite(name: str, change: np.ndarray) -> np.ndarray:
    if not np.isfinite(change).all():
        raise ValueError(f"the aggregate of round updates is not finite in {name!r}; nothing was published")
    return change
