"""`tandem cloud` and `tandem edge`: build a config from flags and serve."""

from __future__ import annotations

import argparse
import json
import os


async def run_cloud(args: argparse.Namespace) -> int:
    from cloud.app import CloudConfig, Coordinator
    from cloud.serving import ServingConfig
    from tandem import lifecycle

    config = CloudConfig(
        listen=args.listen, certs=args.certs, state=args.state, metrics=args.metrics, health=args.health,
        heartbeat_interval=args.heartbeat, grace=args.grace, upload_buffer_bytes=args.upload_buffer_bytes,
        serving=ServingConfig(
            device=args.device, max_batch=args.max_batch, max_delay=args.max_delay_ms / 1000,
            max_queue_rows=args.max_queue_rows, max_request_rows=args.max_request_rows,
        ),
    )
    coordinator = Coordinator(config)
    stop = lifecycle.stop_event()
    await coordinator.start()
    if args.ready_file:
        ports = {"port": coordinator.port, "metrics_port": coordinator.metrics_port,
                 "health_port": coordinator.health_port, "pid": os.getpid()}
        tmp = args.ready_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(ports))
        tmp.replace(args.ready_file)
    await stop.wait()
    await coordinator.stop()
    return 0


async def run_edge(args: argparse.Namespace) -> int:
    import torch

    from edge.agent import AgentConfig
    from edge.app import serve

    torch.set_num_threads(max(1, args.threads))
    await serve(AgentConfig(cloud=args.cloud, certs=args.certs, agent_id=args.id, data=args.data,
                            metrics=args.metrics))
    return 0
