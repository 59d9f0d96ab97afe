"""How the server turns the round's mean delta into the next global model, per strategy.

FedAvg and FedProx apply the mean delta as it is (FedProx differs on the edge, by
its proximal term). FedAdam and FedYogi treat the negative mean delta as a
pseudo-gradient for a server-side adaptive optimiser (Reddi et al., "Adaptive
Federated Optimization", 2021), whose moments persist across rounds.

A strategy is a class registered under the name a job gives (`--strategy`); a job's
runner makes one instance, `get(spec.strategy.name)(lr)`, which holds the server state.
Adding one is one class: subclass `Strategy` (or `FedAvg`, `Adaptive`) and `@register` it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import ClassVar, TypeVar

import numpy as np


class Strategy(ABC):
    """A server step over the round's mean delta, and the state it keeps across rounds."""

    name: ClassVar[str]
    # Agents add FedProx's proximal term, weighted by the job's mu; other strategies refuse mu.
    proximal: ClassVar[bool] = False
    # state() is saved at each round's close and loaded again when a job resumes.
    stateful: ClassVar[bool] = False

    def __init__(self, lr: float = 1.0) -> None:
        self.lr = lr

    @classmethod
    @abstractmethod
    def default_lr(cls, codec: str) -> float:
        """The server step size of a job that sets none, given its uplink codec."""

    def step(self, mean_delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The change to apply to the global model this round, every tensor at once."""
        return {name: self.step_one(name, delta) for name, delta in mean_delta.items()}

    @abstractmethod
    def step_one(self, name: str, delta: np.ndarray) -> np.ndarray:
        """One tensor's change: call it once per tensor and round. It may scale `delta`
        in place (the caller hands it over), so large models cost no copy."""

    def state(self) -> dict[str, np.ndarray]:
        return {}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Restore what `state()` returned (nothing, for a stateless strategy)."""
        return None


_STRATEGIES: dict[str, type[Strategy]] = {}

S = TypeVar("S", bound=type[Strategy])


def register(cls: S) -> S:
    """Class decorator: jobs may name the strategy `cls.name` from now on."""
    if cls.name in _STRATEGIES:
        raise ValueError(f"strategy {cls.name!r} is registered already")
    _STRATEGIES[cls.name] = cls
    return cls


def unregister(name: str) -> None:
    """Forget a strategy (tests register toy ones and take them out again)."""
    del _STRATEGIES[name]


def names() -> list[str]:
    """Every registered strategy's name, in the order they were registered (the default first)."""
    return list(_STRATEGIES)


def get(name: str) -> type[Strategy]:
    try:
        return _STRATEGIES[name]
    except KeyError:
        raise KeyError(f"unknown strategy {name!r}; known: {names()}") from None


@register
class FedAvg(Strategy):
    """The mean delta, scaled by the server learning rate."""

    name = "fedavg"

    @classmethod
    def default_lr(cls, codec: str) -> float:
        """Sparse (top-k) updates default to 2: FedAvg divides each coordinate by every
        client's weight although only a few clients sent it, which shrinks the step;
        measured on the reference workload (bench/README.md), 2 brings topk:0.01 back
        to dense accuracy."""
        return 2.0 if codec.startswith("topk") else 1.0

    def step_one(self, name: str, delta: np.ndarray) -> np.ndarray:
        if self.lr != 1.0:
            delta *= np.float32(self.lr)
        return delta


@register
class FedProx(FedAvg):
    """FedAvg on the server; the proximal term is the agents' (Li et al., 2020)."""

    name = "fedprox"
    proximal = True


class Adaptive(Strategy):
    """An adaptive server optimiser over the pseudo-gradient. State: first and second
    moments per tensor; subclasses say how the second moment moves."""

    stateful = True
    beta1: ClassVar[float] = 0.9
    beta2: ClassVar[float] = 0.99
    tau: ClassVar[float] = 1e-3

    def __init__(self, lr: float = 1.0) -> None:
        super().__init__(lr)
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    @classmethod
    def default_lr(cls, codec: str) -> float:
        return 0.01

    @abstractmethod
    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        """The new second moment from the last one and this round's squared delta."""

    def step_one(self, name: str, delta: np.ndarray) -> np.ndarray:
        m = self.m.get(name, np.zeros_like(delta))
        v = self.v.get(name, np.full_like(delta, self.tau**2))
        m = self.beta1 * m + (1 - self.beta1) * delta
        v = self.second_moment(v, delta * delta)
        self.m[name], self.v[name] = m.astype(np.float32), v.astype(np.float32)
        out: np.ndarray = (self.lr * m / (np.sqrt(v) + self.tau)).astype(np.float32)
        return out

    def state(self) -> dict[str, np.ndarray]:
        return {**{f"m/{k}": a for k, a in self.m.items()}, **{f"v/{k}": a for k, a in self.v.items()}}

    def load_state(self, arrays: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.array(a) for k, a in arrays.items() if k.startswith("m/")}
        self.v = {k[2:]: np.array(a) for k, a in arrays.items() if k.startswith("v/")}


@register
class FedAdam(Adaptive):
    name = "fedadam"

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        out: np.ndarray = self.beta2 * v + (1 - self.beta2) * squared
        return out


@register
class FedYogi(Adaptive):
    name = "fedyogi"

    def second_moment(self, v: np.ndarray, squared: np.ndarray) -> np.ndarray:
        # Yogi: v moves towards delta^2 additively, so it cannot grow as fast
        out: np.ndarray = v - (1 - self.beta2) * squared * np.sign(v - squared)
        return out
