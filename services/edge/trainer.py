"""The agent's training tasks: get the task's base version, train on local data that
never leaves the device, upload the update; each step retried until the task's deadline,
and transfers resumed where a reconnect broke them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TypeVar

import grpc
import numpy as np
import torch

from edge.channels import Backoff
from edge.offers import Offers, Prepared
from tandem import compression, measurements, metrics, tasks, training, transfer, wire
from tandem import config as task_config
from tandem.task import TrainContext
from tandem.transfer import HeldVersion
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

# Codes worth trying again: the coordinator is restarting, draining or unreachable.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}

# (task, base version) -> (the update, local loss, seconds spent training)
Train = Callable[[pb.TrainTask, HeldVersion], Awaitable[tuple[dict[str, np.ndarray], float, float]]]
# Tell the coordinator a task will not be trained: (job, round, status code name, reason).
Decline = Callable[[str, int, str, str], None]
# Tell the coordinator a task failed: (job, round, pb.TaskFailure value, one-line detail).
Fail = Callable[[str, int, pb.TaskFailure, str], None]
MAX_DETAIL = 300  # characters of an exception's text a TaskFailed carries
# Words in the message of a RuntimeError, ValueError or IndexError raised by train that
# say the data does not fit the model (torch's and numpy's wording).
_MISMATCH_WORDS = ("shape", "size mismatch", "must match the size", "dimension", "cannot be multiplied",
                   "out of bounds", "expected input", "channels", "mat1 and mat2")


def classify(exc: BaseException) -> pb.TaskFailure:
    """The pb.TaskFailure of an exception raised while training."""
    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError):
        return pb.TASK_FAILURE_OUT_OF_MEMORY
    if isinstance(exc, tasks.UnknownTask | UnknownTask):
        return pb.TASK_FAILURE_TASK_UNKNOWN
    if isinstance(exc, RuntimeError | ValueError | IndexError):
        text = str(exc).lower()
        if any(word in text for word in _MISMATCH_WORDS):
            return pb.TASK_FAILURE_DATA_MISMATCH
    return pb.TASK_FAILURE_EXCEPTION


def failure_detail(exc: BaseException) -> str:
    """`Type: message` on one line, at most MAX_DETAIL characters."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


class UnknownTask(RuntimeError):
    """A TrainTask names a task that is not offered here (any more)."""


class NothingToUpload(Exception):
    """The training step has no update for this round, and no failure to report (a
    region whose own agents missed its quorum): the task is left undone, so that the
    coordinator's next sending of it is tried again."""


class Trainer:
    """Runs the coordinator's training tasks for one agent: a newer round of a job
    supersedes the older one, tasks of different jobs run side by side."""

    def __init__(
        self, offers: Callable[[], Offers], client_index: int,
        coordinator: Callable[[], coordinator_pb2_grpc.CoordinatorStub],
        connected: asyncio.Event, backoff: tuple[float, float], on_measured: Callable[[], None],
        train: Train | None = None, decline: Decline | None = None, fail: Fail | None = None,
    ) -> None:
        """`offers` gives the tasks this agent offers (prepared at its start); `coordinator`
        gives the current stub (channels are remade on reconnects); `connected` is set
        while the control stream is up; `on_measured` is called when a transfer measured
        the link; `train` replaces `self.train` as the training step; `decline` tells the
        coordinator a task will not be trained; `fail` that training it failed."""
        self._offers, self.client_index = offers, client_index
        self._decline, self._fail = decline, fail
        self._failures_seen: set[tuple[str, int, str]] = set()  # (job, reason, detail) logged with a traceback
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
        # (job, round) -> the training's metrics, example count and contributing agents,
        # for the update's header.
        self._results: dict[tuple[str, int], tuple[dict[str, float], int, int]] = {}
        # (job, round) -> seconds by phase (download, train, encode), for the update's header.
        self._phases: dict[tuple[str, int], dict[str, float]] = {}
        # job -> this agent's tensors that never leave it (local layers, integer counters),
        # kept from round to round in memory.
        self._local: dict[str, tuple[int, dict[str, torch.Tensor]]] = {}  # job -> (round, tensors kept here)

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
        if self._refused(task):
            self._done.add(key)
            return
        if running is not None and not running.done():
            if self._training_round.get(task.job_id, 0) >= task.round:
                return  # already on this round, or a newer one
            running.cancel()
        self._training_round[task.job_id] = task.round
        self._training[task.job_id] = asyncio.create_task(self._train_and_upload(key), name=f"train-{key}")

    def prepared(self, task: pb.TrainTask) -> Prepared:
        """The offered task a TrainTask names (checked by `on_task`)."""
        found = self._offers().get(task.model)
        if found is None or found.loaded is None:
            raise UnknownTask(f"task {task.model} is not offered here")
        return found

    def _refused(self, task: pb.TrainTask) -> bool:
        """Whether a TrainTask names a task this agent did not offer ready, or another
        version of it: then it is not trained (one log line, and the coordinator is told)."""
        found = self._offers().get(task.model)
        if found is None:
            code, reason = "NOT_FOUND", f"this agent does not offer task {task.model} (see its --tasks)"
        elif not found.ready or found.loaded is None:
            code, reason = "FAILED_PRECONDITION", f"task {task.model} is not ready here: {found.offer.reason}"
        elif task.task_fingerprint and task.task_fingerprint != found.loaded.fingerprint:
            code, reason = "FAILED_PRECONDITION", (f"task {task.model} has fingerprint {found.loaded.fingerprint} "
                                                   f"here, the coordinator's {task.task_fingerprint}")
        else:
            return False
        metrics.EDGE_TASKS.labels("declined").inc()
        log.warning("job %s round %d: not training: %s", task.job_id, task.round, reason)
        if self._decline is not None:
            self._decline(task.job_id, task.round, code, reason)
        return True

    def cancel(self) -> None:
        """Cancel every running task (the agent is stopping)."""
        for task in self._training.values():
            task.cancel()

    async def _train_and_upload(self, key: tuple[str, int]) -> None:
        task = self._tasks[key]
        try:
            started = time.perf_counter()
            base = await self._retry(key, "download", lambda: self._ensure_model(task))
            phases = self._phases[key] = {"download": time.perf_counter() - started}
            delta, loss, seconds = await self._train_step(task, base)
            phases["train"] = seconds
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
        except NothingToUpload as exc:
            metrics.EDGE_TASKS.labels("skipped").inc()
            log.warning("job %s round %d: no update: %s", task.job_id, task.round, exc)
        except grpc.aio.AioRpcError as exc:
            # Not marked done: if the coordinator sends this task again, it is tried again.
            metrics.EDGE_TASKS.labels("rejected").inc()
            log.warning("job %s round %d: %s %s", task.job_id, task.round, exc.code().name, exc.details())
        except Exception as exc:  # noqa: BLE001 - the task's train can raise anything: reported, not raised
            self._failed(task, exc)
        finally:
            self._tasks = {k: v for k, v in self._tasks.items() if k[0] != key[0] or k[1] >= key[1]}
            self._uploads.pop(key, None)
            self._results.pop(key, None)
            self._phases.pop(key, None)

    def _failed(self, task: pb.TrainTask, exc: Exception) -> None:
        """One log line per failure (a traceback once per kind, at debug level), and the
        coordinator is told why. Not marked done: a task sent again is tried again."""
        metrics.EDGE_TASKS.labels("failed").inc()
        reason, detail = classify(exc), failure_detail(exc)
        name = pb.TaskFailure.Name(reason).removeprefix("TASK_FAILURE_")
        log.warning("job %s round %d: training failed: %s: %s", task.job_id, task.round, name, detail)
        if (task.job_id, reason, detail) not in self._failures_seen:
            self._failures_seen.add((task.job_id, reason, detail))
            log.debug("job %s round %d: the failure's traceback", task.job_id, task.round, exc_info=exc)
        if self._fail is not None:
            self._fail(task.job_id, task.round, reason, detail)

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
            # The job's initial model is the task's model built with a seed: build it, no download needed.
            loaded = tasks.get(task.model)
            arrays = await asyncio.to_thread(lambda: loaded.state_arrays(loaded.build(task.base_seed)))
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
            started = time.perf_counter()
            components, _ = await asyncio.to_thread(trial.compress, delta)
            phases = self._phases.setdefault(key, {})
            phases["encode"] = time.perf_counter() - started
            after = trial.residual
            trained, examples, contributors = self._results.get(key, ({}, self._offers().num_examples, 1))
            header = pb.UpdateHeader(
                job_id=task.job_id, round=task.round, base_version=task.base_version,
                num_examples=examples, codec=task.codec, local_loss=loss, metrics=trained,
                task_fingerprint=self.prepared(task).offer.fingerprint, phase_seconds=phases,
                contributors=contributors if contributors > 1 else 0,
            )
            pending = self._uploads[key] = (transfer.Upload(header, components), after)
        upload, after = pending
        receipt = await upload.run(self._coordinator(), timeout=120)
        feedback.residual = after
        self._measure(measurements.UPLINK_BYTES_PER_SECOND, transfer.throughput(upload.wire, upload.seconds))
        return receipt

    def record(self, task: pb.TrainTask, trained: dict[str, float], examples: int, contributors: int = 1) -> None:
        """What a training step says of its update, for the update's header: its metrics,
        the example count it is weighted by, and the agents behind it (above 1: a
        region's partial aggregate)."""
        self._results[(task.job_id, task.round)] = (trained, examples, contributors)

    def _measure(self, name: str, value: float | None) -> None:
        """Exponentially weighted, so one odd transfer does not swing the codec choice."""
        if value is None:
            return
        previous = self._measurements.get(name)
        self._measurements[name] = value if previous is None else 0.5 * previous + 0.5 * value
        self._on_measured()

    async def train(self, task: pb.TrainTask, base: HeldVersion) -> tuple[dict[str, np.ndarray], float, float]:
        """Local training from `base` with the task's own `train`, on a worker thread: the
        update (federated tensors after minus base), the loss and the seconds it took.
        Tensors that never leave the agent are restored from its last round of the job
        and kept for the next."""
        prepared = self.prepared(task)
        loaded = prepared.loaded
        assert loaded is not None
        config = task_config.from_proto(task.config)

        def work() -> tuple[dict[str, np.ndarray], float, dict[str, float], int, dict[str, torch.Tensor]]:
            model = loaded.build(0)
            loaded.load_arrays(model, base.arrays)
            kept = self._local.get(task.job_id)
            if kept:
                with torch.no_grad():
                    state = model.state_dict()
                    for name, value in kept[1].items():
                        state[name].copy_(value)
            context = TrainContext(round=task.round, seed=training.shuffle_seed(task.round, self.client_index),
                                   device="cpu", global_state=_Snapshot(base.arrays))
            result = loaded.task.train(model, prepared.data, dict(config), context)
            state = model.state_dict()
            local = {name: state[name].detach().clone() for name in loaded.local_keys}
            after = loaded.state_arrays(model)
            values, dropped = task_config.update_metrics(result.metrics)  # what the coordinator takes
            if dropped:
                log.warning("task %s: metrics %s left out of the update (at most %d finite numbers, names of at "
                            "most %d characters)", task.model, dropped[:5], task_config.MAX_UPDATE_METRICS,
                            task_config.MAX_METRIC_NAME)
            return {name: after[name] - base.arrays[name] for name in after}, values.get("loss", 0.0), values, \
                int(result.num_examples), local

        start = time.perf_counter()
        delta, loss, trained, examples, local = await asyncio.to_thread(work)
        # Kept only here, where this round was not superseded: a cancelled round's thread
        # runs on to its end, and must not overwrite a newer round's tensors.
        if task.round >= self._local.get(task.job_id, (0, {}))[0]:
            self._local[task.job_id] = (task.round, local)
        seconds = time.perf_counter() - start
        self.record(task, trained, examples)
        metrics.EDGE_TRAIN_SECONDS.observe(seconds)
        metrics.EDGE_LOCAL_LOSS.set(loss)
        self._measurements[measurements.TRAIN_SECONDS] = seconds
        return delta, loss, seconds


class _Snapshot(Mapping[str, torch.Tensor]):
    """The round's starting weights for `TrainContext.global_state`: a tensor is copied
    on first use (a task may change it in place; the held base must not change), and
    only tensors a task reads cost memory."""

    def __init__(self, arrays: Mapping[str, np.ndarray]) -> None:
        self._arrays = arrays
        self._tensors: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._tensors.get(name)
        if tensor is None:
            tensor = self._tensors[name] = torch.tensor(self._arrays[name])
        return tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._arrays)

    def __len__(self) -> int:
        return len(self._arrays)
