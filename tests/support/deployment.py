"""Who the session's test deployment issues certificates to (conftest.py's `certs_dir`)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cloud.app import Coordinator

AGENTS = [f"agent-{i}" for i in range(6)]
APP = "app-0"  # a local application calling an edge agent's Inference

# The `limited` fixture (conftest): start a coordinator with the given per-agent limits.
Start = Callable[..., Awaitable["Coordinator"]]
