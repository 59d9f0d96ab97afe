"""Where the placement controller's inputs come from. Two sources, one result.

- `DirectSource` (no Prometheus configured): the cloud's own metrics that the policy
  reads (rendered in the exposition format and parsed with prometheus_client's parser),
  and the measurements agents send in their heartbeats.
- `PrometheusSource`: PromQL over a Prometheus server's HTTP API, which scrapes the
  cloud and the agents (each agent's target carries an `agent` label).

Both return the same `Observations`, so the policy never knows which one it reads.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cloud.placement_policy import AgentView, ModelProfile, Observations
from cloud.registry import Registry
from tandem import measurements as names
from tandem import metrics, staged


class Source(Protocol):
    async def observe(self) -> Observations: ...


def stage_bytes(model: str) -> tuple[int, ...]:
    """Bytes sent per example when split after k = 0..L-1 (k = 0: the input itself)."""
    input_shape, stages = staged.describe(model)
    first = 4
    for d in input_shape:
        first *= d
    return (first, *(s.output_bytes for s in stages[:-1]))


def profiles(cloud_seconds: Mapping[str, Mapping[int, float]]) -> dict[str, ModelProfile]:
    """Models whose every stage has a measured cloud time."""
    result = {}
    for model, by_stage in cloud_seconds.items():
        try:
            _, stages = staged.describe(model)
        except KeyError:
            continue
        seconds = tuple(by_stage.get(s.index, 0.0) for s in stages)
        if all(v > 0 for v in seconds):
            result[model] = ModelProfile(stage_bytes(model), seconds)
    return result


def agent_view(measurements: Mapping[str, float], connected: bool = True) -> AgentView:
    """An agent from the measurements its heartbeats carry (names: tandem.measurements)."""
    edge: dict[str, dict[int, float]] = defaultdict(dict)
    rates: dict[str, float] = {}
    below: dict[str, dict[float, float]] = defaultdict(dict)
    for name, value in measurements.items():
        key = names.parse(name)
        if isinstance(key, names.StageSeconds):
            edge[key.model][key.stage] = value
        elif isinstance(key, names.ExamplesPerSecond):
            rates[key.model] = value
        elif isinstance(key, names.ConfidenceBelow):
            below[key.model][key.level] = value
    edge_seconds = {}
    for model, by_stage in edge.items():
        seconds = tuple(by_stage[i] for i in sorted(by_stage))
        if sorted(by_stage) == list(range(1, len(by_stage) + 1)) and all(v > 0 for v in seconds):
            edge_seconds[model] = seconds
    # Inference requests measure the link; training uploads do too, less often.
    up = measurements.get(names.LINK_UP_BYTES_PER_SECOND, measurements.get(names.UPLINK_BYTES_PER_SECOND, 0.0))
    return AgentView(
        rtt=measurements.get(names.RTT_SECONDS, 0.0), up_bytes_per_second=up,
        reachable=connected and measurements.get(names.LINK_UP, 1.0) > 0, edge_seconds=edge_seconds,
        request_rate=rates,
        confidence_below=dict(below),
    )


# The three families `DirectSource` reads, in a registry of their own: rendering and
# parsing the whole process's /metrics (every agent's and every call's series) took
# 80 ms per tick on the coordinator's event loop (cProfile during an 8-agent job: 5.5 s
# of 20), once a second, holding up uploads and downloads.
_OBSERVED = CollectorRegistry(auto_describe=False)
for _collector in (metrics.INFER_STAGE_SECONDS_PER_EXAMPLE, metrics.INFER_QUEUE_WAIT_SECONDS,
                   metrics.INFER_STAGE_SECONDS):
    _OBSERVED.register(_collector)


def local_exposition() -> str:
    """This process's /metrics text of the families the placement policy reads."""
    return generate_latest(_OBSERVED).decode()


def heartbeats(registry: Registry) -> Callable[[], dict[str, dict[str, float]]]:
    """The newest heartbeat measurements of every connected agent."""
    return lambda: {s.agent_id: dict(s.measurements) for s in registry.sessions()}


class DirectSource:
    def __init__(
        self, agents: Callable[[], Mapping[str, Mapping[str, float]]], exposition: Callable[[], str] = local_exposition
    ) -> None:
        self._agents = agents
        self._exposition = exposition
        self._previous: tuple[float, float, float, float] | None = None  # time, wait sum, wait count, busy sum

    async def observe(self) -> Observations:
        now = time.monotonic()
        cloud: dict[str, dict[int, float]] = defaultdict(dict)
        wait_sum = wait_count = busy = 0.0
        for family in text_string_to_metric_families(self._exposition()):
            for sample in family.samples:
                if sample.name == "tandem_inference_stage_seconds_per_example":
                    cloud[sample.labels["model"]][int(sample.labels["stage"])] = sample.value
                elif sample.name == "tandem_inference_queue_wait_seconds_sum":
                    wait_sum += sample.value
                elif sample.name == "tandem_inference_queue_wait_seconds_count":
                    wait_count += sample.value
                elif sample.name == "tandem_inference_stage_duration_seconds_sum":
                    busy += sample.value
        queue_wait = cloud_busy = 0.0
        if self._previous is not None:
            then, wait_sum0, wait_count0, busy0 = self._previous
            if wait_count > wait_count0:
                queue_wait = (wait_sum - wait_sum0) / (wait_count - wait_count0)
            if now > then:
                cloud_busy = max(busy - busy0, 0.0) / (now - then)
        self._previous = (now, wait_sum, wait_count, busy)
        agents = {agent: agent_view(m) for agent, m in self._agents().items()}
        await staged.prepare(cloud)  # models' layouts are found off the event loop, once
        return Observations(time=time.time(), models=profiles(cloud), agents=agents,
                            queue_wait=queue_wait, cloud_busy=cloud_busy)


# The same quantities in PromQL. Agents' series carry the `agent` label of their scrape
# target; the cloud's carry job="tandem-cloud".
QUERIES = {
    "cloud_stage": 'tandem_inference_stage_seconds_per_example{job="tandem-cloud"}',
    "edge_stage": 'tandem_inference_stage_seconds_per_example{job="tandem-edge"}',
    "rtt": 'tandem_edge_link_rtt_seconds{job="tandem-edge"}',
    "up": 'tandem_edge_link_bytes_per_second{job="tandem-edge",direction="up"}',
    "link_up": 'tandem_edge_link_up{job="tandem-edge"}',
    "below": 'tandem_edge_confidence_below_ratio{job="tandem-edge"}',
    "rate": 'sum by (agent, model) (rate(tandem_edge_inference_examples_total{job="tandem-edge"}[{w}]))',
    "queue_wait": 'sum(rate(tandem_inference_queue_wait_seconds_sum{job="tandem-cloud"}[{w}])) / '
                  'sum(rate(tandem_inference_queue_wait_seconds_count{job="tandem-cloud"}[{w}]))',
    "busy": 'sum(rate(tandem_inference_stage_duration_seconds_sum{job="tandem-cloud"}[{w}]))',
}


class PrometheusSource:
    def __init__(self, url: str, window: str = "30s", timeout: float = 5.0) -> None:
        self._url = url.rstrip("/")
        self._window = window
        self._timeout = timeout

    def _query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        query = urllib.parse.urlencode({"query": promql.replace("{w}", self._window)})
        with urllib.request.urlopen(f"{self._url}/api/v1/query?{query}", timeout=self._timeout) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus query failed: {body.get('error', body)}")
        results = []
        for item in body["data"]["result"]:
            value = float(item["value"][1])
            if value == value:  # NaN (0/0 with no traffic) says nothing
                results.append((item["metric"], value))
        return results

    def _observe(self) -> Observations:
        r = {name: self._query(q) for name, q in QUERIES.items()}
        cloud: dict[str, dict[int, float]] = defaultdict(dict)
        for labels, value in r["cloud_stage"]:
            cloud[labels["model"]][int(labels["stage"])] = value
        measurements: dict[str, dict[str, float]] = defaultdict(dict)
        # The agents' series, under the names their heartbeats would give them.
        for labels, value in r["edge_stage"]:
            measurements[labels["agent"]][names.StageSeconds(labels["model"], int(labels["stage"])).key] = value
        for name, key in (("rtt", names.RTT_SECONDS), ("up", names.LINK_UP_BYTES_PER_SECOND),
                          ("link_up", names.LINK_UP)):
            for labels, value in r[name]:
                measurements[labels["agent"]][key] = value
        for labels, value in r["below"]:
            try:
                level = float(labels["threshold"])
            except ValueError:
                continue  # what agent_view would skip
            measurements[labels["agent"]][names.ConfidenceBelow(labels["model"], level).key] = value
        for labels, value in r["rate"]:
            measurements[labels["agent"]][names.ExamplesPerSecond(labels["model"]).key] = value
        agents = {agent: agent_view(m) for agent, m in measurements.items()}
        queue_wait = r["queue_wait"][0][1] if r["queue_wait"] else 0.0
        busy = r["busy"][0][1] if r["busy"] else 0.0
        return Observations(time=time.time(), models=profiles(cloud), agents=agents, queue_wait=queue_wait,
                            cloud_busy=busy)

    async def observe(self) -> Observations:
        return await asyncio.to_thread(self._observe)
