"""examples/traffic, the planning view: what the cloud and each road-side unit believe about
a district's speeds as its reports age (a cut link), with nothing simulated."""

from __future__ import annotations

import pytest
from tandem_example_traffic.planning import FRESH, CloudView, Report, estimate

AHEAD = {1: {"a": 11.0}, 5: {"a": 15.0}, 10: {"a": 20.0}}


def test_a_fresh_report_is_priced_with_its_speeds_now() -> None:
    report = Report(time=100.0, speeds={"a": 3.0}, forecast_time=90.0, ahead=AHEAD)
    assert estimate({0: report}, now=100.0 + FRESH - 1) == {"a": 3.0}


@pytest.mark.parametrize(("age_minutes", "expected"), [(1.5, 11.0), (4.0, 15.0), (6.0, 15.0), (9.0, 20.0),
                                                       (30.0, 20.0)])
def test_a_stale_report_is_priced_with_the_forecast_nearest_its_age(age_minutes: float, expected: float) -> None:
    report = Report(time=100.0, speeds={"a": 3.0}, forecast_time=100.0, ahead=AHEAD)
    assert estimate({0: report}, now=100.0 + 60 * age_minutes) == {"a": expected}


def test_a_stale_report_without_forecasts_keeps_its_last_speeds() -> None:
    assert estimate({0: Report(time=0.0, speeds={"a": 3.0})}, now=1_000.0) == {"a": 3.0}


def test_the_cloud_holds_each_districts_latest_report_and_a_unit_pulls_the_others() -> None:
    cloud = CloudView()
    cloud.push(0, Report(0.0, {"a": 1.0}))
    cloud.push(1, Report(0.0, {"b": 2.0}))
    cloud.push(0, Report(5.0, {"a": 4.0}))
    assert cloud.speeds(now=6.0) == {"a": 4.0, "b": 2.0}
    assert set(cloud.snapshot(exclude=0)) == {1}
    assert cloud.age(0, now=6.0) == 1.0 and cloud.age(2, now=6.0) == float("inf")


def test_a_vehicle_keeps_its_route_only_within_the_margin_and_only_if_it_still_leads_there() -> None:
    from tandem_example_traffic.network import load_network
    from tandem_example_traffic.planners import keep_or_best
    from tandem_example_traffic.sim import RouteRequest

    network = load_network("braunschweig")
    cost = network.free_flow_cost()

    def detour(origin: str, destination: str) -> tuple[list[str], list[str]] | None:
        """The fastest route and another that avoids one of its inner edges, if the network has one."""
        best = network.shortest_path(origin, destination, cost)
        for edge in (best or [])[1:-1]:
            other = network.shortest_path(origin, destination, {**cost, edge: 1e6})
            if other is not None and edge not in other:
                return best, other
        return None

    origin, destination, (best, own) = next((o, d, pair) for o in network.edges[:20] for d in network.edges[20:60]
                                            if o != d and (pair := detour(o, d)) is not None)
    ratio = network.route_cost(own, cost) / network.route_cost(best, cost)
    request = RouteRequest("v", origin, destination, 0.0, 0, "periodic")
    assert keep_or_best(network, request, best, own, cost, margin=0.0) == best
    assert keep_or_best(network, request, best, own, cost, margin=ratio - 1 + 1e-9) == own
    assert keep_or_best(network, request, best, own, cost, margin=(ratio - 1) / 2) == best
    assert keep_or_best(network, request, best, own[:-1], cost, margin=10.0) == best  # no longer reaches the destination
