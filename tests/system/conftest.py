"""Fixtures of the enrollment tests: an intermediate CA per test module, and the
enrollment service over it on loopback ports (enrollment and renewal), in this process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from cloud.enrollment import CaConfig, CaServer
from tandem import enrollment


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory, certs_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("enrollment-ca")
    enrollment.create_intermediate(certs_dir, out)
    return out


@pytest_asyncio.fixture
async def ca_server(ca_dir: Path) -> AsyncIterator[CaServer]:
    server = CaServer(CaConfig(ca_dir=ca_dir, listen="127.0.0.1:0", renew_listen="127.0.0.1:0", cert_hours=2))
    await server.start()
    yield server
    await server.stop()
