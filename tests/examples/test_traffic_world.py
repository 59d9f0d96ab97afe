"""examples/traffic, the SUMO side: the road network, the day's demand, the simulation with its
route requests, the planners that need no learning, and the history files.

Real SUMO (libsumo, in-process, one simulation at a time) on short days: a 12-minute day with a
steeper peak simulates in about a second.
"""

from __future__ import annotations

from pathlib import Path

import libsumo
import numpy as np
import pytest
from tandem_example_traffic import history, planners
from tandem_example_traffic.demand import Demand, peak_window
from tandem_example_traffic.network import Network, load_network
from tandem_example_traffic.sim import RouteRequest, Simulation


def short_day(network: Network, seed: int) -> Demand:
    """12 minutes, the peak in minutes 4 to 8, steeper than a full day's so that it congests in time."""
    return Demand.generate(network, seed=seed, minutes=12, peak_rate=80.0)


@pytest.fixture(scope="module")
def network() -> Network:
    return load_network("braunschweig")


def test_the_network_is_braunschweig_with_its_monitored_edges(network: Network) -> None:
    assert len(network.edges) == 174 == len(set(network.edges))
    assert network.length.shape == network.speed_limit.shape == (174,) and network.midpoint.shape == (174, 2)
    assert (network.length > 0).all() and (network.speed_limit > 0).all()
    assert not any(edge.startswith(":") for edge in network.edges)
    assert "tandem" in network.signals  # the game's player-held light runs a fixed cycle instead


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_districts_partition_the_edges_into_compact_parts(network: Network, n: int) -> None:
    parts = network.districts(n)
    assert parts == network.districts(n)  # deterministic
    assert len(parts) == n and all(parts)
    flat = [edge for part in parts for edge in part]
    assert sorted(flat) == sorted(network.edges) and len(flat) == len(set(flat))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    if n > 1:
        points = [network.midpoint[[network.index[e] for e in part]] for part in parts]
        centres = np.array([p.mean(axis=0) for p in points])
        for i, p in enumerate(points):
            nearest = np.linalg.norm(p[:, None, :] - centres[None, :, :], axis=2).argmin(axis=1)
            assert (nearest == i).mean() > 0.7  # most edges lie nearest their own district's centre


def test_shortest_path_follows_connections_and_costs(network: Network) -> None:
    free = network.free_flow_cost()
    origin, destination = network.edges[0], network.edges[100]
    route = network.shortest_path(origin, destination, free)
    assert route is not None and route[0] == origin and route[-1] == destination and network.is_route(route)
    detoured = None
    for blocked in route[1:-1]:
        detoured = network.shortest_path(origin, destination, {**free, blocked: 1e6})
        if detoured is not None and blocked not in detoured:
            break
    assert detoured is not None and detoured != route and network.is_route(detoured)
    assert network.route_cost(detoured, free) >= network.route_cost(route, free)
    assert network.shortest_path(origin, "no-such-edge", free) is None
    assert not network.is_route([route[0], route[-1]]) or len(route) == 2


def test_demand_is_deterministic_per_seed_and_peaks_in_the_middle(network: Network) -> None:
    day = Demand.generate(network, seed=3)
    assert day == Demand.generate(network, seed=3)
    assert day.trips != Demand.generate(network, seed=4).trips
    per_minute = day.departures_per_minute()
    assert per_minute[20:40].mean() > 2.5 * per_minute[:10].mean()
    assert per_minute[20:40].mean() > 2.5 * per_minute[-10:].mean()
    assert all(network.is_route(list(t.route)) and t.route[0] == t.origin and t.route[-1] == t.destination
               for t in day.trips)
    assert [t.depart for t in day.trips] == sorted(t.depart for t in day.trips)
    incident = day.incident
    start, end = peak_window(60)
    assert incident is not None and start <= incident.start < incident.end <= end
    assert sum(incident.edge in t.route for t in day.trips) >= 20  # a busy edge
    assert Demand.generate(network, seed=3, incident=False).incident is None


def busiest(result_flow: np.ndarray, k: int = 20) -> np.ndarray:
    return np.argsort(-result_flow.sum(axis=0))[:k]


def test_a_short_day_records_readings_and_the_peak_congests(network: Network) -> None:
    day = short_day(network, 0)
    with Simulation(network, day, None, connected_share=0.0) as sim:
        result = sim.run(until=day.duration)
    readings = result.readings
    assert readings.speed.shape == readings.occupancy.shape == readings.flow.shape == (12, 174)
    assert readings.edges == network.edges and readings.interval == 60.0
    assert (readings.occupancy >= 0).all() and (readings.occupancy <= 100).all() and (readings.flow >= 0).all()
    assert readings.flow.sum() > len(day.trips)  # every vehicle enters several edges
    ratio = readings.speed / network.speed_limit
    busy = busiest(readings.flow)
    assert ratio[5:9, busy].mean() < 0.85 * ratio[:2, busy].mean()
    assert not result.requests and result.teleports < 10


def test_the_incident_cuts_its_edge_for_its_window(network: Network) -> None:
    day = short_day(network, 0)
    incident = day.incident
    assert incident is not None
    lane = f"{incident.edge}_0"
    with Simulation(network, day, None, connected_share=0.0) as sim:
        sim.run(until=incident.start - 1)
        limit = libsumo.lane.getMaxSpeed(lane)
        assert limit > 5 and sim.live_speed[network.index[incident.edge]] > incident.speed
        sim.run(until=incident.start + 1)
        assert libsumo.lane.getMaxSpeed(lane) == incident.speed
        assert sim.live_speed[network.index[incident.edge]] <= incident.speed
        result = sim.run(until=incident.end + 1)
        assert libsumo.lane.getMaxSpeed(lane) == limit
    during = result.readings.speed[int(incident.start // 60) + 1:int(incident.end // 60), network.index[incident.edge]]
    assert len(during) and (during <= incident.speed + 0.5).all()


def test_a_planners_route_is_applied(network: Network) -> None:
    day = short_day(network, 1)
    planned: list[tuple[RouteRequest, list[str]]] = []

    def detour(request: RouteRequest) -> list[str] | None:
        free = network.free_flow_cost()
        best = network.shortest_path(request.edge, request.destination, free)
        for avoid in (best or [])[1:-1]:
            other = network.shortest_path(request.edge, request.destination, {**free, avoid: 1e6})
            if other is not None and other != best and not planned:
                planned.append((request, other))
                return other
        return best

    with Simulation(network, day, detour, districts=network.districts(2), connected_share=0.5) as sim:
        while not planned:
            sim.run(until=sim.time + 1)
        request, route = planned[0]
        assert libsumo.vehicle.getRoute(request.vehicle) == tuple(route)
        result = sim.run(until=180)
    assert request.reason == "depart" and request.district == network.district_of(network.districts(2))[request.edge]
    first = result.requests[0]
    assert first.vehicle == request.vehicle and first.answered and first.changed
    assert all(r.answered for r in result.requests) and result.failed_requests == 0
    connected = {t.vehicle for t in result.trips if t.connected}
    assert {r.vehicle for r in result.requests} <= connected and 0.3 < len(connected) / len(result.trips) < 0.7


@pytest.mark.parametrize("answer", ["none", "invalid"])
def test_a_planner_without_a_valid_answer_fails_the_request_and_the_vehicle_keeps_its_route(
        network: Network, answer: str) -> None:
    day = short_day(network, 2)
    routes = {trip.id: trip.route for trip in day.trips}

    def planner(request: RouteRequest) -> list[str] | None:
        return None if answer == "none" else [request.edge]  # a route that stops short of the destination

    with Simulation(network, day, planner, connected_share=0.3, reroute_every=30) as sim:
        result = sim.run(until=240)
        for vehicle in libsumo.vehicle.getIDList():
            assert libsumo.vehicle.getRoute(vehicle) == routes[vehicle]
    reasons = {r.reason for r in result.requests}
    assert result.requests and result.failed_requests == len(result.requests) and {"depart", "periodic"} <= reasons


def test_no_guidance_makes_no_requests(network: Network) -> None:
    day = short_day(network, 2)
    assert planners.no_guidance is None
    with Simulation(network, day, planners.no_guidance, connected_share=1.0) as sim:
        result = sim.run(until=180)
    assert result.requests == () and result.failed_requests == 0 and all(t.connected for t in result.trips)


@pytest.mark.parametrize("name", ["free_flow", "oracle", "forecast"])
def test_baseline_planners_answer_every_request_with_a_valid_route(network: Network, name: str) -> None:
    day = short_day(network, 0)
    incident = day.incident
    assert incident is not None
    with Simulation(network, day, None, connected_share=0.3) as sim:
        if name == "free_flow":
            sim.planner = planners.free_flow(network)
        elif name == "oracle":
            sim.planner = planners.oracle(sim)
        else:
            sim.planner = planners.ForecastPlanner(network, lambda request: planners.costs_from_speeds(
                network, sim.readings.speed[-1] if len(sim.readings.speed) else network.speed_limit))
        result = sim.run(until=incident.end)
    assert result.requests and all(r.answered for r in result.requests)
    assert {"depart", "periodic", "incident"} <= {r.reason for r in result.requests}
    if name == "free_flow":  # the departure route is already the free-flow one
        assert not any(r.changed for r in result.requests if r.reason == "depart")
    if name == "oracle":  # the incident shows at once: some vehicles turn away from it
        assert any(r.changed for r in result.requests if r.reason == "incident")


def test_a_forecast_planner_that_gets_no_costs_fails_the_request(network: Network) -> None:
    planner = planners.ForecastPlanner(network, lambda request: None)
    request = RouteRequest("v0", network.edges[0], network.edges[100], 0.0, 0, "depart")
    assert planner(request) is None
    with pytest.raises(ValueError, match="shape"):
        planners.costs_from_speeds(network, np.ones(3))
    slow = planners.costs_from_speeds(network, {network.edges[0]: 0.0})
    assert slow[network.edges[0]] == pytest.approx(network.length[0] / planners.MIN_SPEED)


def test_libsumo_runs_one_simulation_at_a_time(network: Network) -> None:
    day = Demand.generate(network, seed=0, minutes=3, incident=False)
    with Simulation(network, day) as sim:
        with pytest.raises(RuntimeError, match="one simulation per process"):
            Simulation(network, day)
        sim.run(until=60)
    with Simulation(network, day) as again:  # closed: the next one starts
        assert again.run(until=60).readings.speed.shape == (1, 174)


def test_history_writes_per_district_and_all_files_in_the_contract_format(
        network: Network, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    history.main(["--out", str(tmp_path), "--districts", "2", "--days", "2", "--minutes", "6", "--seed", "5"])
    printed = capsys.readouterr().out.splitlines()
    names = ["district-0.npz", "district-0-test.npz", "district-1.npz", "district-1-test.npz", "all.npz", "all-test.npz"]
    assert len(printed) == len(names) + 1 and all(any(name in line for line in printed) for name in names)
    parts = network.districts(2)
    for name in names:
        with np.load(tmp_path / name) as data:
            assert set(data.files) == {"speed", "occupancy", "flow", "free_speed", "edges", "interval", "district"}
            district = int(data["district"])
            edges = list(network.edges) if district == -1 else parts[district]
            days = 1 if name.endswith("-test.npz") else 2
            for key in ("speed", "occupancy", "flow"):
                assert data[key].dtype == np.float32 and data[key].shape == (days, 6, len(edges))
            assert data["free_speed"].dtype == np.float32 and data["free_speed"].shape == (len(edges),)
            assert list(data["edges"]) == edges and data["edges"].dtype.kind == "U"
            assert float(data["interval"]) == 60.0 and name.startswith("all") == (district == -1)
            np.testing.assert_allclose(data["free_speed"], network.speed_limit[[network.index[e] for e in edges]])
            assert (data["speed"] > 0).all() and (data["occupancy"] <= 100).all()
    with np.load(tmp_path / "all.npz") as train, np.load(tmp_path / "all-test.npz") as test:
        assert not np.array_equal(train["flow"][0], train["flow"][1]) and not np.array_equal(train["flow"][0], test["flow"][0])
