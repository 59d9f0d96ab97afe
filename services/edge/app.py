"""Start-up and shutdown order of the edge agent, and nothing else."""

from __future__ import annotations

import logging

from edge.agent import Agent, AgentConfig
from tandem import lifecycle, metrics

log = logging.getLogger(__name__)


async def serve(config: AgentConfig) -> None:
    """Run the agent until SIGTERM or SIGINT."""
    agent = Agent(config)
    if config.metrics:
        metrics.serve_metrics(config.metrics)
    await agent.run(lifecycle.stop_event())
    log.info("agent %s stopped", config.agent_id)
