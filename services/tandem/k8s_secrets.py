"""Kubernetes Secrets for a deployment's certificates (`tandem certs init --k8s NAMESPACE`).

The manifests in deploy/k8s mount these by name; each holds at most one private key:
- `tandem-cloud`: the coordinator's server certificate and key;
- `tandem-inference`: the inference replicas' certificate and key (client of the
  coordinator, server of Inference);
- `tandem-admin`: the admin certificate and key, for an operator's pod or a CI job;
- `tandem-ca`: the agents' intermediate CA and its key, read only by the enrollment
  service (`tandem ca`), which issues short-lived agent certificates for one-time tokens;
- `tandem-ca-bundle` (a ConfigMap: it holds no key): the root CA certificate and the
  deny list, mounted by the edge agents. They run in a namespace of their own,
  NAMESPACE-edge (`edge_namespace`), which admits their hostPaths and hostPort while
  NAMESPACE enforces the "restricted" Pod Security Standard; a pod mounts only
  ConfigMaps of its own namespace, so the bundle is written there. It is also written
  into NAMESPACE, where the cert-manager overlay's servers project it. The Secrets stay
  in NAMESPACE.
No agent's key is here: each agent makes its own on its node and enrols
(docs/kubernetes.md). Each object carries the root CA certificate (never its key), and
the ones mounted by servers that check client certificates (coordinator, replicas, the
enrollment service, agents) the deny list `revoked.txt`: Kubernetes updates a mounted
Secret's or ConfigMap's files in place, and servers reload the list when it changes, so
after `tandem certs revoke` an `kubectl apply` of the rewritten file revokes without a restart.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path
from typing import Any

from tandem import certs, enrollment, revocation

_NAMESPACE_RE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
SERVICES = ("tandem-coordinator", "tandem-inference")
COORDINATOR_POD = "tandem-coordinator-0"
CA_SERVICE = "tandem-ca"  # the enrollment service's Service; its own certificate names come from `tandem ca --hosts`
CA_STATEFULSET_POD = "tandem-ca-0"
CA_BUNDLE = "tandem-ca-bundle"  # the ConfigMap: root certificate and deny list, no key
INTERMEDIATE_DIR = "ca"  # the agents' intermediate CA, under the certificate directory


def check_namespace(namespace: str) -> str:
    """`namespace` if Kubernetes takes it as a namespace name (an RFC 1123 label: lowercase
    letters, digits and '-'; a Tandem name may also hold '.' and '_', which it does not)."""
    if not _NAMESPACE_RE.fullmatch(namespace):
        raise ValueError(f"invalid Kubernetes namespace {namespace!r}: use 1-63 lowercase letters, digits or '-', "
                         "starting and ending with a letter or digit")
    return namespace


def service_hosts(namespace: str) -> list[str]:
    """Every name a pod in the cluster may use for the coordinator and the replicas."""
    check_namespace(namespace)
    hosts: list[str] = []
    for service in SERVICES:
        hosts += [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
                  f"{service}.{namespace}.svc.cluster.local"]
    hosts.append(f"{COORDINATOR_POD}.tandem-coordinator.{namespace}.svc.cluster.local")
    return hosts


EDGE_SUFFIX = "-edge"


def edge_namespace(namespace: str) -> str:
    """The edge agents' namespace for a deployment in `namespace` (deploy/k8s/base/namespace.yaml)."""
    check_namespace(namespace)
    edge = namespace + EDGE_SUFFIX
    if len(edge) > 63:
        raise ValueError(f"namespace {namespace!r} is too long: the edge agents' namespace {edge!r} would "
                         f"exceed 63 characters")
    return edge


def intermediate_dir(directory: Path) -> Path:
    return Path(directory) / INTERMEDIATE_DIR


def _content(path: Path) -> bytes:
    # No deny list yet is an empty one, shipped all the same so that it can change in place.
    return path.read_bytes() if path.exists() or path.name != revocation.FILE_NAME else b""


def _metadata(name: str, namespace: str) -> dict[str, Any]:
    return {"name": name, "namespace": namespace, "labels": {"app.kubernetes.io/part-of": "tandem"}}


def _secret(name: str, namespace: str, files: dict[str, Path]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(name, namespace),
        "type": "Opaque",
        "data": {key: base64.b64encode(_content(path)).decode() for key, path in files.items()},
    }


def _config_map(name: str, namespace: str, files: dict[str, Path]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(name, namespace),
        "data": {key: _content(path).decode() for key, path in files.items()},
    }


def secrets(directory: Path, namespace: str) -> list[dict[str, Any]]:
    """The Secrets (in `namespace`) and the CA bundle ConfigMap (in `namespace` and in its edge
    namespace), from the files `tandem certs init` and `tandem certs intermediate --out DIR/ca`
    wrote in `directory`."""
    edge = edge_namespace(namespace)
    d = Path(directory)
    ca_dir = intermediate_dir(d)
    if not (ca_dir / enrollment.INTERMEDIATE_CERT).is_file():
        raise FileNotFoundError(f"no intermediate CA for agents in {ca_dir} "
                                f"(`tandem certs intermediate --dir {d} --out {ca_dir}`)")
    ca = {"ca.pem": d / "ca.pem"}
    deny = {revocation.FILE_NAME: d / revocation.FILE_NAME}
    replica = certs.REPLICA_NAME
    return [
        _secret("tandem-cloud", namespace, {**ca, **deny, "cloud.pem": d / "cloud.pem", "cloud.key": d / "cloud.key"}),
        _secret("tandem-inference", namespace,
                {**ca, **deny, f"{replica}.pem": d / f"{replica}.pem", f"{replica}.key": d / f"{replica}.key"}),
        _secret("tandem-admin", namespace, {**ca, "admin.pem": d / "admin.pem", "admin.key": d / "admin.key"}),
        _secret(CA_SERVICE, namespace, {
            enrollment.INTERMEDIATE_CERT: ca_dir / enrollment.INTERMEDIATE_CERT,
            enrollment.INTERMEDIATE_KEY: ca_dir / enrollment.INTERMEDIATE_KEY, **ca, **deny}),
        _config_map(CA_BUNDLE, namespace, {**ca, **deny}),
        _config_map(CA_BUNDLE, edge, {**ca, **deny}),
    ]


def deployed(path: Path) -> tuple[str, bool]:
    """The namespace of a Secrets file written before, to write it again, and whether an
    older `tandem certs init --k8s` wrote it (with every agent's key in `tandem-agents`)."""
    import yaml

    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(path.read_text()) if d}
    return docs["tandem-cloud"]["metadata"]["namespace"], "tandem-agents" in docs


def token_command(namespace: str, agent: str, ttl: str = "1h") -> str:
    """The admin's command that makes agent `agent`'s one-time token in the cluster."""
    certs.validate_name(agent)
    return (f"kubectl exec -n {namespace} {CA_STATEFULSET_POD} -- tandem certs token {agent} "
            f"--ca-dir /ca --state /state --ttl {ttl}")
