"""A canary's comparison with the version it replaced (issue 16, staged rollouts).

After a canary version answers a request with a full local forward pass, the agent
runs the previous version (which it keeps, edge.models) on the same input, off the
request's path, and counts how the two answers agree (edge.signals). At most one such
run per model is in flight: a request that finds one running is not compared, which
samples the traffic by how busy the agent is and bounds the extra work to one batch
per model at a time. The runs go through the batcher's worker thread between batches,
so they never run torch concurrently with real requests.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from edge.signals import Comparison, Signals
from tandem.batching import Batcher
from tandem.staged import StagedModel

log = logging.getLogger(__name__)

# Two outputs that are not class scores agree on a row when every element is within this.
RELATIVE_TOLERANCE = 0.1
ABSOLUTE_TOLERANCE = 1e-6


def top_probability(logits: np.ndarray) -> np.ndarray:
    """Each row's largest softmax probability: how sure the model is of its top class
    (NaN for a row that is not finite)."""
    with np.errstate(invalid="ignore", over="ignore"):
        shifted = logits - logits.max(axis=1, keepdims=True)
        p = np.exp(shifted)
        return np.asarray(p.max(axis=1) / p.sum(axis=1))


def compare(new: np.ndarray, old: np.ndarray) -> Comparison:
    """How `new` agrees with `old`, row by row: the same top class for class scores (2-D,
    more than one column), every element within 10% of `old`'s otherwise. A row where
    `new` is not finite agrees nowhere, and counts no confidence."""
    rows = len(new)
    if new.shape != old.shape:
        return Comparison(rows, 0)
    finite = np.isfinite(new).reshape(rows, -1).all(axis=1)
    if new.ndim == 2 and new.shape[1] > 1:
        confidence = np.where(finite, top_probability(new), 0.0)
        previous_confidence = np.nan_to_num(top_probability(old), nan=0.0)
        agreed = finite & (new.argmax(axis=1) == old.argmax(axis=1))
        return Comparison(rows, int(agreed.sum()), float(confidence.sum()), float(previous_confidence.sum()))
    with np.errstate(invalid="ignore", over="ignore"):
        close = np.abs(new - old) <= RELATIVE_TOLERANCE * np.abs(old) + ABSOLUTE_TOLERANCE
    return Comparison(rows, int((finite & close.reshape(rows, -1).all(axis=1)).sum()))


class Shadow:
    """The comparison runs in flight, one per model at most."""

    def __init__(self, batcher: Batcher, signals: Signals) -> None:
        self._batcher, self._signals = batcher, signals
        self._running: dict[str, asyncio.Task[None]] = {}  # referenced, or the loop may lose them
        self._failed: set[tuple[str, int]] = set()  # (model, previous version) whose failure was logged

    def compare(self, new: StagedModel, previous: StagedModel, x: np.ndarray, out: np.ndarray) -> None:
        """`out` is `new`'s answer to `x`: compare it with `previous`'s, later, unless a
        comparison of this model is running."""
        running = self._running.get(new.model)
        if running is not None and not running.done():
            return
        self._running[new.model] = asyncio.create_task(self._compare(new, previous, x, out),
                                                       name=f"shadow-{new.model}")

    async def _compare(self, new: StagedModel, previous: StagedModel, x: np.ndarray, out: np.ndarray) -> None:
        answers: list[np.ndarray] = []
        try:
            await self._batcher.call(lambda: answers.append(previous.run(x)))
            comparison = compare(out, answers[0])
        except Exception as exc:  # noqa: BLE001 - a comparison is a sample: lose it, never the request
            if (new.model, previous.version) not in self._failed:
                self._failed.add((new.model, previous.version))
                log.debug("could not compare %s v%d with v%d: %s", new.model, new.version, previous.version, exc)
            return
        self._signals.compared(new.model, new.version, previous.version, comparison)

    def close(self) -> None:
        for task in self._running.values():
            task.cancel()
        self._running.clear()
