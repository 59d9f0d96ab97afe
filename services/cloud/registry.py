"""Agents with an open control stream, and the queues that feed their streams."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tandem import measurements, metrics
from tandem.certs import REGION_PREFIX
from tandem.errors import Aborted, AlreadyExists, TandemError
from tandem.v1 import coordinator_pb2 as pb


@dataclass
class Session:
    """One open control stream. `queue` holds messages for the agent; None ends it."""

    agent_id: str
    hello: pb.Hello
    peer: str = ""  # the agent's address, as gRPC names it ("ipv4:10.0.0.7:51234")
    connected_since: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    measurements: dict[str, float] = field(default_factory=dict)
    queue: asyncio.Queue[pb.CoordinatorMessage | None] = field(default_factory=asyncio.Queue)
    ended_by: TandemError | None = None  # why the coordinator ended the stream, if for a reason to tell

    @property
    def is_region(self) -> bool:
        return self.agent_id.startswith(REGION_PREFIX)

    @property
    def agents(self) -> int:
        """The agents this member stands for: 1, or a region's as its last heartbeat (else
        its Hello) says."""
        if not self.is_region:
            return 1
        agents = self.measurements.get(measurements.AGENTS, float(self.hello.agents))
        return max(1, int(agents)) if math.isfinite(agents) else 1

    @property
    def examples(self) -> int:
        """The examples this member holds: its Hello's, or a region's agents' now."""
        if self.is_region and measurements.EXAMPLES in self.measurements:
            examples = self.measurements[measurements.EXAMPLES]
            return int(examples) if math.isfinite(examples) and examples >= 0 else 0
        return int(self.hello.num_examples)

    def send(self, message: pb.CoordinatorMessage) -> None:
        self.queue.put_nowait(message)

    def close(self, reason: TandemError | None = None) -> None:
        if reason is not None and self.ended_by is None:
            self.ended_by = reason
        self.queue.put_nowait(None)


ConnectListener = Callable[[Session], None]


class Registry:
    """Who is connected right now: one session per agent.

    A second Connect of an agent whose control stream is live is refused ALREADY_EXISTS,
    naming the agent and where its stream comes from: two processes with one identity
    (a copied certificate, a second `tandem edge`) must not evict each other. A stream
    is live while its agent was heard (Hello or heartbeat) within `stale_after` seconds,
    two heartbeat intervals. An agent that reconnects after its link broke silently may
    find its old stream not yet noticed dead (the keepalive takes up to 40 s): once that
    stream has been silent for `stale_after`, the new Connect replaces it, and the old
    one ends ABORTED. Such an agent is back within about `stale_after` plus its retry
    delay (edge.agent retries ALREADY_EXISTS within a heartbeat interval). How often an
    agent may try is limited per second (cloud.limits).
    """

    def __init__(self, stale_after: float = 10.0) -> None:
        self.stale_after = stale_after
        self._sessions: dict[str, Session] = {}
        # Heartbeat measurements per agent, kept across reconnects (a link is still
        # the same link after a new session).
        self._measurements: dict[str, dict[str, float]] = {}
        self._listeners: list[ConnectListener] = []
        self._changed = asyncio.Condition()

    def add_listener(self, listener: ConnectListener) -> None:
        self._listeners.append(listener)

    def remove_listener(self, listener: ConnectListener) -> None:
        if listener in self._listeners:
            self._listeners.remove(listener)

    async def connect(self, agent_id: str, hello: pb.Hello, peer: str = "") -> Session:
        """A session for the agent's new control stream; AlreadyExists while it has a live one."""
        old = self._sessions.get(agent_id)
        if old is not None:
            silent = time.time() - old.last_seen
            if silent < self.stale_after:
                metrics.AGENT_CONNECTS_REFUSED.inc()
                raise AlreadyExists(
                    f"agent {agent_id!r} is already connected from {old.peer or 'another address'} (heard "
                    f"{silent:.1f} s ago); a second control stream of the same identity is refused. Is another "
                    f"process using this agent's certificate? (a stream silent for {self.stale_after:g} s is "
                    "replaced)", reason="duplicate")
            old.close(Aborted(f"replaced by a newer control stream of agent {agent_id!r} from {peer or 'elsewhere'}: "
                              f"this one was silent for {silent:.1f} s"))
        session = Session(agent_id, hello, peer, measurements=self._measurements.setdefault(agent_id, {}))
        self._sessions[agent_id] = session
        metrics.CONNECTED_AGENTS.set(len(self._sessions))
        metrics.AGENT_CONNECTS.inc()
        await self._notify()
        return session

    def announce(self, session: Session) -> None:
        """Tell listeners (job runners) that the session is ready for work."""
        for listener in list(self._listeners):
            listener(session)

    async def disconnect(self, session: Session) -> None:
        if self._sessions.get(session.agent_id) is session:
            del self._sessions[session.agent_id]
            metrics.CONNECTED_AGENTS.set(len(self._sessions))
            await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_changed(self, timeout: float) -> None:
        """Return when an agent connects or disconnects, or after `timeout` seconds."""
        async with self._changed:
            try:
                async with asyncio.timeout(timeout):  # not wait_for: on 3.11 it can swallow a cancellation
                    await self._changed.wait()
            except TimeoutError:
                pass

    def measurements(self, agent_id: str) -> dict[str, float]:
        return self._measurements.get(agent_id, {})

    def get(self, agent_id: str) -> Session | None:
        return self._sessions.get(agent_id)

    def connected(self) -> list[str]:
        return sorted(self._sessions)

    def sessions(self) -> list[Session]:
        return [self._sessions[a] for a in sorted(self._sessions)]

    def send(self, agent_id: str, message: pb.CoordinatorMessage) -> bool:
        session = self._sessions.get(agent_id)
        if session is None:
            return False
        session.send(message)
        return True

    def broadcast(self, message: pb.CoordinatorMessage) -> None:
        for session in self._sessions.values():
            session.send(message)

    def close_all(self, reason: str) -> None:
        for session in self._sessions.values():
            session.send(pb.CoordinatorMessage(shutdown=pb.Shutdown(reason=reason)))
            session.close()
