"""Enrollment: an intermediate CA for agents, one-time tokens, and certificates issued
for requests signed by keys that never leave the agents.

The root CA (`tandem certs init`) signs an intermediate once (`tandem certs
intermediate`); the intermediate lives in its own directory, read only by the
enrollment service (`tandem ca`), and signs short-lived agent certificates. A name
constraint on the intermediate lets it vouch for `tandem://agent/...` identities only,
so whoever takes its key cannot mint an admin, server or replica certificate.

Tokens are made by an admin (`tandem certs token NAME`), printed once, and kept as a
sha256 with their agent name, expiry and whether they were used: single use, expiring,
bound to one name. This module holds the logic; gRPC lives in `cloud.enrollment`.
"""

from __future__ import annotations

import datetime
import hashlib
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tandem import certs
from tandem.errors import InvalidArgument, PermissionDenied, Unauthenticated

INTERMEDIATE_CERT = "intermediate.pem"
INTERMEDIATE_KEY = "intermediate.key"
TOKENS_DB = "tokens.sqlite"
SCHEMA_VERSION = 1
DEFAULT_CERT_HOURS = 24
SERVER_CERT_LIFETIME = datetime.timedelta(days=30)  # the service's own, made again halfway
_MAX_CSR_BYTES = 16 << 10

# Outcomes, as labels of tandem_enrollments_total and reasons of refusals.
ISSUED = "issued"
RENEWED = "renewed"
UNKNOWN_TOKEN = "unknown_token"
REPLAYED = "replayed"
EXPIRED = "expired"
WRONG_NAME = "wrong_name"
BAD_REQUEST = "bad_request"
REVOKED = "revoked"  # a renewal by a revoked agent
NOT_AGENT = "not_agent"  # a renewal by a certificate of another role
OUTCOMES = (ISSUED, RENEWED, UNKNOWN_TOKEN, REPLAYED, EXPIRED, WRONG_NAME, BAD_REQUEST, REVOKED, NOT_AGENT)


# --- the intermediate CA --------------------------------------------------------------


def create_intermediate(certs_dir: Path, out: Path, days: int = 365) -> Path:
    """Sign an intermediate CA for agents with the deployment's root (`certs_dir/ca.key`)
    and write it, its key (0600) and a copy of the root to `out`; returns the certificate path."""
    certs_dir, out = Path(certs_dir), Path(out)
    certs.check_days(days)
    root = certs.load_issuer(certs_dir)
    constraints = root.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    if constraints.path_length == 0:
        raise ValueError(f"the CA in {certs_dir} was made to sign leaf certificates only (path length 0); "
                         "make a new deployment with `tandem certs init` to use enrollment")
    if (out / INTERMEDIATE_CERT).exists():
        raise FileExistsError(f"{out / INTERMEDIATE_CERT} already exists: refusing to replace an intermediate CA")
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    key = certs.new_key()
    now = datetime.datetime.now(datetime.UTC)
    not_after = min(now + datetime.timedelta(days=days), root.cert.not_valid_after_utc)
    root_ski = root.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(certs.name_of("Tandem agent enrollment CA"))
        .issuer_name(root.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - certs.CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False, content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, key_cert_sign=True, crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        # Its leaves may carry only agent identities (the URI's host is the role).
        .add_extension(x509.NameConstraints(
            permitted_subtrees=[x509.UniformResourceIdentifier(certs.ROLE_AGENT)], excluded_subtrees=None),
            critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski), critical=False)
        .sign(root.key, hashes.SHA256())
    )
    certs.write_file(out / INTERMEDIATE_KEY, certs.key_pem(key), certs.KEY_MODE)
    certs.write_file(out / "ca.pem", root.cert.public_bytes(serialization.Encoding.PEM), certs.CERT_MODE)
    certs.write_file(out / INTERMEDIATE_CERT, cert.public_bytes(serialization.Encoding.PEM), certs.CERT_MODE)
    return out / INTERMEDIATE_CERT


def _load_intermediate(ca_dir: Path) -> certs.Issuer:
    cert_path, key_path = ca_dir / INTERMEDIATE_CERT, ca_dir / INTERMEDIATE_KEY
    if not cert_path.is_file() or not key_path.is_file():
        raise FileNotFoundError(f"no intermediate CA in {ca_dir} (run `tandem certs intermediate --out {ca_dir}`)")
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    return certs.Issuer(x509.load_pem_x509_certificate(cert_path.read_bytes()), key)


# --- tokens ---------------------------------------------------------------------------


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Token:
    """A token's record: never the token itself, only its digest."""

    digest: str
    name: str
    expires: float  # seconds since the epoch
    used: bool


class TokenStore:
    """The one-time tokens of a CA, in SQLite (`tokens.sqlite`, 0600) in `state_dir`: the
    CA's directory unless that is read-only (a mounted Kubernetes Secret)."""

    def __init__(self, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(state_dir) / TOKENS_DB
        self._clock = clock
        if not self.path.exists():
            certs.write_file(self.path, b"", certs.KEY_MODE)
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        # One connection, used from the enrollment service's worker threads: one caller at a time
        # (two transactions begun on one connection collide: "cannot start a transaction within a transaction").
        self._lock = threading.Lock()
        self._migrate()

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version < 1:
            self._db.executescript(
                "BEGIN IMMEDIATE;"
                "CREATE TABLE tokens (digest TEXT PRIMARY KEY, name TEXT NOT NULL, expires REAL NOT NULL, "
                "created REAL NOT NULL, used_at REAL);"
                "PRAGMA user_version = 1;"
                "COMMIT;"
            )

    def close(self) -> None:
        self._db.close()

    def create(self, name: str, ttl_seconds: float) -> str:
        """A fresh token for agent `name`, valid `ttl_seconds`: returned once, stored hashed."""
        certs.validate_name(name)
        if ttl_seconds <= 0:
            raise ValueError(f"a token's lifetime must be positive, got {ttl_seconds} s")
        token = secrets.token_urlsafe(32)
        now = self._clock()
        with self._lock:
            self._db.execute("INSERT INTO tokens (digest, name, expires, created) VALUES (?, ?, ?, ?)",
                             (_digest(token), name, now + ttl_seconds, now))
        return token

    def lookup(self, token: str) -> Token | None:
        with self._lock:
            row = self._db.execute("SELECT digest, name, expires, used_at FROM tokens WHERE digest = ?",
                                   (_digest(token),)).fetchone()
        return None if row is None else Token(row[0], row[1], row[2], row[3] is not None)

    def check(self, token: str, name: str) -> Token:
        """The token's record if it may enrol `name` now; the refusal (with its outcome as reason) if not."""
        found = self.lookup(token)
        if found is None:
            raise Unauthenticated("unknown enrollment token", reason=UNKNOWN_TOKEN)
        if found.used:
            raise Unauthenticated("this enrollment token has already been used", reason=REPLAYED)
        if found.expires <= self._clock():
            raise Unauthenticated("this enrollment token has expired; ask for a new one", reason=EXPIRED)
        if found.name != name:
            raise PermissionDenied(f"this enrollment token is not for agent {name!r}", reason=WRONG_NAME)
        return found

    def consume(self, token: Token, issue: Callable[[], bytes]) -> bytes:
        """Mark `token` used and run `issue` in one transaction: the certificate exists only if
        the token is spent, and two requests racing with one token get one certificate."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                spent = self._db.execute("UPDATE tokens SET used_at = ? WHERE digest = ? AND used_at IS NULL",
                                         (self._clock(), token.digest)).rowcount
                if spent != 1:
                    raise Unauthenticated("this enrollment token has already been used", reason=REPLAYED)
                result = issue()
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result


# --- requests and certificates ---------------------------------------------------------


def make_request(name: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A new key pair for agent `name` and a CSR signed with it (PEM): what an agent sends."""
    key = certs.new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, certs.validate_name(name))]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.PEM)


def check_request(csr_pem: bytes, name: str) -> ec.EllipticCurvePublicKey:
    """The public key of a well-formed CSR for `name`; INVALID_ARGUMENT saying what is wrong otherwise."""
    if len(csr_pem) > _MAX_CSR_BYTES:
        raise InvalidArgument(f"the CSR is larger than {_MAX_CSR_BYTES} bytes", reason=BAD_REQUEST)
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError:
        raise InvalidArgument("the CSR is not a PEM certificate signing request", reason=BAD_REQUEST) from None
    if not csr.is_signature_valid:
        raise InvalidArgument("the CSR's signature is not valid", reason=BAD_REQUEST)
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise InvalidArgument("the CSR's key must be EC P-256", reason=BAD_REQUEST)
    cns = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [name]:
        raise InvalidArgument(f"the CSR's subject CN must be the agent name {name!r}, got {cns}", reason=BAD_REQUEST)
    return key


@dataclass(frozen=True)
class Issued:
    chain_pem: bytes  # the agent's certificate, then the intermediate
    not_after: datetime.datetime


class AgentIssuer:
    """Issues agent certificates from the intermediate CA in `ca_dir`: against one-time
    tokens (enrollment), or to an agent whose current certificate proves its name (renewal)."""

    def __init__(self, ca_dir: Path, cert_hours: float = DEFAULT_CERT_HOURS,
                 clock: Callable[[], float] = time.time, state_dir: Path | None = None) -> None:
        if not cert_hours > 0:
            raise ValueError(f"--cert-hours must be positive, got {cert_hours}")
        self.ca_dir = Path(ca_dir)
        self.issuer = _load_intermediate(self.ca_dir)
        self.tokens = TokenStore(self.ca_dir if state_dir is None else Path(state_dir), clock)
        self.lifetime = datetime.timedelta(hours=cert_hours)

    def enroll(self, name: str, token: str, csr_pem: bytes) -> Issued:
        """A certificate for `name`'s CSR if `token` allows it (spent in the same transaction)."""
        try:
            certs.validate_name(name)
        except ValueError as exc:
            raise InvalidArgument(str(exc), reason=BAD_REQUEST) from None
        record = self.tokens.check(token, name)
        public_key = check_request(csr_pem, name)
        issued: list[Issued] = []

        def issue() -> bytes:
            issued.append(self._sign(name, public_key))
            return issued[0].chain_pem

        self.tokens.consume(record, issue)
        return issued[0]

    def renew(self, name: str, csr_pem: bytes) -> Issued:
        """A new certificate for agent `name`, whose current certificate the caller has
        proved over mutual TLS (and which is not revoked: the servicer checks that)."""
        return self._sign(name, check_request(csr_pem, name))

    def _sign(self, name: str, public_key: ec.EllipticCurvePublicKey) -> Issued:
        now = datetime.datetime.now(datetime.UTC)
        not_after = min(now + self.lifetime, self.issuer.cert.not_valid_after_utc)
        ca_ski = self.issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        uri = x509.UniformResourceIdentifier(f"{certs.URI_SCHEME}{certs.ROLE_AGENT}/{name}")
        # The same names and usages `tandem certs add-agent` gives an agent.
        sans: list[x509.GeneralName] = [*certs.host_names([]), uri]
        cert = (
            x509.CertificateBuilder()
            .subject_name(certs.name_of(name))
            .issuer_name(self.issuer.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - certs.CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True, content_commitment=False, key_encipherment=False,
                    data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                    encipher_only=False, decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self.issuer.key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.issuer.cert.public_bytes(serialization.Encoding.PEM)
        return Issued(chain, not_after)

    def server_certificate(self, hosts: list[str], lifetime: datetime.timedelta = SERVER_CERT_LIFETIME,
                           ) -> tuple[bytes, bytes, datetime.datetime]:
        """(key PEM, chain PEM, expiry) for the enrollment service's own TLS, kept in memory
        and made again before it expires (`cloud.enrollment`).

        It carries host names only: the intermediate may not vouch for any Tandem role but agent."""
        key = certs.new_key()
        now = datetime.datetime.now(datetime.UTC)
        ca_ski = self.issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        cert = (
            x509.CertificateBuilder()
            .subject_name(certs.name_of("tandem-enrollment"))
            .issuer_name(self.issuer.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - certs.CLOCK_SKEW)
            .not_valid_after(not_after := min(now + lifetime, self.issuer.cert.not_valid_after_utc))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(certs.host_names(hosts)), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(self.issuer.key, hashes.SHA256())
        )
        chain = cert.public_bytes(serialization.Encoding.PEM) + self.issuer.cert.public_bytes(serialization.Encoding.PEM)
        return certs.key_pem(key), chain, not_after


def write_chain(certs_dir: Path, name: str, chain_pem: bytes, ca_pem: bytes) -> Path:
    """Write an enrolled agent's certificate chain (its key is already there, 0600) and the
    root CA bundle, where `tls.agent_credentials` reads them; returns the certificate path."""
    cert_path, _ = certs.agent_paths(certs_dir, name)
    ca_path = Path(certs_dir) / "ca.pem"
    if not ca_path.exists():
        certs.write_file(ca_path, ca_pem, certs.CERT_MODE)
    # Last, in one rename: a usable certificate means enrolled (edge.enroll.needed).
    certs.replace_file(cert_path, chain_pem, certs.CERT_MODE)
    return cert_path
