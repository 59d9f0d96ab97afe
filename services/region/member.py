"""A region towards its parent: one member, as an agent is, with the region's own
certificate. What it trains is a round over its agents (region.relay); what it offers
is every task installed here; what it says of itself is its agents (how many, and their
examples), in its Hello and, as they come and go, in its heartbeats."""

from __future__ import annotations

import asyncio
import logging
import time

import numpy as np

from cloud.app import Coordinator
from edge.agent import Agent, AgentConfig
from edge.offers import Offers, Prepared
from edge.trainer import NothingToUpload
from region.relay import Relay
from tandem import measurements, metrics, tasks, training, transfer
from tandem.errors import TandemError
from tandem.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

COUNT_INTERVAL = 1.0  # seconds between looks at how many agents the region holds


def relayed_offers(names: tuple[str, ...] | None) -> Offers:
    """The tasks a region offers its parent: every installed one (or `names`), ready. It
    holds no data: its agents do, and each of them says what it can train."""
    prepared = []
    for name in names if names is not None else tasks.names():
        try:
            loaded = tasks.get(name)
        except tasks.TaskError as exc:
            if names is not None:
                raise
            log.warning("task %s cannot be loaded; not offered: %s", name, exc)
            continue
        prepared.append(Prepared(name, loaded, None, pb.TaskOffer(name=name, fingerprint=loaded.fingerprint,
                                                                  ready=True)))
    return Offers(prepared)


class RegionMember(Agent):
    """The region's control stream to its parent, its training tasks relayed to the
    region's agents, and the parent's promoted versions served here."""

    def __init__(self, config: AgentConfig, coordinator: Coordinator, relay: Relay) -> None:
        super().__init__(config)
        self._region = coordinator
        self._relay = relay
        self._serving: set[asyncio.Task[None]] = set()

    def _agents(self) -> tuple[int, int]:
        """(agents, their examples) connected to the region now."""
        sessions = self._region.registry.sessions()
        return len(sessions), sum(int(s.hello.num_examples) for s in sessions)

    def _load_offers(self) -> Offers:
        return relayed_offers(self.config.tasks)

    def _hello(self) -> pb.Hello:
        hello = super()._hello()
        hello.agents, hello.num_examples = self._agents()
        return hello

    async def run(self, stop: asyncio.Event) -> None:
        counter = asyncio.create_task(self._count(stop), name="region-agents")
        try:
            await super().run(stop)
        finally:
            counter.cancel()
            for task in self._serving:
                task.cancel()

    async def _count(self, stop: asyncio.Event) -> None:
        """The parent hears of agents coming and going in the next heartbeat."""
        while not stop.is_set():
            agents, examples = self._agents()
            metrics.REGION_AGENTS.set(agents)
            if self._measurements.get(measurements.AGENTS) != agents:
                self._measurements[measurements.AGENTS] = float(agents)
                self._measurements[measurements.EXAMPLES] = float(examples)
                self._measured.set()
            await asyncio.sleep(COUNT_INTERVAL)

    async def _train(self, task: pb.TrainTask, base: transfer.HeldVersion) -> tuple[dict[str, np.ndarray], float, float]:
        started = time.perf_counter()
        try:
            partial = await self._relay.relay(task, base)
        except NothingToUpload:
            metrics.REGION_PARTIALS.labels("skipped").inc()
            raise
        metrics.REGION_PARTIALS.labels("ready").inc()
        seconds = time.perf_counter() - started
        metrics.REGION_ROUND_SECONDS.observe(seconds)
        self._measurements[measurements.REGION_ROUND_SECONDS] = seconds  # the parent's `tandem agents` shows it
        self._measured.set()
        # The header's example count is an integer: the region's total, rounded (capped
        # agents' weights may be fractional).
        self.trainer.record(task, partial.metrics, max(1, round(partial.weight)), partial.contributors)
        log.info("parent job %s round %d: partial aggregate of %d agents, weight %g", task.job_id, task.round,
                 partial.contributors, partial.weight)
        return partial.mean, partial.loss, time.perf_counter() - started

    def _announced(self, notice: pb.ModelNotice) -> None:
        """A version the parent now serves is served here too: the region's agents forward
        their cloud requests to it, not past it."""
        if notice.serving and not notice.canary:
            task = asyncio.create_task(self._serve(notice), name=f"serve-{notice.model}")
            self._serving.add(task)
            task.add_done_callback(self._serving.discard)

    async def _serve(self, notice: pb.ModelNotice) -> None:
        models = self._region.models
        try:
            held = self.trainer.held.get(notice.model)
            if held is None or held.sha256 != notice.sha256:
                specs = await asyncio.to_thread(training.state_specs, notice.model)
                arrays = await transfer.Download(notice.model, notice.version, notice.sha256, specs,
                                                 held).run(self._coordinator(), timeout=120)
                held = transfer.HeldVersion(notice.version, notice.sha256, arrays)
            version = await self._relay.base(notice.model, held)
            serving = models.serving(notice.model)
            if serving is None or serving.version != version:
                models.promote(notice.model, version, "region", f"the parent serves {notice.model} "
                                                                 f"v{notice.version}")
                log.info("serving the parent's %s v%d here as v%d", notice.model, notice.version, version)
        except (TandemError, ValueError, transfer.ModelMismatch) as exc:
            log.warning("could not serve the parent's %s v%d here: %s", notice.model, notice.version, exc)
        except Exception as exc:  # noqa: BLE001 - a failed download: tried again at the next notice or reconnect
            log.warning("could not fetch the parent's %s v%d: %s", notice.model, notice.version, exc)
