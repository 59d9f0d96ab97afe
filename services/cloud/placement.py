"""The placement controller: observe, decide, push down the control stream, export.

Every `interval` it reads observations (Prometheus or the direct source), filters them
(cloud.placement_filter: stage times over recent ticks, link change points), asks the
policy for decisions and sends each agent the placements that changed (and all of
them when it reconnects). An operator's pin overrides the policy for that agent and
model until unpinned; pins are kept in the store, so they survive restarts.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from cloud.observations import Source
from cloud.placement_filter import ObservationFilter
from cloud.placement_policy import Decision, PolicyConfig, decide
from cloud.registry import Registry, Session
from cloud.store import Store
from tandem import certs, metrics, placement, staged
from tandem.errors import InvalidArgument, NotFound
from tandem.timestamps import timestamp
from tandem.v1 import admin_pb2
from tandem.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (agent, model)


@dataclass(frozen=True)
class ControllerConfig:
    interval: float = 1.0
    policy: PolicyConfig = field(default_factory=PolicyConfig)


def split_text(model: str, k: int, policy: PolicyConfig = PolicyConfig()) -> str:
    """The placement string of option k (L + 1 is the model's cascade, if offered)."""
    stages = len(staged.describe(model)[1])
    option = policy.cascades.get(model)
    if option is not None:
        if k == 0:
            return option.all_cloud
        return f"cascade:{option.threshold:g}" + (f":{option.cloud_model}" if option.cloud_model else "")
    return "cloud" if k == 0 else "edge" if k >= stages else f"split:{k}"


class PlacementController:
    def __init__(self, source: Source, registry: Registry, store: Store, config: ControllerConfig) -> None:
        self._source, self._registry, self._store, self.config = source, registry, store, config
        self.decisions: dict[Key, Decision] = {}
        self._pins = store.pins()
        self._sent: dict[Key, str] = {}  # what each agent was last told
        self._since: dict[Key, float] = {}  # wall time of the last change, for Admin
        self._filter = ObservationFilter()
        registry.add_listener(self._on_connect)

    def _on_connect(self, session: Session) -> None:
        # A reconnected agent starts from its flags: tell it everything again, now.
        agent = session.agent_id
        for key in [k for k in self._sent if k[0] == agent]:
            del self._sent[key]
        for key in sorted(set(self.decisions) | set(self._pins)):
            if key[0] == agent:
                decision = self.decisions.get(key)
                self._push(key, self._text(key), decision.cost if decision else 0.0)

    def _text(self, key: Key) -> str:
        pinned = self._pins.get(key)
        return pinned if pinned is not None else split_text(key[1], self.decisions[key].split, self.config.policy)

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except Exception:
                log.exception("placement tick failed; keeping the current placements")
            await asyncio.sleep(self.config.interval)

    async def tick(self) -> None:
        observations, changed = self._filter.apply(await self._source.observe())
        await staged.prepare(model for _, model in self._pins)  # pins loaded from the store
        self.decisions = decide(observations, self.decisions, self.config.policy, frozenset(self._pins), changed)
        connected = set(self._registry.connected())
        if log.isEnabledFor(logging.DEBUG):  # the prices behind decisions that did not change, too
            for key, held in sorted(self.decisions.items()):
                log.debug("placement costs %s %s: %s [%s]", *key, split_text(key[1], held.split, self.config.policy),
                          ", ".join(f"k={k}: {1000 * c:.1f} ms" for k, c in enumerate(held.costs)))
        for key in sorted(set(self.decisions) | set(self._pins)):
            agent, model = key
            text = self._text(key)
            metrics.PLACEMENT_SPLIT_LAYER.labels(agent, model).set(
                placement.parse(model, text).gauge(len(staged.describe(model)[1]))
            )
            if agent in connected and self._sent.get(key) != text:
                decision = self.decisions.get(key)
                self._push(key, text, decision.cost if decision else 0.0)

    def _push(self, key: Key, text: str, cost: float) -> None:
        agent, model = key
        decision = self.decisions.get(key)
        options = ", ".join(f"k={k}: {1000 * c:.1f} ms" for k, c in enumerate(decision.costs)) if decision else ""
        log.info("placement %s %s -> %s (%s) [%s]", agent, model, text, "pinned" if key in self._pins else
                 f"predicted {1000 * cost:.1f} ms", options)
        message = pb.CoordinatorMessage(placement=pb.PlacementDecision(
            model=model, placement=text, predicted_seconds=cost, pinned=key in self._pins))
        if self._registry.send(agent, message):
            if self._sent.get(key) not in (None, text):
                metrics.PLACEMENT_SWITCHES.labels(model).inc()
            self._sent[key] = text
            self._since[key] = time.time()

    # ---- Admin ---------------------------------------------------------------------

    def list(self, agent: str = "", model: str = "") -> list[admin_pb2.PlacementInfo]:
        keys = sorted(set(self.decisions) | set(self._pins))
        result = []
        for key in keys:
            if (agent and key[0] != agent) or (model and key[1] != model):
                continue
            decision = self.decisions.get(key)
            text = self._text(key)
            result.append(admin_pb2.PlacementInfo(
                agent=key[0], model=key[1], placement=text, pinned=key in self._pins,
                predicted_seconds=decision.costs if decision else (),
                since=timestamp(self._since.get(key, decision.since if decision else time.time())),
            ))
        return result

    def pin(self, agent: str, model: str, text: str) -> admin_pb2.PlacementInfo:
        if not agent or not model:
            raise InvalidArgument("agent and model are required")
        try:
            certs.validate_name(agent)  # it becomes a metric label and a row: no arbitrary strings
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        try:
            chosen = placement.parse(model, text)
        except KeyError as exc:
            raise NotFound(str(exc.args[0])) from None
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        self._pins[(agent, model)] = str(chosen)
        self._store.set_pin(agent, model, str(chosen))
        if agent in self._registry.connected():
            self._push((agent, model), str(chosen), 0.0)
        return self.list(agent, model)[0]

    def unpin(self, agent: str, model: str) -> admin_pb2.PlacementInfo:
        if (agent, model) not in self._pins:
            raise NotFound(f"no pinned placement for agent {agent!r} and model {model!r}")
        del self._pins[(agent, model)]
        self._store.set_pin(agent, model, None)
        self._sent.pop((agent, model), None)  # the policy's choice goes down at the next tick
        found = self.list(agent, model)
        return found[0] if found else admin_pb2.PlacementInfo(agent=agent, model=model)
