"""Who the session's test deployment issues certificates to (conftest.py's `certs_dir`)."""

from __future__ import annotations

AGENTS = [f"agent-{i}" for i in range(6)]
APP = "app-0"  # a local application calling an edge agent's Inference
