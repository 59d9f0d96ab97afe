"""An agent's own certificate: enrolment when it has none (or the one it has expired
while it was offline), and renewal before it expires, while it runs.

Enrolment: make a key here, send a CSR with a one-time token, keep the certificate
chain where `tls.agent_credentials` reads it; the enrollment service is authenticated
by the CA bundle the agent was given. Renewal: a new key and CSR, sent over mutual TLS
with the current certificate (`tandem ca --renew-listen`), once two thirds of the
certificate's life have passed; the new key and chain replace the old files in one
rename each. Private keys are written 0600 before anything is sent and never leave
this machine.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tandem import certs, enrollment, grpcserver, tls
from tandem.files import replace_durably
from tandem.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 30.0
RENEW_AT = 2 / 3  # of a certificate's life
EXPIRED = "its certificate expired"  # how `needed` begins for an expired certificate
RETRY_FIRST, RETRY_CAP = 5.0, 600.0  # seconds between failed renewals: doubling, with jitter


@dataclass(frozen=True)
class EnrollConfig:
    target: str  # HOST:PORT of `tandem ca`
    token_file: Path
    ca_file: Path  # the deployment's root CA bundle: authenticates the service, then the coordinator


def needed(certs_dir: Path, name: str, now: datetime.datetime | None = None) -> str | None:
    """Why agent `name` must enrol (no certificate in `certs_dir`, or an expired or
    unreadable one), or None when its certificate can be used."""
    path = certs.agent_paths(certs_dir, name)[0]
    if not path.exists():
        return "no certificate yet"
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except ValueError:
        return f"{path} is not a certificate"
    if cert.not_valid_after_utc <= (now or datetime.datetime.now(datetime.UTC)):
        return f"{EXPIRED} at {cert.not_valid_after_utc.isoformat(timespec='seconds')}"
    key_path = certs.agent_paths(certs_dir, name)[1]
    try:  # a renewal cut short between its two renames leaves a key the certificate does not match
        tls.check_pair(path.read_bytes(), key_path.read_bytes(), path.read_bytes(), Path(certs_dir))
    except (OSError, ValueError):
        return f"{key_path} is missing or does not match the certificate"
    return None


async def enroll(certs_dir: Path, name: str, config: EnrollConfig) -> Path:
    """Enrol agent `name` and write its key, chain and the CA bundle under `certs_dir`;
    returns the certificate's path."""
    try:
        token = config.token_file.read_text().strip()
        ca_pem = config.ca_file.read_bytes()
    except OSError as exc:
        flag = "--enroll-token-file" if exc.filename == str(config.token_file) else "--ca-file"
        raise ValueError(f"{flag} {exc.filename}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"the enrollment token file {config.token_file} is empty")
    cert_path, key_path = certs.agent_paths(certs_dir, name)
    key, csr_pem = enrollment.make_request(name)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    # The new key, 0600, before anything is sent; beside the old pair (an agent enrolling
    # again after its certificate expired), which it replaces only once enrolled.
    pending = key_path.with_name(key_path.name + ".new")
    certs.write_file(pending, certs.key_pem(key), certs.KEY_MODE)
    try:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
        async with grpcserver.secure_channel(config.target, credentials) as channel:
            try:
                reply: enrollment_pb2.EnrollResponse = await enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
                    enrollment_pb2.EnrollRequest(name=name, token=token, csr_pem=csr_pem), timeout=TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError as exc:  # the command line ends with its code and details, in one line
                log.error("enrollment of %r at %s failed: %s", name, config.target, exc.code().name)
                raise
        chain = reply.certificate_chain_pem
        _check_issued(chain, name, key, "enrollment")
        replace_durably(pending, key_path)
    finally:
        pending.unlink(missing_ok=True)
    enrollment.write_chain(certs_dir, name, chain, ca_pem)
    log.info("enrolled as agent %r at %s; certificate in %s", name, config.target, cert_path)
    return cert_path


def _check_issued(chain: bytes, name: str, key: ec.EllipticCurvePrivateKey, service: str) -> x509.Certificate:
    """The leaf of an issued chain, if it is agent `name`'s for `key`; ValueError otherwise."""
    leaf = x509.load_pem_x509_certificate(chain)
    identity = certs.identity_from_pem(chain)
    if identity != certs.Identity(certs.ROLE_AGENT, name):
        raise ValueError(f"the {service} service returned a certificate for {identity}, not agent/{name}")
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if leaf.public_key().public_bytes(serialization.Encoding.DER, public) != key.public_key().public_bytes(
            serialization.Encoding.DER, public):
        raise ValueError(f"the {service} service returned a certificate for another key")
    return leaf


# --- renewal --------------------------------------------------------------------------


def renewal_due(cert_pem: bytes) -> datetime.datetime:
    """When a certificate should be renewed: two thirds into its life, counted from its
    issue (a Tandem CA back-dates `not_before` by `certs.CLOCK_SKEW`)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    if start + certs.CLOCK_SKEW < end:
        start += certs.CLOCK_SKEW
    return start + (end - start) * RENEW_AT


def default_renew_target(enroll_target: str) -> str:
    """Where renewals go when only the enrollment address is known: its host, the next port
    (`tandem ca`'s defaults are 7445 and 7446)."""
    host, _, port = enroll_target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--enroll {enroll_target!r}: expected HOST:PORT")
    return f"{host}:{int(port) + 1}"


class Renewer:
    """Renews agent `name`'s certificate in `certs_dir` at `target` while the agent runs,
    then awaits `renewed` (which makes the agent's channels again with the new files)."""

    def __init__(self, certs_dir: Path, name: str, target: str, renewed: Callable[[], Awaitable[None]],
                 clock: Callable[[], float] = time.time) -> None:
        self.certs_dir, self.name, self.target = Path(certs_dir), name, target
        self._renewed, self._clock = renewed, clock

    def seconds_left(self) -> float:
        """Seconds until the current certificate is due for renewal (0 when it is)."""
        cert_path, _ = certs.agent_paths(self.certs_dir, self.name)
        return max(0.0, renewal_due(cert_path.read_bytes()).timestamp() - self._clock())

    async def run(self) -> None:
        failures = 0
        while True:
            try:
                wait = self.seconds_left()
            except (OSError, ValueError) as exc:
                log.error("cannot read this agent's certificate to plan its renewal: %s", exc)
                wait = RETRY_CAP
            await asyncio.sleep(wait)
            try:
                await self.renew()
            except grpc.aio.AioRpcError as exc:
                failures += 1
                delay = random.uniform(0.5, 1.0) * min(RETRY_CAP, RETRY_FIRST * 2 ** min(failures, 16))
                log.error("renewal of this agent's certificate at %s failed: %s %s; trying again in %.0f s",
                          self.target, exc.code().name, exc.details(), delay)
                await asyncio.sleep(delay)
                continue
            except (OSError, ValueError) as exc:
                failures += 1
                log.error("renewal of this agent's certificate failed: %s; trying again in %.0f s", exc, RETRY_CAP)
                await asyncio.sleep(RETRY_CAP)
                continue
            failures = 0
            await self._renewed()

    async def renew(self) -> datetime.datetime:
        """One renewal: a new key, its CSR over mutual TLS with the current certificate,
        the new key and chain written; returns the new certificate's expiry."""
        key, csr_pem = enrollment.make_request(self.name)
        credentials = tls.agent_credentials(self.certs_dir, self.name)
        async with grpcserver.secure_channel(self.target, credentials) as channel:
            reply: enrollment_pb2.EnrollResponse = await enrollment_pb2_grpc.RenewalStub(channel).Renew(
                enrollment_pb2.RenewRequest(csr_pem=csr_pem), timeout=TIMEOUT_SECONDS)
        chain = reply.certificate_chain_pem
        leaf = _check_issued(chain, self.name, key, "renewal")
        cert_path, key_path = certs.agent_paths(self.certs_dir, self.name)
        # Key, then certificate, each in one rename: a reader between the two sees a pair that does
        # not match, which servers and the agent's channels refuse and read again (tls.check_pair).
        certs.replace_file(key_path, certs.key_pem(key), certs.KEY_MODE)
        certs.replace_file(cert_path, chain, certs.CERT_MODE)
        log.info("renewed this agent's certificate at %s: valid until %s", self.target,
                 leaf.not_valid_after_utc.isoformat(timespec="seconds"))
        return leaf.not_valid_after_utc
