"""Tandem's SDK: a Task is your model, your data and your training, under one name.

    from tandem import Task, TrainContext, TrainResult, Signature

    class Forecaster(Task):
        version = "1.0"
        input = Signature((24, 1))
        output = Signature((1,))

        def build(self, seed):
            ...  # any torch.nn.Module; deterministic in the seed
        def train(self, model, data, config, context):
            ...  # your loop: optimizer, loss, schedule, clipping
            return TrainResult({"loss": loss}, num_examples=len(data))
        def evaluate(self, model, data, config):
            return {"mae": ..., "rmse": ...}
        def load_data(self, spec):
            ...  # read the agent's --data (or the cloud's --eval) however suits you

A task is named `PACKAGE.MODULE:ATTRIBUTE`, or by the short name an installed package
registers under the entry-point group `tandem.tasks` (the built-in zoo does so: `mlp`,
`cnn`, ...). Code never travels over the wire: the coordinator names a task, and an
agent runs it only if it is installed there (`tandem.tasks` loads, checks and
fingerprints it). Every method runs on a worker thread, never on an event loop.

What is federated: every floating-point tensor of the model's `state_dict`
(parameters and float buffers such as batch norm's running statistics, averaged as
the parameters are), except those matching `local` (fnmatch patterns: personalised
layers, FedPer; batch norm, FedBN), which never leave the device. Integer tensors
(batch norm's `num_batches_tracked`) are counters, not weights: they stay local too
and are never pushed through a float codec.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from tandem.config import Config, ConfigValue  # plain values only; the coordinator validates them

__all__ = ["Config", "ConfigValue", "Signature", "Task", "TrainContext", "TrainResult"]


@dataclass(frozen=True)
class Signature:
    """The shape of one example (no batch dimension) and its dtype."""

    shape: tuple[int, ...]
    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        if any(d < 1 for d in self.shape):
            raise ValueError(f"every dimension of a signature must be >= 1, got {self.shape}")
        np.dtype(self.dtype)  # TypeError for a dtype numpy does not know


@dataclass
class TrainContext:
    """What a training step knows besides the model, the data and the config."""

    round: int  # the job's round, from 1
    seed: int  # a seed for this (round, agent): shuffles, dropout
    device: str  # "cpu" or "cuda[:N]": where to train
    # The round's starting point (the federated tensors, by name): for FedProx-style
    # terms. Read-only; on the CPU.
    global_state: Mapping[str, torch.Tensor] = field(default_factory=dict)
    # Called with the fraction done (0..1): shown in the agent's metrics and log.
    on_progress: Callable[[float], None] = lambda fraction: None

    def report(self, fraction: float) -> None:
        """Say how far training has come (0..1)."""
        self.on_progress(min(1.0, max(0.0, float(fraction))))


@dataclass(frozen=True)
class TrainResult:
    """What a training step returns: float metrics (at least "loss") and the number of
    examples it used (the update's FedAvg weight, capped by the coordinator)."""

    metrics: Mapping[str, float]
    num_examples: int


class Task:
    """Subclass and override `build` (and whatever else differs from a classifier
    trained with SGD on `tandem.data` files)."""

    name: str = ""  # set by the registry to the name it was loaded under
    version: str = "0"  # part of the fingerprint: agents with another version are refused
    input: Signature = Signature((1,))
    output: Signature = Signature((1,))
    local: tuple[str, ...] = ()  # fnmatch patterns of state keys that never leave the device

    def build(self, seed: int) -> nn.Module:
        """A fresh model; its weights depend only on `seed` (the registry seeds torch's RNG)."""
        raise NotImplementedError(f"{type(self).__name__} must define build(seed)")

    def train(self, model: nn.Module, data: Any, config: Config, context: TrainContext) -> TrainResult:
        """The default loop: SGD on cross-entropy over int64 labels (a classifier on
        `tandem.data.Dataset`), config keys epochs, batch_size, learning_rate and mu
        (FedProx's proximal weight)."""
        from tandem import training  # the platform's classifier loop

        loss = training.train_local(
            model, data, int(config.get("epochs", 1)), int(config.get("batch_size", 32)),
            float(config.get("learning_rate", 0.05)), context.seed, mu=float(config.get("mu", 0.0)),
        )
        return TrainResult({"loss": loss}, len(data))

    def evaluate(self, model: nn.Module, data: Any, config: Config) -> dict[str, float]:
        """The default: accuracy and mean cross-entropy of a classifier."""
        from tandem import training

        accuracy, loss = training.evaluate(model, data)
        return {"accuracy": accuracy, "loss": loss}

    def load_data(self, spec: str) -> Any:
        """The agent's `--data` or the cloud's `--eval`: by default `digits` (the
        reference test split), `digits:I/N` (a partition of its training split) or a
        directory of `.npz` / `.safetensors` files with arrays x and y."""
        from tandem import data

        return data.eval_dataset(spec) if spec == "digits" else data.load_data(spec)

    def check_data(self, data: Any) -> None:
        """ValueError, saying why, if `data` cannot feed this task's model. The default
        checks arrays `x` against the input signature's shape."""
        x = getattr(data, "x", None)
        if x is not None and tuple(np.shape(x)[1:]) != self.input.shape:
            raise ValueError(f"the data's examples have shape {list(np.shape(x)[1:])}; "
                             f"{self.name or type(self).__name__} takes {list(self.input.shape)}")

    def split_points(self, model: nn.Module) -> list[str] | None:
        """Where inference may be split, as names of the traced graph's nodes, in order;
        None (the default) finds them by tracing (`tandem.split`)."""
        return None

