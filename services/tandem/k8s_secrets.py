"""Kubernetes Secrets for a deployment's certificates (`tandem certs init --k8s NAMESPACE`).

The manifests in deploy/k8s mount these by name:
- `tandem-cloud`: the coordinator's server certificate;
- `tandem-inference`: the inference replicas' certificate (client of the coordinator,
  server of Inference);
- `tandem-agents`: every agent's certificate and key, named after its edge node (an
  init container gives each agent pod only its own);
- `tandem-admin`: the admin certificate, for an operator's pod or a CI job.
Each also carries the CA certificate (never its key), and the ones mounted by servers
that check client certificates (coordinator, replicas, agents) the deny list
`revoked.txt`: Kubernetes updates a mounted Secret's files in place, and servers reload
the list when it changes, so after `tandem certs revoke` an `kubectl apply` of the
rewritten file revokes without a restart.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tandem import certs, revocation

SERVICES = ("tandem-coordinator", "tandem-inference")
COORDINATOR_POD = "tandem-coordinator-0"


def service_hosts(namespace: str) -> list[str]:
    """Every name a pod in the cluster may use for the coordinator and the replicas."""
    certs.validate_name(namespace)
    hosts: list[str] = []
    for service in SERVICES:
        hosts += [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
                  f"{service}.{namespace}.svc.cluster.local"]
    hosts.append(f"{COORDINATOR_POD}.tandem-coordinator.{namespace}.svc.cluster.local")
    return hosts


def _secret(name: str, namespace: str, files: dict[str, Path]) -> dict[str, Any]:
    def content(path: Path) -> bytes:
        # No deny list yet is an empty one, shipped all the same so that it can change in place.
        return path.read_bytes() if path.exists() or path.name != revocation.FILE_NAME else b""

    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "tandem"}},
        "type": "Opaque",
        "data": {key: base64.b64encode(content(path)).decode() for key, path in files.items()},
    }


def secrets(directory: Path, namespace: str, agents: Sequence[str]) -> list[dict[str, Any]]:
    """The four Secrets, from the files `tandem certs init` wrote in `directory`."""
    certs.validate_name(namespace)
    d = Path(directory)
    ca = {"ca.pem": d / "ca.pem"}
    deny = {revocation.FILE_NAME: d / revocation.FILE_NAME}
    agent_files: dict[str, Path] = {**ca, **deny}
    for name in agents:
        cert, key = certs.agent_paths(d, name)
        agent_files |= {f"{name}.pem": cert, f"{name}.key": key}
    replica = certs.REPLICA_NAME
    return [
        _secret("tandem-cloud", namespace, {**ca, **deny, "cloud.pem": d / "cloud.pem", "cloud.key": d / "cloud.key"}),
        _secret("tandem-inference", namespace,
                {**ca, **deny, f"{replica}.pem": d / f"{replica}.pem", f"{replica}.key": d / f"{replica}.key"}),
        _secret("tandem-agents", namespace, agent_files),
        _secret("tandem-admin", namespace, {**ca, "admin.pem": d / "admin.pem", "admin.key": d / "admin.key"}),
    ]


def deployed(path: Path) -> tuple[str, list[str]]:
    """The namespace and agents of a Secrets file written before, to write it again."""
    import yaml

    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(path.read_text()) if d}
    agents = docs["tandem-agents"]["data"]
    names = sorted(key[: -len(".pem")] for key in agents if key.endswith(".pem") and key != "ca.pem")
    return docs["tandem-agents"]["metadata"]["namespace"], names
