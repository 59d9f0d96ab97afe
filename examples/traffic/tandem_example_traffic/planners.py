"""Route planners that need no learning, and one that plans on any source of edge costs.

A planner is a callable `plan(request: RouteRequest) -> list[str] | None` (sim.Planner). The
baselines bracket what a learned forecast can achieve:

* no guidance: pass `planner=None` to the Simulation. Nobody asks, so nothing fails; the
  vehicles drive the free-flow route they left with. `no_guidance` is that None, named.
* `free_flow`: shortest path on length over speed limit, i.e. a map without traffic. It
  differs from no guidance only in re-planning from wherever the vehicle is.
* `oracle`: shortest path on the true current travel time of every edge (length over the
  mean speed of the vehicles on it over the last minute or so; the speed limit when empty,
  so an incident's speed cut shows at once). Full information at request time, but no
  foresight: the bound for planning on the present, not on the future.
* `ForecastPlanner`: shortest path on costs from any callable, e.g. per-edge speeds forecast
  by a model that Tandem serves, turned into seconds by `costs_from_speeds`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from .network import Network
from .sim import Planner, RouteRequest, Simulation

no_guidance: Planner | None = None
"""No planner: Simulation(planner=None). Vehicles keep their departure route; no request is made."""

MIN_SPEED = 0.5
"""m/s: a forecast or measured speed below this counts as this, so a stopped edge costs a long,
finite time (length / 0.5) rather than infinity, and routes through it remain comparable."""


def free_flow(network: Network) -> Planner:
    """Plans on free-flow times: what a map without traffic information would suggest."""
    cost = network.free_flow_cost()

    def plan(request: RouteRequest) -> list[str] | None:
        return network.shortest_path(request.edge, request.destination, cost)

    return plan


def oracle(simulation: Simulation) -> Planner:
    """Plans on the true travel time of every edge now: length over `simulation.live_speed`.

    Full information at request time, no foresight. The speeds are SUMO's per-step mean speeds
    smoothed over a minute, not SUMO's instantaneous `edge.getTraveltime`: a single car
    stopped at a red light makes that read its road as closed, and an oracle on it detours so
    eagerly that its vehicles arrive later than with no guidance at all.
    """
    network = simulation.network
    cache: dict[float, dict[str, float]] = {}

    def plan(request: RouteRequest) -> list[str] | None:
        if request.time not in cache:
            cache.clear()
            cache[request.time] = costs_from_speeds(network, simulation.live_speed)
        return network.shortest_path(request.edge, request.destination, cache[request.time])

    return plan


def costs_from_speeds(network: Network, speeds: np.ndarray | Mapping[str, float]) -> dict[str, float]:
    """Per-edge seconds from per-edge speeds (m/s): length / max(speed, MIN_SPEED).

    `speeds` is an [E] array in the network's edge order or a mapping edge -> speed (an edge it
    does not mention keeps its free-flow time). Non-finite speeds count as the speed limit.
    """
    if isinstance(speeds, Mapping):
        cost = network.free_flow_cost()
        for edge, speed in speeds.items():
            i = network.index[edge]
            cost[edge] = _seconds(float(network.length[i]), float(speed), float(network.speed_limit[i]))
        return cost
    values = np.asarray(speeds, dtype=np.float64)
    if values.shape != (len(network.edges),):
        raise ValueError(f"costs_from_speeds: speeds has shape {values.shape}, expected ({len(network.edges)},)")
    return {edge: _seconds(float(length), float(speed), float(limit))
            for edge, length, speed, limit in zip(network.edges, network.length, values, network.speed_limit)}


def _seconds(length: float, speed: float, limit: float) -> float:
    if not np.isfinite(speed):
        speed = limit
    return length / max(speed, MIN_SPEED)


def keep_or_best(network: Network, request: RouteRequest, best: list[str] | None, own: Sequence[str],
                 cost: Mapping[str, float], margin: float) -> list[str] | None:
    """The vehicle's own remaining route `own` if it still leads from the request's edge to its
    destination and costs at most (1 + margin) x `best`; otherwise `best`. margin 0: always `best`."""
    if margin and best is not None and own and own[0] == request.edge and own[-1] == request.destination \
            and network.route_cost(list(own), cost) <= (1 + margin) * network.route_cost(best, cost):
        return list(own)
    return best


class ForecastPlanner:
    """Plans on edge costs (s per edge) from `costs(request)`, whatever produces them.

    `costs` may return costs for only some edges; the others keep their free-flow time. If it
    returns None (a forecast service that did not answer), so does the planner, and the
    simulation counts the request as failed.
    """

    def __init__(self, network: Network, costs: Callable[[RouteRequest], Mapping[str, float] | None]) -> None:
        self.network = network
        self.costs = costs

    def __call__(self, request: RouteRequest) -> list[str] | None:
        cost = self.costs(request)
        if cost is None:
            return None
        return self.network.shortest_path(request.edge, request.destination, cost)
