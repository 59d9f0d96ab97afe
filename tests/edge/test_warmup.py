"""Issue 18, part 2: an agent pays torch's first-use costs when it starts, before its
hello, so that a job's first round costs what later rounds do."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from edge import warmup
from edge.offers import Offers

SERVICES = Path(__file__).resolve().parents[2] / "services"

# In a fresh interpreter (this one may have imported torch._dynamo already): what an
# agent's `prepare` leaves imported, and whether a first optimiser still imports it.
PROBE = textwrap.dedent("""
    import asyncio, sys
    from pathlib import Path
    from edge.agent import Agent, AgentConfig
    warm = sys.argv[1] == "1"
    agent = Agent(AgentConfig(cloud="localhost:1", certs=Path("."), agent_id="a", data="digits:0/4",
                              tasks=("mlp",), warmup=warm))
    asyncio.run(agent.prepare())
    print("dynamo" if "torch._dynamo" in sys.modules else "cold", agent.warmup_seconds > 0)
""")


def _probe(warm: bool) -> str:
    done = subprocess.run([sys.executable, "-c", PROBE, "1" if warm else "0"], capture_output=True, text=True,
                          env={"PYTHONPATH": str(SERVICES), "PATH": "/usr/bin:/bin"}, timeout=180, check=True)
    return done.stdout.split("\n")[-2]


@pytest.mark.process
def test_prepare_imports_what_the_first_optimiser_would() -> None:
    assert _probe(warm=True) == "dynamo True"
    assert _probe(warm=False) == "cold False"  # --no-warmup: the first task pays it


def test_warm_runs_small_ready_tasks_and_skips_the_rest() -> None:
    offers = Offers.prepare(["mlp", "mlp10m", "forecast"], "digits:0/4")
    assert warmup.warm_task(offers, "mlp")
    assert not warmup.warm_task(offers, "mlp10m")  # 42 MB of state: above WARM_MAX_BYTES, not built twice
    assert not warmup.warm_task(offers, "forecast")  # not ready on digits
    assert not warmup.warm_task(offers, "no-such-task")
    assert warmup.warm(offers) >= 0.0
