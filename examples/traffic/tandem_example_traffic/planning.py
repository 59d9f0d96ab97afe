"""Route planning across road-side units (edge) and the cloud, from Tandem-served forecasts.

Each district's road-side unit (`RoadSideUnit`) reads only its own district's detectors.
Every interval it asks its own `tandem edge` agent (Inference, model `traffic-speed`)
for speed forecasts of its edges: the inputs are the last readings of its detectors,
which never leave the district for anything but that agent. It pushes its forecasts
(not its readings) up to the cloud when its link is up, and pulls the cloud's view of
the other districts every `sync_every` seconds: its view of them is stale by up to that
long, and frozen while its link is cut.

`CloudView` is the cloud's global view: every district's latest forecasts, as fresh as
each district's link lets them be.

Planning is a shortest path (network.shortest_path) on edge costs: the edge's length
over its forecast speed 1 minute ahead (see HORIZON), the speed limit where nothing is
known; a vehicle keeps its own route unless another is HYSTERESIS faster. The strategies:

- `edge`: the district's unit plans with its own fresh forecasts and its stale copy of
  the others'; it always answers (its agent answers locally whatever the link).
- `cloud`: the cloud plans with the global view; a request from a district whose link
  is cut cannot reach it and fails.
- `collaborative`: a cascade: the edge answers first (a route the vehicle can always
  use), and when the district's link is up the cloud refines it with the global view.
  The cloud's view is never worse than the edge's (it holds the same district's fresh
  forecasts, and fresher ones of the others), so refining whenever the link allows can
  only help, and a cut link costs nothing but that refinement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from tandem import tls, wire
from tandem.v1 import inference_pb2 as ipb
from tandem.v1 import inference_pb2_grpc
from tandem_example_traffic.network import Network
from tandem_example_traffic.planners import MIN_SPEED, costs_from_speeds
from tandem_example_traffic.sim import Readings, RouteRequest
from tandem_example_traffic.windows import WINDOW, window_features

log = logging.getLogger(__name__)

MODEL = "traffic-speed"
# The forecast 1 minute ahead (windows.HORIZONS[0]) prices the edges: routing every guided
# vehicle on the 5-minute forecast was worse than free flow on the benchmark's days (the
# forecasts regress towards the day's pattern, and a route is re-planned every 2 minutes
# anyway), while the latest speeds with a hysteresis beat it (docs/traffic.md).
HORIZON = 0
# A vehicle changes route only for one at least this much faster on the same costs: with
# 30% of vehicles guided, switching on any gain herds them from one street to the next
# (measured on three held-out days: 0.15 beat both 0 and 0.3 on each).
HYSTERESIS = 0.15


@dataclass
class Forecast:
    """Forecast speeds (m/s) of some edges, made at `time` (simulated seconds)."""

    time: float
    speeds: dict[str, float]


@dataclass
class Link:
    """Whether a district's link to the cloud is up (the benchmark cuts the agent's real
    link through a relay at the same moments)."""

    up: bool = True


class CloudView:
    """The cloud's global view: each district's latest forecasts, pushed by its unit."""

    def __init__(self) -> None:
        self.districts: dict[int, Forecast] = {}

    def push(self, district: int, forecast: Forecast) -> None:
        self.districts[district] = forecast

    def speeds(self) -> dict[str, float]:
        return {edge: v for f in self.districts.values() for edge, v in f.speeds.items()}

    def age(self, district: int, now: float) -> float:
        """How stale the cloud's view of `district` is (inf: never heard)."""
        known = self.districts.get(district)
        return now - known.time if known else float("inf")


class RoadSideUnit:
    """One district's unit: forecasts from its agent, its view of the others."""

    def __init__(self, district: int, edges: Sequence[str], network: Network, target: str, certs: Path,
                 client: str, link: Link, cloud: CloudView, day_intervals: int, sync_every: float = 300.0) -> None:
        self.district, self.edges, self.link, self.cloud = district, list(edges), link, cloud
        self.day_intervals = day_intervals  # T of the training days: time of day is a fraction of it
        self._index = np.array([network.index[e] for e in self.edges])
        self._free = network.speed_limit[self._index].astype(np.float32)
        self._channel = grpc.secure_channel(target, tls.app_credentials(certs, client))
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self.sync_every = sync_every
        self.own = Forecast(-1.0, {})
        self.others = Forecast(-1.0, {})  # the cloud's view of the other districts, as last synced
        self.inference_failures = 0
        self.placements: dict[str, int] = {}  # where the agent answered: edge, cloud, split

    def refresh(self, readings: Readings, now: float) -> None:
        """Forecast this district's edges from its last WINDOW intervals, push them up and
        pull the others' when the link is up."""
        t = readings.speed.shape[0]
        if t >= WINDOW:
            rows = slice(t - WINDOW, t)
            x = window_features(readings.speed[rows][:, self._index], readings.occupancy[rows][:, self._index],
                                readings.flow[rows][:, self._index], self._free, t - 1, self.day_intervals)
            try:
                answer = self._stub.Infer(ipb.InferRequest(model=MODEL, input=wire.to_proto(x.astype(np.float32))),
                                          timeout=10)
                ratios = wire.from_proto(answer.output)[:, HORIZON]
                where = ipb.Placement.Name(answer.placement).removeprefix("PLACEMENT_").lower()
                self.placements[where] = self.placements.get(where, 0) + 1
                self.own = Forecast(now, {e: float(max(r * f, MIN_SPEED))
                                          for e, r, f in zip(self.edges, ratios, self._free)})
            except grpc.RpcError as exc:
                self.inference_failures += 1
                log.warning("district %d: its agent did not forecast: %s", self.district, exc)
        if self.link.up:
            if self.own.time >= 0:
                self.cloud.push(self.district, self.own)
            if now - self.others.time >= self.sync_every:
                self.others = Forecast(now, self.cloud.speeds())

    def speeds(self) -> dict[str, float]:
        return {**self.others.speeds, **self.own.speeds}

    def close(self) -> None:
        self._channel.close()


@dataclass
class Planners:
    """The three Tandem strategies over one set of road-side units and the cloud view."""

    network: Network
    units: list[RoadSideUnit]
    cloud: CloudView
    readings: Callable[[], Readings]
    now: Callable[[], float]
    interval: float
    current_route: Callable[[str], Sequence[str]]  # a vehicle's remaining route, from its current edge
    _refreshed: int = field(default=-1)

    def tick(self) -> None:
        """Refresh every unit once per completed interval."""
        done = int(self.now() // self.interval)
        if done != self._refreshed:
            self._refreshed = done
            readings = self.readings()
            for unit in self.units:
                unit.refresh(readings, self.now())

    def edge(self, request: RouteRequest) -> list[str] | None:
        self.tick()
        return self._plan(request, self.units[request.district].speeds())

    def cloud_only(self, request: RouteRequest) -> list[str] | None:
        self.tick()
        if not self.units[request.district].link.up:
            return None  # the request cannot reach the cloud
        return self._plan(request, self.cloud.speeds())

    def collaborative(self, request: RouteRequest) -> list[str] | None:
        route = self.edge(request)
        if self.units[request.district].link.up:
            route = self._plan(request, self.cloud.speeds()) or route
        return route

    def _plan(self, request: RouteRequest, speeds: Mapping[str, float]) -> list[str] | None:
        """The fastest route on these speeds, unless the vehicle's own route is within
        HYSTERESIS of it (then its own: the vehicle tells its route with its request)."""
        cost = costs_from_speeds(self.network, speeds)  # the speed limit where nothing is known
        best = self.network.shortest_path(request.edge, request.destination, cost)
        own = list(self.current_route(request.vehicle))
        if best is not None and own and own[0] == request.edge and own[-1] == request.destination \
                and self.network.route_cost(own, cost) <= (1 + HYSTERESIS) * self.network.route_cost(best, cost):
            return own
        return best
