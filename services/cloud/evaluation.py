"""The cloud's evaluation of a new global version: the task's `evaluate` on the job's
`--eval` data (a data spec handed to the task's `load_data`, loaded once per (task,
spec) and kept), and the metrics a round reports (checked, aggregated, exported).

Everything here runs torch or the user's code: call it off the event loop.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from tandem import config as tandem_config
from tandem import metrics, tasks
from tandem.errors import InvalidArgument
from tandem.task import Config

log = logging.getLogger(__name__)

# What a round's metric may be called to become a Prometheus label value, and how many
# one task may export per source: the gauge's cardinality stays bounded.
METRIC_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_EXPORTED = 16
# What an agent's header may carry at all (checked at the intake).
MAX_UPDATE_METRICS = tandem_config.MAX_UPDATE_METRICS
MAX_METRIC_NAME = tandem_config.MAX_METRIC_NAME

_lock = threading.Lock()
_locks: dict[tuple[str, str], threading.Lock] = {}
_data: dict[tuple[str, str], Any] = {}  # kept for the process's life: eval sets are few and small
_exported: dict[tuple[str, str], set[str]] = {}  # (task, source) -> the names the gauge has
_dropped: set[tuple[str, str, str]] = set()  # (task, source, name) logged once


class EvalDataError(ValueError):
    """The eval spec cannot be loaded by the task's load_data."""


def eval_data(task: str, spec: str) -> Any:
    """The task's `load_data(spec)`, loaded once per (task, spec); EvalDataError saying why not."""
    key = (task, spec)
    with _lock:  # one lock per (task, spec): one job's slow load stalls no other job's evaluation
        lock = _locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _data:
            loaded = tasks.get(task)
            try:
                data = loaded.task.load_data(spec)
                loaded.task.check_data(data)
            except Exception as exc:  # noqa: BLE001 - the user's load_data can raise anything
                raise EvalDataError(f"eval data {spec!r} for task {task!r}: {type(exc).__name__}: {exc}") from None
            _data[key] = data
        return _data[key]


def evaluate(task: str, arrays: Mapping[str, np.ndarray], spec: str, config: Config) -> dict[str, float]:
    """The task's `evaluate` of the federated tensors `arrays` on eval data `spec`."""
    loaded = tasks.get(task)
    data = eval_data(task, spec)
    model = loaded.build(0)
    loaded.load_arrays(model, arrays)
    found = loaded.task.evaluate(model, data, dict(config))
    if not isinstance(found, Mapping):
        raise TypeError(f"{task}'s evaluate returned {type(found).__name__}, not a dict of metrics")
    kept, _ = tandem_config.update_metrics(found)  # finite numbers under sane names; the rest left out
    return kept


def check_update_metrics(values: Mapping[str, float]) -> None:
    """InvalidArgument unless an update's metrics are few, with short names, and finite."""
    if len(values) > MAX_UPDATE_METRICS:
        raise InvalidArgument(f"{len(values)} metrics in the update; at most {MAX_UPDATE_METRICS}", reason="malformed")
    for name, value in values.items():
        if not 0 < len(name) <= MAX_METRIC_NAME:
            raise InvalidArgument(f"metric name {name[:80]!r} is empty or over {MAX_METRIC_NAME} characters",
                                  reason="malformed")
        if not math.isfinite(value):
            raise InvalidArgument(f"metric {name!r} is not finite", reason="malformed")


def weighted(per_agent: Mapping[str, tuple[float, Mapping[str, float]]]) -> dict[str, float]:
    """Agents' metrics (weight, metrics) averaged by weight, each over the agents that report it."""
    sums: dict[str, float] = {}
    weights: dict[str, float] = {}
    for weight, values in per_agent.values():
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + weight * value
            weights[name] = weights.get(name, 0.0) + weight
    return {name: sums[name] / weights[name] for name in sorted(sums) if weights[name] > 0}


def export(task: str, source: str, values: Mapping[str, float]) -> None:
    """Set the round-metrics gauge: names of METRIC_NAME only, at most MAX_EXPORTED per
    (task, source); the others are dropped with one log line each."""
    names = _exported.setdefault((task, source), set())
    for name in sorted(values):
        if METRIC_NAME.fullmatch(name) and (name in names or len(names) < MAX_EXPORTED):
            names.add(name)
            metrics.ROUND_METRIC.labels(task, source, name).set(values[name])
        elif (task, source, name) not in _dropped:
            _dropped.add((task, source, name))
            log.warning("task %s: %s metric %r is not exported to Prometheus (names match [a-z][a-z0-9_]{0,31}, "
                        "at most %d per task)", task, source, name, MAX_EXPORTED)
