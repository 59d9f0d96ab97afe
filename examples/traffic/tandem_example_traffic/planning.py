"""Route planning across road-side units (edge) and the cloud, from Tandem-served forecasts.

Each district's road-side unit (`RoadSideUnit`) reads only its own district's detectors:
continuously (the smoothed speed of each of its edges now) and per interval (the readings
its forecaster takes). Every interval it asks its own `tandem edge` agent (Inference,
model `traffic-speed`) for forecasts of its edges 1, 5 and 10 minutes ahead: the inputs are
its last readings, which never leave the district for anything but that agent. While its
link is up it reports to the cloud every `PUSH_EVERY` seconds (its edges' speeds now and its
latest forecasts: never the readings) and pulls the cloud's view of the other districts
every `SYNC_EVERY` seconds, so its view of them is up to that stale, and frozen while its
link is cut.

A view of a district that is stale is where the federated forecaster earns its place:
`estimate` prices such a district's edges with the forecast whose horizon is nearest to the
report's age (a report 5 minutes old: the 5-minute forecast made with it), and a fresh one
with its speeds now (fresher than any forecast: the 1-minute forecast planned worse than
the latest speeds, docs/traffic.md).

Planning is a shortest path (network.shortest_path) on edge costs: length over the estimated
speed, the speed limit where nothing is known. The strategies:

- `edge`: the district's unit plans with its own speeds now and its stale copy of the
  others' reports; it always answers (its agent answers locally whatever the link).
- `cloud`: the cloud plans with every district's latest report; a request from a district
  whose link is cut cannot reach it and fails.
- `collaborative`, a cascade: the edge answers first (a route the vehicle can always use),
  and when the district's link is up the cloud refines it with the global view. The cloud
  holds the same district's speeds (at most PUSH_EVERY old) and fresher reports of the
  others, so refining whenever the link allows cannot make its information worse, and a cut
  link costs only the refinement. While a district's link is cut the cloud's view of it
  ages, and the cloud prices it with that district's last forecasts.
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
from tandem_example_traffic.planners import MIN_SPEED, costs_from_speeds, keep_or_best
from tandem_example_traffic.sim import Readings, RouteRequest
from tandem_example_traffic.windows import HORIZONS, WINDOW, window_features

log = logging.getLogger(__name__)

MODEL = "traffic-speed"
PUSH_EVERY = 1.0
"""Seconds between a unit's reports to the cloud while its link is up (one number per edge
of the district: a few hundred bytes)."""
SYNC_EVERY = 300.0
"""Seconds between a unit's pulls of the cloud's view of the other districts."""
FRESH = 60.0
"""A report younger than this is priced with its speeds now; older, with its forecasts."""
HYSTERESIS = 0.0
"""A vehicle keeps its own route unless another is this much faster on the same costs. 0:
with speeds refreshed every second a margin only holds vehicles on routes that have become
slower (the oracle: 0.81 of free flow's peak travel time without one, 0.86 with 15%, over 10
days). It paid only while costs changed once a minute and every vehicle that asked in that
minute was sent the same way (docs/traffic.md)."""


@dataclass(frozen=True)
class Report:
    """What a unit sends up: its edges' speeds (m/s) at `time`, and the forecasts it made at
    `forecast_time` (minutes ahead -> edge -> m/s; empty before its first forecast)."""

    time: float
    speeds: Mapping[str, float]
    forecast_time: float = -1.0
    ahead: Mapping[int, Mapping[str, float]] = field(default_factory=dict)


def estimate(reports: Mapping[int, Report], now: float) -> dict[str, float]:
    """The best estimate now of every reported edge's speed: a report younger than FRESH
    gives its speeds; an older one the forecast whose horizon is nearest to the forecast's
    age (its speeds if it holds no forecast)."""
    out: dict[str, float] = {}
    for report in reports.values():
        if now - report.time < FRESH or not report.ahead:
            out.update(report.speeds)
            continue
        age = (now - report.forecast_time) / 60
        out.update(report.ahead[min(report.ahead, key=lambda minutes: abs(minutes - age))])
    return out


@dataclass
class Link:
    """Whether a district's link to the cloud is up (the benchmark cuts the agent's real
    link through a relay at the same moments)."""

    up: bool = True


class CloudView:
    """The cloud's global view: each district's latest report."""

    def __init__(self) -> None:
        self.reports: dict[int, Report] = {}

    def push(self, district: int, report: Report) -> None:
        self.reports[district] = report

    def snapshot(self, exclude: int) -> dict[int, Report]:
        """The reports of every district but `exclude` (what a unit pulls)."""
        return {d: r for d, r in self.reports.items() if d != exclude}

    def speeds(self, now: float) -> dict[str, float]:
        return estimate(self.reports, now)

    def age(self, district: int, now: float) -> float:
        """How stale the cloud's view of `district` is (inf: never heard)."""
        known = self.reports.get(district)
        return now - known.time if known else float("inf")


class RoadSideUnit:
    """One district's unit: its detectors, forecasts from its agent, its view of the others."""

    def __init__(self, district: int, edges: Sequence[str], network: Network, target: str, certs: Path,
                 client: str, link: Link, cloud: CloudView, day_intervals: int,
                 detectors: Callable[[], np.ndarray]) -> None:
        self.district, self.edges, self.link, self.cloud = district, list(edges), link, cloud
        self.day_intervals = day_intervals  # T of the training days: time of day is a fraction of it
        self.detectors = detectors  # every edge's detector speed now, [E]: the unit reads its own columns
        self._index = np.array([network.index[e] for e in self.edges])
        self._free = network.speed_limit[self._index].astype(np.float32)
        self._channel = grpc.secure_channel(target, tls.app_credentials(certs, client))
        self._stub = inference_pb2_grpc.InferenceStub(self._channel)
        self.forecast_time = -1.0
        self.ahead: dict[int, dict[str, float]] = {}
        self.others: dict[int, Report] = {}  # the cloud's reports of the other districts, as last pulled
        self._pushed = self._pulled = -float("inf")
        self.inference_failures = 0
        self.placements: dict[str, int] = {}  # where the agent answered: edge, cloud, split

    def forecast(self, readings: Readings, now: float) -> None:
        """Forecast this district's edges from its last WINDOW intervals."""
        t = readings.speed.shape[0]
        if t < WINDOW:
            return
        rows = slice(t - WINDOW, t)
        x = window_features(readings.speed[rows][:, self._index], readings.occupancy[rows][:, self._index],
                            readings.flow[rows][:, self._index], self._free, t - 1, self.day_intervals)
        try:
            answer = self._stub.Infer(ipb.InferRequest(model=MODEL, input=wire.to_proto(x)), timeout=10)
        except grpc.RpcError as exc:
            self.inference_failures += 1
            log.warning("district %d: its agent did not forecast: %s", self.district, exc)
            return
        ratios = wire.from_proto(answer.output)
        where = ipb.Placement.Name(answer.placement).removeprefix("PLACEMENT_").lower()
        self.placements[where] = self.placements.get(where, 0) + 1
        minutes = [int(h * readings.interval // 60) for h in HORIZONS]
        self.forecast_time = now
        self.ahead = {m: {e: float(max(r * f, MIN_SPEED)) for e, r, f in zip(self.edges, ratios[:, k], self._free)}
                      for k, m in enumerate(minutes)}

    def own(self) -> dict[str, float]:
        """Its edges' detector speeds now."""
        return dict(zip(self.edges, self.detectors()[self._index].tolist()))

    def sync(self, now: float) -> None:
        """Report to the cloud and pull the others' reports when due and the link is up."""
        if not self.link.up:
            return
        if now - self._pushed >= PUSH_EVERY:
            self._pushed = now
            self.cloud.push(self.district, Report(now, self.own(), self.forecast_time, self.ahead))
        if now - self._pulled >= SYNC_EVERY:
            self._pulled = now
            self.others = self.cloud.snapshot(exclude=self.district)

    def speeds(self, now: float) -> dict[str, float]:
        return {**estimate(self.others, now), **self.own()}

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
    _forecast: int = field(default=-1)

    def tick(self) -> None:
        """Forecast once per completed interval; report and pull when due."""
        now = self.now()
        done = int(now // self.interval)
        if done != self._forecast:
            self._forecast = done
            readings = self.readings()
            for unit in self.units:
                unit.forecast(readings, now)
        for unit in self.units:
            unit.sync(now)

    def edge(self, request: RouteRequest) -> list[str] | None:
        self.tick()
        return self._plan(request, self.units[request.district].speeds(self.now()))

    def cloud_only(self, request: RouteRequest) -> list[str] | None:
        self.tick()
        if not self.units[request.district].link.up:
            return None  # the request cannot reach the cloud
        return self._plan(request, self.cloud.speeds(self.now()))

    def collaborative(self, request: RouteRequest) -> list[str] | None:
        route = self.edge(request)
        if self.units[request.district].link.up:
            route = self._plan(request, self.cloud.speeds(self.now())) or route
        return route

    def _plan(self, request: RouteRequest, speeds: Mapping[str, float]) -> list[str] | None:
        """The fastest route on these speeds, unless the vehicle's own route is within
        HYSTERESIS of it (then its own: the vehicle tells its route with its request)."""
        cost = costs_from_speeds(self.network, speeds)  # the speed limit where nothing is known
        best = self.network.shortest_path(request.edge, request.destination, cost)
        own = self.current_route(request.vehicle) if HYSTERESIS else ()
        return keep_or_best(self.network, request, best, own, cost, HYSTERESIS)
