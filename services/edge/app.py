"""Start-up and shutdown order of the edge agent, and nothing else."""

from __future__ import annotations

import asyncio
import logging

import grpc
from grpc_health.v1 import health

from edge.agent import Agent, AgentConfig
from tandem import grpcserver, inference, metrics, tls
from tandem.v1 import inference_pb2_grpc

log = logging.getLogger(__name__)

GRACE_SECONDS = 3.0


class EdgeApp:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.agent = Agent(config)
        # Bound and started by `start`:
        self.inference_port = 0
        self.metrics_port = 0
        self.health_port = 0
        self.health: health.aio.HealthServicer | None = None
        self.server: grpc.aio.Server | None = None  # Inference for local applications, with --listen
        self.health_server: grpc.aio.Server | None = None

    async def start(self) -> None:
        cfg = self.config
        await self.agent.prepare()  # the tasks it offers, and their data: a task not installed stops it here
        if cfg.metrics:
            _, self.metrics_port = metrics.serve_metrics(cfg.metrics)
        # Health: SERVING while the agent runs; the Inference service only when it is served.
        self.health = await grpcserver.new_health([])
        if self.agent.router is not None and cfg.listen:
            self.server = grpcserver.create_server([metrics.MetricsInterceptor()])
            inference_pb2_grpc.add_InferenceServicer_to_server(inference.InferenceService(self.agent.router), self.server)
            self.health = await grpcserver.add_standard_services(self.server, [inference.SERVICE_NAME])
            credentials = tls.agent_server_credentials(cfg.certs, cfg.agent_id)
            self.inference_port = grpcserver.bind(self.server, cfg.listen, credentials)
            await self.server.start()
            await grpcserver.set_serving(self.health, [inference.SERVICE_NAME], True)
            log.info("serving Inference to local applications on port %d", self.inference_port)
        else:
            await grpcserver.set_serving(self.health, [], True)
        self.health_server, self.health_port = await grpcserver.start_health_only(cfg.health, self.health)

    async def run(self, stop: asyncio.Event) -> None:
        """The control stream until `stop`; then drain local requests and close."""
        await self.agent.run(stop)
        if self.health is not None:
            await self.health.enter_graceful_shutdown()
        if self.server is not None:
            await self.server.stop(GRACE_SECONDS)
        if self.health_server is not None:
            await self.health_server.stop(0)
        log.info("agent %s stopped", self.config.agent_id)

