"""How an agent reaches the cloud: channels made from its certificate files and made
again when they change (a rotated CA bundle or a renewed certificate is picked up at
the next reconnect, without a restart; while a connection is up the files are not
looked at), and the backoff between reconnects."""

from __future__ import annotations

import hashlib
import logging
import random
from pathlib import Path

import grpc

from tandem import certs, grpcserver, tls

log = logging.getLogger(__name__)

# How a coordinator that will not talk to this certificate ends the control stream.
REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class Backoff:
    """Full-jitter exponential backoff: a random wait in [0, min(cap, base * 2**n))."""

    def __init__(self, initial: float, cap: float) -> None:
        self.initial, self.cap, self.failures = initial, cap, 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        self.failures += 1
        return random.uniform(0, min(self.cap, self.initial * 2 ** min(self.failures, 32)))


class CloudChannels:
    def __init__(self, certs_dir: Path, agent_id: str, cloud: str, inference_cloud: str | None = None) -> None:
        self._certs_dir, self._agent_id = certs_dir, agent_id
        self._cloud, self._inference_cloud = cloud, inference_cloud
        self._files = ""
        self.coordinator: grpc.aio.Channel | None = None
        self.inference: grpc.aio.Channel | None = None  # the coordinator's channel unless inference_cloud is set

    def _fingerprint(self) -> str:
        cert, key = certs.agent_paths(self._certs_dir, self._agent_id)
        digest = hashlib.sha256()
        for path in (self._certs_dir / "ca.pem", cert, key):
            digest.update(path.read_bytes())
        return digest.hexdigest()

    async def open(self) -> None:
        files = self._fingerprint()
        credentials = tls.agent_credentials(self._certs_dir, self._agent_id)
        self.coordinator = grpcserver.secure_channel(self._cloud, credentials)
        self.inference = self.coordinator
        if self._inference_cloud:
            self.inference = grpcserver.secure_channel(self._inference_cloud, credentials)
        self._files = files  # only once made: files that could not be used are tried again

    async def refresh(self) -> bool:
        """Make the channels again if the certificate files changed; whether they were."""
        try:
            if self._fingerprint() == self._files:
                return False
            old = (self.coordinator, self.inference)
            await self.open()
        except (OSError, ValueError) as exc:  # caught between the renames of a rotation: next time
            log.warning("certificate files unreadable (%s); keeping the current channels", exc)
            return False
        for channel in {c for c in old if c is not None}:
            await channel.close()
        log.info("certificate files changed: the cloud channels are made again with them")
        return True

    async def close(self) -> None:
        for channel in {c for c in (self.coordinator, self.inference) if c is not None}:
            await channel.close()
