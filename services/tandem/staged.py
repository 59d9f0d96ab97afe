"""A model version ready to serve: its stages on a device, runnable from any stage
boundary to any other, with each stage's compute time measured as it runs.

A task's stages are the pieces between its split points (`tandem.split`: found by
tracing the model, or named by the task; the zoo's are its ``nn.Sequential``'s
top-level children). ``start_layer = k`` means the input is stage k's output and
stages k+1..L remain. A model that cannot be split is one stage, and says why.
Loading a task and finding its points happens once per process, off the event loop
(`describe` caches; `prepare` reaches it from one).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from tandem import metrics, split, tasks
from tandem.errors import InvalidArgument

# Weight of the newest measurement in the per-stage moving averages.
_EWMA = 0.2
_DESCRIBE_LOCK = threading.Lock()
_LAYOUTS: dict[str, Layout] = {}


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based
    name: str
    output_shape: tuple[int, ...]  # for one example

    @property
    def output_bytes(self) -> int:
        return math.prod(self.output_shape) * 4  # float32 activations


@dataclass(frozen=True)
class Layout:
    """A task's serving layout: its input, its stages, where they are cut, and why not."""

    input_shape: tuple[int, ...]
    input_dtype: str
    stages: tuple[Stage, ...]
    plan: split.Plan

    @property
    def split_note(self) -> str:
        return self.plan.note


def layout(name: str) -> Layout:
    """Task `name`'s layout, found once per process (KeyError for an unknown task,
    ValueError for one that cannot load). It builds and runs the model: call it on a
    worker thread or at startup, or await `prepare`."""
    found = _LAYOUTS.get(name)  # found already: no lock (the event loop asks often)
    if found is not None:
        return found
    with _DESCRIBE_LOCK:
        found = _LAYOUTS.get(name)
        if found is None:
            found = _LAYOUTS[name] = _layout(name)
        return found


def _layout(name: str) -> Layout:
    loaded = tasks.get(name)
    plan = split.find(loaded.task, loaded.build(0))
    stages = tuple(Stage(i, n, shape) for i, (n, shape) in enumerate(zip(plan.names, plan.output_shapes,
                                                                           strict=True), start=1))
    return Layout(loaded.task.input.shape, loaded.task.input.dtype, stages, plan)


def describe(name: str) -> tuple[tuple[int, ...], tuple[Stage, ...]]:
    """The input shape and the stages of task `name` (see `layout`)."""
    found = layout(name)
    return found.input_shape, found.stages


async def prepare(names: Iterable[str]) -> None:
    """Find the layouts of these tasks on a worker thread, so that `describe` answers
    at once on the event loop; a task that does not load raises later, where it is used."""
    wanted = sorted(set(names))

    def load() -> None:
        for name in wanted:
            with contextlib.suppress(Exception):
                layout(name)

    if wanted:
        await asyncio.to_thread(load)


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
        found = layout(model)
        self.input_shape, self.stages, self.split_note = found.input_shape, found.stages, found.split_note
        self.input_dtype = np.dtype(found.input_dtype)
        loaded = tasks.get(model)
        net = loaded.build(0)  # federated tensors from `arrays`; local ones keep the build's values
        loaded.load_arrays(net, arrays)
        self._net = net.to(device).eval()
        self._modules: list[nn.Module] = split.pieces(self._net, found.plan)
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
        """INVALID_ARGUMENT, saying why, unless `x` is a finite batch for `start_layer`: of
        the task's input dtype at 0, float32 activations after."""
        expected = self.input_shape_at(start_layer)
        dtype = self.input_dtype if start_layer == 0 else np.dtype(np.float32)
        if x.dtype != dtype:
            raise InvalidArgument(f"input dtype is {x.dtype}; {self.model} takes {dtype} at start_layer {start_layer}")
        if x.ndim != len(expected) + 1 or tuple(x.shape[1:]) != expected:
            raise InvalidArgument(
                f"input shape {list(x.shape)} does not fit {self.model} at start_layer {start_layer}: "
                f"expected [batch, {', '.join(map(str, expected))}]"
            )
        if x.shape[0] == 0:
            raise InvalidArgument("input batch is empty")
        # A float64 sum of float32 values cannot overflow, so it is finite exactly when
        # every value is: one pass, no boolean array.
        if x.dtype.kind == "f" and not np.isfinite(x.sum(dtype=np.float64)):
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
            return h.float().cpu().numpy() if h.is_floating_point() else h.cpu().numpy()

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
        self.run(np.zeros((1, *shape), self.input_dtype if start == 0 else np.float32), start, end)

    def predicted_seconds(self, rows: int, start_layer: int = 0, end_layer: int | None = None) -> float:
        """Seconds that stages start_layer+1..end_layer should take on `rows` rows, from the
        stage profile (0 until the stages have been timed)."""
        with self._lock:
            return rows * sum(self._seconds_per_example[start_layer:end_layer])

    def seconds_per_example(self) -> list[float]:
        """Measured compute time per example of each stage (0 until a batch has run)."""
        with self._lock:
            return list(self._seconds_per_example)
