"""The controller's direct source as plain logic: heartbeat measurement names, and the
cloud's exposition text parsed with prometheus_client's parser (made here by a real
registry with the same metric names, so the text is what /metrics serves)."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cloud.observations import DirectSource, agent_view, local_exposition, stage_bytes
from edge.link import RTT_SAMPLES, THROUGHPUT_SAMPLES, LinkMonitor
from tandem import metrics


def test_agent_view_reads_the_heartbeat_names() -> None:
    view = agent_view({
        "rtt_seconds": 0.02, "link_up_bytes_per_second": 1e6, "link_up": 1.0,
        **{f"stage_seconds:cnn:{i}": 0.001 * i for i in range(1, 6)},
        "stage_seconds:mlp:1": 0.001, "stage_seconds:mlp:3": 0.001,  # a gap: not usable
        "examples_per_second:cnn": 7.5, "confidence_below:cnn:0.9": 0.25, "confidence_below:cnn:x": 1.0,
        "uplink_bytes_per_second": 5.0,
    })
    assert (view.rtt, view.up_bytes_per_second, view.reachable) == (0.02, 1e6, True)
    assert view.edge_seconds == {"cnn": (0.001, 0.002, 0.003, 0.004, 0.005)}
    assert view.request_rate == {"cnn": 7.5}
    assert view.sent_up("cnn", 0.8) == 0.25 and view.sent_up("cnn", 0.95) is None
    # Without inference traffic, the throughput that training uploads measured stands in.
    assert agent_view({"uplink_bytes_per_second": 5.0}).up_bytes_per_second == 5.0
    assert not agent_view({"link_up": 0.0}).reachable


def test_stage_bytes_start_with_the_input() -> None:
    assert stage_bytes("cnn") == (110_592, 73_728, 36_864, 18_432, 9_216)


async def test_direct_source_turns_counters_into_rates() -> None:
    registry = CollectorRegistry()
    per_example = Gauge("tandem_inference_stage_seconds_per_example", "", ["model", "stage"], registry=registry)
    wait = Histogram("tandem_inference_queue_wait_seconds", "", ["model"], registry=registry)
    busy = Histogram("tandem_inference_stage_duration_seconds", "", ["model", "stage"], registry=registry)
    for stage in range(1, 6):
        per_example.labels("cnn", str(stage)).set(0.002)
    per_example.labels("mlp", "1").set(0.001)  # mlp's other stages unmeasured: not a usable profile
    measurements = {"a": {"rtt_seconds": 0.01, "link_up_bytes_per_second": 1e6,
                          **{f"stage_seconds:cnn:{i}": 0.003 for i in range(1, 6)}}}
    source = DirectSource(agents=lambda: measurements, exposition=lambda: generate_latest(registry).decode())
    first = await source.observe()
    assert set(first.models) == {"cnn"} and first.models["cnn"].cloud_seconds == (0.002,) * 5
    assert (first.queue_wait, first.cloud_busy) == (0.0, 0.0)  # no interval yet
    for _ in range(10):
        wait.labels("cnn").observe(0.004)
    busy.labels("cnn", "1").observe(0.05)
    second = await source.observe()
    assert abs(second.queue_wait - 0.004) < 1e-9
    assert second.cloud_busy > 0
    assert second.agents["a"].edge_seconds["cnn"] == (0.003,) * 5


def test_link_monitor_separates_round_trips_from_throughput() -> None:
    async def never(timeout: float, size: int) -> None:
        raise AssertionError("not probed in this test")

    link = LinkMonitor(never, interval=1.0)
    link.success(0.010)
    link.success(0.020)
    assert link.rtt == 0.010  # the least of the recent small calls: the other one was held up
    link.success(0.110, sent=100_000)
    assert abs(link.bytes_per_second["up"] - 100_000 / (0.110 - link.rtt)) < 1.0
    link.failure(grpc.StatusCode.INVALID_ARGUMENT)
    assert link.available()  # not a link problem
    link.failure(grpc.StatusCode.UNAVAILABLE)
    assert not link.available()
    link.success(0.01)
    assert link.available()


def test_link_estimates_ignore_late_samples_and_follow_lasting_changes() -> None:
    async def never(timeout: float, size: int) -> None:
        raise AssertionError("not probed in this test")

    link = LinkMonitor(never, interval=1.0)
    link.success(0.030)
    link.success(0.090)  # an agent busy with its own work answered late
    assert link.rtt == 0.030
    for _ in range(RTT_SAMPLES):
        link.success(0.080)  # the path itself got longer
    assert link.rtt == 0.080
    link.success(0.080 + 0.100, sent=1_000_000)  # 10 MB/s
    link.success(0.080 + 0.400, sent=1_000_000)  # held up: not the link
    assert abs(link.bytes_per_second["up"] - 1e7) < 1.0
    for _ in range(THROUGHPUT_SAMPLES):
        link.success(0.080 + 0.500, sent=1_000_000)  # the link got slower: 2 MB/s
    assert abs(link.bytes_per_second["up"] - 2e6) < 1.0
    link.success(0.080 + 0.100, sent=1_000_000)  # and faster again: taken at once
    assert abs(link.bytes_per_second["up"] - 1e7) < 1.0
    link.too_slow(100_000, 0.5)  # a missed deadline caps it at once
    assert link.bytes_per_second["up"] == 200_000
    link.success(0.080 + 0.400, sent=100_000)  # 250 KB/s
    assert abs(link.bytes_per_second["up"] - 250_000) < 1.0


def test_the_default_source_renders_only_what_the_policy_reads() -> None:
    """Issue 18: rendering and parsing the coordinator's whole /metrics took 80 ms a tick
    on its event loop; only the three families the policy reads are rendered now."""
    metrics.INFER_STAGE_SECONDS_PER_EXAMPLE.labels("cnn", "1").set(0.002)
    metrics.ROUNDS.labels("closed").inc(0)  # a family of the process the policy does not read
    read = ("tandem_inference_stage_seconds_per_example", "tandem_inference_queue_wait_seconds",
            "tandem_inference_stage_duration_seconds")
    families = {f.name for f in text_string_to_metric_families(local_exposition())}
    assert set(read) <= families
    assert all(name.startswith(read) for name in families), families  # (and their `_created` series)
