"""deploy/k8s and the Dockerfile: every overlay renders, validates, and has the properties operators rely on."""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from tandem import certs, k8s_secrets
from tandem_cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["base", "overlays/dev", "overlays/gpu", "overlays/prometheus-operator", "overlays/cert-manager",
            "overlays/regional"]
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}  # CRDs: no schema in kubernetes-validate
# cert-manager's kinds: validated strictly with deploy/k8s/schemas/cert-manager (see its README), and against
# the pinned release's CRDs too when $TANDEM_CERT_MANAGER_CRDS names a directory holding them.
CERT_MANAGER_KINDS = {"Issuer": "issuer", "ClusterIssuer": "clusterissuer", "Certificate": "certificate"}
CERT_MANAGER_SECRETS = {"tandem-cloud-tls", "tandem-inference-tls"}  # what its Certificates write
WORKLOADS = {"StatefulSet", "Deployment", "DaemonSet"}
SECRETS = {"tandem-cloud", "tandem-inference", "tandem-admin", "tandem-ca"}  # `tandem certs init --k8s` writes
# The regional overlay's one region (its StatefulSet, Services, NetworkPolicy, and the Secret with its certificate,
# which `tandem certs init --k8s` does not write: docs/kubernetes.md, "Regional aggregators", has the commands).
REGIONAL = "overlays/regional"
REGION = "tandem-region-west"
REGION_SECRETS = {REGION}
CA_BUNDLE = "tandem-ca-bundle"  # a ConfigMap, written with them: the root certificate and the deny list
CLOUD_NS = "tandem"  # the coordinator, the replicas, the enrollment service: Pod Security "restricted", enforced
EDGE_NS = "tandem-edge"  # the edge agents (hostPaths, a hostPort): the one namespace that relaxes enforcement
EDGE = "edge-agent"  # the app.kubernetes.io/component of every object in EDGE_NS
PSS = "pod-security.kubernetes.io/enforce"
PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")

Obj = dict[str, Any]


def render(overlay: str) -> list[Obj]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], check=True, capture_output=True, text=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(objs: list[Obj], kind: str, name: str, namespace: str | None = None) -> Obj:
    """The one object of that kind and name (in `namespace`, if given: tandem-config is in both namespaces)."""
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name
               and namespace in (None, o["metadata"].get("namespace"))]
    assert len(matches) == 1, f"{kind}/{name} in {namespace}: {len(matches)} found"
    return matches[0]


def namespace_of(obj: Obj) -> str:
    return str(obj["metadata"]["namespace"])


def settings(objs: list[Obj], namespace: str) -> dict[str, str]:
    """The tandem-config ConfigMap the workloads of `namespace` read."""
    return dict(find(objs, "ConfigMap", "tandem-config", namespace)["data"])


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert selector.keys() <= {"matchLabels"}, selector  # the manifests use matchLabels only
    return bool(selector.get("matchLabels", {}).items() <= labels.items())


def namespace_labels(objs: list[Obj], namespace: str) -> dict[str, str]:
    """A namespace's labels as the API server has them (it adds kubernetes.io/metadata.name)."""
    ours = [o for o in objs if o["kind"] == "Namespace" and o["metadata"]["name"] == namespace]
    return {**(ours[0]["metadata"].get("labels", {}) if ours else {}), "kubernetes.io/metadata.name": namespace}


def admitted(objs: list[Obj], pod: Obj, namespace: str, port: int, source: dict[str, str], source_ns: str) -> bool:
    """Whether the NetworkPolicies let a pod labelled `source` in `source_ns` reach `port` of the pod template
    `pod` in `namespace` (Ingress only: no policy here restricts egress)."""
    labels = pod["metadata"]["labels"]
    policies = [o for o in objs if o["kind"] == "NetworkPolicy" and namespace_of(o) == namespace
                and selects(o["spec"]["podSelector"], labels)]
    if not policies:
        return True
    for policy in policies:
        for rule in policy["spec"].get("ingress", []):
            if rule.get("ports") and port not in {p["port"] for p in rule["ports"]}:
                continue
            for peer in rule.get("from") or [{"namespaceSelector": {}}]:
                assert "ipBlock" not in peer, peer
                if "namespaceSelector" in peer:
                    in_ns = selects(peer["namespaceSelector"], namespace_labels(objs, source_ns))
                else:
                    in_ns = source_ns == namespace
                if in_ns and selects(peer.get("podSelector", {}), source):
                    return True
    return False


def pods(objs: list[Obj]) -> list[tuple[str, Obj, Obj]]:
    """(namespace, workload, pod template) of every workload."""
    return [(namespace_of(o), o, o["spec"]["template"]) for o in objs if o["kind"] in WORKLOADS]


def containers(workload: Obj) -> list[Obj]:
    spec = workload["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def flag(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def port_of(address: str | None) -> int:
    assert address is not None
    return int(address.rsplit(":", 1)[1])


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    return {name for action in parser._actions if isinstance(action, argparse._SubParsersAction)
            for name in action.choices}


def parse_args(args: list[str], env: dict[str, str]) -> argparse.Namespace:
    """A container's args through the real CLI, with $(VAR)s put in from `env`."""
    expanded = [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]
    parsed, unknown = build_parser().parse_known_args(expanded)
    assert unknown == [], unknown
    return parsed


def reached(objs: list[Obj], address: str, namespace: str) -> set[tuple[str, int]]:
    """(workload, container port) of the pods behind HOST:PORT, for a caller in `namespace`: HOST a Service's name
    (in the caller's namespace) or SERVICE.NAMESPACE[.svc[.cluster.local]], PORT one of its ports."""
    host, port = address.rsplit(":", 1)
    service_name, *rest = host.split(".")
    assert rest[1:] in ([], ["svc"], ["svc", "cluster", "local"]), address
    service = find(objs, "Service", service_name, rest[0] if rest else namespace)
    (target,) = [p["targetPort"] for p in service["spec"]["ports"] if p["port"] == int(port)]
    found = set()
    for ns, workload, pod in pods(objs):
        if ns == namespace_of(service) and service["spec"]["selector"].items() <= pod["metadata"]["labels"].items():
            (container_port,) = [p["containerPort"] for p in pod["spec"]["containers"][0]["ports"]
                                 if p["name"] == target]
            found.add((workload["metadata"]["name"], container_port))
    assert found, address
    return found


def private_keys(obj: Obj) -> int:
    """How many PEM private keys a Secret or ConfigMap holds, in all its values."""
    count = 0
    for field in ("data", "binaryData"):
        for value in (obj.get(field) or {}).values():
            raw = value.encode() if obj["kind"] == "ConfigMap" and field == "data" else base64.b64decode(value)
            count += len(PRIVATE_KEY.findall(raw))
    for value in (obj.get("stringData") or {}).values():
        count += len(PRIVATE_KEY.findall(value.encode()))
    return count


def mounted_secrets(workload: Obj) -> set[str]:
    """The Secrets a workload's pods mount, directly or in projected volumes."""
    names: set[str] = set()
    for volume in workload["spec"]["template"]["spec"].get("volumes", []):
        if "secret" in volume:
            names.add(volume["secret"]["secretName"])
        for source in volume.get("projected", {}).get("sources", []):
            if "secret" in source:
                names.add(source["secret"]["name"])
    return names


def _strict(schema: Any) -> Any:
    """A CRD's openAPIV3Schema with unknown fields refused, as the API server's strict field validation does."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if out.get("type") == "object" and "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


def validate_cert_manager(obj: Obj) -> None:
    """Raises jsonschema.ValidationError unless `obj` is a well-formed cert-manager object."""
    stem = CERT_MANAGER_KINDS[obj["kind"]]
    ours = json.loads((K8S / "schemas" / "cert-manager" / f"{stem}.schema.json").read_text())
    jsonschema.validate(obj, ours, cls=jsonschema.Draft202012Validator)
    crds = os.environ.get("TANDEM_CERT_MANAGER_CRDS")
    if crds:
        crd = yaml.safe_load((Path(crds) / f"{stem}s.yaml").read_text())
        version = next(v for v in crd["spec"]["versions"] if f"cert-manager.io/{v['name']}" == obj["apiVersion"])
        schema = _strict(version["schema"]["openAPIV3Schema"])
        schema["properties"]["metadata"] = {"type": "object"}
        jsonschema.validate(obj, schema, cls=jsonschema.Draft7Validator)


def go_duration_hours(text: str) -> float:
    units = {"h": 1.0, "m": 1 / 60, "s": 1 / 3600}
    parts = re.findall(r"([0-9.]+)([hms])", text)
    assert "".join(n + u for n, u in parts) == text, text
    return sum(float(n) * units[u] for n, u in parts)


def certs_init_k8s(directory: Path, namespace: str = "factory") -> list[Obj]:
    assert main(["certs", "init", "--dir", str(directory), "--agents", "edge-node-1,edge-node-2",
                 "--k8s", namespace]) == 0
    return [d for d in yaml.safe_load_all((directory / "k8s" / "secrets.yaml").read_text()) if d]


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay: str) -> None:
    objs = render(overlay)
    assert {o["kind"] for o in objs} >= {"Namespace", "StatefulSet", "Deployment", "DaemonSet", "Service",
                                        "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
    for obj in objs:
        # Every object in one of the two namespaces: the edge agents' in EDGE_NS, the rest in CLOUD_NS.
        component = obj["metadata"].get("labels", {}).get("app.kubernetes.io/component")
        expected = EDGE_NS if component == EDGE else CLOUD_NS
        if obj["kind"] == "Namespace":
            assert obj["metadata"]["name"] in {CLOUD_NS, EDGE_NS} and "namespace" not in obj["metadata"]
        else:
            assert obj["metadata"].get("namespace") == expected, (obj["kind"], obj["metadata"]["name"])
        if obj["kind"] in OPERATOR_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["spec"]
            continue
        if obj["kind"] in CERT_MANAGER_KINDS:
            validate_cert_manager(obj)  # raises ValidationError
            continue
        kubernetes_validate.validate(obj, "1.37.0", strict=True)  # raises ValidationError
    assert {o["metadata"]["name"] for o in objs if o["kind"] == "Namespace"} == {CLOUD_NS, EDGE_NS}


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_are_locked_down_and_probed_on_the_ports_they_serve(overlay: str) -> None:
    objs = render(overlay)
    enrollment = {"tandem-ca"} if overlay != "overlays/cert-manager" else set()  # cert-manager's CSI driver instead
    regions = {REGION} if overlay == REGIONAL else set()
    assert {o["metadata"]["name"] for o in objs if o["kind"] in WORKLOADS} == {
        "tandem-coordinator", "tandem-inference", "tandem-edge-agent", *enrollment, *regions}
    for workload in (o for o in objs if o["kind"] in WORKLOADS):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]
        config = settings(objs, namespace_of(workload))  # the ConfigMap of its own namespace
        assert workload["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["automountServiceAccountToken"] is False
        for c in containers(workload):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            if sc.get("runAsUser") == 0 or "add" in sc["capabilities"]:
                # The one exception: the edge agent's init container that hands the node's certificate
                # directory to the agent's user. Root with CHOWN only, running chown only.
                assert (name, c["name"]) == ("tandem-edge-agent", "certs-owner")
                assert c in pod["spec"]["initContainers"] and sc["capabilities"]["add"] == ["CHOWN"]
                assert sc["runAsNonRoot"] is False and "privileged" not in sc
                script = c["command"][-1]
                assert re.findall(r"\b(chown|chmod|cp|mv|rm|ln|cat|mkdir|tandem)\b", script) == ["chown", "chown"]
            else:
                assert sc.get("runAsNonRoot", True) is True and "runAsUser" not in sc, (name, c["name"])
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][kind].keys(), (c["name"], kind)
        main_container = pod["spec"]["containers"][0]
        args = main_container["args"]
        # The args are the real CLI's: they parse, with the ConfigMap's values put in.
        parse_args(args, {**config, "NODE_NAME": "edge-node-1", "POD_NAMESPACE": namespace_of(workload),
                          "POD_NAME": "tandem-edge-agent-x7k2p"})
        ports = {p["name"]: p["containerPort"] for p in main_container["ports"]}
        # Every port declared is one the process serves, and every one it serves is declared.
        served = {port_of(flag(args, f)) for f in ("listen", "renew-listen", "health", "metrics") if flag(args, f)}
        assert set(ports.values()) == served, name
        assert ports["metrics"] == port_of(flag(args, "metrics"))
        if flag(args, "health"):
            health = port_of(flag(args, "health"))
            assert ports["health"] == health
            assert ports["grpc"] == port_of(flag(args, "listen"))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert main_container[probe]["grpc"]["port"] == health, (name, probe)
        else:  # `tandem ca` has no health port: its probes connect to the enrollment port
            assert name == "tandem-ca"
            assert ports["enroll"] == port_of(flag(args, "listen"))
            assert ports["renew"] == port_of(flag(args, "renew-listen"))
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                assert main_container[probe]["tcpSocket"]["port"] == ports["enroll"], (name, probe)
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        secrets = mounted_secrets(workload)
        assert secrets <= SECRETS | CERT_MANAGER_SECRETS | (REGION_SECRETS if name == REGION else set())
        assert bool(secrets) == (name != "tandem-edge-agent")  # the edge agent mounts no Secret
        mounts = {m["mountPath"]: m["name"] for m in main_container["volumeMounts"]}
        certs_dir = flag(args, "certs") or flag(args, "dir")
        assert certs_dir is not None
        assert mounts[re.sub(r"\$\((\w+)\)", lambda m, config=config: config[m.group(1)], certs_dir)] in volumes


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_certificates_are_mounted_whole_so_that_rotations_reach_the_servers(overlay: str) -> None:
    """A subPath mount is never updated by the kubelet: a rotated certificate, a new deny list or a
    renewed intermediate would not reach the process (the servers reload changed files)."""
    for workload in (o for o in render(overlay) if o["kind"] in WORKLOADS):
        spec = workload["spec"]["template"]["spec"]
        projected = {v["name"] for v in spec["volumes"] if {"secret", "configMap", "projected", "csi"} & v.keys()}
        for c in containers(workload):
            for mount in c.get("volumeMounts", []):
                if mount["name"] in projected:
                    assert "subPath" not in mount and "subPathExpr" not in mount, (workload["metadata"]["name"], mount)
                    assert mount.get("readOnly") is True, (workload["metadata"]["name"], mount)


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
def test_services_policies_and_scaling_point_at_real_pods() -> None:
    objs = render("base")
    templates = pods(objs)
    for service in (o for o in objs if o["kind"] == "Service"):  # a Service selects pods of its own namespace
        selected = [p for ns, _, p in templates if ns == namespace_of(service)
                    and service["spec"]["selector"].items() <= p["metadata"]["labels"].items()]
        assert selected, service["metadata"]["name"]
        names = {port["name"] for p in selected for port in p["spec"]["containers"][0]["ports"]}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= names
    for pdb in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
        assert any(pdb["spec"]["selector"]["matchLabels"].items() <= p["metadata"]["labels"].items()
                   for ns, _, p in templates if ns == namespace_of(pdb))
    hpa = find(objs, "HorizontalPodAutoscaler", "tandem-inference")
    assert find(objs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])

    coordinator = find(objs, "StatefulSet", "tandem-coordinator")
    state = flag(coordinator["spec"]["template"]["spec"]["containers"][0]["args"], "state")
    mounts = coordinator["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "state", "mountPath": state} in mounts
    assert coordinator["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "state"

    agents = find(objs, "DaemonSet", "tandem-edge-agent")["spec"]["template"]["spec"]
    assert agents["nodeSelector"] == {"tandem.dev/edge": "true"}
    assert any(t["key"] == "node-role.kubernetes.io/edge" and t["effect"] == "NoSchedule" for t in agents["tolerations"])

    # The enrollment service: its tokens on its own volume, the intermediate from the tandem-ca Secret.
    config = settings(objs, EDGE_NS)  # the agents'
    ca = find(objs, "StatefulSet", "tandem-ca")
    ca_pod = ca["spec"]["template"]["spec"]
    ca_args = ca_pod["containers"][0]["args"]
    ca_mounts = {m["mountPath"]: m for m in ca_pod["containers"][0]["volumeMounts"]}
    assert ca["spec"]["replicas"] == 1
    assert ca_mounts[flag(ca_args, "state")]["name"] == "state" and "readOnly" not in ca_mounts[flag(ca_args, "state")]
    assert [t["metadata"]["name"] for t in ca["spec"]["volumeClaimTemplates"]] == ["state"]
    ca_dir = ca_mounts[flag(ca_args, "dir")]
    assert ca_dir["readOnly"] is True
    assert {v["name"]: v for v in ca_pod["volumes"]}[ca_dir["name"]]["secret"]["secretName"] == "tandem-ca"
    hosts = (flag(ca_args, "hosts") or "").replace("$(POD_NAMESPACE)", namespace_of(ca)).split(",")
    ca_service = find(objs, "Service", "tandem-ca")
    assert {"tandem-ca", "tandem-ca.tandem.svc", "tandem-ca.tandem.svc.cluster.local"} <= set(hosts)
    ports = {p["port"]: p["targetPort"] for p in ca_service["spec"]["ports"]}
    assert ports == {7445: "enroll", 7446: "renew"}
    # The agents, in their own namespace, reach the cloud's Services by names their certificates carry.
    assert config["TANDEM_CA"] == "tandem-ca.tandem.svc:7445" and config["TANDEM_CA_RENEW"] == "tandem-ca.tandem.svc:7446"
    assert {config["TANDEM_CA"].rsplit(":", 1)[0], config["TANDEM_CA_RENEW"].rsplit(":", 1)[0]} <= set(hosts)
    server_names = set(k8s_secrets.service_hosts(CLOUD_NS))
    for key, service in (("TANDEM_CLOUD", "tandem-coordinator"), ("TANDEM_INFERENCE", "tandem-inference")):
        host, port = config[key].rsplit(":", 1)
        assert host == f"{service}.{CLOUD_NS}.svc" and host in server_names, key
        assert int(port) in {p["port"] for p in find(objs, "Service", service, CLOUD_NS)["spec"]["ports"]}, key
    assert namespace_of(ca_service) == CLOUD_NS

    # The edge agent: its key made and kept on its node, its token from the node, the CA bundle keyless.
    agent = agents["containers"][0]
    agent_args = [re.sub(r"\$\((\w+)\)", lambda m: config.get(m.group(1), m.group(0)), a) for a in agent["args"]]
    volumes = {v["name"]: v for v in agents["volumes"]}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert flag(agent_args, "id") == "$(NODE_NAME)"
    assert {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}} in agent["env"]
    assert flag(agent_args, "enroll") == config["TANDEM_CA"] and flag(agent_args, "renew") == config["TANDEM_CA_RENEW"]
    certs_mount = mounts[config["TANDEM_CERTS"]]
    assert volumes[certs_mount["name"]]["hostPath"] == {"path": "/var/lib/tandem/certs", "type": "DirectoryOrCreate"}
    assert "readOnly" not in certs_mount  # the agent writes its key and renewed certificate there

    def volume_of(path: str | None) -> tuple[Obj, Obj]:
        assert path is not None
        mount = max((m for p, m in mounts.items() if path.startswith(p + "/")), key=lambda m: len(m["mountPath"]))
        return mount, volumes[mount["name"]]

    token_mount, token_volume = volume_of(flag(agent_args, "enroll-token-file"))
    assert token_mount["readOnly"] is True and "hostPath" in token_volume
    bundle_mount, bundle_volume = volume_of(flag(agent_args, "ca-file"))
    assert bundle_mount["readOnly"] is True and bundle_volume["configMap"]["name"] == CA_BUNDLE
    # The certificate directory's ca.pem and revoked.txt are links into the bundle, so they follow its updates.
    layout = " ".join(c["command"][-1] for c in agents["initContainers"])
    for name in ("ca.pem", "revoked.txt"):
        assert f"ln -sfn {bundle_mount['mountPath']}/{name} /certs/{name}" in layout

    for deny in ("tandem-default-deny", "tandem-edge-default-deny"):  # both namespaces closed by default
        assert find(objs, "NetworkPolicy", deny)["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    grpc_in = find(objs, "NetworkPolicy", "tandem-coordinator")["spec"]["ingress"]
    assert [p["port"] for rule in grpc_in for p in rule["ports"]] == [7443]
    callers = [peer["podSelector"]["matchLabels"] for rule in grpc_in for peer in rule["from"]]
    assert callers == [{"app.kubernetes.io/component": "edge-agent"}, {"app.kubernetes.io/component": "inference"},
                       {"tandem.dev/admin": "true"}]
    edge_ns = {"matchLabels": {"kubernetes.io/metadata.name": EDGE_NS}}
    assert grpc_in[0]["from"][0]["namespaceSelector"] == edge_ns  # the agents: from their namespace only
    # Enrollment and renewal: edge agents only, whichever policy selects the CA's pods.
    ca_labels = ca["spec"]["template"]["metadata"]["labels"]
    reaching = []
    for policy in (o for o in objs if o["kind"] == "NetworkPolicy"):
        if policy["spec"]["podSelector"].get("matchLabels", {}).items() <= ca_labels.items():
            for rule in policy["spec"].get("ingress", []):
                opened = {p["port"] for p in rule.get("ports", [])}
                if not rule.get("ports") or opened & {7445, 7446}:
                    reaching.append((policy["metadata"]["name"], rule.get("from"), opened))
    assert reaching == [("tandem-ca", [{"namespaceSelector": edge_ns,
                                        "podSelector": {"matchLabels": {"app.kubernetes.io/component": "edge-agent"}}}],
                         {7445, 7446})]
    for name in ("tandem-metrics", "tandem-edge-metrics"):
        metrics_in = find(objs, "NetworkPolicy", name)["spec"]["ingress"]
        assert [peer["podSelector"]["matchLabels"] for rule in metrics_in for peer in rule["from"]] == [
            {"app.kubernetes.io/name": "prometheus"}]


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_cloud_namespace_enforces_restricted_and_only_the_edge_namespace_relaxes_it(overlay: str) -> None:
    """The "restricted" Pod Security Standard, as far as a test of the manifests can check it, for every pod
    of the cloud's namespace, which enforces it; the edge agents' DaemonSet alone runs where it is relaxed."""
    objs = render(overlay)
    enforced = {o["metadata"]["name"]: o["metadata"].get("labels", {}) for o in objs if o["kind"] == "Namespace"}
    assert enforced[CLOUD_NS][PSS] == "restricted"
    assert {name for name, labels in enforced.items() if labels.get(PSS) != "restricted"} == {EDGE_NS}
    assert enforced[EDGE_NS][PSS] == "privileged"  # no level between baseline and privileged admits a hostPort
    assert enforced[EDGE_NS]["pod-security.kubernetes.io/warn"] in {"baseline", "restricted"}
    relaxed = [(w["kind"], w["metadata"]["name"]) for ns, w, _ in pods(objs) if ns == EDGE_NS]
    assert relaxed == [("DaemonSet", "tandem-edge-agent")]
    cloud = [(w["metadata"]["name"], p["spec"]) for ns, w, p in pods(objs) if ns != EDGE_NS]
    assert {name for name, _ in cloud} >= {"tandem-coordinator", "tandem-inference"}
    for name, spec in cloud:
        assert all(ns == CLOUD_NS for ns, w, _ in pods(objs) if w["metadata"]["name"] == name), name
        for field in ("hostNetwork", "hostPID", "hostIPC"):
            assert not spec.get(field), (name, field)
        for volume in spec.get("volumes", []):  # restricted admits these volume types only (so no hostPath)
            assert "hostPath" not in volume, (name, volume["name"])
            assert volume.keys() - {"name"} <= {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                                               "persistentVolumeClaim", "projected", "secret"}, (name, volume)
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert pod_sc.get("runAsUser") != 0, name
        for c in [*spec.get("initContainers", []), *spec["containers"]]:
            sc = c.get("securityContext", {})
            assert (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))) is True, (name, c["name"])
            assert sc.get("runAsUser", pod_sc.get("runAsUser")) not in (0, None), (name, c["name"])
            assert sc.get("seccompProfile", {}).get("type", "RuntimeDefault") == "RuntimeDefault", (name, c["name"])
            assert sc.get("allowPrivilegeEscalation") is False and not sc.get("privileged"), (name, c["name"])
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), (name, c["name"])
            assert not any(p.get("hostPort") for p in c.get("ports", [])), (name, c["name"])


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_edge_agents_reach_exactly_the_cloud_ports_they_use_across_namespaces(overlay: str) -> None:
    """The agents, in their own namespace, reach the ports of the cloud's pods that their settings name (the
    coordinator, or their region in the regional overlay; the replicas, enrollment and renewal) and no other; a
    pod in the cloud's namespace that merely carries the agents' labels is not let in as one; Prometheus still
    reaches every metrics port."""
    objs = render(overlay)
    daemonset = find(objs, "DaemonSet", "tandem-edge-agent")
    assert namespace_of(daemonset) == EDGE_NS
    agent_pod = daemonset["spec"]["template"]
    agent_labels = agent_pod["metadata"]["labels"]
    config = settings(objs, EDGE_NS)
    args = [re.sub(r"\$\((\w+)\)", lambda m: config.get(m.group(1), m.group(0)), a)
            for a in agent_pod["spec"]["containers"][0]["args"]]
    # What the agent calls: SERVICE.NAMESPACE.svc:PORT, each a Service's port, to the pods' container port.
    used: set[tuple[str, int]] = set()
    for option in ("cloud", "inference-cloud", "enroll", "renew"):
        address = flag(args, option)
        if address is None:
            continue  # the cert-manager overlay: no enrollment
        assert address.rsplit(":", 1)[0].split(".")[1:] == [CLOUD_NS, "svc"], address
        used |= reached(objs, address, EDGE_NS)
    expected = {(REGION if overlay == REGIONAL else "tandem-coordinator", 7443), ("tandem-inference", 7450)}
    if overlay != "overlays/cert-manager":
        expected |= {("tandem-ca", 7445), ("tandem-ca", 7446)}
    assert used == expected
    prometheus = {"app.kubernetes.io/name": "prometheus"}
    for ns, workload, pod in pods(objs):
        for port in (p["containerPort"] for c in pod["spec"]["containers"] for p in c.get("ports", [])):
            key = (workload["metadata"]["name"], port)
            if ns == CLOUD_NS:
                assert admitted(objs, pod, ns, port, agent_labels, EDGE_NS) == (key in used), key
                # The agents' labels alone, from the cloud's own namespace, are not an agent.
                assert not admitted(objs, pod, ns, port, agent_labels, CLOUD_NS) or key[1] == 7450, key
            if port in (9100, 9101):
                assert admitted(objs, pod, ns, port, prometheus, "monitoring"), key
                assert not admitted(objs, pod, ns, port, {"app.kubernetes.io/name": "other"}, "monitoring"), key
    # The agents' own ports: Inference (7460) for local applications, metrics for Prometheus only, nothing else.
    for port, open_to_all in ((7460, True), (7461, False), (9101, False)):
        assert admitted(objs, agent_pod, EDGE_NS, port, {"app": "client"}, "apps") is open_to_all, port


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
def test_overlays_change_what_they_say() -> None:
    dev = render("overlays/dev")
    assert find(dev, "Deployment", "tandem-inference")["spec"]["replicas"] == 1
    assert find(dev, "HorizontalPodAutoscaler", "tandem-inference")["spec"]["minReplicas"] == 1

    gpu = find(render("overlays/gpu"), "Deployment", "tandem-inference")["spec"]["template"]["spec"]["containers"][0]
    assert gpu["resources"]["requests"]["nvidia.com/gpu"] == 1 and gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu["image"].endswith("-cuda") and "--device=cuda" in gpu["args"]

    operator = render("overlays/prometheus-operator")
    jobs = {m["metadata"]["name"]: (m["spec"].get("endpoints") or m["spec"]["podMetricsEndpoints"])[0]
            for m in operator if m["kind"] in {"ServiceMonitor", "PodMonitor"}}
    assert {name: ep["relabelings"][0]["replacement"] for name, ep in jobs.items()} == {
        "tandem-cloud": "tandem-cloud", "tandem-inference": "tandem-inference", "tandem-edge": "tandem-edge",
        "tandem-ca": "tandem-ca"}
    # Each monitor selects its targets' namespace: the agents' PodMonitor the edge namespace.
    targets = {"tandem-cloud": "coordinator", "tandem-inference": "inference", "tandem-edge": EDGE, "tandem-ca": "ca"}
    for monitor in (m for m in operator if m["kind"] in {"ServiceMonitor", "PodMonitor"}):
        component = targets[monitor["metadata"]["name"]]
        (namespace,) = {namespace_of(w) for w in operator if w["kind"] in WORKLOADS and w["spec"]["template"][
            "metadata"]["labels"]["app.kubernetes.io/component"] == component}
        assert monitor["spec"]["namespaceSelector"] == {"matchNames": [namespace]}, monitor["metadata"]["name"]
        assert monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == component
    assert find(operator, "PodMonitor", "tandem-edge")["spec"]["namespaceSelector"] == {"matchNames": [EDGE_NS]}
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules" / "tandem.rules.yml").read_text())
    assert find(operator, "PrometheusRule", "tandem")["spec"]["groups"] == rules["groups"]


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
def test_cert_manager_overlay_makes_agent_keys_on_nodes_and_renews_the_servers() -> None:
    objs = render("overlays/cert-manager")
    config = settings(objs, EDGE_NS)
    assert not [o for o in objs if o["metadata"]["name"] in {"tandem-ca", "tandem-ca-metrics"}]  # no enrollment service
    issuers = {o["metadata"]["name"]: o["spec"]["ca"]["secretName"] for o in objs if o["kind"] == "Issuer"}
    assert issuers == {"tandem-agents": "tandem-agents-issuer", "tandem-servers": "tandem-servers-issuer"}
    # A namespaced Issuer signs the requests of its own namespace only: the agents' (the CSI driver requests in
    # the pod's namespace) is in theirs, the servers' with the Certificates.
    assert namespace_of(find(objs, "Issuer", "tandem-agents")) == namespace_of(
        find(objs, "DaemonSet", "tandem-edge-agent")) == EDGE_NS
    assert namespace_of(find(objs, "Issuer", "tandem-servers")) == CLOUD_NS
    assert {namespace_of(o) for o in objs if o["kind"] == "Certificate"} == {CLOUD_NS}
    workloads = [o for o in objs if o["kind"] in WORKLOADS]
    assert not {s for w in workloads for s in mounted_secrets(w)} & set(issuers.values())  # CA keys: cert-manager's

    # Agents: the CSI driver makes the key on the node and has tandem-agents sign tandem://agent/POD_NAME.
    daemonset = find(objs, "DaemonSet", "tandem-edge-agent")
    pod = daemonset["spec"]["template"]["spec"]
    agent = pod["containers"][0]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounted_secrets(daemonset) == set()
    assert [v["hostPath"]["path"] for v in volumes.values() if "hostPath" in v] == ["/var/lib/tandem/data"]
    (tls,) = [v["csi"] for v in volumes.values() if "csi" in v]
    attributes = tls["volumeAttributes"]
    assert tls["driver"] == "csi.cert-manager.io" and tls["readOnly"] is True
    assert attributes["csi.cert-manager.io/issuer-name"] == "tandem-agents"
    assert attributes["csi.cert-manager.io/issuer-kind"] == "Issuer"
    assert attributes["csi.cert-manager.io/uri-sans"] == "tandem://agent/${POD_NAME}"
    assert attributes["csi.cert-manager.io/common-name"] == "${POD_NAME}"
    assert set(attributes["csi.cert-manager.io/key-usages"].split(",")) == {"digital signature", "client auth",
                                                                             "server auth"}
    assert attributes["csi.cert-manager.io/fs-group"] == str(pod["securityContext"]["fsGroup"])
    assert go_duration_hours(attributes["csi.cert-manager.io/renew-before"]) < go_duration_hours(
        attributes["csi.cert-manager.io/duration"])
    assert flag(agent["args"], "id") == "$(POD_NAME)" and flag(agent["args"], "enroll") is None
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in agent["env"]
    mounts = {m["name"]: m["mountPath"] for m in agent["volumeMounts"]}
    assert mounts["certs"] == config["TANDEM_CERTS"] and "emptyDir" in volumes["certs"]
    (layout,) = pod["initContainers"]
    links = layout["command"][-1]
    for volume, name, target in (("tls", "tls.crt", "agents/$(POD_NAME).pem"), ("tls", "tls.key", "agents/$(POD_NAME).key"),
                                 ("ca-bundle", "ca.pem", "ca.pem"), ("ca-bundle", "revoked.txt", "revoked.txt")):
        link = rf'ln -sfn {re.escape(mounts[volume])}/{re.escape(name)} "?/certs/{re.escape(target)}"?( |$)'
        assert re.search(link, links), (volume, name)
    assert {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}} in layout["env"]

    # Servers: Certificates from tandem-servers, renewed before expiry, with the names `certs init --k8s` gives,
    # mounted (whole, as the files Tandem reads) by the coordinator and the replicas.
    hosts = {str(n.value) for n in certs.host_names(k8s_secrets.service_hosts("tandem"))}
    for name, owner, leaf, identity in (
            ("tandem-cloud", find(objs, "StatefulSet", "tandem-coordinator"), "cloud", "tandem://server/cloud"),
            ("tandem-inference", find(objs, "Deployment", "tandem-inference"), "inference",
             "tandem://replica/inference")):
        spec = find(objs, "Certificate", name)["spec"]
        assert spec["issuerRef"] == {"name": "tandem-servers", "kind": "Issuer", "group": "cert-manager.io"}
        assert 0 < go_duration_hours(spec["renewBefore"]) < go_duration_hours(spec["duration"])
        assert spec["uris"] == [identity] and spec["privateKey"]["rotationPolicy"] == "Always"
        assert {*spec["dnsNames"], *spec["ipAddresses"]} == hosts
        (certs_volume,) = [v for v in owner["spec"]["template"]["spec"]["volumes"] if v["name"] == "certs"]
        sources = {next(iter(s)): s[next(iter(s))] for s in certs_volume["projected"]["sources"]}
        assert sources["secret"]["name"] == spec["secretName"]
        assert {i["key"]: i["path"] for i in sources["secret"]["items"]} == {"tls.crt": f"{leaf}.pem",
                                                                              "tls.key": f"{leaf}.key"}
        assert sources["configMap"]["name"] == CA_BUNDLE
        assert {i["path"] for i in sources["configMap"]["items"]} == {"ca.pem", "revoked.txt"}


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
def test_regional_overlay_puts_a_region_between_the_agents_and_the_cloud() -> None:
    objs = render(REGIONAL)
    cloud_config, edge_config = settings(objs, CLOUD_NS), settings(objs, EDGE_NS)
    region = find(objs, "StatefulSet", REGION, CLOUD_NS)
    region_pod = region["spec"]["template"]
    container = region_pod["spec"]["containers"][0]
    assert container["args"][0] == "region" and region["spec"]["replicas"] == 1
    args = parse_args(container["args"], cloud_config)
    listen = port_of(args.listen)

    # Its state on a volume of its own: the StatefulSet's claim, mounted writable where --state points.
    (claim,) = region["spec"]["volumeClaimTemplates"]
    state = {m["mountPath"]: m for m in container["volumeMounts"]}[str(args.state)]
    assert state["name"] == claim["metadata"]["name"] and not state.get("readOnly")
    assert state["name"] not in {v["name"] for v in region_pod["spec"]["volumes"]}  # no pod volume shadows the claim
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"] and claim["spec"]["resources"]["requests"]["storage"]

    # Its parent: the cloud Service's coordinator port, by a name the coordinator's certificate carries.
    assert reached(objs, args.parent, CLOUD_NS) == {("tandem-coordinator", 7443)}
    assert args.parent.rsplit(":", 1)[0] in k8s_secrets.service_hosts(CLOUD_NS)

    # Its certificate directory: regions/ID.pem and .key from its Secret, ca.pem and the deny list from the bundle.
    certs_mount = {m["mountPath"]: m for m in container["volumeMounts"]}[str(args.certs)]
    (certs_volume,) = [v for v in region_pod["spec"]["volumes"] if v["name"] == certs_mount["name"]]
    files = {item["path"]: (kind, source["name"], item["key"]) for entry in certs_volume["projected"]["sources"]
             for kind, source in entry.items() for item in source["items"]}
    cert_path, key_path = (str(p.relative_to(args.certs)) for p in certs.region_paths(args.certs, args.id))
    assert files == {cert_path: ("secret", REGION, f"{args.id}.pem"), key_path: ("secret", REGION, f"{args.id}.key"),
                     "ca.pem": ("configMap", CA_BUNDLE, "ca.pem"), "revoked.txt": ("configMap", CA_BUNDLE, "revoked.txt")}

    # The agents: their coordinator is the region's Service; enrollment and renewal stay at tandem-ca.
    daemonset = find(objs, "DaemonSet", "tandem-edge-agent", EDGE_NS)
    agent_pod = daemonset["spec"]["template"]
    agent_args = parse_args(agent_pod["spec"]["containers"][0]["args"],
                            {**edge_config, "NODE_NAME": "edge-node-1"})
    assert reached(objs, agent_args.cloud, EDGE_NS) == {(REGION, listen)}
    assert reached(objs, agent_args.enroll, EDGE_NS) == {("tandem-ca", 7445)}
    assert reached(objs, agent_args.renew, EDGE_NS) == {("tandem-ca", 7446)}
    region_name = region_pod["metadata"]["labels"]["tandem.dev/region"]
    agent_labels = agent_pod["metadata"]["labels"]
    assert agent_labels["tandem.dev/region"] == region_name == daemonset["spec"]["selector"]["matchLabels"][
        "tandem.dev/region"] == agent_pod["spec"]["nodeSelector"]["tandem.dev/region"]

    # NetworkPolicies: agents -> their region; the region -> the cloud's coordinator; not agents -> the coordinator.
    coordinator_pod = find(objs, "StatefulSet", "tandem-coordinator", CLOUD_NS)["spec"]["template"]
    region_labels = region_pod["metadata"]["labels"]
    assert admitted(objs, region_pod, CLOUD_NS, listen, agent_labels, EDGE_NS)
    assert not admitted(objs, region_pod, CLOUD_NS, listen, {**agent_labels, "tandem.dev/region": "east"}, EDGE_NS)
    assert not admitted(objs, region_pod, CLOUD_NS, port_of(args.health), agent_labels, EDGE_NS)
    assert admitted(objs, coordinator_pod, CLOUD_NS, 7443, region_labels, CLOUD_NS)
    assert not admitted(objs, coordinator_pod, CLOUD_NS, 7443, region_labels, EDGE_NS)
    assert not admitted(objs, coordinator_pod, CLOUD_NS, 7443, agent_labels, EDGE_NS)
    # And the base, for contrast: there the agents reach the coordinator.
    base = render("base")
    base_agent = find(base, "DaemonSet", "tandem-edge-agent", EDGE_NS)["spec"]["template"]["metadata"]["labels"]
    base_coordinator = find(base, "StatefulSet", "tandem-coordinator", CLOUD_NS)["spec"]["template"]
    assert admitted(base, base_coordinator, CLOUD_NS, 7443, base_agent, EDGE_NS)


def documented_commands(section: str) -> list[list[str]]:
    """The shell commands of the code blocks of docs/kubernetes.md's `## section`, split into words."""
    text = (ROOT / "docs" / "kubernetes.md").read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", text, re.S)
    return [shlex.split(line, comments=True) for block in blocks
            for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
def test_documented_region_commands_make_the_secret_the_regional_overlay_mounts(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tandem certs init --k8s` does not write the region's Secret: docs/kubernetes.md says how. Its commands,
    run here, make a Secret with the keys the overlay mounts and one private key, and a certificate that the
    agents' --cloud host and the deployment's root vouch for."""
    objs = render(REGIONAL)
    region_pod = find(objs, "StatefulSet", REGION, CLOUD_NS)["spec"]["template"]["spec"]
    (certs_volume,) = [v for v in region_pod["volumes"] if v["name"] == "certs"]
    (mounted,) = [s["secret"] for s in certs_volume["projected"]["sources"] if "secret" in s]
    edge_config = settings(objs, EDGE_NS)

    commands = documented_commands("Regional aggregators")
    monkeypatch.chdir(tmp_path)
    certs_init_k8s(Path("certs"), namespace=CLOUD_NS)
    (add_region,) = [c for c in commands if c[:3] == ["tandem", "certs", "add-region"]]
    assert main(add_region[1:]) == 0
    (create,) = [c for c in commands if c[:4] == ["kubectl", "create", "secret", "generic"]]
    assert create[4] == mounted["name"] == REGION and create[create.index("-n") + 1] == CLOUD_NS
    data: dict[str, bytes] = {}
    paths: set[Path] = set()
    for arg in create:
        if arg.startswith("--from-file="):
            key, _, path = arg.removeprefix("--from-file=").rpartition("=")
            data[key or Path(path).name] = Path(path).read_bytes()
            paths.add(Path(path))
    assert data.keys() == {item["key"] for item in mounted["items"]}
    # The files of the region the overlay runs (its --id), as `add-region` wrote them.
    assert add_region[3] == flag(region_pod["containers"][0]["args"], "id")
    assert paths == set(certs.region_paths(Path("certs"), add_region[3]))
    secret = {"kind": "Secret", "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}
    assert private_keys(secret) == 1
    (pem,) = [v for k, v in data.items() if k.endswith(".pem")]
    cert = x509.load_pem_x509_certificate(pem)
    cert.verify_directly_issued_by(x509.load_pem_x509_certificate(Path("certs/ca.pem").read_bytes()))
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [f"tandem://region/{add_region[3]}"]
    assert edge_config["TANDEM_CLOUD"].rsplit(":", 1)[0] in names.get_values_for_type(x509.DNSName)


def test_certs_init_k8s_writes_the_secrets_the_manifests_mount(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    directory = tmp_path / "certs"
    objs = certs_init_k8s(directory)
    path = directory / "k8s" / "secrets.yaml"
    assert path.stat().st_mode & 0o777 == 0o600
    secrets = {s["metadata"]["name"]: s for s in objs if s["kind"] == "Secret"}
    assert secrets.keys() == SECRETS
    # The Secrets in the namespace given; the key-less bundle in the edge agents' namespace (and in the cloud's,
    # where the cert-manager overlay's servers project it).
    assert all(namespace_of(s) == "factory" for s in secrets.values())
    bundles = {namespace_of(o): o for o in objs if o["kind"] == "ConfigMap"}
    assert bundles.keys() == {"factory", "factory-edge"} and {o["metadata"]["name"] for o in bundles.values()} == {
        CA_BUNDLE}
    assert bundles["factory"]["data"] == bundles["factory-edge"]["data"]
    bundle = bundles["factory-edge"]["data"]
    # No agent was given a key, here or in the Secrets: they enrol; the admin is told how to make their tokens.
    assert not (directory / "agents" / "edge-node-1.key").exists()
    out = capsys.readouterr().out
    for node in ("edge-node-1", "edge-node-2"):
        assert (f"kubectl exec -n factory tandem-ca-0 -- tandem certs token {node} --ca-dir /ca --state /state "
                f"--ttl 1h") in out
    for secret, leaf in (("tandem-cloud", "cloud.pem"), ("tandem-inference", "inference.pem")):
        cert = x509.load_pem_x509_certificate(base64.b64decode(secrets[secret]["data"][leaf]))
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {"tandem-coordinator.factory.svc", "tandem-inference.factory.svc.cluster.local"} <= set(
            names.get_values_for_type(x509.DNSName))
    # The enrollment service's Secret: the agents' intermediate (made in certs/ca), signed by the root,
    # able to vouch for agents only; the agents' bundle: the root and the deny list, no key.
    ca = {k: base64.b64decode(v) for k, v in secrets["tandem-ca"]["data"].items()}
    assert ca.keys() == {"intermediate.pem", "intermediate.key", "ca.pem", "revoked.txt"}
    assert ca["intermediate.key"] == (directory / "ca" / "intermediate.key").read_bytes()
    root = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    intermediate = x509.load_pem_x509_certificate(ca["intermediate.pem"])
    intermediate.verify_directly_issued_by(root)
    constraints = intermediate.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical and constraints.value.permitted_subtrees == [x509.UniformResourceIdentifier("agent")]
    assert bundle.keys() == {"ca.pem", "revoked.txt"} and bundle["ca.pem"].encode() == ca["ca.pem"]


def test_certs_init_k8s_refuses_a_bad_agent_name_before_writing(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    assert main(["certs", "init", "--dir", str(directory), "--agents", "ok,Not A Name", "--k8s", "factory"]) == 2
    assert not (directory / "ca.pem").exists()


def test_certs_init_k8s_refuses_a_namespace_whose_edge_namespace_is_too_long(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    assert main(["certs", "init", "--dir", str(directory), "--k8s", "n" * 59]) == 2  # n...n-edge: 64 characters
    assert not (directory / "ca.pem").exists()
    assert k8s_secrets.edge_namespace("n" * 58) == "n" * 58 + "-edge"


@pytest.mark.parametrize("namespace", ["bad_ns", "bad.ns", "Bad", "bad-"])
def test_certs_init_k8s_refuses_what_kubernetes_would_not_take_as_a_namespace(
        tmp_path: Path, namespace: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Tandem names allow '.' and '_'; namespaces do not: the Secrets would be refused at kubectl apply.
    directory = tmp_path / "certs"
    assert main(["certs", "init", "--dir", str(directory), "--k8s", namespace]) == 2
    assert capsys.readouterr().err.startswith(f"error: invalid Kubernetes namespace {namespace!r}")
    assert not directory.exists()


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
def test_no_secret_holds_more_than_one_private_key_and_edge_nodes_mount_none(tmp_path: Path) -> None:
    """Issue 19: one stolen edge node's kubelet must not hold the fleet's keys. Every object of every
    overlay and of the file `tandem certs init --k8s` writes: at most one private key each, and the
    edge workloads mount no Secret holding a key (their keys are made on their nodes)."""
    generated = certs_init_k8s(tmp_path / "certs")
    keyed = {(namespace_of(o), o["metadata"]["name"]): private_keys(o) for o in generated
             if o["kind"] in {"Secret", "ConfigMap"}}
    assert {name: n for name, n in keyed.items() if n > 1} == {}
    assert keyed == {("factory", "tandem-cloud"): 1, ("factory", "tandem-inference"): 1, ("factory", "tandem-admin"): 1,
                     ("factory", "tandem-ca"): 1, ("factory", CA_BUNDLE): 0, ("factory-edge", CA_BUNDLE): 0}
    for overlay in OVERLAYS:
        objs = render(overlay)
        available = {o["metadata"]["name"]: o for o in [*generated, *objs] if o["kind"] == "Secret"}
        for obj in objs:
            if obj["kind"] in {"Secret", "ConfigMap"}:
                assert private_keys(obj) <= 1, (overlay, obj["metadata"]["name"])
        edge = [o for o in objs if o["kind"] in WORKLOADS and (o["kind"] == "DaemonSet" or o["spec"]["template"][
            "metadata"]["labels"].get("app.kubernetes.io/component") == "edge-agent")]
        assert edge, overlay
        for workload in edge:
            for name in mounted_secrets(workload):
                assert name in available, (overlay, name)
                assert private_keys(available[name]) == 0, (overlay, workload["metadata"]["name"], name)


def test_certs_revoke_rewrites_the_secrets_with_the_deny_list(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    before = {(namespace_of(s), s["metadata"]["name"]): s for s in certs_init_k8s(directory)}
    path = directory / "k8s" / "secrets.yaml"
    servers = ("tandem-cloud", "tandem-inference", "tandem-ca")  # every server that checks client certificates
    bundles = (("factory-edge", CA_BUNDLE), ("factory", CA_BUNDLE))  # the agents', the cert-manager servers'

    def deny_lists(objs: dict[tuple[str, str], Obj]) -> dict[tuple[str, str], bytes]:
        lists = {("factory", name): base64.b64decode(objs["factory", name]["data"]["revoked.txt"]) for name in servers}
        return {**lists, **{key: objs[key]["data"]["revoked.txt"].encode() for key in bundles}}

    assert set(deny_lists(before).values()) == {b""}
    assert main(["certs", "revoke", "edge-node-2", "--dir", str(directory), "--role", "agent"]) == 0
    after = {(namespace_of(s), s["metadata"]["name"]): s for s in yaml.safe_load_all(path.read_text())}
    deny = (directory / "revoked.txt").read_bytes()
    assert b"agent/edge-node-2" in deny
    assert set(deny_lists(after).values()) == {deny}
    assert after.keys() == before.keys()  # the same objects in the same namespaces, the bundle still in factory-edge
    assert {n: o["data"].keys() for n, o in after.items()} == {n: o["data"].keys() for n, o in before.items()}
    assert path.stat().st_mode & 0o777 == 0o600


def test_certs_rotate_rewrites_the_secrets_and_keeps_the_bundle_in_the_edge_namespace(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    before = {(namespace_of(o), o["metadata"]["name"]): o for o in certs_init_k8s(directory)}
    path = directory / "k8s" / "secrets.yaml"
    assert main(["certs", "rotate", "--dir", str(directory), "--days", "30"]) == 0
    after = {(namespace_of(o), o["metadata"]["name"]): o for o in yaml.safe_load_all(path.read_text()) if o}
    assert after.keys() == before.keys() and ("factory-edge", CA_BUNDLE) in after
    for name, leaf in (("tandem-cloud", "cloud.pem"), ("tandem-inference", "inference.pem")):
        new = after["factory", name]["data"][leaf]
        assert new != before["factory", name]["data"][leaf]
        assert base64.b64decode(new) == (directory / leaf).read_bytes()
    assert after["factory-edge", CA_BUNDLE] == before["factory-edge", CA_BUNDLE]
    assert path.stat().st_mode & 0o777 == 0o600


def test_certs_revoke_leaves_a_secrets_file_without_an_intermediate_alone(tmp_path: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A file from before enrollment (every agent's key in tandem-agents) is not rewritten: the
    revocation itself happens, and the operator is pointed at the upgrade."""
    directory = tmp_path / "certs"
    certs_init_k8s(directory)
    shutil.rmtree(directory / "ca")
    path = directory / "k8s" / "secrets.yaml"
    text = path.read_text()
    assert main(["certs", "revoke", "edge-node-2", "--dir", str(directory), "--role", "agent"]) == 0
    assert path.read_text() == text
    assert b"agent/edge-node-2" in (directory / "revoked.txt").read_bytes()
    assert "did not rewrite" in capsys.readouterr().out


def test_dockerfile_is_pinned_non_root_and_copies_what_exists() -> None:
    text = (ROOT / "Dockerfile").read_text()
    lines = [line.strip() for line in text.replace("\\\n", " ").splitlines()]
    base = next(line.split("=", 1)[1] for line in lines if line.startswith("ARG PYTHON_IMAGE="))
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base  # a pinned patch release, never :latest
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) == 2 and stages[0].endswith(" AS build")
    final = text.rsplit(stages[1] + "\n", 1)[1]
    assert "USER 10001:10001" in final and 'ENTRYPOINT ["tandem"]' in final
    assert not re.search(r"apt-get|gcc|build-essential|pip install", final), "the final stage only copies"
    assert "ARG TORCH_VARIANT=cpu" in text and not any(line.startswith("HEALTHCHECK") for line in lines)
    for line in lines:
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = shlex.split(line)[1:]
            for source in sources:
                assert (ROOT / source).exists(), f"{line}: {source} does not exist"
