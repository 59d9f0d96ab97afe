"""Shared fixtures: certificates made once per session, an in-process coordinator."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from cloud.app import CloudConfig, Coordinator
from cloud.limits import LimitsConfig
from tandem import certs
from tandem_lab import volume
from tests.support.cluster import Cluster
from tests.support.deployment import AGENTS, APP, Start


@pytest.fixture(scope="session")
def certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    certs.init_deployment(directory, AGENTS)
    certs.add_client(directory, APP)
    return directory


@pytest.fixture(scope="session")
def foreign_certs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another deployment with its own CA, and agent names that collide with ours."""
    directory = tmp_path_factory.mktemp("foreign-certs")
    certs.init_deployment(directory, AGENTS)
    return directory


@pytest_asyncio.fixture
async def coordinator(tmp_path: Path, certs_dir: Path) -> AsyncIterator[Coordinator]:
    """A real coordinator on a loopback port with mutual TLS, in this process."""
    config = CloudConfig(
        listen="127.0.0.1:0", certs=certs_dir, state=tmp_path / "state", health="127.0.0.1:0",
        heartbeat_interval=0.5, grace=1.0,
    )
    server = Coordinator(config)
    await server.start()
    yield server
    await server.stop()




@pytest_asyncio.fixture
async def limited(tmp_path: Path, certs_dir: Path) -> AsyncIterator[Start]:
    """Starts a real coordinator with the given per-agent limits (the others at their defaults)."""
    started: list[Coordinator] = []

    async def start(**limits: object) -> Coordinator:
        config = CloudConfig(listen="127.0.0.1:0", certs=certs_dir, state=tmp_path / "state", heartbeat_interval=0.5,
                             grace=1.0, limits=LimitsConfig(**limits))  # type: ignore[arg-type]
        server = Coordinator(config)
        await server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()

@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[pytest.TestReport]:
    """Keep each phase's report on the test item, so fixtures can see whether it failed."""
    report: pytest.TestReport = yield
    setattr(item, f"report_{report.when}", report)
    return report


@pytest.fixture
def cluster(request: pytest.FixtureRequest, tmp_path: Path, certs_dir: Path) -> Iterator[Cluster]:
    """Real coordinator and agent processes; their logs are printed when a test fails."""
    cluster = Cluster(tmp_path, certs_dir)
    try:
        yield cluster
    finally:
        cluster.stop_all()
        report = getattr(request.node, "report_call", None)
        if report is None or report.failed:
            print(cluster.logs())


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[volume.SmallVolume]:
    """A real 20 MB filesystem (tmpfs) to use as a state directory and fill with ballast."""
    reason = volume.unavailable()
    if reason is not None:
        pytest.skip(reason)
    with volume.SmallVolume(tmp_path / "state", 20 << 20) as mounted:
        yield mounted
