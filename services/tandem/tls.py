"""Mutual TLS: credentials from a deployment's certificate directory, identity of a peer.

Identity always comes from the peer's verified certificate (its `tandem://ROLE/NAME`
SAN URI), never from a field in a message.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from tandem import certs
from tandem.errors import PermissionDenied, Unauthenticated


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"certificate file {path} not found (run `tandem certs init`)") from None


def server_credentials(certs_dir: Path) -> grpc.ServerCredentials:
    """The cloud's server certificate; clients must present one from the same CA."""
    return grpc.ssl_server_credentials(
        [(_read(certs_dir / "cloud.key"), _read(certs_dir / "cloud.pem"))],
        root_certificates=_read(certs_dir / "ca.pem"),
        require_client_auth=True,
    )


def _leaf_server_credentials(certs_dir: Path, cert: Path, key: Path) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(_read(key), _read(cert))], root_certificates=_read(certs_dir / "ca.pem"), require_client_auth=True
    )


def agent_server_credentials(certs_dir: Path, name: str) -> grpc.ServerCredentials:
    """An agent's certificate, serving Inference to local clients from the same CA."""
    return _leaf_server_credentials(certs_dir, *certs.agent_paths(certs_dir, name))


def replica_paths(certs_dir: Path) -> tuple[Path, Path]:
    """The inference replicas' (certificate, key), written by `tandem certs init`."""
    return certs_dir / f"{certs.REPLICA_NAME}.pem", certs_dir / f"{certs.REPLICA_NAME}.key"


def replica_server_credentials(certs_dir: Path) -> grpc.ServerCredentials:
    """A cloud inference replica serving Inference, under the cloud's names."""
    return _leaf_server_credentials(certs_dir, *replica_paths(certs_dir))


def replica_credentials(certs_dir: Path) -> grpc.ChannelCredentials:
    """A replica calling the coordinator for the models it serves."""
    return client_credentials(certs_dir, *replica_paths(certs_dir))


def client_credentials(certs_dir: Path, cert: Path, key: Path) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(
        root_certificates=_read(certs_dir / "ca.pem"),
        private_key=_read(key),
        certificate_chain=_read(cert),
    )


def admin_credentials(certs_dir: Path) -> grpc.ChannelCredentials:
    return client_credentials(certs_dir, certs_dir / "admin.pem", certs_dir / "admin.key")


def agent_credentials(certs_dir: Path, name: str) -> grpc.ChannelCredentials:
    cert, key = certs.agent_paths(certs_dir, name)
    return client_credentials(certs_dir, cert, key)


def app_credentials(certs_dir: Path, name: str) -> grpc.ChannelCredentials:
    """A local application's credentials (`tandem certs add-client NAME`)."""
    cert, key = certs.client_paths(certs_dir, name)
    return client_credentials(certs_dir, cert, key)


def peer_identity(context: grpc.aio.ServicerContext) -> certs.Identity:
    """The verified identity of the peer of a call."""
    pems = context.auth_context().get("x509_pem_cert")
    if not pems:
        raise Unauthenticated("a client certificate is required")
    identity = certs.identity_from_pem(pems[0])
    if identity is None:
        raise Unauthenticated("the client certificate carries no Tandem identity")
    return identity


def require_role(context: grpc.aio.ServicerContext, *roles: str) -> certs.Identity:
    identity = peer_identity(context)
    if identity.role not in roles:
        wanted = " or ".join(roles)
        raise PermissionDenied(f"this call needs a {wanted} certificate; {identity.role} {identity.name!r} presented")
    return identity
