"""`tandem certs init|add-agent|add-region|add-client|revoke|rotate|intermediate|token`: the deployment's CA, its
certificates, and what enrollment needs (an intermediate CA for agents, one-time tokens)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tandem import certs
from tandem_cli.options import Subparsers, certs_default


def register(subparsers: Subparsers) -> None:
    p_certs = subparsers.add_parser("certs", help="make the deployment's CA and certificates")
    certs_sub = p_certs.add_subparsers(dest="certs_command", required=True, metavar="ACTION")
    p = certs_sub.add_parser("init", help="create a CA, the cloud's server certificate, the admin's and agents'")
    p.add_argument("--dir", type=Path, default=certs_default(),
                   help="directory to write (must not hold a CA yet; env TANDEM_CERTS; default %(default)s, where "
                        "every other command looks)")
    p.add_argument("--agents", default="",
                   help="comma-separated agent names (with --k8s: the edge nodes that will enrol; no certificate is "
                        "made for them, and the command making each one's token is printed)")
    p.add_argument("--hosts", default="", help="extra server names or IPs for the cloud certificate, comma-separated")
    p.add_argument("--days", type=int, default=365, help="validity of the leaf certificates")
    p.add_argument("--k8s", default=None, metavar="NAMESPACE",
                   help="also name the Kubernetes services of deploy/k8s in NAMESPACE in the server certificates, "
                        "make the agents' intermediate CA in DIR/ca, and write the Secrets (in NAMESPACE, one private "
                        "key each, none of an agent) and the key-less tandem-ca-bundle ConfigMap (in NAMESPACE-edge, "
                        "the edge agents' namespace, and in NAMESPACE) to DIR/k8s/secrets.yaml; agents enrol, named "
                        "after their edge nodes")
    p.set_defaults(func=_init)
    p = certs_sub.add_parser("add-agent", help="issue a certificate for one more agent")
    p.add_argument("name", help="the agent's name: its identity everywhere")
    _deployment_dir(p)
    p.add_argument("--days", type=int, default=365, help="validity of the certificate, in days")
    p.add_argument("--hosts", default="", help="names or IPs local applications reach the agent by, comma-separated")
    p.set_defaults(func=_add_agent)
    p = certs_sub.add_parser("add-region", help="issue a certificate for a regional aggregator (docs/scale-out.md)")
    p.add_argument("name", help="the region's name: its identity towards its parent is region/NAME")
    _deployment_dir(p)
    p.add_argument("--days", type=int, default=365, help="validity of the certificate, in days")
    p.add_argument("--hosts", default="", help="names or IPs the region's agents reach it by, comma-separated")
    p.set_defaults(func=_add_region)
    p = certs_sub.add_parser("add-client", help="issue a certificate for a local application that calls Inference")
    p.add_argument("name", help="the application's name")
    _deployment_dir(p)
    p.add_argument("--days", type=int, default=365, help="validity of the certificate, in days")
    p.set_defaults(func=_add_client)

    p = certs_sub.add_parser("revoke", help="deny an agent's or application's certificate on every server, "
                                            "without a restart")
    p.add_argument("name", help="the agent's or application's name")
    _deployment_dir(p)
    p.add_argument("--role", choices=certs.REVOCABLE_ROLES, default=None,
                   help="needed only when the name has certificates of two roles, or its certificate is gone "
                        "(an enrolled agent's never was in DIR: with --ca-dir, a name with no certificate is an agent)")
    p.add_argument("--ca-dir", type=Path, default=None,
                   help="also deny it in the enrollment service's directory (`tandem ca --dir`), so that it cannot "
                        "renew its certificate")
    p.set_defaults(func=_revoke)

    p = certs_sub.add_parser("rotate", help="new keys and certificates for the coordinator and the inference "
                                            "replicas, picked up by the running servers without a restart")
    _deployment_dir(p, ", with the root CA")
    p.add_argument("--days", type=int, default=365, help="validity of the new certificates, in days")
    p.set_defaults(func=_rotate)

    p = certs_sub.add_parser("intermediate", help="sign an intermediate CA for enrolled agents with the root "
                                                  "(run once, where the root key is)")
    _deployment_dir(p, ", with the root CA")
    p.add_argument("--out", type=Path, required=True,
                   help="directory for the intermediate CA: only `tandem ca` reads it")
    p.add_argument("--days", type=int, default=365, help="validity of the intermediate CA, in days")
    p.set_defaults(func=_intermediate)
    p = certs_sub.add_parser("token", help="print a one-time enrollment token for one agent name")
    p.add_argument("name", help="the agent's name: the token enrols this name only")
    p.add_argument("--ca-dir", type=Path, required=True, help="the intermediate CA's directory (`tandem ca --dir`)")
    p.add_argument("--state", type=Path, default=None,
                   help="where the service keeps its tokens (`tandem ca --state`; default: --ca-dir)")
    p.add_argument("--ttl", type=_duration, default=3600.0, metavar="DURATION",
                   help="how long the token is valid: seconds, or a number with s, m, h or d (default 1h)")
    p.set_defaults(func=_token)


def _deployment_dir(p: argparse.ArgumentParser, what: str = "") -> None:
    p.add_argument("--dir", type=Path, default=certs_default(),
                   help=f"the deployment's certificate directory{what} (env TANDEM_CERTS; default %(default)s)")


def _init(args: argparse.Namespace) -> int:
    agents = [a for a in args.agents.split(",") if a]
    hosts = [h for h in args.hosts.split(",") if h]
    if args.k8s:
        return _init_k8s(args, agents, hosts)
    certs.init_deployment(args.dir, agents, hosts, days=args.days)
    print(f"wrote CA, cloud, admin, inference and {len(agents)} agent certificates to {args.dir}")
    return 0


def _init_k8s(args: argparse.Namespace, agents: list[str], hosts: list[str]) -> int:
    """A deployment for deploy/k8s: no agent key is made here, agents enrol on their nodes."""
    from tandem import enrollment, k8s_secrets

    for name in agents:  # a bad name is refused before anything is written
        certs.validate_name(name)
    edge = k8s_secrets.edge_namespace(args.k8s)  # and so is a namespace too long for its edge namespace
    certs.init_deployment(args.dir, [], hosts + k8s_secrets.service_hosts(args.k8s), days=args.days)
    print(f"wrote CA, cloud, admin and inference certificates to {args.dir}")
    ca_dir = k8s_secrets.intermediate_dir(args.dir)
    if not (ca_dir / enrollment.INTERMEDIATE_CERT).exists():
        enrollment.create_intermediate(args.dir, ca_dir, days=args.days)
        print(f"wrote the agents' intermediate CA to {ca_dir}")
    path = _write_k8s_secrets(args.dir, args.k8s)
    print(f"wrote Kubernetes Secrets for namespace {args.k8s}, and the agents' CA bundle for {edge} (and "
          f"{args.k8s}), to {path} (kubectl apply -f {path}, after deploy/k8s/base/namespace.yaml); "
          f"keep {args.dir / 'ca.key'} offline")
    if agents:
        print("agents enrol with a one-time token placed on their node at /etc/tandem/enroll/token "
              "(docs/kubernetes.md); make each one's, once tandem-ca-0 runs, with:")
        for name in agents:
            print(f"  {k8s_secrets.token_command(args.k8s, name)}")
    return 0


def _add_agent(args: argparse.Namespace) -> int:
    hosts = [h for h in args.hosts.split(",") if h]
    cert, _ = certs.add_agent(args.dir, args.name, days=args.days, hosts=hosts)
    print(f"wrote {cert}")
    return 0


def _add_region(args: argparse.Namespace) -> int:
    cert, _ = certs.add_region(args.dir, args.name, days=args.days, hosts=[h for h in args.hosts.split(",") if h])
    print(f"wrote {cert}")
    return 0


def _add_client(args: argparse.Namespace) -> int:
    cert, _ = certs.add_client(args.dir, args.name, days=args.days)
    print(f"wrote {cert}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    role = args.role
    if role is None and args.ca_dir is not None and not certs.client_paths(args.dir, args.name)[0].exists():
        role = certs.ROLE_AGENT  # enrolled: its certificate was never in --dir
    if args.ca_dir is not None and not (args.ca_dir / "ca.pem").is_file():
        raise FileNotFoundError(f"--ca-dir {args.ca_dir}: no enrollment service's directory there (no ca.pem)")
    identity = certs.revoke(args.dir, args.name, role=role)
    print(f"revoked {identity}: servers reading {args.dir} refuse its next call within a second "
          f"(copy {args.dir / 'revoked.txt'} to other servers' certificate directories)")
    if args.ca_dir is not None:
        certs.revoke(args.ca_dir, args.name, role=identity.role)
        print(f"and the enrollment service reading {args.ca_dir} refuses to renew its certificate")
    _rewrite_k8s_secrets(args.dir, "with the deny list")
    return 0


def _rotate(args: argparse.Namespace) -> int:
    for path in certs.rotate_servers(args.dir, days=args.days):
        print(f"wrote {path} and its key: servers reading {args.dir} use them for new connections")
    _rewrite_k8s_secrets(args.dir, "with the new certificates")
    return 0


def _rewrite_k8s_secrets(directory: Path, what: str) -> None:
    """Write DIR/k8s/secrets.yaml again, if `tandem certs init --k8s` wrote one."""
    secrets_file = directory / "k8s" / "secrets.yaml"
    if not secrets_file.exists():
        return
    from tandem import enrollment, k8s_secrets

    namespace, legacy = k8s_secrets.deployed(secrets_file)
    if not (k8s_secrets.intermediate_dir(directory) / enrollment.INTERMEDIATE_CERT).exists():
        print(f"did not rewrite {secrets_file}: an older `tandem certs init --k8s` wrote it, with every agent's "
              f"key in one Secret; see docs/kubernetes.md, \"Upgrading from tandem-agents\"")
        return
    _write_k8s_secrets(directory, namespace)
    print(f"rewrote {secrets_file} {what}: kubectl apply -f {secrets_file}")
    if legacy:
        print(f"it no longer holds tandem-agents: once the edge agents have enrolled, "
              f"kubectl delete secret -n {namespace} tandem-agents")


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], units[text[-1]]) if text and text[-1] in units else (text, 1)
    try:
        value = float(number) * unit
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 90s, 30m, 1h or 2d")
    return value


def _intermediate(args: argparse.Namespace) -> int:
    from tandem import enrollment

    path = enrollment.create_intermediate(args.dir, args.out, days=args.days)
    print(f"wrote {path} and its key to {args.out}; run `tandem ca --dir {args.out}` there, and keep "
          f"{args.dir / 'ca.key'} offline from now on")
    return 0


def _token(args: argparse.Namespace) -> int:
    from tandem import enrollment

    if not (args.ca_dir / enrollment.INTERMEDIATE_CERT).is_file():
        raise FileNotFoundError(f"no intermediate CA in {args.ca_dir} (run `tandem certs intermediate --out "
                                f"{args.ca_dir}` first)")
    if args.state is not None and not args.state.is_dir():
        raise FileNotFoundError(f"--state {args.state}: no such directory")
    store = enrollment.TokenStore(args.ca_dir if args.state is None else args.state)
    try:
        print(store.create(args.name, args.ttl))
    finally:
        store.close()
    return 0


def _write_k8s_secrets(directory: Path, namespace: str) -> Path:
    import yaml

    from tandem import k8s_secrets

    path = directory / "k8s" / "secrets.yaml"
    path.parent.mkdir(exist_ok=True)
    text = yaml.safe_dump_all(k8s_secrets.secrets(directory, namespace), sort_keys=False)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds private keys
    with os.fdopen(fd, "w") as out:
        out.write(text)
    return path
