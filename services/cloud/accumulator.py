"""The open round's running sum: each accepted update is folded in as it arrives.

The sum lives in a scratch file and is folded one tensor at a time, so the
coordinator holds a few copies of one tensor, never a model (let alone agents x
model). The file is not durable state: after a restart the round's sum is rebuilt
from the updates' own files.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np

from cloud.tensorfile import pread_array, pwrite_array
from tandem import compression, wire
from tandem.compression import Codec


class Accumulator:
    """sum(w_i * delta_i) over the updates folded in, and sum(w_i). Which agents those
    were, and with what weight, is the round's to know (`cloud.open_round`), not the sum's."""

    def __init__(self, specs: Mapping[str, wire.TensorSpec], path: Path) -> None:
        self._specs = {name: specs[name] for name in sorted(specs)}
        self._offsets: dict[str, int] = {}
        end = 0
        for name, spec in self._specs.items():
            self._offsets[name] = end
            end += 4 * int(np.prod(spec.shape, dtype=np.int64))
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_CREAT | os.O_RDWR | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(self._fd, end)  # zeros, without writing them
            if end:
                # Blocks taken now: a fold never meets a full disk half-way through an
                # update (which would leave part of it in the sum); the round's opening does.
                os.posix_fallocate(self._fd, 0, end)
        except BaseException:
            os.close(self._fd)
            path.unlink(missing_ok=True)
            raise
        self.weight = 0.0
        self._touched = False  # until the first fold the file is all zeros

    def total(self, name: str) -> np.ndarray:
        """sum(n_i * delta_i) of one tensor."""
        out = np.empty(self._specs[name].shape, np.float32)
        pread_array(self._fd, out, self._offsets[name])
        return out

    def fold(self, weight: float, components: Mapping[str, np.ndarray], codec: Codec) -> None:
        """Add weight * delta, one tensor at a time (a negative weight takes some of an
        update out again: the close's correction for capped claims). `components` may
        read each tensor's encoding when it is looked up (`TensorFile.arrays`)."""
        for name in self._specs:
            # The first update needs no read: the file is all zeros until then.
            total = self.total(name) if self._touched else np.zeros(self._specs[name].shape, np.float32)
            compression.accumulate(total, name, components, codec, weight)
            pwrite_array(self._fd, total, self._offsets[name])
        self._touched = True
        self.weight += weight

    def mean(self) -> Mapping[str, np.ndarray]:
        """sum(n_i * delta_i) / sum(n_i), the FedAvg delta: each tensor is read and
        divided when it is looked up."""
        if self.weight <= 0:
            raise ValueError("no update was folded in")
        return _Mean(self, np.float32(self.weight))

    def close(self) -> None:
        """Delete the scratch file (the sum is spent, or will be rebuilt)."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
            self.path.unlink(missing_ok=True)


class _Mean(Mapping[str, np.ndarray]):
    def __init__(self, accumulator: Accumulator, weight: np.float32) -> None:
        self._accumulator = accumulator
        self._weight = weight

    def __getitem__(self, name: str) -> np.ndarray:
        total = self._accumulator.total(name)
        total /= self._weight
        return total

    def __iter__(self) -> Iterator[str]:
        return iter(self._accumulator._specs)

    def __len__(self) -> int:
        return len(self._accumulator._specs)
