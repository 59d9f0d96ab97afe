"""A model version ready to serve: its stages on a device, runnable from any stage
boundary to any other, with each stage's compute time measured as it runs.

Stage k (1-based) is the k-th top-level child of the zoo's ``nn.Sequential``;
``start_layer = k`` means the input is stage k's output and stages k+1..L remain.
"""

from __future__ import annotations

import functools
import math
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tandem import metrics, tasks, training, zoo
from tandem.errors import InvalidArgument

# Weight of the newest measurement in the per-stage moving averages.
_EWMA = 0.2


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based
    name: str
    output_shape: tuple[int, ...]  # for one example

    @property
    def output_bytes(self) -> int:
        return math.prod(self.output_shape) * 4  # float32


def _stage_name(module: nn.Module) -> str:
    children = list(module.children()) if isinstance(module, nn.Sequential) else []
    return "+".join(type(c).__name__ for c in children) if children else type(module).__name__


@functools.cache
def describe(name: str) -> tuple[tuple[int, ...], tuple[Stage, ...]]:
    """The input shape and the stages of zoo model `name`, found by a dry run."""
    input_shape = tasks.get(name).task.input.shape
    net = zoo.build_model(name)
    assert isinstance(net, nn.Sequential), "staged models are Sequentials until tandem.split"
    stages = []
    with torch.inference_mode():
        x = torch.zeros((1, *input_shape))
        for index, module in enumerate(net, start=1):
            x = module(x)
            stages.append(Stage(index, _stage_name(module), tuple(x.shape[1:])))
    return input_shape, tuple(stages)


def resolve_device(requested: str) -> str:
    """'auto' picks cuda when a GPU is present, else cpu; 'cuda' without one is an error."""
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {requested!r} requested but torch sees no GPU")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise ValueError(f"unknown device {requested!r}: use auto, cpu or cuda[:N]")
    return requested


class StagedModel:
    """One version of one model on one device. `run` is called from a worker thread."""

    def __init__(
        self, model: str, version: int, sha256: str, arrays: Mapping[str, np.ndarray], device: str = "cpu"
    ) -> None:
        self.model, self.version, self.sha256, self.device = model, version, sha256, device
        self.input_shape, self.stages = describe(model)
        net = zoo.build_model(model)
        training.load_state_arrays(net, arrays)
        assert isinstance(net, nn.Sequential)
        self._net = net.to(device).eval()
        self._modules = list(self._net)
        self._histograms = [metrics.INFER_STAGE_SECONDS.labels(model, str(s.index)) for s in self.stages]
        self._gauges = [metrics.INFER_STAGE_SECONDS_PER_EXAMPLE.labels(model, str(s.index)) for s in self.stages]
        self._seconds_per_example = [0.0] * len(self.stages)  # moving averages, per stage
        self._measured_at = [0.0] * len(self.stages)  # time.monotonic() of each stage's last measurement
        self._lock = threading.Lock()
        self._timed_batches = 0

    @property
    def num_stages(self) -> int:
        return len(self.stages)

    def input_shape_at(self, start_layer: int) -> tuple[int, ...]:
        """Per-example shape of the input that a request starting after `start_layer` carries."""
        if not 0 <= start_layer < self.num_stages:
            raise InvalidArgument(
                f"start_layer {start_layer} is out of range for {self.model}: it has {self.num_stages} stages, "
                f"so start_layer must be in 0..{self.num_stages - 1}"
            )
        return self.input_shape if start_layer == 0 else self.stages[start_layer - 1].output_shape

    def check_input(self, x: np.ndarray, start_layer: int) -> None:
        """INVALID_ARGUMENT, saying why, unless `x` is a finite float32 batch for `start_layer`."""
        expected = self.input_shape_at(start_layer)
        if x.dtype != np.float32:
            raise InvalidArgument(f"input dtype is {x.dtype}; {self.model} takes float32")
        if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise InvalidArgument(
                f"input shape {list(x.shape)} does not fit {self.model} at start_layer {start_layer}: "
                f"expected [batch, {', '.join(map(str, expected))}]"
            )
        if x.shape[0] == 0:
            raise InvalidArgument("input batch is empty")
        # A float64 sum of float32 values cannot overflow, so it is finite exactly when
        # every value is: one pass, no boolean array.
        if not np.isfinite(x.sum(dtype=np.float64)):
            raise InvalidArgument("input holds non-finite values (NaN or infinity)")

    def run(self, x: np.ndarray, start_layer: int = 0, end_layer: int | None = None) -> np.ndarray:
        """Stages start_layer+1..end_layer (default: to the end) on a checked batch."""
        end = self.num_stages if end_layer is None else end_layer
        # On a GPU, timing each stage means waiting for it: do that on one batch in 16.
        timed = self.device == "cpu" or self._timed_batches % 16 == 0
        self._timed_batches += 1
        if not x.flags.writeable or not x.flags.c_contiguous:
            x = x.copy()  # torch shares the array's memory and wants to own writable memory
        with torch.inference_mode():
            h = torch.from_numpy(x).to(self.device, non_blocking=True)
            for index in range(start_layer, end):
                begin = time.perf_counter()
                h = self._modules[index](h)
                if timed:
                    if self.device != "cpu":
                        torch.cuda.synchronize()
                    self._observe(index, time.perf_counter() - begin, x.shape[0])
            return h.float().cpu().numpy()

    def _observe(self, index: int, seconds: float, rows: int) -> None:
        self._histograms[index].observe(seconds)
        with self._lock:
            previous = self._seconds_per_example[index]
            sample = seconds / rows
            value = sample if previous == 0 else (1 - _EWMA) * previous + _EWMA * sample
            self._seconds_per_example[index] = value
            self._measured_at[index] = time.monotonic()
        self._gauges[index].set(value)

    def stale_stages(self, max_age: float) -> tuple[int, int] | None:
        """The range (start, end) of stages not measured for `max_age` seconds, if any:
        the stages this side has not been running, whose cost placement still needs."""
        now = time.monotonic()
        with self._lock:
            stale = [i for i, at in enumerate(self._measured_at) if now - at > max_age]
        return (stale[0], stale[-1] + 1) if stale else None

    def profile(self, start: int, end: int) -> None:
        """Time stages start+1..end on one example of zeros (call on the worker thread)."""
        shape = self.input_shape_at(start)
        self.run(np.zeros((1, *shape), np.float32), start, end)

    def seconds_per_example(self) -> list[float]:
        """Measured compute time per example of each stage (0 until a batch has run)."""
        with self._lock:
            return list(self._seconds_per_example)
