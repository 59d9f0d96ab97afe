"""A deployment's private certificate authority and the certificates it issues.

One CA per deployment signs a server certificate for the cloud, a client certificate
for the admin, and one client certificate per edge agent. Who a peer is comes from
the `tandem://ROLE/NAME` URI in its certificate's SubjectAlternativeName, so the
identity is exactly what the CA vouched for. The CA key stays in the directory so
agents can be added later; every private key file is 0600 from the moment it exists.
"""

from __future__ import annotations

import datetime
import functools
import ipaddress
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tandem import revocation
from tandem.files import replace_durably

ROLE_AGENT = "agent"
ROLE_ADMIN = "admin"
ROLE_SERVER = "server"
ROLE_CLIENT = "client"  # a local application calling an edge agent's (or the cloud's) Inference
ROLE_REPLICA = "replica"  # a cloud inference replica: reads published models, serves Inference
# A regional aggregator: to its parent, an agent that may also upload partial aggregates;
# to its own agents, a coordinator (a server under the names of its certificate).
ROLE_REGION = "region"
ROLES = frozenset({ROLE_AGENT, ROLE_ADMIN, ROLE_SERVER, ROLE_CLIENT, ROLE_REPLICA, ROLE_REGION})
REVOCABLE_ROLES = (ROLE_AGENT, ROLE_CLIENT, ROLE_REGION)  # the identities `tandem certs add-*` hands out
MEMBER_ROLES = (ROLE_AGENT, ROLE_REGION)  # who holds a control stream and trains (or aggregates) for jobs
REGION_PREFIX = "region:"  # a region's id among a coordinator's members: never an agent's (no ':' in names)
# Agents are clients of the cloud and servers of Inference to local applications.
_AGENT_USAGES = (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH)

URI_SCHEME = "tandem://"
SERVER_CN = "tandem-cloud"
SERVER_NAME = "cloud"
ADMIN_NAME = "admin"
REPLICA_NAME = "inference"

# Lowercase, starts alphanumeric, at most 63 characters: safe as a file name, a DNS
# label and a URI path segment without any escaping.
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")

# Peers whose clocks run a little behind still accept a freshly issued certificate.
CLOCK_SKEW = datetime.timedelta(minutes=5)
# The CA outlives the leaf certificates it signs, so agents added later still chain.
_CA_MIN_DAYS = 3650

KEY_MODE = 0o600
CERT_MODE = 0o644


@dataclass(frozen=True)
class Identity:
    """Who a peer is, as vouched for by the deployment's CA."""

    role: str
    name: str

    def __str__(self) -> str:
        return f"{self.role}/{self.name}"


def validate_name(name: str) -> str:
    """Return `name` if it is a valid agent name; raise ValueError saying why not."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ValueError(
            f"invalid name {name!r}: use 1-63 characters of lowercase letters, digits, '.', '_' "
            "or '-', starting with a letter or digit"
        )
    return name


def agent_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """The (certificate, key) paths of agent `name` in a deployment directory."""
    validate_name(name)
    agents = Path(directory) / "agents"
    return agents / f"{name}.pem", agents / f"{name}.key"


# --- files --------------------------------------------------------------------------


def write_file(path: Path, data: bytes, mode: int) -> None:
    """Write `data` to `path` with `mode` set at creation, so a key is never readable by others
    (in place: `replace_file` for a file that servers may be reading)."""
    with os.fdopen(os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode), "wb") as f:
        # O_CREAT's mode is masked by the umask and ignored for an existing file.
        os.fchmod(f.fileno(), mode)
        f.write(data)


def replace_file(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` in one rename, durably: a server or an agent reading it
    sees the old file or the new one, never a part (a renewed certificate or key)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with os.fdopen(os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode), "wb") as f:
        os.fchmod(f.fileno(), mode)
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    replace_durably(tmp, path)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write_pair(cert_path: Path, key_path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
    write_file(key_path, key_pem(key), KEY_MODE)
    write_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)


# --- issuing ------------------------------------------------------------------------


@dataclass(frozen=True)
class Issuer:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def name_of(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tandem"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def check_days(days: int) -> None:
    if days < 1:
        raise ValueError(f"certificate lifetime must be at least 1 day, got {days}")


def _new_ca(days: int) -> Issuer:
    key = new_key()
    now = datetime.datetime.now(datetime.UTC)
    subject = name_of("Tandem deployment CA")
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=max(days, _CA_MIN_DAYS)))
        # One level below: the intermediate CA for enrolled agents (`tandem certs intermediate`).
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Issuer(cert, key)


def _issue(
    issuer: Issuer,
    cn: str,
    identity: Identity,
    usage: x509.ObjectIdentifier | Sequence[x509.ObjectIdentifier],
    days: int,
    hosts: Sequence[x509.GeneralName] = (),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate carrying `identity` as a SAN URI, for the extended key usages given."""
    usages = [usage] if isinstance(usage, x509.ObjectIdentifier) else list(usage)
    key = new_key()
    now = datetime.datetime.now(datetime.UTC)
    # Never outlive the CA: a chain with an expired CA fails anyway, and confusingly.
    not_after = min(now + datetime.timedelta(days=days), issuer.cert.not_valid_after_utc)
    ca_ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    uri = x509.UniformResourceIdentifier(f"{URI_SCHEME}{identity.role}/{identity.name}")
    sans: list[x509.GeneralName] = [*hosts, uri]
    cert = (
        x509.CertificateBuilder()
        .subject_name(name_of(cn))
        .issuer_name(issuer.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )
    return cert, key


def host_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    """localhost and 127.0.0.1 plus `hosts`, each an IP SAN if it parses as one, else DNS."""
    names: list[x509.GeneralName] = []
    for host in ["localhost", "127.0.0.1", *hosts]:
        host = host.strip()
        if not host:
            raise ValueError("empty host name for the server certificate")
        try:
            name: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            name = x509.DNSName(host.lower())
        if name not in names:
            names.append(name)
    return names


def load_issuer(directory: Path) -> Issuer:
    ca_pem, ca_key = directory / "ca.pem", directory / "ca.key"
    if not ca_pem.is_file() or not ca_key.is_file():
        raise FileNotFoundError(
            f"no certificate authority in {directory} (need ca.pem and ca.key; run `tandem certs init` first)"
        )
    key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{ca_key} is not an EC private key")
    return Issuer(x509.load_pem_x509_certificate(ca_pem.read_bytes()), key)


# --- public operations -------------------------------------------------------------


def init_deployment(directory: Path, agents: Sequence[str], hosts: Sequence[str] = (), days: int = 365) -> None:
    """Create a new CA and the cloud, admin, inference-replica and agent certificates in `directory`.

    The inference replicas (`tandem serve`) share one identity, `replica/inference`,
    and are servers under the same names as the cloud.

    Refuses to touch a directory that already holds a CA, so a deployment's
    certificates are never silently replaced.
    """
    directory = Path(directory)
    check_days(days)
    if isinstance(agents, str):
        raise TypeError("agents must be a sequence of names, not a single string")
    names = [validate_name(a) for a in agents]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"duplicate agent names: {', '.join(duplicates)}")
    server_names = host_names(hosts)
    if (directory / "ca.pem").exists():
        raise FileExistsError(
            f"{directory / 'ca.pem'} already exists: refusing to overwrite an existing deployment "
            "(use `add_agent` to add agents, or choose an empty directory)"
        )

    (directory / "agents").mkdir(parents=True, exist_ok=True)
    ca = _new_ca(days)
    write_file(directory / "ca.key", key_pem(ca.key), KEY_MODE)

    server = Identity(ROLE_SERVER, SERVER_NAME)
    cert, key = _issue(ca, SERVER_CN, server, ExtendedKeyUsageOID.SERVER_AUTH, days, server_names)
    _write_pair(directory / "cloud.pem", directory / "cloud.key", cert, key)
    cert, key = _issue(ca, ADMIN_NAME, Identity(ROLE_ADMIN, ADMIN_NAME), ExtendedKeyUsageOID.CLIENT_AUTH, days)
    _write_pair(directory / "admin.pem", directory / "admin.key", cert, key)
    replica = Identity(ROLE_REPLICA, REPLICA_NAME)
    cert, key = _issue(ca, REPLICA_NAME, replica, _AGENT_USAGES, days, server_names)
    _write_pair(directory / f"{REPLICA_NAME}.pem", directory / f"{REPLICA_NAME}.key", cert, key)
    for name in names:
        cert, key = _issue(ca, name, Identity(ROLE_AGENT, name), _AGENT_USAGES, days, host_names([]))
        _write_pair(*agent_paths(directory, name), cert, key)

    # ca.pem last: its presence marks a complete deployment, so an interrupted init
    # can simply be run again.
    write_file(directory / "ca.pem", ca.cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)


def rotate_servers(directory: Path, days: int = 365) -> list[Path]:
    """New keys and certificates for the coordinator (`cloud`) and the inference replicas,
    under the names their current certificates carry, signed by the root in `directory`;
    returns the certificates written.

    Each file is replaced in one rename (key, then certificate): the running servers'
    credentials follow their files, so new connections get the new pair without a
    restart (one read between the renames sees a key that does not match, and keeps the
    old pair until the certificate follows); open connections keep theirs.
    """
    directory = Path(directory)
    check_days(days)
    ca = load_issuer(directory)
    written: list[Path] = []
    for cn, identity, usage, stem in (
        (SERVER_CN, Identity(ROLE_SERVER, SERVER_NAME), ExtendedKeyUsageOID.SERVER_AUTH, "cloud"),
        (REPLICA_NAME, Identity(ROLE_REPLICA, REPLICA_NAME), _AGENT_USAGES, REPLICA_NAME),
    ):
        cert_path, key_path = directory / f"{stem}.pem", directory / f"{stem}.key"
        try:
            current = x509.load_pem_x509_certificate(cert_path.read_bytes())
        except FileNotFoundError:
            raise FileNotFoundError(f"{cert_path} not found: rotate only renews what `tandem certs init` made") from None
        names = [n for n in current.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
                 if not isinstance(n, x509.UniformResourceIdentifier)]
        cert, key = _issue(ca, cn, identity, usage, days, names)
        replace_file(key_path, key_pem(key), KEY_MODE)
        replace_file(cert_path, cert.public_bytes(serialization.Encoding.PEM), CERT_MODE)
        written.append(cert_path)
    return written


def member_id(identity: Identity) -> str:
    """The id a coordinator knows a member by: an agent's name, or `region:NAME`, so that a
    region's certificate can never stand in for the agent of the same name."""
    return f"{REGION_PREFIX}{identity.name}" if identity.role == ROLE_REGION else identity.name


def region_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """The (certificate, key) paths of region `name` in a deployment directory."""
    validate_name(name)
    regions = Path(directory) / "regions"
    return regions / f"{name}.pem", regions / f"{name}.key"


def add_region(directory: Path, name: str, days: int = 365, hosts: Sequence[str] = ()) -> tuple[Path, Path]:
    """Issue a regional aggregator's certificate: its identity `region/NAME` towards its
    parent, and a server certificate for its agents under localhost and `hosts`."""
    return _add_leaf(directory, Identity(ROLE_REGION, name), region_paths, _AGENT_USAGES, days, host_names(hosts))


def add_agent(directory: Path, name: str, days: int = 365, hosts: Sequence[str] = ()) -> tuple[Path, Path]:
    """Issue a certificate for a new agent from the deployment's CA; returns (cert, key) paths.

    It serves Inference to local applications as well, so it names localhost,
    127.0.0.1 and `hosts` like the cloud's server certificate."""
    return _add_leaf(directory, Identity(ROLE_AGENT, name), agent_paths, _AGENT_USAGES, days, host_names(hosts))


def _add_leaf(
    directory: Path, identity: Identity, paths: Callable[[Path, str], tuple[Path, Path]],
    usages: x509.ObjectIdentifier | Sequence[x509.ObjectIdentifier], days: int,
    hosts: Sequence[x509.GeneralName] = (),
) -> tuple[Path, Path]:
    """Issue one more leaf certificate from the deployment's CA where `paths` puts it,
    refusing to replace one; returns its (cert, key) paths."""
    directory = Path(directory)
    check_days(days)
    cert_path, key_path = paths(directory, identity.name)
    issuer = load_issuer(directory)
    if cert_path.exists() or key_path.exists():
        raise FileExistsError(f"{identity.role} {identity.name!r} already exists in {directory} ({cert_path})")
    cert, key = _issue(issuer, identity.name, identity, usages, days, hosts)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    _write_pair(cert_path, key_path, cert, key)
    return cert_path, key_path


def client_paths(directory: Path, name: str) -> tuple[Path, Path]:
    """The (certificate, key) paths of local application `name` in a deployment directory."""
    validate_name(name)
    clients = Path(directory) / "clients"
    return clients / f"{name}.pem", clients / f"{name}.key"


def add_client(directory: Path, name: str, days: int = 365) -> tuple[Path, Path]:
    """Issue a certificate for a local application that calls Inference (and nothing else)."""
    return _add_leaf(directory, Identity(ROLE_CLIENT, name), client_paths, ExtendedKeyUsageOID.CLIENT_AUTH, days)


@functools.lru_cache(maxsize=1024)
def identity_from_pem(pem: bytes) -> Identity | None:
    """The Tandem identity in a certificate's SAN URI, or None if it carries none.

    Called on every RPC with the peer's already verified certificate, hence the cache.
    An unparsable certificate, an unknown role, a bad name, or more than one distinct
    identity all give None: the caller treats that as unauthenticated.
    """
    try:
        cert = x509.load_pem_x509_certificate(pem)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    found: set[Identity] = set()
    for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
        if not uri.startswith(URI_SCHEME):
            continue
        role, sep, name = uri[len(URI_SCHEME):].partition("/")
        if not sep or role not in ROLES or not _NAME_RE.fullmatch(name):
            return None
        found.add(Identity(role, name))
    return found.pop() if len(found) == 1 else None


def revoke(directory: Path, name: str, role: str | None = None) -> Identity:
    """Deny agent (or local application) `name` on every server of the deployment.

    Servers reading this directory refuse its next call within about a second, no
    restart needed (see `tandem.revocation`). With no `role`, the name must belong
    to exactly one issued agent or client certificate; give `role` to revoke a name
    whose certificate is gone from the directory, or one used by both.
    """
    directory = Path(directory)
    validate_name(name)
    if not (directory / "ca.pem").is_file():
        raise FileNotFoundError(f"no deployment in {directory} (no ca.pem)")
    if role is None:
        issued = [r for r, paths in ((ROLE_AGENT, agent_paths), (ROLE_CLIENT, client_paths),
                                     (ROLE_REGION, region_paths))
                  if paths(directory, name)[0].exists()]
        if not issued:
            raise FileNotFoundError(f"no agent or client named {name!r} in {directory}; name its role to revoke "
                                    "a certificate that is not there (an enrolled agent's: --role agent, or --ca-dir)")
        if len(issued) > 1:
            raise ValueError(f"{name!r} names {' and '.join(issued)} certificates in {directory}: "
                             "name the role to revoke")
        role = issued[0]
    elif role not in REVOCABLE_ROLES:
        raise ValueError(f"cannot revoke role {role!r}; only {', '.join(REVOCABLE_ROLES)} certificates")
    identity = Identity(role, name)
    revocation.add(directory, [str(identity)])
    return identity
