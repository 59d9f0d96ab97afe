"""The agent's training tasks: get the task's base version, train on local data that
never leaves the device, upload the update; each step retried until the task's deadline,
and transfers resumed where a reconnect broke them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
import numpy as np

from edge.channels import Backoff
from tandem import compression, data, measurements, metrics, training, transfer, wire, zoo
from tandem.transfer import HeldVersion
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

# Codes worth trying again: the coordinator is restarting, draining or unreachable.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}

# (task, base version) -> (the update, local loss, seconds spent training)
Train = Callable[[pb.TrainTask, HeldVersion], Awaitable[tuple[dict[str, np.ndarray], float, float]]]


class Trainer:
    """Runs the coordinator's training tasks for one agent: a newer round of a job
    supersedes the older one, tasks of different jobs run side by side."""

    def __init__(
        self, dataset: data.Dataset, client_index: int, coordinator: Callable[[], coordinator_pb2_grpc.CoordinatorStub],
        connected: asyncio.Event, backoff: tuple[float, float], on_measured: Callable[[], None],
        train: Train | None = None,
    ) -> None:
        """`coordinator` gives the current stub (channels are remade on reconnects);
        `connected` is set while the control stream is up; `on_measured` is called when
        a transfer measured the link; `train` replaces `self.train` as the training step."""
        self.dataset, self.client_index = dataset, client_index
        self._coordinator, self._connected, self._backoff = coordinator, connected, backoff
        self._on_measured = on_measured
        self._train_step: Train = train or self.train
        self.held: dict[str, HeldVersion] = {}  # model -> the version last trained from
        self._measurements: dict[str, float] = {}
        self._tasks: dict[tuple[str, int], pb.TrainTask] = {}  # newest message for each (job, round)
        self._done: set[tuple[str, int]] = set()
        self._training: dict[str, asyncio.Task[None]] = {}  # job -> its running task
        self._training_round: dict[str, int] = {}  # job -> the round of that task
        self._feedback: dict[str, compression.ErrorFeedback] = {}  # job -> error-feedback residual
        self._downloads: dict[tuple[str, int], transfer.Download] = {}
        self._uploads: dict[tuple[str, int], tuple[transfer.Upload, dict[str, np.ndarray]]] = {}

    def measurements(self) -> dict[str, float]:
        """What training measured, for the heartbeat: transfer throughputs and training time."""
        return dict(self._measurements)

    def on_task(self, task: pb.TrainTask) -> None:
        """Start a task, unless it is already running or done."""
        key = (task.job_id, task.round)
        self._tasks[key] = task  # a re-sent task may carry a later deadline or another codec
        running = self._training.get(task.job_id)
        if key in self._done:
            return
        if running is not None and not running.done():
            if self._training_round.get(task.job_id, 0) >= task.round:
                return  # already on this round, or a newer one
            running.cancel()
        self._training_round[task.job_id] = task.round
        self._training[task.job_id] = asyncio.create_task(self._train_and_upload(key), name=f"train-{key}")

    def cancel(self) -> None:
        """Cancel every running task (the agent is stopping)."""
        for task in self._training.values():
            task.cancel()

    async def _train_and_upload(self, key: tuple[str, int]) -> None:
        task = self._tasks[key]
        try:
            base = await self._retry(key, "download", lambda: self._ensure_model(task))
            delta, loss, seconds = await self._train_step(task, base)
            receipt = await self._retry(key, "upload", lambda: self._upload(key, delta, loss))
            self._done.add(key)
            metrics.EDGE_TASKS.labels("duplicate" if receipt.duplicate else "uploaded").inc()
            log.info(
                "job %s round %d: trained %.2f s, loss %.4f, update %s accepted%s",
                task.job_id, task.round, seconds, loss, receipt.digest[:12], " (duplicate)" if receipt.duplicate else "",
            )
        except asyncio.CancelledError:
            metrics.EDGE_TASKS.labels("superseded").inc()
            raise
        except grpc.aio.AioRpcError as exc:
            # Not marked done: if the coordinator sends this task again, it is tried again.
            metrics.EDGE_TASKS.labels("rejected").inc()
            log.warning("job %s round %d: %s %s", task.job_id, task.round, exc.code().name, exc.details())
        except Exception:
            metrics.EDGE_TASKS.labels("failed").inc()
            log.exception("job %s round %d failed", task.job_id, task.round)
        finally:
            self._tasks = {k: v for k, v in self._tasks.items() if k[0] != key[0] or k[1] >= key[1]}
            self._uploads.pop(key, None)

    async def _retry(self, key: tuple[str, int], what: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Retry transient failures until the task's deadline (re-read: it may move)."""
        backoff = Backoff(*self._backoff)
        while True:
            try:
                return await attempt()
            except (grpc.aio.AioRpcError, transfer.ModelMismatch) as exc:
                retryable = isinstance(exc, transfer.ModelMismatch) or exc.code() in RETRYABLE
                deadline = self._tasks[key].deadline.ToNanoseconds() / 1e9
                delay = backoff.next_delay()
                if not retryable or time.time() + delay > deadline:
                    raise
                log.info("%s failed (%s); retrying in %.1f s", what, exc, delay)
                await asyncio.sleep(delay)
                await self._connected.wait()

    async def _ensure_model(self, task: pb.TrainTask) -> HeldVersion:
        held = self.held.get(task.model)
        if held is not None and held.version == task.base_version and held.sha256 == task.base_sha256:
            return held
        if task.HasField("base_seed"):
            # The job's initial model is a seeded zoo model: build it, no download needed.
            arrays = await asyncio.to_thread(lambda: training.state_arrays(zoo.build_model(task.model, task.base_seed)))
            if wire.state_sha256(arrays) == task.base_sha256:
                return self._hold(task, arrays)
            log.warning("the locally built initial %s differs from the cloud's; downloading it", task.model)
        key = (task.model, task.base_version)
        download = self._downloads.get(key)
        if download is None:
            specs = training.state_specs(task.model)
            have = held if held is not None and held.version < task.base_version else None
            download = self._downloads[key] = transfer.Download(
                task.model, task.base_version, task.base_sha256, specs, have
            )
        try:
            arrays = await download.run(self._coordinator(), timeout=120)
        except transfer.ModelMismatch:
            # Start over, and as a whole model: whatever went wrong is not repeated.
            self._downloads[key] = transfer.Download(task.model, task.base_version, task.base_sha256,
                                                     download.specs)
            raise
        del self._downloads[key]
        self._measure(measurements.DOWNLINK_BYTES_PER_SECOND, transfer.throughput(download.wire, download.seconds))
        return self._hold(task, arrays)

    def _hold(self, task: pb.TrainTask, arrays: dict[str, np.ndarray]) -> HeldVersion:
        held = HeldVersion(task.base_version, task.base_sha256, arrays)
        self.held[task.model] = held
        metrics.MODEL_VERSION.labels(task.model).set(task.base_version)
        return held

    async def _upload(self, key: tuple[str, int], delta: dict[str, np.ndarray], loss: float) -> pb.UpdateReceipt:
        """Encode with the codec of the newest task message (error feedback per job), send, resume."""
        task = self._tasks[key]
        feedback = self._feedback.setdefault(task.job_id, compression.ErrorFeedback(compression.Codec("none")))
        pending = self._uploads.get(key)
        if pending is None or pending[0].header.codec != task.codec:
            # Compress on a copy: the job's residual changes only once the coordinator
            # has the update (and not at all if this task is cancelled meanwhile).
            trial = compression.ErrorFeedback(compression.parse_codec(task.codec))
            trial.load_state(feedback.residual)
            components, _ = await asyncio.to_thread(trial.compress, delta)
            after = trial.residual
            header = pb.UpdateHeader(
                job_id=task.job_id, round=task.round, base_version=task.base_version,
                num_examples=len(self.dataset), codec=task.codec, local_loss=loss,
            )
            pending = self._uploads[key] = (transfer.Upload(header, components), after)
        upload, after = pending
        receipt = await upload.run(self._coordinator(), timeout=120)
        feedback.residual = after
        self._measure(measurements.UPLINK_BYTES_PER_SECOND, transfer.throughput(upload.wire, upload.seconds))
        return receipt

    def _measure(self, name: str, value: float | None) -> None:
        """Exponentially weighted, so one odd transfer does not swing the codec choice."""
        if value is None:
            return
        previous = self._measurements.get(name)
        self._measurements[name] = value if previous is None else 0.5 * previous + 0.5 * value
        self._on_measured()

    async def train(self, task: pb.TrainTask, base: HeldVersion) -> tuple[dict[str, np.ndarray], float, float]:
        """Local training from `base`: the update (local minus base), the loss and the seconds it took."""
        def work() -> tuple[dict[str, np.ndarray], float]:
            net = zoo.build_model(task.model)
            training.load_state_arrays(net, base.arrays)
            loss = training.train_local(
                net, self.dataset, task.training.epochs, task.training.batch_size, task.training.learning_rate,
                training.shuffle_seed(task.round, self.client_index), mu=task.training.mu,
            )
            local = training.state_arrays(net)
            return {name: local[name] - base.arrays[name] for name in local}, loss

        start = time.perf_counter()
        delta, loss = await asyncio.to_thread(work)
        seconds = time.perf_counter() - start
        metrics.EDGE_TRAIN_SECONDS.observe(seconds)
        metrics.EDGE_LOCAL_LOSS.set(loss)
        self._measurements[measurements.TRAIN_SECONDS] = seconds
        return delta, loss, seconds
