"""A simulated day's demand: who drives from where to where, when, and one incident.

Choices, and why:

* Time-varying rate. Departures follow a Poisson process whose rate (vehicles per minute over
  the whole network) is `base` for the first sixth of the day, ramps linearly to `peak` over
  the second sixth, holds it through the middle third, ramps back down over the fifth sixth and
  is `base` again at the end. The defaults (12 and 50 vehicles a minute, about 1,850 a
  60-minute day) are tuned on Braunschweig so that the peak congests while the quiet hours
  flow freely: on the 20 busiest edges the mean speed falls from 95% of the limit to 65-75%
  over the peak (70-80% without the incident; the 20 slowest edges to 35-50%) and trips take
  1.5 to 2.5 times as long as in the quiet hours, yet the network drains. At 55 and above,
  some days gridlock around the central crossing and SUMO resolves it by teleporting hundreds
  of vehicles. A forecaster has something to learn, and a planner something to avoid. The
  profile is relative to the day's length, so a short test day has the same shape (with a
  shorter peak that needs a steeper rate to congest).
* Trips. Origin and destination are drawn uniformly among the monitored edges; a pair is kept
  only when the destination is reachable and the trip crosses at least `MIN_EDGES` edges. Each
  trip carries its free-flow shortest route (length over speed limit): that is the route of a
  driver without guidance, fixed at departure. We route here rather than letting SUMO route
  trips at insertion, because SUMO's router weighs edges by their *current* speed limits and
  so quietly avoids the incident's edge once its limit is cut (checked with
  simulation.findRoute); a driver with a paper map cannot.
* The incident. One busy edge (among the `INCIDENT_CANDIDATES` edges that most peak-time
  routes use, and only one around which the network offers a detour) has its speed limit set
  to `incident_speed` (1 m/s: an accident blocking all but a crawl) for half the peak, starting
  in the first quarter of it. A crawl rather than closing the lanes to cars: SUMO 1.28 ends
  the whole run ("has no valid route", a FatalTraCIError) as soon as a vehicle whose route
  enters a closed lane reaches it, whereas at 1 m/s the queue keeps moving and the jam spills
  back as a real one would (seeds 0-4: 0 to 19 teleports over a day, against 0 to 2 without
  the incident). Free-flow routing cannot foresee it.

Everything is drawn from one `numpy.random.Generator` seeded with the seed: the same seed gives
the same day, trip for trip.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np

from .network import Network

MIN_EDGES = 3
INCIDENT_CANDIDATES = 8
# Tuned on Braunschweig (174 edges, 14 km of road): see the module docstring.
BASE_RATE = 12.0
PEAK_RATE = 50.0


@dataclass(frozen=True)
class Trip:
    """One vehicle: its scheduled departure (s), origin and destination edges, and free-flow route."""

    id: str
    depart: float
    origin: str
    destination: str
    route: tuple[str, ...]


@dataclass(frozen=True)
class Incident:
    """The speed limit on `edge` is `speed` (m/s) from `start` to `end` (s into the day)."""

    edge: str
    start: float
    end: float
    speed: float = 1.0

    def active(self, time: float) -> bool:
        return self.start <= time < self.end


def rate(fraction: float, base: float, peak: float) -> float:
    """Vehicles per minute at `fraction` (0..1) of the day: base, ramp, peak in the middle third, ramp, base."""
    edges = (1 / 6, 1 / 3, 2 / 3, 5 / 6)
    if fraction < edges[0] or fraction >= edges[3]:
        return base
    if fraction < edges[1]:
        return base + (peak - base) * (fraction - edges[0]) / (edges[1] - edges[0])
    if fraction < edges[2]:
        return peak
    return peak - (peak - base) * (fraction - edges[2]) / (edges[3] - edges[2])


def peak_window(minutes: float) -> tuple[float, float]:
    """The peak's start and end in seconds into a day of `minutes`."""
    return minutes * 60 / 3, minutes * 60 * 2 / 3


@dataclass(frozen=True)
class Demand:
    """A day of `minutes`: its trips in departure order, and the incident (or None)."""

    seed: int
    minutes: int
    base_rate: float
    peak_rate: float
    trips: tuple[Trip, ...]
    incident: Incident | None

    @property
    def duration(self) -> float:
        """The day's length in seconds."""
        return float(self.minutes * 60)

    def departures_per_minute(self) -> np.ndarray:
        """How many trips are scheduled in each minute of the day, [minutes]."""
        counts = np.zeros(self.minutes, dtype=np.int64)
        for trip in self.trips:
            counts[min(int(trip.depart // 60), self.minutes - 1)] += 1
        return counts

    @classmethod
    def generate(cls, network: Network, seed: int = 0, minutes: int = 60, *, base_rate: float = BASE_RATE,
                 peak_rate: float = PEAK_RATE, incident: bool = True, incident_speed: float = 1.0) -> Demand:
        """Draw the day for `seed` (see the module docstring for the choices)."""
        if minutes < 1:
            raise ValueError(f"Demand: minutes={minutes} must be at least 1")
        if not 0 <= base_rate <= peak_rate:
            raise ValueError(f"Demand: rates must satisfy 0 <= base_rate ({base_rate}) <= peak_rate ({peak_rate})")
        rng = np.random.default_rng(seed)
        free = network.free_flow_cost()
        trips: list[Trip] = []
        seconds = minutes * 60
        for second in range(seconds):
            expected = rate(second / seconds, base_rate, peak_rate) / 60
            # Sorted within the second: SUMO ignores vehicles listed out of departure order.
            for offset in np.sort(rng.random(int(rng.poisson(expected)))):
                depart = second + float(offset)
                origin, destination, route = _draw_pair(network, free, rng)
                trips.append(Trip(f"v{len(trips)}", round(depart, 2), origin, destination, tuple(route)))
        chosen = _incident(network, trips, minutes, rng, incident_speed) if incident else None
        return cls(seed, minutes, base_rate, peak_rate, tuple(trips), chosen)


def _draw_pair(network: Network, free: dict[str, float], rng: np.random.Generator) -> tuple[str, str, list[str]]:
    edges = network.edges
    while True:
        origin, destination = (edges[int(i)] for i in rng.choice(len(edges), size=2, replace=False))
        route = network.shortest_path(origin, destination, free)
        if route is not None and len(route) >= MIN_EDGES:
            return origin, destination, route


def _incident(network: Network, trips: list[Trip], minutes: int, rng: np.random.Generator, speed: float) -> Incident:
    """A busy edge with a detour, during the first half of the peak (see the module docstring)."""
    start, end = peak_window(minutes)
    busy = Counter(edge for trip in trips if start <= trip.depart < end for edge in trip.route[1:-1])
    candidates = [edge for edge, _ in sorted(busy.items(), key=lambda item: (-item[1], item[0]))
                  if _has_detour(network, edge, trips)][:INCIDENT_CANDIDATES]
    if not candidates:
        raise ValueError("Demand: no trip uses an edge with a detour around it; the day is too short for an incident")
    edge = candidates[int(rng.integers(len(candidates)))]
    length = end - start
    begin = start + float(rng.uniform(0, length / 4))
    return Incident(edge, round(begin), round(begin + length / 2), speed)


def _has_detour(network: Network, edge: str, trips: list[Trip]) -> bool:
    """Whether most trips through `edge` could reach their destination without it."""
    through = [trip for trip in trips if edge in trip.route[1:-1]][:20]
    blocked = network.free_flow_cost()
    blocked[edge] = float("inf")
    detours = 0
    for trip in through:
        route = network.shortest_path(trip.origin, trip.destination, blocked)
        detours += route is not None and edge not in route
    return bool(through) and detours >= 0.8 * len(through)
