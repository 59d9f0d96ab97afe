"""An agent's first start with no certificate: make a key here, enrol with a one-time
token, and keep the certificate chain where `tls.agent_credentials` reads it.

The private key is written 0600 before anything is sent and never leaves this
machine; the enrollment service is authenticated by the CA bundle the agent was given.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import grpc

from tandem import certs, enrollment, grpcserver
from tandem.v1 import enrollment_pb2, enrollment_pb2_grpc

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 30.0


@dataclass(frozen=True)
class EnrollConfig:
    target: str  # HOST:PORT of `tandem ca`
    token_file: Path
    ca_file: Path  # the deployment's root CA bundle: authenticates the service, then the coordinator


def needed(certs_dir: Path, name: str) -> bool:
    """Whether agent `name` has no certificate yet in `certs_dir`."""
    return not certs.agent_paths(certs_dir, name)[0].exists()


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
    certs._write(key_path, certs._key_pem(key), certs._KEY_MODE)  # before anything is sent
    credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpcserver.secure_channel(config.target, credentials) as channel:
        try:
            reply: enrollment_pb2.EnrollResponse = await enrollment_pb2_grpc.EnrollmentStub(channel).Enroll(
                enrollment_pb2.EnrollRequest(name=name, token=token, csr_pem=csr_pem), timeout=TIMEOUT_SECONDS)
        except grpc.aio.AioRpcError as exc:  # the command line ends with its code and details, in one line
            log.error("enrollment of %r at %s failed: %s", name, config.target, exc.code().name)
            raise
    chain = reply.certificate_chain_pem
    leaf = certs.identity_from_pem(chain)
    if leaf != certs.Identity(certs.ROLE_AGENT, name):
        raise ValueError(f"the enrollment service returned a certificate for {leaf}, not agent/{name}")
    enrollment.write_chain(certs_dir, name, chain, ca_pem)
    log.info("enrolled as agent %r at %s; certificate in %s", name, config.target, cert_path)
    return cert_path
