"""Hostile messages against every RPC of a real coordinator and of an edge agent's
Inference server: none is answered INTERNAL or UNKNOWN, none hangs, no server logs an
error, and every server still answers afterwards. `tandem_lab.fuzz` builds the cases
(hypothesis, from the message descriptors, plus byte mutations of valid messages);
`python -m tandem_lab.fuzz --cases 10000` is the long run."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from cloud.app import Coordinator
from tandem_lab import fuzz
from tests.support.inference import start_edge
from tests.support.waiting import wait_for

# hundreds of hostile cases per server (~8 s in all); `make fuzz` is the long run
pytestmark = pytest.mark.slow

EXAMPLES = 16  # per RPC: about 340 cases in all


async def explore(harness: fuzz.Harness, rpcs: list[fuzz.Rpc]) -> Counter[str]:
    """Every RPC's cases, each failing case shrunk by hypothesis; the status codes seen."""
    loop, tally = asyncio.get_running_loop(), fuzz.Tally()
    for rpc in rpcs:
        await asyncio.to_thread(fuzz.explore, harness, rpc, loop, EXAMPLES, tally)
        assert await harness.alive(), f"a server stopped answering after the cases of {rpc.name}"
    assert set(tally.cases) == {rpc.name for rpc in rpcs}
    return sum(tally.codes.values(), Counter())


@pytest.mark.parametrize("service", ["Coordinator", "Admin", "Inference"])
async def test_cloud_rpcs_survive_hostile_messages(coordinator: Coordinator, certs_dir: Path, service: str) -> None:
    harness = fuzz.Harness(certs_dir, coordinator.port)
    try:
        await harness.setup(job=service != "Inference")
        codes = await explore(harness, [r for r in fuzz.RPCS if r.target == "cloud"
                                        and r.method.containing_service.name == service])
    finally:
        await harness.close()
    # Cases got past the first checks (some were served) and hostile ones were refused precisely.
    assert codes["OK"] and codes["INVALID_ARGUMENT"]
    assert service == "Inference" or codes["PERMISSION_DENIED"]  # the wrong callers


async def test_edge_inference_survives_hostile_messages(coordinator: Coordinator, certs_dir: Path) -> None:
    harness = fuzz.Harness(certs_dir, coordinator.port)
    await harness.setup(job=False)
    app = await start_edge(coordinator.port, certs_dir, (f"{fuzz.MODEL}=split:1", "mlp=cloud"))
    stop = asyncio.Event()
    runner = asyncio.create_task(app.run(stop))
    try:
        await wait_for(lambda: app.agent.models.held_version(fuzz.MODEL))
        harness.ports["edge"] = app.inference_port
        codes = await explore(harness, [r for r in fuzz.RPCS if r.target == "edge"])
    finally:
        await harness.close()
        stop.set()
        await runner
    assert codes["OK"] and codes["INVALID_ARGUMENT"]
