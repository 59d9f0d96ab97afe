"""A region's two sides, built and wired here: the coordinator its agents connect to,
and the member its parent sees."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path

from cloud.app import CloudConfig, Coordinator
from cloud.placement import ControllerConfig
from edge.agent import AgentConfig
from region.member import RegionMember
from region.relay import Relay
from tandem import certs, metrics

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionConfig:
    parent: str  # HOST:PORT of the parent coordinator (the cloud, or a region above)
    name: str  # the region's name: its certificate is regions/NAME.pem in `certs`
    certs: Path
    listen: str
    state: Path
    metrics: str | None = None
    health: str | None = None
    min_clients: int = 1  # agents a local round needs before the parent's deadline
    clients_per_round: int = 0  # agents a local round selects (0: every eligible connected one)
    heartbeat_interval: float = 5.0
    tasks: tuple[str, ...] | None = None  # offered to the parent (None: every installed one)
    backoff_initial: float = 0.5
    backoff_max: float = 15.0


class Region:
    """A coordinator under the region's certificate, with its own state, and the member
    that relays the parent's tasks to it."""

    def __init__(self, config: RegionConfig) -> None:
        if config.min_clients < 1:
            raise ValueError(f"--min-clients must be at least 1, got {config.min_clients}")
        if config.clients_per_round and config.clients_per_round < config.min_clients:
            raise ValueError(f"--clients-per-round ({config.clients_per_round}) must be 0 (all) or at least "
                             f"--min-clients ({config.min_clients})")
        self.config = config
        identity = certs.region_paths(config.certs, config.name)
        for path in identity:
            if not path.exists():
                raise FileNotFoundError(f"no {path}: run `tandem certs add-region {config.name} --dir {config.certs}`")
        self.coordinator = Coordinator(CloudConfig(
            listen=config.listen, certs=config.certs, state=config.state, metrics=config.metrics,
            health=config.health, heartbeat_interval=config.heartbeat_interval, identity=identity,
            # Its agents' placements are decided here, from their links to the region: the
            # tier their cloud requests reach.
            placement=ControllerConfig(),
        ))
        self.relay = Relay(self.coordinator, config.state / "relay", config.min_clients, config.clients_per_round)
        self.member = RegionMember(AgentConfig(
            cloud=config.parent, certs=config.certs, agent_id=config.name, data="", tasks=config.tasks,
            warmup=False, identity=certs.region_paths, backoff_initial=config.backoff_initial,
            backoff_max=config.backoff_max,
        ), self.coordinator, self.relay)
        self._member_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()

    @property
    def port(self) -> int:
        return self.coordinator.port

    async def start(self) -> None:
        """Serve the region's agents, then connect to the parent."""
        await self.coordinator.start()
        metrics.TIER.labels("region", self.config.name).set(1)
        self._member_task = asyncio.create_task(self.member.run(self._stop), name="region-member")
        log.info("region %s serving its agents on port %d; parent %s", self.config.name, self.port,
                 self.config.parent)

    async def stop(self) -> None:
        """Leave the parent, then drain the agents' side (a second call does nothing)."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._member_task is not None:
            await self._member_task
        await self.coordinator.stop()
