"""Dynamic batching: requests with the same key are gathered and run as one batch.

A batch closes when it holds `max_batch` rows or its oldest request has waited
`max_delay` seconds, whichever comes first; each caller gets its own rows back. A
batch whose predicted cost is under `inline_below` seconds runs inline on the event
loop: handing it to a thread costs more than it computes (two thread switches, and
the worker waiting for the GIL that a busy loop holds). Any other batch runs on the
batcher's own worker thread, so the event loop never waits long on torch. While
one batch runs there, the next one gathers, so a busy server batches more without
waiting longer. Rows waiting are bounded: past `max_queue_rows` a
request is refused with RESOURCE_EXHAUSTED instead of queueing without end.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import time
from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from tandem import metrics
from tandem.errors import ResourceExhausted
from tandem.staged import StagedModel

Run = Callable[[np.ndarray], np.ndarray]
Cost = Callable[[int], float]  # predicted seconds of one forward pass on n rows

# Weight of the newest batch in a lane's measured CPU seconds per row.
_EWMA = 0.2

# A key's gathering task ends after this long without requests (an old version, say).
_IDLE_SECONDS = 30.0


@dataclass
class _Pending:
    rows: np.ndarray
    future: asyncio.Future[np.ndarray]
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _Lane:
    """The requests waiting for one key, and the task that gathers them."""

    run: Run
    label: str
    cost: Cost | None  # the caller's prediction (a stage profile), until a batch has been measured here
    cpu_per_row: float = 0.0  # CPU seconds per row of this lane's batches, as run (0: none yet)
    waiting: collections.deque[_Pending] = field(default_factory=collections.deque)
    rows: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # a request came to an empty lane
    full: asyncio.Event = field(default_factory=asyncio.Event)  # max_batch rows, or the delay is up
    task: asyncio.Task[None] | None = None


class Batcher:
    def __init__(
        self, max_batch: int, max_delay: float, max_queue_rows: int, name: str = "infer", inline_below: float = 0.0
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_delay < 0:
            raise ValueError(f"max_delay must be >= 0, got {max_delay}")
        if not inline_below >= 0:
            raise ValueError(f"--inline-below-ms must be >= 0 (0: never inline), got {inline_below * 1000:g}")
        self.max_batch, self.max_delay, self.max_queue_rows = max_batch, max_delay, max_queue_rows
        self.inline_below = inline_below  # seconds; 0: every batch on the worker thread
        # One thread: batches run one after another, each with all of torch's threads.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=name)
        self._lanes: dict[Hashable, _Lane] = {}
        self.queued_rows = 0
        self.batches = 0
        self.rows_run = 0
        self.inline_batches = 0

    async def submit(self, key: Hashable, rows: np.ndarray, run: Run, label: str, cost: Cost | None = None) -> np.ndarray:
        """Queue `rows` under `key` (all requests of a key share `run` and `cost`); await their outputs.
        Without `cost`, a key's batches run on the worker thread until one has been measured."""
        if self.queued_rows + len(rows) > self.max_queue_rows:
            metrics.INFER_REJECTED.labels(label, "overloaded").inc()
            raise ResourceExhausted(
                f"inference queue is full ({self.queued_rows} rows waiting, limit {self.max_queue_rows}); "
                "retry later", reason="overloaded",
            )
        lane = self._lanes.get(key)
        if lane is None:
            lane = self._lanes[key] = _Lane(run, label, cost)
        pending = _Pending(rows, asyncio.get_running_loop().create_future())
        lane.waiting.append(pending)
        lane.rows += len(rows)
        self._queued(len(rows))
        # Wake the gathering task only when it has something to do: cheap per request.
        if len(lane.waiting) == 1:
            lane.arrived.set()
        if lane.rows >= self.max_batch:
            lane.full.set()
        if lane.task is None:
            lane.task = asyncio.create_task(self._gather(key, lane), name=f"batcher-{key}")
        return await pending.future

    def _queued(self, rows: int) -> None:
        self.queued_rows += rows
        metrics.INFER_QUEUE_ROWS.set(self.queued_rows)

    async def _gather(self, key: Hashable, lane: _Lane) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not lane.waiting:
                lane.arrived.clear()
                try:
                    async with asyncio.timeout(_IDLE_SECONDS):
                        await lane.arrived.wait()
                except TimeoutError:
                    if not lane.waiting:
                        del self._lanes[key]
                        return
                continue
            remaining = lane.waiting[0].enqueued + self.max_delay - time.perf_counter()
            if lane.rows < self.max_batch and remaining > 0:
                # One timer per batch, not one wait per arrival: the batch closes when
                # submit() sees it full or when the oldest request has waited max_delay.
                lane.full.clear()
                timer = loop.call_later(remaining, lane.full.set)
                await lane.full.wait()
                timer.cancel()
            batch = self._take(lane)
            if not batch:
                continue
            x = batch[0].rows if len(batch) == 1 else np.concatenate([p.rows for p in batch])
            try:
                if self.inline(lane, len(x)):
                    self.inline_batches += 1
                    out = self._run(lane, x)
                else:
                    out = await loop.run_in_executor(self._executor, self._run, lane, x)
            except Exception as exc:  # noqa: BLE001 - each waiting request gets the error
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(exc)
                continue
            self.batches += 1
            self.rows_run += len(x)
            metrics.child(metrics.INFER_BATCH_ROWS, lane.label).observe(len(x))
            first = 0
            for p in batch:
                if not p.future.done():
                    p.future.set_result(out[first : first + len(p.rows)])
                first += len(p.rows)

    def predicted(self, lane: _Lane, rows: int) -> float | None:
        """Seconds a batch of `rows` should take: as this lane's batches have measured, else as the
        caller predicts; None when neither knows."""
        if lane.cpu_per_row > 0:
            return lane.cpu_per_row * rows
        return lane.cost(rows) if lane.cost is not None else None

    def inline(self, lane: _Lane, rows: int) -> bool:
        """Whether a batch of `rows` is cheap enough to run on the event loop."""
        predicted = self.predicted(lane, rows)
        return predicted is not None and 0 < predicted < self.inline_below

    @staticmethod
    def _run(lane: _Lane, x: np.ndarray) -> np.ndarray:
        # CPU time of the thread that runs the batch, not wall time: on a busy server wall
        # time includes waiting for the GIL and a core, and a batch that waited on the
        # worker would look expensive and never come back inline.
        begin = time.thread_time()
        out = lane.run(x)
        sample = (time.thread_time() - begin) / len(x)
        lane.cpu_per_row = sample if lane.cpu_per_row == 0 else (1 - _EWMA) * lane.cpu_per_row + _EWMA * sample
        return out

    def _take(self, lane: _Lane) -> list[_Pending]:
        """Up to max_batch rows of live requests, oldest first (one request at least)."""
        batch: list[_Pending] = []
        rows, now = 0, time.perf_counter()
        while lane.waiting:
            head = lane.waiting[0]
            if batch and rows + len(head.rows) > self.max_batch:
                break
            lane.waiting.popleft()
            lane.rows -= len(head.rows)
            self._queued(-len(head.rows))
            if head.future.done():  # its caller gave up (cancelled or timed out)
                continue
            metrics.child(metrics.INFER_QUEUE_WAIT_SECONDS, lane.label).observe(now - head.enqueued)
            batch.append(head)
            rows += len(head.rows)
        return batch

    async def call(self, fn: Callable[[], object]) -> None:
        """Run `fn` on the worker thread, between batches (profiling, say)."""
        await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def close(self) -> None:
        for lane in list(self._lanes.values()):
            if lane.task is not None:
                lane.task.cancel()
        self._lanes.clear()
        self._executor.shutdown(wait=False, cancel_futures=True)


async def keep_profiled(batcher: Batcher, models: Callable[[], Iterable[StagedModel]], interval: float) -> None:
    """Every `interval`, time the stages of each model that real requests have not run
    lately (a split leaves some stages to the other side), on one example, between
    batches: placement needs every stage's cost on both sides."""
    while True:
        await asyncio.sleep(interval)
        for model in list(models()):
            stale = model.stale_stages(max_age=2 * interval)
            if stale is not None:
                await batcher.call(functools.partial(model.profile, *stale))
