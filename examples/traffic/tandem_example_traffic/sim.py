"""One simulated day in SUMO, run in-process through libsumo, with connected vehicles that ask a
planner for routes.

SUMO simulates every vehicle (car following, lane changes, junctions, traffic lights);
this module only feeds it the day's vehicles, applies the incident, records what road-side
sensors would see, and relays route requests. libsumo rather than TraCI over a socket: the
same API without a SUMO process and a round trip per call, which matters at over 500 calls per
simulated second. libsumo holds one simulation per process, so a second `Simulation` cannot
start while one is open (a RuntimeError says so).

Readings, per monitored edge and per `interval`: the mean speed (m/s; the mean over the
interval's steps of SUMO's last-step mean speed, which is the lane's current speed limit while
the edge is empty), the occupancy (percent of the edge covered by vehicles, the same mean) and
the flow (vehicles that entered the edge during the interval).

Connected vehicles (a seeded `connected_share` of them) ask the planner at departure, then every
`reroute_every` seconds, and once more when the incident begins. A vehicle inside a junction
asks at its next step on a road. A route is applied only when it starts on the vehicle's edge,
ends at its destination and is drivable; otherwise, or when the planner answers None, the
request counts as failed and the vehicle keeps its route. With no planner at all (planner=None)
nobody asks, and nothing fails: that is "no guidance", distinct from a planner that fails.
"""

from __future__ import annotations

import heapq
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from xml.sax.saxutils import quoteattr

import libsumo as traci
import numpy as np

from .demand import Demand
from .network import Network


@dataclass(frozen=True)
class RouteRequest:
    """A connected vehicle asks for a route from `edge` to `destination` at `time` (s).

    `district` is the district of `edge` (what road-side unit the vehicle talks to); `reason`
    is "depart", "periodic" or "incident".
    """

    vehicle: str
    edge: str
    destination: str
    time: float
    district: int
    reason: str


Planner = Callable[[RouteRequest], list[str] | None]


@dataclass(frozen=True)
class Readings:
    """Per-interval sensor readings, [T, E] in the network's edge order."""

    speed: np.ndarray
    occupancy: np.ndarray
    flow: np.ndarray
    interval: float
    edges: tuple[str, ...]


@dataclass(frozen=True)
class TripRecord:
    """One vehicle's day: scheduled and actual departure, arrival (nan if still driving), and whether connected."""

    vehicle: str
    depart: float
    departed: float
    arrival: float
    connected: bool

    @property
    def travel_time(self) -> float:
        """Seconds from insertion to arrival; nan when the vehicle has not arrived (or not departed)."""
        return self.arrival - self.departed


@dataclass(frozen=True)
class RequestRecord:
    """One route request: whether it was answered with a valid route, and whether that route differed."""

    vehicle: str
    time: float
    reason: str
    district: int
    answered: bool
    changed: bool


@dataclass(frozen=True)
class Result:
    """What a run produced up to `time`: readings, every scheduled trip, every route request, teleports."""

    time: float
    readings: Readings
    trips: tuple[TripRecord, ...]
    requests: tuple[RequestRecord, ...]
    teleports: int

    def travel_times(self, connected: bool | None = None) -> np.ndarray:
        """Travel times (s) of arrived vehicles; only connected ones (True), only others (False), or all."""
        return np.array([t.travel_time for t in self.trips if t.arrival == t.arrival
                         and (connected is None or t.connected == connected)], dtype=np.float64)

    @property
    def failed_requests(self) -> int:
        return sum(not r.answered for r in self.requests)


_open: list[Simulation] = []


@dataclass
class _Vehicle:
    trip: int
    connected: bool
    departed: float = float("nan")
    arrival: float = float("nan")


@dataclass
class _Accumulator:
    """Sums over the current interval's steps."""

    speed: np.ndarray
    occupancy: np.ndarray
    flow: np.ndarray
    steps: int = 0
    on_edge: list[set[str]] = field(default_factory=list)


class Simulation:
    """One day of `demand` on `network` in libsumo; `run` advances it and returns a `Result`.

    `districts` is the partition used to label route requests (see Network.districts). The
    `planner` attribute may be set after construction (a forecast planner that reads this
    simulation's `readings` is built that way).
    """

    def __init__(self, network: Network, demand: Demand, planner: Planner | None = None, *,
                 districts: Sequence[Sequence[str]] | None = None, connected_share: float = 0.3,
                 reroute_every: float = 120.0, interval: float = 60.0, seed: int | None = None,
                 time_to_teleport: float = 300.0, max_drain: float = 1800.0, smoothing: float = 60.0,
                 options: Sequence[str] = ()) -> None:
        if _open:
            raise RuntimeError("Simulation: libsumo runs one simulation per process; close the open one first")
        if not 0 <= connected_share <= 1:
            raise ValueError(f"Simulation: connected_share={connected_share} must be between 0 and 1")
        if interval < 1 or interval != int(interval) or reroute_every <= 0:
            raise ValueError(f"Simulation: interval={interval} must be whole seconds, reroute_every={reroute_every} > 0")
        self.network, self.demand, self.planner = network, demand, planner
        self.interval, self.reroute_every, self.max_drain = float(interval), float(reroute_every), max_drain
        self.seed = demand.seed if seed is None else seed
        parts = districts if districts is not None else [list(network.edges)]
        self._district = {edge: i for i, part in enumerate(parts) for edge in part}
        rng = np.random.default_rng([self.seed, 1])
        self._vehicles = {trip.id: _Vehicle(i, bool(rng.random() < connected_share)) for i, trip in enumerate(demand.trips)}
        self._requests: list[RequestRecord] = []
        self._due: list[tuple[float, str, str]] = []  # (time, vehicle, reason): requests to make
        self._rows: dict[str, list[np.ndarray]] = {"speed": [], "occupancy": [], "flow": []}
        count = len(network.edges)
        self._acc = _Accumulator(np.zeros(count), np.zeros(count), np.zeros(count),
                                 on_edge=[set() for _ in network.edges])
        self._teleports = 0
        self.smoothing = smoothing
        self._live = network.speed_limit.copy()
        self._time = 0.0
        self._lane_speeds: dict[str, float] = {}
        self._tmp = tempfile.TemporaryDirectory(prefix="tandem-traffic-")
        routes = Path(self._tmp.name) / "day.rou.xml"
        _write_routes(routes, demand)
        additional = []
        if network.signals:
            signals = Path(self._tmp.name) / "signals.add.xml"
            signals.write_text(f"<additional>\n{network.signals}\n</additional>\n")
            additional = ["-a", str(signals)]
        traci.start(["sumo", "-n", str(network.path), "-r", str(routes), "--step-length", "1", "--begin", "0",
                     "--seed", str(self.seed), "--time-to-teleport", str(time_to_teleport), "--no-step-log", "true",
                     "--no-warnings", "true", "--duration-log.disable", "true", *additional, *options])
        _open.append(self)

    @property
    def time(self) -> float:
        """Simulated seconds so far."""
        return self._time

    @property
    def readings(self) -> Readings:
        """The readings of every complete interval so far, [T, E]."""
        shape = (0, len(self.network.edges))
        rows = {k: np.array(v, dtype=np.float64) if v else np.zeros(shape) for k, v in self._rows.items()}
        return Readings(rows["speed"], rows["occupancy"], rows["flow"], self.interval, self.network.edges)

    @property
    def detector_speed(self) -> np.ndarray:
        """What the road-side detectors read now (m/s, [E]): SUMO's per-step mean speed (the
        speed limit when empty), smoothed exponentially over `smoothing` seconds so that one
        car waiting at a red light does not make its road look closed. A road-side unit reads
        its own district's columns of this continuously (the per-interval `readings` are the
        same detectors averaged over each interval)."""
        return self._live.copy()

    @property
    def live_speed(self) -> np.ndarray:
        """The oracle's view (m/s, [E]): `detector_speed` everywhere, and an edge under an
        incident's speed limit at most that limit from the incident's first second."""
        live = self._live.copy()
        incident = self.demand.incident
        if incident is not None and incident.active(self._time):
            i = self.network.index[incident.edge]
            live[i] = min(live[i], incident.speed)  # the cut speed limit is known at once, as a closure would be
        return live

    def remaining_route(self, vehicle: str) -> tuple[str, ...]:
        """The edges `vehicle` still has to drive, its current one first (empty if it is not driving)."""
        try:
            route, index = traci.vehicle.getRoute(vehicle), traci.vehicle.getRouteIndex(vehicle)
        except traci.TraCIException:
            return ()
        return tuple(route[index:]) if index >= 0 else ()

    def run(self, until: float | None = None) -> Result:
        """Advance to `until` seconds; None: to the day's end and then until every vehicle has arrived
        (at most `max_drain` seconds more). May be called again to continue."""
        if self not in _open:
            raise RuntimeError("Simulation: already closed")
        end = self.demand.duration + self.max_drain if until is None else until
        while self._time < end:
            if until is None and self._time >= self.demand.duration and traci.simulation.getMinExpectedNumber() == 0:
                break
            self._step()
        return self.result()

    def result(self) -> Result:
        """The `Result` as of now."""
        trips = tuple(TripRecord(trip.id, trip.depart, v.departed, v.arrival, v.connected)
                      for trip, v in zip(self.demand.trips, self._vehicles.values()))
        return Result(self._time, self.readings, trips, tuple(self._requests), self._teleports)

    def _step(self) -> None:
        traci.simulationStep()
        self._time = float(traci.simulation.getTime())
        self._record()
        for vehicle in traci.simulation.getDepartedIDList():
            state = self._vehicles[vehicle]
            state.departed = self._time
            if state.connected and self.planner is not None:
                heapq.heappush(self._due, (self._time, vehicle, "depart"))
        for vehicle in traci.simulation.getArrivedIDList():
            self._vehicles[vehicle].arrival = self._time
        self._teleports += int(traci.simulation.getStartingTeleportNumber())
        self._incident()
        self._ask()

    def _record(self) -> None:
        acc = self._acc
        speeds = np.array([traci.edge.getLastStepMeanSpeed(edge) for edge in self.network.edges])
        self._live += (speeds - self._live) / self.smoothing
        acc.speed += speeds
        for i, edge in enumerate(self.network.edges):
            # SUMO gives the share of the edge's length covered by vehicles (0..1, a little more on
            # very short edges where a car overhangs): as percent, at most 100.
            acc.occupancy[i] += min(100.0, 100.0 * traci.edge.getLastStepOccupancy(edge))
            now = set(traci.edge.getLastStepVehicleIDs(edge))
            acc.flow[i] += len(now - acc.on_edge[i])
            acc.on_edge[i] = now
        acc.steps += 1
        if self._time % self.interval == 0:
            self._rows["speed"].append(acc.speed / acc.steps)
            self._rows["occupancy"].append(acc.occupancy / acc.steps)
            self._rows["flow"].append(acc.flow.copy())
            acc.speed, acc.occupancy, acc.flow = (np.zeros_like(acc.speed) for _ in range(3))
            acc.steps = 0

    def _incident(self) -> None:
        incident = self.demand.incident
        if incident is None:
            return
        if self._time == incident.start:
            for lane in range(traci.edge.getLaneNumber(incident.edge)):
                lane_id = f"{incident.edge}_{lane}"
                self._lane_speeds[lane_id] = float(traci.lane.getMaxSpeed(lane_id))
                traci.lane.setMaxSpeed(lane_id, incident.speed)
            if self.planner is not None:
                for vehicle in traci.vehicle.getIDList():
                    if self._vehicles[vehicle].connected:
                        heapq.heappush(self._due, (self._time, vehicle, "incident"))
        elif self._time == incident.end:
            for lane_id, speed in self._lane_speeds.items():
                traci.lane.setMaxSpeed(lane_id, speed)

    def _ask(self) -> None:
        """Make every request that is due; periodic ones schedule the next."""
        retry: list[tuple[float, str, str]] = []
        while self._due and self._due[0][0] <= self._time:
            _, vehicle, reason = heapq.heappop(self._due)
            state = self._vehicles[vehicle]
            if state.arrival == state.arrival:
                continue  # arrived (or teleported out) before its turn
            edge = traci.vehicle.getRoadID(vehicle)
            if edge not in self.network.index:
                retry.append((self._time + 1, vehicle, reason))  # inside a junction: ask on the next road
                continue
            if reason != "incident":
                heapq.heappush(self._due, (self._time + self.reroute_every, vehicle, "periodic"))
            destination = self.demand.trips[state.trip].destination
            if edge == destination:
                continue
            self._request(RouteRequest(vehicle, edge, destination, self._time, self._district.get(edge, -1), reason))
        for item in retry:
            heapq.heappush(self._due, item)

    def _request(self, request: RouteRequest) -> None:
        assert self.planner is not None
        route = self.planner(request)
        answered = changed = False
        if route is not None and route[0] == request.edge and route[-1] == request.destination \
                and self.network.is_route(route):
            current = traci.vehicle.getRoute(request.vehicle)[traci.vehicle.getRouteIndex(request.vehicle):]
            try:
                traci.vehicle.setRoute(request.vehicle, route)
                answered, changed = True, list(current) != route
            except traci.TraCIException:
                pass  # SUMO refused it (the vehicle cannot reach the next edge from its lane any more)
        self._requests.append(RequestRecord(request.vehicle, request.time, request.reason, request.district,
                                            answered, changed))

    def close(self) -> None:
        """End the SUMO run and free libsumo for the next simulation."""
        if self in _open:
            traci.close()
            _open.remove(self)
            self._tmp.cleanup()

    def __enter__(self) -> Simulation:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.close()


def _write_routes(path: Path, demand: Demand) -> None:
    """The day's vehicles, each with its free-flow route, in departure order (as SUMO requires)."""
    lines = ["<routes>"]
    for trip in demand.trips:
        lines.append(f'  <vehicle id={quoteattr(trip.id)} depart="{trip.depart:.2f}" departLane="best" departSpeed="max">')
        lines.append(f'    <route edges={quoteattr(" ".join(trip.route))}/>')
        lines.append("  </vehicle>")
    lines.append("</routes>")
    path.write_text("\n".join(lines) + "\n")
