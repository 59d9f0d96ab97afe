"""How the server turns the round's mean delta into the next global model.

FedAvg and FedProx apply the mean delta as it is (FedProx differs on the edge, by
its proximal term). FedAdam and FedYogi treat the negative mean delta as a
pseudo-gradient for a server-side adaptive optimiser (Reddi et al., "Adaptive
Federated Optimization", 2021), whose moments persist across rounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")


@dataclass
class ServerOptimizer:
    """Server step over the mean delta. State: first and second moments per tensor."""

    strategy: str = "fedavg"
    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3
    m: dict[str, np.ndarray] = field(default_factory=dict)
    v: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def stateful(self) -> bool:
        return self.strategy in ("fedadam", "fedyogi")

    def step(self, mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The change to apply to the global model this round, every tensor at once."""
        return {name: self.step_one(name, delta) for name, delta in mean_delta.items()}

    def step_one(self, name: str, delta: np.ndarray) -> np.ndarray:
        """One tensor's change: call it once per tensor and round. FedAvg scales the
        mean delta in place (the caller hands it over), so large models cost no copy."""
        if not self.stateful:
            if self.lr != 1.0:
                delta *= np.float32(self.lr)
            return delta
        m = self.m.get(name, np.zeros_like(delta))
        v = self.v.get(name, np.full_like(delta, self.tau**2))
        m = self.beta1 * m + (1 - self.beta1) * delta
        squared = delta * delta
        if self.strategy == "fedadam":
            v = self.beta2 * v + (1 - self.beta2) * squared
        else:  # Yogi: v moves towards delta^2 additively, so it cannot grow as fast
            v = v - (1 - self.beta2) * squared * np.sign(v - squared)
        self.m[name], self.v[name] = m.astype(np.float32), v.astype(np.float32)
        out: np.ndarray = (self.lr * m / (np.sqrt(v) + self.tau)).astype(np.float32)
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {**{f"m/{k}": a for k, a in self.m.items()}, **{f"v/{k}": a for k, a in self.v.items()}}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.array(a) for k, a in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: np.array(a) for k, a in arrays.items() if k.startswith("v/")}
