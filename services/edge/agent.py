"""The edge agent daemon: a control stream to the cloud that survives any break, and
the wiring of its parts: training tasks (edge.trainer) and, with `--listen`, local
inference (edge.router, edge.models, edge.link).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from edge import warmup
from edge.channels import REFUSED, Backoff, CloudChannels
from edge.enroll import Renewer
from edge.link import LinkMonitor
from edge.models import EdgeModels
from edge.offers import Offers
from edge.router import EdgeRouter, RouterConfig
from edge.trainer import Trainer
from tandem import __version__, data, measurements, metrics, placement, staged, training, transfer
from tandem.batching import Batcher, keep_profiled
from tandem.certs import agent_paths
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc, inference_pb2_grpc

log = logging.getLogger(__name__)

EARLY_HEARTBEAT_GAP = 0.5  # seconds: at most two heartbeats a second for new measurements
# How a connect that found no coordinator ends: then the next of --fallback is tried.
FAIL_OVER = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


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
    inline_below: float = 0.001  # seconds: a cheaper batch runs on the event loop (tandem.batching)
    max_queue_rows: int = 8192
    max_request_rows: int = 1024
    # Training: the tasks this agent may train (None: every registered one) and its labels.
    tasks: tuple[str, ...] | None = None
    labels: tuple[tuple[str, str], ...] = ()
    warmup: bool = True  # pay torch's first-use costs at start (edge.warmup), not in the first round
    renew: str | None = None  # HOST:PORT of `tandem ca`'s renewal port: renew the certificate before it expires
    # Coordinators tried in turn after a connect to the current one failed (another region,
    # the cloud), back to `cloud` after the last.
    fallbacks: tuple[str, ...] = ()
    # Where this member's certificate and key are in `certs` (a region's are under regions/).
    identity: Callable[[Path, str], tuple[Path, Path]] = agent_paths


class Agent:
    """One edge agent: its control stream and heartbeats, its training tasks, and (with
    `listen`) the local inference the router serves."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self._offers: Offers | None = None  # the tasks offered, prepared once by `prepare`
        self.warmup_seconds = 0.0  # what `prepare` spent warming torch and the tasks up
        self.welcomed = asyncio.Event()  # set while the control stream is up
        self._stub: coordinator_pb2_grpc.CoordinatorStub | None = None  # once run() has opened the channels
        self._channels: CloudChannels | None = None
        self._outgoing: asyncio.Queue[pb.AgentMessage] | None = None  # the open control stream's queue
        self._measurements: dict[str, float] = {}
        self._measured = asyncio.Event()  # a link measurement the coordinator has not heard yet
        self._heartbeat_interval = 5.0  # the coordinator's, from its last Welcome
        self.trainer = Trainer(
            self.offers, client_index(config.agent_id, config.data), self._coordinator, self.welcomed,
            (config.backoff_initial, config.backoff_max), self._measured.set, train=self._train, decline=self._decline,
            fail=self._fail,
        )
        # Versions served here; idle unless `listen` is set (fetched only when wanted).
        self.models = EdgeModels(self._fetch_for_serving, config.device)
        self.router = self._router() if config.listen else None

    async def prepare(self) -> Offers:
        """Load the allowed tasks and the data for each, once, off the event loop, and
        warm torch and them up (tasks.UnknownTask for a task named in --tasks that is not
        installed)."""
        if self._offers is None:
            self._offers = await asyncio.to_thread(self._load_offers)
            if self.config.warmup:  # before the hello: a job's first task then costs what later ones do
                self.warmup_seconds = await asyncio.to_thread(warmup.warm, self._offers)
            self._measurements[measurements.EXAMPLES] = float(self._offers.num_examples)
            ready = [o.name for o in self._offers.offers() if o.ready]
            log.info("offering tasks %s (ready: %s), %d examples", [o.name for o in self._offers.offers()], ready,
                     self._offers.num_examples)
        return self._offers

    def _load_offers(self) -> Offers:
        """The allowed tasks, loaded with this agent's data (blocking: off the event loop)."""
        return Offers.prepare(list(self.config.tasks) if self.config.tasks is not None else None, self.config.data)

    def offers(self) -> Offers:
        """The tasks this agent offers (after `prepare`)."""
        if self._offers is None:
            raise RuntimeError("the agent's tasks are not prepared: Agent.prepare (or run) prepares them")
        return self._offers

    def _decline(self, job_id: str, round_: int, code: str, reason: str) -> None:
        if self._outgoing is not None:
            self._outgoing.put_nowait(pb.AgentMessage(declined=pb.TaskDeclined(
                job_id=job_id, round=round_, code=code, reason=reason)))

    def _fail(self, job_id: str, round_: int, reason: pb.TaskFailure, detail: str) -> None:
        # Not connected: nothing is sent; the coordinator re-sends the task on a reconnect.
        if self._outgoing is not None:
            self._outgoing.put_nowait(pb.AgentMessage(failed=pb.TaskFailed(
                job_id=job_id, round=round_, reason=reason, detail=detail)))

    @property
    def held(self) -> dict[str, transfer.HeldVersion]:
        """The version of each model that training last started from."""
        return self.trainer.held

    def _router(self) -> EdgeRouter:
        cfg = self.config
        placements = placement.parse_all(list(cfg.placements))
        link = LinkMonitor(self._probe, cfg.probe_interval, on_measure=self._measure_link)
        router = EdgeRouter(
            self.models, link, Batcher(cfg.max_batch, cfg.max_delay, cfg.max_queue_rows, name="edge-infer",
                                      inline_below=cfg.inline_below if staged.resolve_device(cfg.device) == "cpu" else 0.0),
            placements, RouterConfig(max_request_rows=cfg.max_request_rows, cloud_timeout=cfg.cloud_timeout),
        )
        for name, chosen in placements.items():
            router.set_placement(name, chosen, len(staged.describe(name)[1]))
        self.models.want(sorted(placements))
        return router

    async def run(self, stop: asyncio.Event) -> None:
        """Keep a control stream open until `stop` is set, reconnecting with backoff."""
        await self.prepare()
        if self.config.identity is agent_paths:  # a region's member: the region says its tier
            metrics.TIER.labels("edge", self.config.agent_id).set(1)
        channels = CloudChannels(self.config.certs, self.config.agent_id, self.config.cloud, self.config.inference_cloud,
                                 self.config.identity, self.config.fallbacks)
        self._channels = channels
        await channels.open()
        self._use(channels)
        prober: asyncio.Task[None] | None = None
        profiler: asyncio.Task[None] | None = None
        renewer: asyncio.Task[None] | None = None
        if self.config.renew is not None:
            async def renewed() -> None:  # new calls on the new certificate; the control stream stays up
                if await channels.refresh():
                    self._use(channels)

            renewer = asyncio.create_task(
                Renewer(self.config.certs, self.config.agent_id, self.config.renew, renewed).run(), name="renewer")
        if self.router is not None:
            prober = asyncio.create_task(self.router.link.run(), name="link-probe")
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
                elif code == grpc.StatusCode.ALREADY_EXISTS:
                    # Our own stream, broken silently, that the coordinator has not given up yet (it
                    # does after two heartbeat intervals), or another process with this identity:
                    # tried again within a heartbeat interval, so that the former is short.
                    delay = min(backoff.next_delay(), self._heartbeat_interval)
                    log.warning("the coordinator has another control stream of this agent; trying again in %.1f s",
                                delay)
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
                elif not welcomed and code in FAIL_OVER and await channels.fail_over():
                    self._use(channels)
                channels.drop_retired()  # the stream that used them has ended
        finally:
            self.trainer.cancel()
            if self.router is not None:
                self.router.close()
            for background in (prober, profiler, renewer):
                if background is not None:
                    background.cancel()
            await channels.close()

    def _target(self) -> str:
        return self._channels.target if self._channels is not None else self.config.cloud

    def _use(self, channels: CloudChannels) -> None:
        assert channels.coordinator is not None and channels.inference is not None
        self._stub = coordinator_pb2_grpc.CoordinatorStub(channels.coordinator)
        if self.router is not None:
            self.router.cloud = inference_pb2_grpc.InferenceStub(channels.inference)

    def _coordinator(self) -> coordinator_pb2_grpc.CoordinatorStub:
        """The coordinator's stub on the current channels (remade when certificates change)."""
        if self._stub is None:
            raise RuntimeError("the agent's channels are not open: Agent.run opens them")
        return self._stub

    async def _session(self) -> tuple[bool, grpc.StatusCode]:
        """One control stream; returns whether the coordinator welcomed us, and how it ended."""
        outgoing: asyncio.Queue[pb.AgentMessage] = asyncio.Queue()
        self._outgoing = outgoing
        outgoing.put_nowait(pb.AgentMessage(hello=self._hello()))

        async def requests() -> AsyncIterator[pb.AgentMessage]:
            while True:
                yield await outgoing.get()

        call = self._coordinator().Connect(requests())
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
                    self._heartbeat_interval = interval
                    heartbeat = asyncio.create_task(self._heartbeats(outgoing, interval))
                    log.info("connected to %s as %s", self._target(), message.welcome.agent_id)
                    for notice in message.welcome.models:
                        self._announced(notice)
                elif kind == "task":
                    self.trainer.on_task(message.task)
                elif kind == "model":
                    what = "new candidate version"
                    if message.model.serving:
                        what = "canary of a staged rollout" if message.model.canary else "serving version"
                    log.info("%s: %s v%d", what, message.model.model, message.model.version)
                    self._announced(message.model)
                elif kind == "placement":
                    await self._place(message.placement)
                elif kind == "shutdown":
                    log.info("coordinator says: %s", message.shutdown.reason)
                    break
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            log.warning("control stream broke: %s %s", exc.code().name, exc.details())
        finally:
            transfer.count_call("Connect", code)
            self._outgoing = None
            self.welcomed.clear()
            metrics.EDGE_CONNECTED.set(0)
            if heartbeat is not None:
                heartbeat.cancel()
            call.cancel()
        return welcomed, code

    def _hello(self) -> pb.Hello:
        """What this member says of itself when its control stream opens."""
        offers = self.offers()
        return pb.Hello(
            agent_version=__version__, num_examples=offers.num_examples, device="cpu",
            models={name: held.version for name, held in self.held.items()},
            labels=dict(self.config.labels), tasks=offers.offers(),
        )

    async def _heartbeats(self, outgoing: asyncio.Queue[pb.AgentMessage], interval: float) -> None:
        """A heartbeat every `interval`, and sooner when a new measurement is in, but not
        within `EARLY_HEARTBEAT_GAP` of the last one: an agent uploading several times a
        second, or forwarding requests that each measure the link, would otherwise go over
        the coordinator's heartbeat rate and have its control stream closed."""
        self._measured.clear()
        seq = 0
        loop = asyncio.get_running_loop()
        last = loop.time() - EARLY_HEARTBEAT_GAP
        while True:
            try:
                async with asyncio.timeout(interval):
                    await self._measured.wait()
                await asyncio.sleep(last + EARLY_HEARTBEAT_GAP - loop.time())  # returns at once if negative
            except TimeoutError:
                pass
            last = loop.time()
            self._measured.clear()
            seq += 1
            self._measurements.update(self.trainer.measurements())
            serving: list[pb.ServingSignals] = []
            if self.router is not None:
                self._measurements.update(self.router.measurements())
                serving = self.router.signals.drain()  # what the canary judgement of a rollout reads
            outgoing.put_nowait(pb.AgentMessage(heartbeat=pb.Heartbeat(seq=seq, measurements=self._measurements,
                                                                       serving=serving)))

    # ---- inference -------------------------------------------------------------

    async def _place(self, decision: pb.PlacementDecision) -> None:
        """Apply the controller's (or a pinned) placement; the next request follows it."""
        if self.router is None:
            return
        await staged.prepare([decision.model])  # a model's split points are found off the loop
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
            self.models.announce(notice.model, notice.version, notice.sha256, notice.serving, notice.canary)

    async def _fetch_for_serving(
        self, model: str, version: int, sha: str, held: transfer.HeldVersion | None
    ) -> Mapping[str, np.ndarray]:
        """A version to serve: the one held for training if it is that one, else downloaded."""
        trained = self.trainer.held.get(model)
        if trained is not None and trained.version == version and trained.sha256 == sha:
            return trained.arrays
        specs = await asyncio.to_thread(training.state_specs, model)  # a first load of the task: off the loop
        # A failure is retried at the next request, ModelNotice or reconnect (EdgeModels).
        return await transfer.Download(model, version, sha, specs, held).run(self._coordinator(), timeout=120)

    async def _probe(self, timeout: float, size: int) -> None:
        await self._coordinator().Probe(pb.ProbeRequest(payload=bytes(size)), timeout=timeout)

    def _measure_link(self, name: str, value: float) -> None:
        self._measurements[name] = value  # the next heartbeat carries it

    async def _train(
        self, task: pb.TrainTask, base: transfer.HeldVersion
    ) -> tuple[dict[str, np.ndarray], float, float]:
        """Every task's training step (Trainer.train); a subclass may change the update
        here (tandem_lab.hostile poisons it)."""
        return await self.trainer.train(task, base)


def client_index(agent_id: str, spec: str) -> int:
    """This agent's index in the training seeds (`training.shuffle_seed`): I of a
    `digits:I/N` spec (so that the reference workload matches its simulation), else
    from the agent's name, so that agents on other data do not all shuffle alike."""
    if data.parse_digits_spec(spec) is not None:
        return data.partition_index(spec)
    return int(hashlib.sha256(agent_id.encode()).hexdigest()[:8], 16) % 1000
