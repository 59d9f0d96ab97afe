"""`tandem cloud` and `tandem edge`: build a config from flags and serve."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloud.serving import ServingConfig


async def run_cloud(args: argparse.Namespace) -> int:
    from cloud.app import CloudConfig, Coordinator
    from cloud.limits import LimitsConfig
    from cloud.placement import ControllerConfig
    from cloud.placement_policy import CascadeOption, PolicyConfig
    from tandem import lifecycle
    from tandem import placement as placement_mod

    alphas = {}
    for item in args.alpha_model:
        model, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--alpha-model {item!r} is not MODEL=ALPHA")
        alphas[model] = float(value)
    cascades = {}
    for item in args.cascade:
        model, sep, text = item.partition("=")
        chosen = placement_mod.parse(model, f"cascade:{text}") if sep else None
        if chosen is None or chosen.mode != "cascade":
            raise ValueError(f"--cascade {item!r} is not MODEL=T[:CLOUD_MODEL]")
        cascades[model] = CascadeOption(chosen.threshold, chosen.cloud_model)
    policy = PolicyConfig(alpha=args.alpha, alpha_per_model=alphas, min_dwell=args.min_dwell, min_gain=args.min_gain,
                          cascades=cascades)
    placement = ControllerConfig(interval=args.placement_interval, policy=policy) if args.placement_interval > 0 else None

    config = CloudConfig(
        listen=args.listen, certs=args.certs, state=args.state, metrics=args.metrics, health=args.health,
        heartbeat_interval=args.heartbeat, grace=args.grace,
        serving=_serving_config(args),
        placement=placement, prometheus_url=args.prometheus_url,
        limits=LimitsConfig(max_streams=args.agent_max_streams, requests_per_second=args.agent_requests_per_second,
                            request_burst=max(1, int(2 * args.agent_requests_per_second)),
                            bytes_per_second=args.agent_bytes_per_second),
    )
    lifecycle.tune_for_serving(args.torch_threads)
    coordinator = Coordinator(config)
    stop = lifecycle.stop_event()
    await coordinator.start()
    if args.ready_file:
        _write_ready(args.ready_file, {"port": coordinator.port, "metrics_port": coordinator.metrics_port,
                                       "health_port": coordinator.health_port})
    await stop.wait()
    await coordinator.stop()
    return 0


async def run_edge(args: argparse.Namespace) -> int:
    from edge.agent import AgentConfig
    from edge.app import EdgeApp
    from tandem import lifecycle

    # --threads (training, 1 by default, which keeps local training reproducible) unless
    # --torch-threads says otherwise.
    lifecycle.tune_for_serving(args.torch_threads or max(1, args.threads))
    config = AgentConfig(
        cloud=args.cloud, certs=args.certs, agent_id=args.id, data=args.data, metrics=args.metrics, health=args.health,
        listen=args.listen, inference_cloud=args.inference_cloud, placements=tuple(args.placement),
        cloud_timeout=args.cloud_timeout,
        probe_interval=args.probe_interval, device=args.device, max_batch=args.max_batch,
        max_delay=args.max_delay_ms / 1000, max_queue_rows=args.max_queue_rows, max_request_rows=args.max_request_rows,
    )
    app = EdgeApp(config)
    stop = lifecycle.stop_event()
    await app.start()
    if args.ready_file:
        _write_ready(args.ready_file, {"inference_port": app.inference_port, "metrics_port": app.metrics_port,
                                       "health_port": app.health_port})
    await app.run(stop)
    return 0


async def run_serve(args: argparse.Namespace) -> int:
    from cloud.replica import Replica, ReplicaConfig
    from tandem import lifecycle

    config = ReplicaConfig(
        cloud=args.cloud, certs=args.certs, listen=args.listen, cache=args.cache,
        health=args.health, metrics=args.metrics, poll_interval=args.poll_interval,
        serving=_serving_config(args),
    )
    lifecycle.tune_for_serving(args.torch_threads)
    replica = Replica(config)
    stop = lifecycle.stop_event()
    await replica.start()
    if args.ready_file:
        _write_ready(args.ready_file, {"port": replica.port, "metrics_port": replica.metrics_port,
                                       "health_port": replica.health_port})
    await replica.run(stop)
    return 0


def _serving_config(args: argparse.Namespace) -> ServingConfig:
    """The inference flags that `tandem cloud` and `tandem serve` share."""
    from cloud.serving import ServingConfig

    return ServingConfig(
        device=args.device, max_batch=args.max_batch, max_delay=args.max_delay_ms / 1000,
        max_queue_rows=args.max_queue_rows, max_request_rows=args.max_request_rows,
        models=tuple(m for m in args.models.split(",") if m),
    )


def _write_ready(path: Path, ports: dict[str, int]) -> None:
    """Bound ports as JSON, written atomically, for whoever started this process."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**ports, "pid": os.getpid()}))
    tmp.replace(path)
