"""The `tandem` command: certificates, the coordinator, edge agents, jobs, the demo."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import grpc

from tandem import certs


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(name, default)


def _client_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cloud", default=_env("TANDEM_CLOUD", "localhost:7443"),
                        help="coordinator address HOST:PORT (env TANDEM_CLOUD; default %(default)s)")
    parser.add_argument("--certs", type=Path, default=Path(_env("TANDEM_CERTS", ".certs") or ".certs"),
                        help="deployment certificate directory (env TANDEM_CERTS; default %(default)s)")


def _serving_args(parser: argparse.ArgumentParser, device: str = "auto") -> None:
    group = parser.add_argument_group("inference")
    group.add_argument("--device", default=device, help="where models run: auto (cuda if present), cpu, cuda[:N]")
    group.add_argument("--max-batch", type=int, default=64, help="rows gathered into one forward pass")
    group.add_argument("--max-delay-ms", type=float, default=2.0,
                       help="longest a request waits for its batch to fill, in milliseconds")
    group.add_argument("--max-queue-rows", type=int, default=8192,
                       help="rows waiting at most; beyond it requests get RESOURCE_EXHAUSTED")
    group.add_argument("--max-request-rows", type=int, default=1024, help="rows one request may carry")
    group.add_argument("--torch-threads", type=int, default=0,
                       help="torch intra-op threads (0: one fewer than the cores, leaving one to gRPC)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description="Cloud-edge collaborative AI.")
    parser.add_argument("--log-level", default=_env("TANDEM_LOG_LEVEL", "INFO"), help="logging level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_certs = sub.add_parser("certs", help="make the deployment's CA and certificates")
    certs_sub = p_certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    p = certs_sub.add_parser("init", help="create a CA, the cloud's server certificate, the admin's and agents'")
    p.add_argument("--dir", type=Path, required=True, help="directory to write (must not hold a CA yet)")
    p.add_argument("--agents", default="", help="comma-separated agent names")
    p.add_argument("--hosts", default="", help="extra server names or IPs for the cloud certificate, comma-separated")
    p.add_argument("--days", type=int, default=365, help="validity of the leaf certificates")
    p.add_argument("--k8s", default=None, metavar="NAMESPACE",
                   help="also name the Kubernetes services of deploy/k8s in NAMESPACE in the server certificates, "
                        "and write their Secrets to DIR/k8s/secrets.yaml (agents are named after edge nodes)")
    p = certs_sub.add_parser("add-agent", help="issue a certificate for one more agent")
    p.add_argument("name", help="the agent's name: its identity everywhere")
    p.add_argument("--dir", type=Path, required=True, help="the deployment's certificate directory")
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--hosts", default="", help="names or IPs local applications reach the agent by, comma-separated")
    p = certs_sub.add_parser("add-client", help="issue a certificate for a local application that calls Inference")
    p.add_argument("name", help="the application's name")
    p.add_argument("--dir", type=Path, required=True, help="the deployment's certificate directory")
    p.add_argument("--days", type=int, default=365)

    p = certs_sub.add_parser("revoke", help="deny an agent's or application's certificate on every server, "
                                            "without a restart")
    p.add_argument("name", help="the agent's or application's name")
    p.add_argument("--dir", type=Path, required=True, help="the deployment's certificate directory")
    p.add_argument("--role", choices=certs.REVOCABLE_ROLES, default=None,
                   help="needed only when the name is both an agent and a client, or its certificate is gone")

    p = sub.add_parser("cloud", help="run the coordinator")
    p.add_argument("--listen", default="0.0.0.0:7443", help="gRPC address (mutual TLS), HOST:PORT")
    p.add_argument("--certs", type=Path, default=Path(_env("TANDEM_CERTS", ".certs") or ".certs"),
                   help="deployment certificate directory (env TANDEM_CERTS)")
    p.add_argument("--state", type=Path, required=True, help="state directory (SQLite and tensor files)")
    p.add_argument("--metrics", default=None, help="Prometheus metrics address HOST:PORT")
    p.add_argument("--health", default=None, help="plaintext gRPC health-only address HOST:PORT, for probes")
    p.add_argument("--heartbeat", type=float, default=5.0, help="seconds between agent heartbeats")
    p.add_argument("--grace", type=float, default=10.0, help="seconds in-flight calls get on SIGTERM")
    p.add_argument("--ready-file", type=Path, default=None, help="write the bound ports here as JSON once serving")
    p.add_argument("--models", default="",
                   help="comma-separated models its Inference service serves (default: every zoo model)")
    _serving_args(p)
    group = p.add_argument_group("placement controller")
    group.add_argument("--placement-interval", type=float, default=1.0,
                       help="seconds between placement decisions (0: no controller; agents keep their flags)")
    group.add_argument("--prometheus-url", default=None,
                       help="read the controller's inputs from this Prometheus server (default: straight from "
                            "the cloud's /metrics and the agents' heartbeats)")
    group.add_argument("--alpha", type=float, default=0.0,
                       help="price of a byte sent between edge and cloud, in seconds (per deployment)")
    group.add_argument("--alpha-model", action="append", default=[], metavar="MODEL=ALPHA",
                       help="the price for one model; repeatable")
    group.add_argument("--cascade", action="append", default=[], metavar="MODEL=T[:CLOUD_MODEL]",
                       help="offer a cascade for MODEL as an option besides the split points; repeatable")
    group.add_argument("--min-dwell", type=float, default=5.0, help="seconds a placement is kept at least")
    group.add_argument("--min-gain", type=float, default=0.10,
                       help="fraction of predicted latency a switch must save")
    group = p.add_argument_group("limits per agent (beyond them calls get RESOURCE_EXHAUSTED; others are not slowed)")
    group.add_argument("--agent-max-streams", type=int, default=32, help="streaming calls an agent has open at once")
    group.add_argument("--agent-requests-per-second", type=float, default=5000.0,
                       help="calls per second, sustained (bursts of twice as many)")
    group.add_argument("--agent-bytes-per-second", type=float, default=float(256 << 20),
                       help="request bytes per second, sustained (bursts of 1 GiB)")

    p = sub.add_parser("edge", help="run an edge agent")
    _client_args(p)
    p.add_argument("--id", required=True, help="agent name; its certificate is CERTS/agents/ID.pem")
    p.add_argument("--data", required=True,
                   help="local data: digits:I/N (partition I of N, 0-based, of the reference workload) "
                        "or a directory of .npz/.safetensors files with arrays x and y")
    p.add_argument("--metrics", default=None, help="Prometheus metrics address HOST:PORT")
    p.add_argument("--health", default=None, help="plaintext gRPC health-only address HOST:PORT, for probes")
    p.add_argument("--threads", type=int, default=1, help="torch threads for local training")
    p.add_argument("--listen", default=None,
                   help="serve Inference (mutual TLS) to local applications at HOST:PORT")
    p.add_argument("--placement", action="append", default=[], metavar="MODEL=MODE",
                   help="where MODEL's requests run: edge, cloud, split:K (stages 1..K here, the rest in the "
                        "cloud) or cascade:T[:CLOUD_MODEL] (the cloud answers when the edge's confidence is "
                        "below T); repeatable; models not named run at the edge. The cloud's placement "
                        "controller replaces these as it decides (`tandem placement pin` fixes one)")
    p.add_argument("--inference-cloud", default=None, metavar="HOST:PORT",
                   help="where cloud and split inference requests go, e.g. the inference replicas' Service "
                        "(default: the coordinator at --cloud)")
    p.add_argument("--cloud-timeout", type=float, default=1.0,
                   help="seconds a cloud call may take when the request sets no deadline; then the edge answers")
    p.add_argument("--probe-interval", type=float, default=2.0,
                   help="seconds between link probes while no request measures the link")
    p.add_argument("--ready-file", type=Path, default=None, help="write the bound ports here as JSON once serving")
    _serving_args(p, device="cpu")

    p = sub.add_parser("serve", help="run a cloud inference replica that follows the coordinator's models")
    _client_args(p)
    p.add_argument("--listen", default="0.0.0.0:7450", help="Inference address (mutual TLS), HOST:PORT")
    p.add_argument("--health", default=None, help="plaintext gRPC health-only address HOST:PORT, for probes")
    p.add_argument("--metrics", default=None, help="Prometheus metrics address HOST:PORT")
    p.add_argument("--cache", type=Path, required=True, help="directory for the mirrored model files")
    p.add_argument("--models", default="", help="comma-separated models to serve (default: every zoo model)")
    p.add_argument("--poll-interval", type=float, default=2.0, help="seconds between looks for new versions")
    p.add_argument("--ready-file", type=Path, default=None, help="write the bound ports here as JSON once serving")
    _serving_args(p)

    p_job = sub.add_parser("job", help="start, watch and stop federated training jobs")
    job_sub = p_job.add_subparsers(dest="job_command", required=True, metavar="ACTION")
    p = job_sub.add_parser("start", help="start a job and print its id")
    _client_args(p)
    p.add_argument("--model", required=True, help="model name in the zoo (e.g. mlp)")
    p.add_argument("--rounds", type=int, required=True)
    p.add_argument("--min-clients", type=int, required=True, help="updates needed to close a round")
    p.add_argument("--clients-per-round", type=int, default=0, help="agents selected per round (0: all)")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds a round waits for updates")
    p.add_argument("--eval", default="", help="held-out data in the cloud for test accuracy (digits)")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--codec", default="none",
                   help="update codec: none (dense float32), fp16, int8, topk:F, topk:F+int8, or auto (chosen per "
                        "agent and round from its measured link)")
    p.add_argument("--downlink-codec", default="", help="codec of new versions sent as deltas (default: from --codec)")
    p.add_argument("--target-upload-seconds", type=float, default=2.0, help="with --codec auto: upload time to meet")
    p.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedprox", "fedadam", "fedyogi"])
    p.add_argument("--mu", type=float, default=0.0, help="FedProx proximal weight")
    p.add_argument("--server-lr", type=float, default=0.0, help="server step size (0: the strategy's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial weights and agent selection")
    p.add_argument("--max-update-bytes", type=int, default=0, help="largest update accepted (0: 256 MiB)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end, with a progress bar on a terminal")
    group = p.add_argument_group("defences against hostile agents, and privacy")
    group.add_argument("--aggregator", default="mean",
                       choices=["mean", "median", "trimmed_mean", "mean_around_median", "krum", "multi_krum"],
                       help="how updates are combined (mean: FedAvg weighted by examples; the others weigh agents "
                            "alike and run at the round's close)")
    group.add_argument("--trim-fraction", type=float, default=0.0, help="trimmed_mean: fraction cut from each end")
    group.add_argument("--hostile", type=int, default=0,
                       help="hostile agents per round to withstand; refused if the aggregator cannot with "
                            "--min-clients updates")
    group.add_argument("--krum-selected", type=int, default=0, help="multi_krum: updates averaged (0: n - f)")
    group.add_argument("--clip-norm", type=float, default=0.0, help="bound on each update's L2 norm (0: none)")
    group.add_argument("--clip-to-median", action="store_true", help="bound each round at its median update norm")
    group.add_argument("--dp-noise-multiplier", type=float, default=0.0,
                       help="DP-FedAvg: Gaussian noise of std this x --clip-norm on the sum of updates (0: off)")
    group.add_argument("--dp-delta", type=float, default=1e-5, help="delta at which epsilon is reported")
    for action, text in (("status", "print a job"), ("wait", "wait for a job to end, then print it"),
                         ("stop", "stop a running job")):
        p = job_sub.add_parser(action, help=text)
        _client_args(p)
        p.add_argument("job_id")
        p.add_argument("--json", action="store_true", help="print JSON")
        if action == "wait":
            p.add_argument("--timeout", type=float, default=0, help="give up after this many seconds (0: never)")
    p = job_sub.add_parser("list", help="list jobs")
    _client_args(p)
    p.add_argument("--json", action="store_true")

    p_place = sub.add_parser("placement", help="read, pin and unpin where agents run each model")
    place_sub = p_place.add_subparsers(dest="placement_command", required=True, metavar="ACTION")
    p = place_sub.add_parser("show", help="placements with the predicted cost of each split point")
    _client_args(p)
    p.add_argument("--agent", default="")
    p.add_argument("--model", default="")
    p.add_argument("--json", action="store_true")
    p = place_sub.add_parser("pin", help="fix an agent's placement for a model until unpinned")
    _client_args(p)
    p.add_argument("agent")
    p.add_argument("model")
    p.add_argument("placement", help="edge, cloud, split:K or cascade:T[:CLOUD_MODEL]")
    p = place_sub.add_parser("unpin", help="hand a placement back to the controller")
    _client_args(p)
    p.add_argument("agent")
    p.add_argument("model")

    p = sub.add_parser("status", help="agents, jobs, models and placements on one screen")
    _client_args(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p = sub.add_parser("agents", help="list agents the coordinator knows")
    _client_args(p)
    p.add_argument("--json", action="store_true")
    p = sub.add_parser("models", help="list published model versions")
    _client_args(p)
    p.add_argument("--model", default="")
    p.add_argument("--json", action="store_true")

    p_bench = sub.add_parser("bench", help="benchmarks that write JSON results")
    bench_sub = p_bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    p = bench_sub.add_parser("fl", help="federated training of the reference workload, per codec")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--codec", default="none,topk:0.01+int8", help="comma-separated codecs to run")
    p.add_argument("--server-lr", type=float, default=0.0, help="override the strategy's server step")
    p.add_argument("--rss-agents", type=int, default=0, help="also measure coordinator memory with this many agents")
    p.add_argument("--out", type=Path, default=Path("bench/results/fl.json"))

    p = bench_sub.add_parser("auto", help="codec auto vs fixed codecs, two agents behind a shaped link (root)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--rate", default="1mbit", help="bandwidth of the shaped link, both directions (tc syntax)")
    p.add_argument("--target", type=float, default=1.0, help="target upload seconds for codec auto")
    p.add_argument("--codec", default="none,auto")
    p.add_argument("--out", type=Path, default=Path("bench/results/auto.json"))

    p = bench_sub.add_parser("infer", help="inference serving under load: throughput, latency, hot swaps, edge")
    p.add_argument("--seconds", type=float, default=10.0, help="measured seconds of each load run")
    p.add_argument("--swap-seconds", type=float, default=30.0, help="seconds of the hot-swap run")
    p.add_argument("--swap-interval", type=float, default=3.0, help="seconds between publications in it")
    p.add_argument("--clients", type=int, default=64, help="concurrent clients of single-row runs")
    p.add_argument("--clients-per-channel", type=int, default=16, help="clients sharing one gRPC channel")
    p.add_argument("--big-rows", type=int, default=256, help="rows per request of the large-request run")
    p.add_argument("--big-clients", type=int, default=8, help="concurrent clients of the large-request run")
    p.add_argument("--max-delay-ms", type=float, default=2.0, help="the cloud's batching delay")
    p.add_argument("--edge-clients", type=int, default=16, help="concurrent clients of runs through the edge")
    p.add_argument("--thresholds", type=lambda s: [float(t) for t in s.split(",") if t],
                   default=[0.0, 0.5, 0.7, 0.9, 0.99, 1.01], help="cascade thresholds, comma-separated")
    p.add_argument("--small-epochs", type=int, default=8, help="central training of mlp-small (the edge model)")
    p.add_argument("--small-lr", type=float, default=0.1)
    p.add_argument("--heavy-epochs", type=int, default=30, help="central training of mlp-heavy (the cloud model)")
    p.add_argument("--heavy-lr", type=float, default=0.02, help="plain SGD on mlp-heavy diverges at 0.05 and 0.1")
    p.add_argument("--no-edge", action="store_true", help="skip the placements and cascade through an edge agent")
    p.add_argument("--work", type=Path, default=None, help="keep certificates, logs and raw runs here")
    p.add_argument("--out", type=Path, default=Path("bench/results/infer.json"))

    p = sub.add_parser("demo", help="coordinator + agents on loopback, federated training of the reference workload")
    p.add_argument("--certs", type=Path, default=Path(".certs"))
    p.add_argument("--agents", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--min-accuracy", type=float, default=0.93, help="exit 1 below this final test accuracy")

    p = sub.add_parser("gpu-check", help="cloud inference batching and split paths on cuda, checked against CPU")
    p.add_argument("--device", default="cuda", help="device to check (skips when it is cuda and there is none)")
    p.add_argument("--out", type=Path, default=Path("bench/results/gpu.json"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return _dispatch(args)
    except grpc.aio.AioRpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (ValueError, FileExistsError, FileNotFoundError, KeyError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _write_k8s_secrets(directory: Path, namespace: str, agents: list[str]) -> Path:
    import yaml

    from tandem import k8s_secrets

    path = directory / "k8s" / "secrets.yaml"
    path.parent.mkdir(exist_ok=True)
    text = yaml.safe_dump_all(k8s_secrets.secrets(directory, namespace, agents), sort_keys=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds private keys
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return path


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "certs":
        if args.certs_command == "init":
            agents = [a for a in args.agents.split(",") if a]
            hosts = [h for h in args.hosts.split(",") if h]
            if args.k8s:
                from tandem import k8s_secrets

                hosts += k8s_secrets.service_hosts(args.k8s)
            certs.init_deployment(args.dir, agents, hosts, days=args.days)
            print(f"wrote CA, cloud, admin, inference and {len(agents)} agent certificates to {args.dir}")
            if args.k8s:
                path = _write_k8s_secrets(args.dir, args.k8s, agents)
                print(f"wrote Kubernetes Secrets for namespace {args.k8s} to {path} (kubectl apply -f {path})")
        elif args.certs_command == "add-agent":
            hosts = [h for h in args.hosts.split(",") if h]
            cert, _ = certs.add_agent(args.dir, args.name, days=args.days, hosts=hosts)
            print(f"wrote {cert}")
        elif args.certs_command == "revoke":
            identity = certs.revoke(args.dir, args.name, role=args.role)
            print(f"revoked {identity}: servers reading {args.dir} refuse its next call within a second "
                  f"(copy {args.dir / 'revoked.txt'} to other servers' certificate directories)")
            secrets_file = args.dir / "k8s" / "secrets.yaml"
            if secrets_file.exists():
                from tandem import k8s_secrets

                _write_k8s_secrets(args.dir, *k8s_secrets.deployed(secrets_file))
                print(f"rewrote {secrets_file} with the deny list: kubectl apply -f {secrets_file}")
        else:
            cert, _ = certs.add_client(args.dir, args.name, days=args.days)
            print(f"wrote {cert}")
        return 0
    if args.command == "cloud":
        from tandem_cli.run import run_cloud

        return asyncio.run(run_cloud(args))
    if args.command == "edge":
        from tandem_cli.run import run_edge

        return asyncio.run(run_edge(args))
    if args.command == "serve":
        from tandem_cli.run import run_serve

        return asyncio.run(run_serve(args))
    if args.command == "bench":
        if args.bench_command == "auto":
            from tandem_cli.bench_auto import run_bench_auto

            return asyncio.run(run_bench_auto(args))
        if args.bench_command == "infer":
            from tandem_cli.bench_infer import run_bench_infer

            return asyncio.run(run_bench_infer(args))
        from tandem_cli.bench import run_bench_fl

        return asyncio.run(run_bench_fl(args))
    if args.command == "gpu-check":
        from tandem_cli.gpu_check import run_gpu_check

        return run_gpu_check(args)
    if args.command == "demo":
        from tandem_cli.demo import run_demo

        return asyncio.run(run_demo(args))
    from tandem_cli.client import run_client

    return asyncio.run(run_client(args))


if __name__ == "__main__":
    sys.exit(main())
