"""deploy/k8s and the Dockerfile: every overlay renders, validates, and has the properties operators rely on."""

from __future__ import annotations

import base64
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from tandem_cli.main import build_parser, main

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ["base", "overlays/dev", "overlays/gpu", "overlays/prometheus-operator"]
OPERATOR_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}  # CRDs: no schema in kubernetes-validate
WORKLOADS = {"StatefulSet", "Deployment", "DaemonSet"}
SECRETS = {"tandem-cloud", "tandem-inference", "tandem-agents", "tandem-admin"}

needs_kubectl = pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (with kustomize) is not installed")

Obj = dict[str, Any]


def render(overlay: str) -> list[Obj]:
    out = subprocess.run(["kubectl", "kustomize", str(K8S / overlay)], check=True, capture_output=True, text=True)
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(objs: list[Obj], kind: str, name: str) -> Obj:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"{kind}/{name}: {len(matches)} found"
    return matches[0]


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


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates_strictly(overlay: str) -> None:
    objs = render(overlay)
    assert {o["kind"] for o in objs} >= {"Namespace", "StatefulSet", "Deployment", "DaemonSet", "Service",
                                        "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}
    for obj in objs:
        if obj["kind"] in OPERATOR_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1" and obj["spec"]
            continue
        kubernetes_validate.validate(obj, "1.37.0", strict=True)  # raises ValidationError
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "tandem", obj["metadata"]["name"]


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
def test_workloads_are_locked_down_and_probed_on_the_ports_they_serve() -> None:
    objs = render("base")
    config = find(objs, "ConfigMap", "tandem-config")["data"]
    for workload in (o for o in objs if o["kind"] in WORKLOADS):
        pod = workload["spec"]["template"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
        assert pod["spec"]["automountServiceAccountToken"] is False
        for c in containers(workload):
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            assert sc["capabilities"]["drop"] == ["ALL"]
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][kind].keys(), (c["name"], kind)
        main_container = pod["spec"]["containers"][0]
        args = main_container["args"]
        # The args are the real CLI's: they parse, with the ConfigMap's values put in.
        env = {**config, "NODE_NAME": "edge-node-1"}
        build_parser().parse_args([re.sub(r"\$\((\w+)\)", lambda m, env=env: env[m.group(1)], a) for a in args])
        ports = {p["name"]: p["containerPort"] for p in main_container["ports"]}
        health = port_of(flag(args, "health"))
        assert ports["health"] == health
        assert ports["grpc"] == port_of(flag(args, "listen"))
        assert ports["metrics"] == port_of(flag(args, "metrics"))
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert main_container[probe]["grpc"]["port"] == health, (workload["metadata"]["name"], probe)
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        secrets = {v["secret"]["secretName"] for v in volumes.values() if "secret" in v}
        assert secrets and secrets <= SECRETS
        mounts = {m["mountPath"]: m["name"] for m in main_container["volumeMounts"]}
        assert mounts[config["TANDEM_CERTS"]] in volumes


@pytest.mark.process  # kubectl kustomize
@needs_kubectl
def test_services_policies_and_scaling_point_at_real_pods() -> None:
    objs = render("base")
    pods = [o["spec"]["template"] for o in objs if o["kind"] in WORKLOADS]
    for service in (o for o in objs if o["kind"] == "Service"):
        selected = [p for p in pods if service["spec"]["selector"].items() <= p["metadata"]["labels"].items()]
        assert selected, service["metadata"]["name"]
        names = {port["name"] for p in selected for port in p["spec"]["containers"][0]["ports"]}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= names
    for pdb in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
        assert any(pdb["spec"]["selector"]["matchLabels"].items() <= p["metadata"]["labels"].items() for p in pods)
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

    assert find(objs, "NetworkPolicy", "tandem-default-deny")["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    grpc_in = find(objs, "NetworkPolicy", "tandem-coordinator")["spec"]["ingress"]
    assert [p["port"] for rule in grpc_in for p in rule["ports"]] == [7443]
    callers = [peer["podSelector"]["matchLabels"] for rule in grpc_in for peer in rule["from"]]
    assert callers == [{"app.kubernetes.io/component": "edge-agent"}, {"app.kubernetes.io/component": "inference"},
                       {"tandem.dev/admin": "true"}]
    metrics_in = find(objs, "NetworkPolicy", "tandem-metrics")["spec"]["ingress"]
    assert [peer["podSelector"]["matchLabels"] for rule in metrics_in for peer in rule["from"]] == [
        {"app.kubernetes.io/name": "prometheus"}]


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
        "tandem-cloud": "tandem-cloud", "tandem-inference": "tandem-inference", "tandem-edge": "tandem-edge"}
    rules = yaml.safe_load((ROOT / "deploy" / "prometheus" / "rules" / "tandem.rules.yml").read_text())
    assert find(operator, "PrometheusRule", "tandem")["spec"]["groups"] == rules["groups"]


def test_certs_init_k8s_writes_the_secrets_the_manifests_mount(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    assert main(["certs", "init", "--dir", str(directory), "--agents", "edge-node-1,edge-node-2",
                 "--k8s", "factory"]) == 0
    path = directory / "k8s" / "secrets.yaml"
    assert path.stat().st_mode & 0o777 == 0o600
    secrets = {s["metadata"]["name"]: s for s in yaml.safe_load_all(path.read_text())}
    assert secrets.keys() == SECRETS
    assert all(s["metadata"]["namespace"] == "factory" for s in secrets.values())
    agents = secrets["tandem-agents"]["data"]
    assert set(agents) == {"ca.pem", "revoked.txt", "edge-node-1.pem", "edge-node-1.key", "edge-node-2.pem",
                           "edge-node-2.key"}
    assert base64.b64decode(agents["edge-node-2.key"]) == (directory / "agents" / "edge-node-2.key").read_bytes()
    for secret, leaf in (("tandem-cloud", "cloud.pem"), ("tandem-inference", "inference.pem")):
        cert = x509.load_pem_x509_certificate(base64.b64decode(secrets[secret]["data"][leaf]))
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {"tandem-coordinator.factory.svc", "tandem-inference.factory.svc.cluster.local"} <= set(
            names.get_values_for_type(x509.DNSName))


def test_certs_revoke_rewrites_the_secrets_with_the_deny_list(tmp_path: Path) -> None:
    directory = tmp_path / "certs"
    assert main(["certs", "init", "--dir", str(directory), "--agents", "edge-node-1,edge-node-2",
                 "--k8s", "factory"]) == 0
    path = directory / "k8s" / "secrets.yaml"
    before = {s["metadata"]["name"]: s for s in yaml.safe_load_all(path.read_text())}
    assert all(base64.b64decode(before[n]["data"]["revoked.txt"]) == b""
               for n in ("tandem-cloud", "tandem-inference", "tandem-agents"))
    assert main(["certs", "revoke", "edge-node-2", "--dir", str(directory)]) == 0
    after = {s["metadata"]["name"]: s for s in yaml.safe_load_all(path.read_text())}
    deny = (directory / "revoked.txt").read_bytes()
    assert b"agent/edge-node-2" in deny
    for name in ("tandem-cloud", "tandem-inference", "tandem-agents"):  # every server that checks client certificates
        assert base64.b64decode(after[name]["data"]["revoked.txt"]) == deny
        assert after[name]["metadata"]["namespace"] == "factory"
    assert after["tandem-agents"]["data"].keys() == before["tandem-agents"]["data"].keys()
    assert path.stat().st_mode & 0o777 == 0o600


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
