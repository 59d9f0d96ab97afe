"""The road network: a real city extract shipped inside the eclipse-sumo wheel, read offline
with sumolib, so the example needs no download and every run sees the same roads.

Two networks are known by name: "braunschweig" (the Braunschweig inner city of SUMO's 3D
game, 174 roads a passenger car may use) and "osm" (an OpenStreetMap city extract of the DRT
game, 740 such roads). A `Network` fixes the order of the monitored edges once: the readings
([T, E] arrays), the districts and the history files all index edges in that order.

Braunschweig comes from a game in which the player switches its one traffic light: each of
its four programs holds one green for 1000 s. `signal_plans` turns such player-held programs
into a fixed-time cycle through them (green 3 s per green link, 10 to 40 s, each program's own
yellow and all-red first), so the central crossing serves every approach as a real one would.

Routes never turn around mid-network (see `load_network`). Routing is our own small Dijkstra
over edge-to-edge connections, because planners route on costs that change with every request
(free flow, the true current travel times, a forecast), and sumolib's getShortestPath and
getFastestPath weigh edges by length or by free-flow time only.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sumo
import sumolib

NETWORKS = {
    "braunschweig": "tools/game/bs3d/bs.net.xml",
    "osm": "tools/game/DRT/osm.net.xml",
}
VCLASS = "passenger"


@dataclass(frozen=True, eq=False)
class Network:
    """A SUMO network and what the traffic example needs from it, in one fixed edge order.

    `edges` are the monitored edges: the non-internal edges a passenger car may use.
    `length` (m), `speed_limit` (m/s) and `midpoint` (x, y in m) are aligned with them;
    `successors` maps each edge to the edges a car can turn into from it.
    """

    name: str
    path: Path
    net: sumolib.net.Net
    edges: tuple[str, ...]
    length: np.ndarray
    speed_limit: np.ndarray
    midpoint: np.ndarray
    successors: Mapping[str, tuple[str, ...]]
    signals: str
    index: Mapping[str, int] = field(init=False)
    _free: Mapping[str, float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "index", {edge: i for i, edge in enumerate(self.edges)})
        free = {edge: float(length / speed) for edge, length, speed in zip(self.edges, self.length, self.speed_limit)}
        object.__setattr__(self, "_free", free)

    def free_flow_cost(self) -> dict[str, float]:
        """Seconds to drive each edge at its speed limit: what a map without traffic knows."""
        return dict(self._free)

    def districts(self, n: int) -> list[list[str]]:
        """Partition the monitored edges into `n` geographically compact districts.

        Recursive bisection: split along the longer side of the bounding box of the edges'
        midpoints, at the quantile that leaves k of the n districts on one side. Unlike
        k-means it needs no seed and gives districts of near-equal size, so each road-side
        agent holds a similar share of the data. Each district lists edges in network order.
        """
        if not 1 <= n <= len(self.edges):
            raise ValueError(f"districts: n={n} must be between 1 and the {len(self.edges)} edges")
        parts: list[list[int]] = []
        self._bisect(list(range(len(self.edges))), n, parts)
        return [[self.edges[i] for i in sorted(part)] for part in parts]

    def _bisect(self, members: list[int], n: int, out: list[list[int]]) -> None:
        if n == 1:
            out.append(members)
            return
        points = self.midpoint[members]
        axis = int(np.argmax(points.max(axis=0) - points.min(axis=0)))
        # Ties in the coordinate are broken by edge index: the order is total, the split deterministic.
        order = sorted(members, key=lambda i: (float(self.midpoint[i, axis]), i))
        k = n // 2
        cut = round(len(order) * k / n)
        self._bisect(order[:cut], k, out)
        self._bisect(order[cut:], n - k, out)

    def district_of(self, districts: list[list[str]]) -> dict[str, int]:
        """Edge id -> the index of its district, for a partition from `districts`."""
        return {edge: i for i, part in enumerate(districts) for edge in part}

    def shortest_path(self, from_edge: str, to_edge: str, cost: Mapping[str, float]) -> list[str] | None:
        """The cheapest route from `from_edge` to `to_edge` (both included), or None when unreachable.

        `cost` is the seconds to traverse each edge; an edge missing from it costs its free-flow
        time. The route's cost counts every edge on it, the first and last included.
        """
        if from_edge not in self.index or to_edge not in self.index:
            return None
        free = self._free
        best: dict[str, float] = {from_edge: cost.get(from_edge, free[from_edge])}
        previous: dict[str, str] = {}
        queue: list[tuple[float, str]] = [(best[from_edge], from_edge)]
        done: set[str] = set()
        while queue:
            total, edge = heapq.heappop(queue)
            if edge in done:
                continue
            if edge == to_edge:
                return self._unwind(previous, to_edge)
            done.add(edge)
            for nxt in self.successors[edge]:
                step = cost[nxt] if nxt in cost else free[nxt]
                if step < 0 or step != step:
                    raise ValueError(f"shortest_path: the cost of edge {nxt!r} is {step}, not a non-negative number")
                candidate = total + step
                if candidate < best.get(nxt, float("inf")):
                    best[nxt] = candidate
                    previous[nxt] = edge
                    heapq.heappush(queue, (candidate, nxt))
        return None

    @staticmethod
    def _unwind(previous: Mapping[str, str], to_edge: str) -> list[str]:
        route = [to_edge]
        while route[-1] in previous:
            route.append(previous[route[-1]])
        return route[::-1]

    def route_cost(self, route: list[str], cost: Mapping[str, float]) -> float:
        """Seconds along `route` under `cost` (every edge counted, as in `shortest_path`)."""
        return float(sum(cost[edge] for edge in route))

    def is_route(self, route: list[str]) -> bool:
        """Whether a car can drive `route`: known edges, each one turning into the next."""
        if not route or any(edge not in self.index for edge in route):
            return False
        return all(b in self.successors[a] for a, b in zip(route, route[1:]))


def network_path(name: str) -> Path:
    """Where the named network lies inside the installed eclipse-sumo wheel."""
    if name not in NETWORKS:
        raise ValueError(f"load_network: unknown network {name!r}; known: {', '.join(sorted(NETWORKS))}")
    return Path(sumo.SUMO_HOME) / NETWORKS[name]


HELD = 300.0  # a phase this long waits for a game's player, not for traffic


def signal_plans(net: sumolib.net.Net) -> str:
    """SUMO additional-file content replacing player-held signal programs with a fixed-time cycle.

    A light whose programs each hold a phase for `HELD` seconds or more gets one program,
    "tandem", that runs through them in programID order, each held phase cut to 3 s per green
    link (10 to 40 s). Loaded last, it is the light's active program. Empty when no light needs it.
    """
    logics = []
    for light in net.getTrafficLights():
        programs = light.getPrograms()
        if not programs or not all(any(p.duration >= HELD for p in prog.getPhases()) for prog in programs.values()):
            continue
        phases = []
        for key in sorted(programs, key=lambda k: (len(k), k)):
            for phase in programs[key].getPhases():
                duration = phase.duration
                if duration >= HELD:
                    duration = min(40, max(10, 3 * sum(c in "Gg" for c in phase.state)))
                phases.append(f'        <phase duration="{duration:g}" state="{phase.state}"/>')
        logics.append(f'    <tlLogic id="{light.getID()}" type="static" programID="tandem" offset="0">\n'
                      + "\n".join(phases) + "\n    </tlLogic>")
    return "\n".join(logics)


def load_network(name: str = "braunschweig") -> Network:
    """Read the named network (see NETWORKS) and index its monitored edges."""
    path = network_path(name)
    net = sumolib.net.readNet(str(path), withInternal=False, withPrograms=True)
    usable = [edge for edge in net.getEdges() if edge.allows(VCLASS) and not edge.isSpecial()]
    ids = tuple(edge.getID() for edge in usable)
    known = set(ids)
    successors: dict[str, tuple[str, ...]] = {}
    for edge in usable:
        turns: list[str] = []
        u_turns: list[str] = []
        for to, connections in edge.getOutgoing().items():
            usable_by_car = [c for c in connections if c.getFromLane().allows(VCLASS) and c.getToLane().allows(VCLASS)]
            if to.getID() in known and usable_by_car:
                u_turn = all(c.getDirection() in ("t", "T") for c in usable_by_car)
                (u_turns if u_turn else turns).append(to.getID())
        # U-turns only where the road ends: mid-network ones are rare in life, and in SUMO a car
        # turning around across oncoming traffic at a priority junction deadlocks it at the peak.
        successors[edge.getID()] = tuple(sorted(turns or u_turns))
    midpoints = []
    for edge in usable:
        shape = edge.getShape()
        midpoints.append(sumolib.geomhelper.positionAtShapeOffset(shape, sumolib.geomhelper.polyLength(shape) / 2))
    return Network(
        name=name,
        path=path,
        net=net,
        edges=ids,
        length=np.array([edge.getLength() for edge in usable], dtype=np.float64),
        speed_limit=np.array([edge.getSpeed() for edge in usable], dtype=np.float64),
        midpoint=np.array(midpoints, dtype=np.float64).reshape(len(usable), 2),
        successors=successors,
        signals=signal_plans(net),
    )
