"""The open round's running sum: each accepted update is folded in as it arrives,
so the coordinator holds O(model size), not O(agents x model size)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tandem import codec as wire
from tandem import compression
from tandem.compression import Codec


class Accumulator:
    def __init__(self, specs: Mapping[str, wire.TensorSpec]) -> None:
        self._specs = dict(specs)
        self.total = {name: np.zeros(spec.shape, np.float32) for name, spec in specs.items()}
        self.weight = 0
        self.folded: set[str] = set()

    def fold(self, agent: str, num_examples: int, components: Mapping[str, np.ndarray], codec: Codec) -> None:
        """Add num_examples * delta, one tensor at a time (one dense tensor at a time in memory)."""
        if agent in self.folded:
            return
        for name in self._specs:
            compression.accumulate(self.total[name], name, components, codec, num_examples)
        self.weight += num_examples
        self.folded.add(agent)

    def mean(self) -> dict[str, np.ndarray]:
        """sum(n_i * delta_i) / sum(n_i), the FedAvg delta, computed in place: the
        accumulator is spent afterwards (no second model-sized buffer)."""
        if self.weight <= 0:
            raise ValueError("no update was folded in")
        w = np.float32(self.weight)
        for total in self.total.values():
            total /= w
        self.weight = 0
        return self.total
