"""Mutual TLS: credentials from a deployment's certificate directory, identity of a peer.

Identity always comes from the peer's verified certificate (its `tandem://ROLE/NAME`
SAN URI), never from a field in a message.

Servers follow their directory while they run: a replaced certificate, key or CA
bundle is used for new connections (open ones keep theirs), and an identity added
to the deny list (`tandem certs revoke`) is refused on its next call.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tandem import certs, revocation
from tandem.errors import PermissionDenied, Unauthenticated

log = logging.getLogger(__name__)


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"certificate file {path} not found ({_making(path)})") from None


def _making(path: Path) -> str:
    """The command that makes the missing file `path` of a deployment directory."""
    directory, stem = path.parent, path.stem
    if directory.name == "agents":
        return f"run `tandem certs add-agent {stem} --dir {directory.parent}`"
    if directory.name == "clients":
        return f"run `tandem certs add-client {stem} --dir {directory.parent}`"
    return f"run `tandem certs init --dir {directory}`, or check --certs"


# --- server credentials -------------------------------------------------------------


def check_pair(cert_pem: bytes, key_pem: bytes, ca_pem: bytes, where: Path) -> None:
    """Refuse a certificate and key that do not belong together, or an empty CA bundle:
    caught between the two renames of a rotation, they would fail every handshake."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
        bundle = x509.load_pem_x509_certificates(ca_pem)
    except ValueError as exc:
        raise ValueError(f"unreadable certificate, key or CA bundle in {where}: {exc}") from None
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != cert.public_key().public_bytes(
        serialization.Encoding.DER, public
    ):
        raise ValueError(f"the private key in {where} does not match its certificate")
    if not bundle:
        raise ValueError(f"no CA certificate in {where}")


_Stamp = tuple[tuple[int, int, int] | None, ...]


class _ServerFiles:
    """A server's certificate, key and CA bundle, reread when any of them changed.

    gRPC calls it (from one of its own threads) before each TLS handshake; a stat of
    three files is all it costs while nothing changed. A half-rotated set (a key
    that does not match the certificate yet) is logged and the previous set kept.
    """

    def __init__(self, certs_dir: Path, cert: Path, key: Path) -> None:
        self._paths = (cert, key, certs_dir / "ca.pem")
        self._where = certs_dir
        self._deny = revocation.REGISTRY.for_directory(certs_dir)
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self.initial = self._load()

    def _stat(self) -> _Stamp:
        stamps: list[tuple[int, int, int] | None] = []
        for path in self._paths:
            try:
                st = os.stat(path)
                stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
            except FileNotFoundError:
                stamps.append(None)
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert, key, ca = (_read(path) for path in self._paths)
        check_pair(cert, key, ca, self._where)
        revocation.REGISTRY.trust(ca, self._deny)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            with self._lock:
                stamp = self._stat()
                if stamp == self._stamp:
                    return None
                self._stamp = stamp  # a bad set is reported once, and retried when a file changes again
                config = self._load()
        except Exception as exc:  # noqa: BLE001 - on gRPC's thread nothing may escape: keep serving the old set
            log.error("keeping the current server certificates: %s", exc)
            return None
        log.info("new server certificates from %s are used for new connections", self._where)
        return config


def _server_credentials(certs_dir: Path, cert: Path, key: Path) -> grpc.ServerCredentials:
    files = _ServerFiles(Path(certs_dir), cert, key)
    return grpc.dynamic_ssl_server_credentials(files.initial, files, require_client_authentication=True)


def server_credentials(certs_dir: Path, identity: tuple[Path, Path] | None = None) -> grpc.ServerCredentials:
    """The cloud's server certificate, or the (certificate, key) `identity` (a region's);
    clients must present one from the same CA."""
    cert, key = identity or (certs_dir / "cloud.pem", certs_dir / "cloud.key")
    return _server_credentials(certs_dir, cert, key)


def agent_server_credentials(certs_dir: Path, name: str) -> grpc.ServerCredentials:
    """An agent's certificate, serving Inference to local clients from the same CA."""
    return _server_credentials(certs_dir, *certs.agent_paths(certs_dir, name))


def replica_paths(certs_dir: Path) -> tuple[Path, Path]:
    """The inference replicas' (certificate, key), written by `tandem certs init`."""
    return certs_dir / f"{certs.REPLICA_NAME}.pem", certs_dir / f"{certs.REPLICA_NAME}.key"


def replica_server_credentials(certs_dir: Path) -> grpc.ServerCredentials:
    """A cloud inference replica serving Inference, under the cloud's names."""
    return _server_credentials(certs_dir, *replica_paths(certs_dir))


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


@dataclass(frozen=True)
class Peer:
    """A call's verified peer, parsed once: a stream keeps it and asks `check` for each
    message, which costs a deny-list lookup instead of reading the certificate again."""

    identity: certs.Identity
    pem: bytes
    chain: bytes = b""  # as presented: the intermediates between the certificate and the CA

    def check(self) -> None:
        """UNAUTHENTICATED if the deployment has revoked this identity since (a revoked
        identity's certificate no longer proves anything, whatever the call)."""
        if revocation.REGISTRY.revoked(str(self.identity), self.pem, self.chain):
            raise Unauthenticated(f"the certificate of {self.identity} has been revoked")


# The last call whose peer was read in this task, and that peer: an interceptor and then the
# servicer both ask, and reading the certificate back from gRPC (auth_context builds a
# dict of it) was ~15 us per request. gRPC runs each call in a task of its own, so the
# value never crosses calls; the context's identity is checked anyway.
_LAST_PEER: contextvars.ContextVar[tuple[object, Peer] | None] = contextvars.ContextVar("tandem_peer", default=None)


def peer(context: grpc.aio.ServicerContext) -> Peer:
    """The verified peer of a call, unless the deployment revoked it."""
    last = _LAST_PEER.get()
    if last is not None and last[0] is context:
        last[1].check()
        return last[1]
    auth = context.auth_context()
    pems = auth.get("x509_pem_cert")
    if not pems:
        raise Unauthenticated("a client certificate is required")
    identity = certs.identity_from_pem(pems[0])  # cached by certificate
    if identity is None:
        raise Unauthenticated("the client certificate carries no Tandem identity")
    found = Peer(identity, pems[0], b"".join(auth.get("x509_pem_cert_chain", ())))
    found.check()
    _LAST_PEER.set((context, found))
    return found


def peer_identity(context: grpc.aio.ServicerContext) -> certs.Identity:
    """The verified identity of the peer of a call, unless the deployment revoked it."""
    return peer(context).identity


def require_peer(context: grpc.aio.ServicerContext, *roles: str) -> Peer:
    """The call's verified peer if its role is one of `roles`; PERMISSION_DENIED otherwise."""
    found = peer(context)
    if found.identity.role not in roles:
        wanted = " or ".join(roles)
        raise PermissionDenied(f"this call needs a {wanted} certificate; {found.identity.role} "
                               f"{found.identity.name!r} presented")
    return found


def require_role(context: grpc.aio.ServicerContext, *roles: str) -> certs.Identity:
    return require_peer(context, *roles).identity
