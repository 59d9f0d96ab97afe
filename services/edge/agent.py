"""The edge agent daemon: a control stream to the cloud that survives any break,
and local training on data that never leaves the device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np

from edge.channels import REFUSED, Backoff, CloudChannels
from edge.link import LinkMonitor
from edge.models import EdgeModels
from edge.router import EdgeRouter, RouterConfig
from tandem import (
    __version__,
    codec,
    compression,
    data,
    measurements,
    metrics,
    placement,
    staged,
    training,
    transfer,
    zoo,
)
from tandem.batching import Batcher, keep_profiled
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc, inference_pb2_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

# Codes worth trying again: the coordinator is restarting, draining or unreachable.
RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


@dataclass(frozen=True)
class AgentConfig:
    cloud: str
    certs: Path
    agent_id: str
    data: str
    metrics: str | None = None
    health: str | None = None  # plaintext health-only port for probes that cannot present a certificate
    backoff_initial: float = 0.5
    backoff_max: float = 15.0
    # Inference for local applications (served when `listen` is set).
    listen: str | None = None
    inference_cloud: str | None = None  # where cloud and split requests go; None: the coordinator (`cloud`)
    placements: tuple[str, ...] = ()  # MODEL=MODE
    cloud_timeout: float = 1.0
    probe_interval: float = 2.0
    device: str = "cpu"
    max_batch: int = 64
    max_delay: float = 0.002
    max_queue_rows: int = 8192
    max_request_rows: int = 1024


# The former name of transfer.HeldVersion; tandem_cli.hostile still imports it.
HeldModel = transfer.HeldVersion


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.dataset = data.load_data(config.data)
        self.client_index = data.partition_index(config.data)
        self.held: dict[str, transfer.HeldVersion] = {}
        self.welcomed = asyncio.Event()
        self._tasks: dict[tuple[str, int], pb.TrainTask] = {}  # newest message for each (job, round)
        self._done: set[tuple[str, int]] = set()
        self._training: dict[str, asyncio.Task[None]] = {}  # job -> its running task
        self._training_round: dict[str, int] = {}  # job -> the round of that task
        self._feedback: dict[str, compression.ErrorFeedback] = {}  # job -> error-feedback residual
        self._downloads: dict[tuple[str, int], transfer.Download] = {}
        self._uploads: dict[tuple[str, int], tuple[transfer.Upload, dict[str, np.ndarray]]] = {}
        self._measurements: dict[str, float] = {measurements.EXAMPLES: float(len(self.dataset))}
        self._measured = asyncio.Event()  # a link measurement the coordinator has not heard yet
        self.router = self._router() if config.listen else None

    def _router(self) -> EdgeRouter:
        cfg = self.config
        placements = placement.parse_all(list(cfg.placements))
        self.models = EdgeModels(self._fetch_for_serving, cfg.device)
        self.link = LinkMonitor(self._probe, cfg.probe_interval, on_measure=self._measure_link)
        router = EdgeRouter(
            self.models, self.link, Batcher(cfg.max_batch, cfg.max_delay, cfg.max_queue_rows, name="edge-infer"),
            placements, RouterConfig(max_request_rows=cfg.max_request_rows, cloud_timeout=cfg.cloud_timeout),
        )
        for name, chosen in placements.items():
            router.set_placement(name, chosen, len(staged.describe(name)[1]))
        self.models.want(sorted(placements))
        return router

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a control stream open until `stop` is set, reconnecting with backoff."""
        channels = CloudChannels(self.config.certs, self.config.agent_id, self.config.cloud, self.config.inference_cloud)
        await channels.open()
        self._use(channels)
        prober: asyncio.Task[None] | None = None
        profiler: asyncio.Task[None] | None = None
        if self.router is not None:
            prober = asyncio.create_task(self.link.run(), name="link-probe")
            profiler = asyncio.create_task(keep_profiled(self.router.batcher, self.models.served, 5.0))
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_max)
        try:
            while not stop.is_set():
                session = asyncio.create_task(self._session())
                stopper = asyncio.create_task(stop.wait())
                await asyncio.wait({session, stopper}, return_when=asyncio.FIRST_COMPLETED)
                stopper.cancel()
                if not session.done():
                    session.cancel()
                    break
                welcomed, code = session.result()
                if welcomed:
                    backoff.reset()
                if code in REFUSED:  # revoked, or a certificate of the wrong role: no use hurrying
                    delay = backoff.cap
                    log.error("the coordinator refuses this agent's certificate (%s); trying again every %.0f s, "
                              "serving local requests meanwhile", code.name, delay)
                else:
                    delay = backoff.next_delay()
                    log.info("control stream closed; reconnecting in %.1f s", delay)
                metrics.EDGE_RECONNECTS.inc()
                try:
                    async with asyncio.timeout(delay):
                        await stop.wait()
                except TimeoutError:
                    pass
                if await channels.refresh():
                    self._use(channels)
        finally:
            for task in self._training.values():
                task.cancel()
            for background in (prober, profiler):
                if background is not None:
                    background.cancel()
            await channels.close()

    def _use(self, channels: CloudChannels) -> None:
        assert channels.coordinator is not None and channels.inference is not None
        self._stub = coordinator_pb2_grpc.CoordinatorStub(channels.coordinator)
        if self.router is not None:
            self.router.cloud = inference_pb2_grpc.InferenceStub(channels.inference)

    async def _session(self) -> tuple[bool, grpc.StatusCode]:
        """One control stream; returns whether the coordinator welcomed us, and how it ended."""
        outgoing: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
        outgoing.put_nowait(pb.AgentMessage(hello=pb.Hello(
            agent_version=__version__, num_examples=len(self.dataset), device="cpu",
            models={name: held.version for name, held in self.held.items()},
        )))

        async def requests() -> AsyncIterator[pb.AgentMessage]:
            while True:
                yield await outgoing.get()

        call = self._stub.Connect(requests())
        heartbeat: asyncio.Task[None] | None = None
        welcomed = False
        code = grpc.StatusCode.OK
        try:
            async for message in call:
                kind = message.WhichOneof("kind")
                if kind == "welcome":
                    welcomed = True
                    self.welcomed.set()
                    metrics.EDGE_CONNECTED.set(1)
                    interval = message.welcome.heartbeat_interval_seconds or 5.0
                    heartbeat = asyncio.create_task(self._heartbeats(outgoing, interval))
                    log.info("connected to %s as %s", self.config.cloud, message.welcome.agent_id)
                    for notice in message.welcome.models:
                        self._announced(notice)
                elif kind == "task":
                    self._on_task(message.task)
                elif kind == "model":
                    log.info("new global version: %s v%d", message.model.model, message.model.version)
                    self._announced(message.model)
                elif kind == "placement":
                    self._place(message.placement)
                elif kind == "shutdown":
                    log.info("coordinator says: %s", message.shutdown.reason)
                    break
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            log.warning("control stream broke: %s %s", exc.code().name, exc.details())
        finally:
            transfer.count_call("Connect", code)
            self.welcomed.clear()
            metrics.EDGE_CONNECTED.set(0)
            if heartbeat is not None:
                heartbeat.cancel()
            call.cancel()
        return welcomed, code

    async def _heartbeats(self, outgoing: asyncio.Queue[pb.AgentMessage], interval: float) -> None:
        """A heartbeat every `interval`, and at once when a new link measurement is in."""
        self._measured.clear()
        seq = 0
        while True:
            try:
                async with asyncio.timeout(interval):
                    await self._measured.wait()
            except TimeoutError:
                pass
            self._measured.clear()
            seq += 1
            if self.router is not None:
                self._measurements.update(self.router.measurements())
            outgoing.put_nowait(pb.AgentMessage(heartbeat=pb.Heartbeat(seq=seq, measurements=self._measurements)))

    # ---- inference -------------------------------------------------------------

    def _place(self, decision: pb.PlacementDecision) -> None:
        """Apply the controller's (or a pinned) placement; the next request follows it."""
        if self.router is None:
            return
        try:
            chosen = placement.parse(decision.model, decision.placement)
        except (ValueError, KeyError) as exc:
            log.warning("ignoring placement %s for %s: %s", decision.placement, decision.model, exc)
            return
        before = self.router.placement(decision.model)
        self.router.set_placement(decision.model, chosen, len(staged.describe(decision.model)[1]))
        if chosen != before:
            log.info("placement of %s: %s -> %s (%s)", decision.model, before, chosen,
                     "pinned by an operator" if decision.pinned else "the cloud's placement controller")

    def _announced(self, notice: pb.ModelNotice) -> None:
        if self.router is not None:
            self.models.announce(notice.model, notice.version, notice.sha256)

    async def _fetch_for_serving(
        self, model: str, version: int, sha: str, held: transfer.HeldVersion | None
    ) -> Mapping[str, np.ndarray]:
        """A version to serve: the one held for training if it is that one, else downloaded."""
        trained = self.held.get(model)
        if trained is not None and trained.version == version and trained.sha256 == sha:
            return trained.arrays
        specs = training.state_specs(model)
        # A failure is retried at the next request, ModelNotice or reconnect (EdgeModels).
        return await transfer.Download(model, version, sha, specs, held).run(self._stub, timeout=120)

    async def _probe(self, timeout: float, size: int) -> None:
        await self._stub.Probe(pb.ProbeRequest(payload=bytes(size)), timeout=timeout)

    def _measure_link(self, name: str, value: float) -> None:
        self._measurements[name] = value  # the next heartbeat carries it

    # ---- training tasks --------------------------------------------------------

    def _on_task(self, task: pb.TrainTask) -> None:
        """Start a task, unless it is already running or done; a newer round of the
        same job supersedes the older one, tasks of different jobs run side by side."""
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

    async def _train_and_upload(self, key: tuple[str, int]) -> None:
        task = self._tasks[key]
        try:
            base = await self._retry(key, "download", lambda: self._ensure_model(task))
            delta, loss, seconds = await self._train(task, base)
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
        backoff = Backoff(self.config.backoff_initial, self.config.backoff_max)
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
                await self.welcomed.wait()

    async def _ensure_model(self, task: pb.TrainTask) -> transfer.HeldVersion:
        held = self.held.get(task.model)
        if held is not None and held.version == task.base_version and held.sha256 == task.base_sha256:
            return held
        if task.HasField("base_seed"):
            # The job's initial model is a seeded zoo model: build it, no download needed.
            arrays = await asyncio.to_thread(lambda: training.state_arrays(zoo.build_model(task.model, task.base_seed)))
            if codec.state_sha256(arrays) == task.base_sha256:
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
            arrays = await download.run(self._stub, timeout=120)
        except transfer.ModelMismatch:
            # Start over, and as a whole model: whatever went wrong is not repeated.
            self._downloads[key] = transfer.Download(task.model, task.base_version, task.base_sha256,
                                                     download.specs)
            raise
        del self._downloads[key]
        self._measure(measurements.DOWNLINK_BYTES_PER_SECOND, transfer.throughput(download.wire, download.seconds))
        return self._hold(task, arrays)

    def _hold(self, task: pb.TrainTask, arrays: dict[str, np.ndarray]) -> transfer.HeldVersion:
        held = transfer.HeldVersion(task.base_version, task.base_sha256, arrays)
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
        receipt = await upload.run(self._stub, timeout=120)
        feedback.residual = after
        self._measure(measurements.UPLINK_BYTES_PER_SECOND, transfer.throughput(upload.wire, upload.seconds))
        return receipt

    def _measure(self, name: str, value: float | None) -> None:
        """Exponentially weighted, so one odd transfer does not swing the codec choice."""
        if value is None:
            return
        previous = self._measurements.get(name)
        self._measurements[name] = value if previous is None else 0.5 * previous + 0.5 * value
        self._measured.set()

    async def _train(self, task: pb.TrainTask, base: transfer.HeldVersion) -> tuple[dict[str, np.ndarray], float, float]:
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

