"""How an agent reaches the cloud: channels made from its certificate files and made
again when they change (a rotated CA bundle is picked up at the next reconnect, a
renewed certificate as soon as it is written; without a restart), and the backoff
between reconnects.

Channels made again do not cut what runs on the old ones: those are retired, and
closed once the control stream that was opened on them has ended, with a grace for
the calls still in flight."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
from collections.abc import Callable
from pathlib import Path

import grpc

from tandem import certs, grpcserver, tls

log = logging.getLogger(__name__)

RETIRE_GRACE = 30.0  # seconds calls on retired channels may still take

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
    def __init__(self, certs_dir: Path, agent_id: str, cloud: str, inference_cloud: str | None = None,
                 identity: Callable[[Path, str], tuple[Path, Path]] = certs.agent_paths,
                 fallbacks: tuple[str, ...] = ()) -> None:
        """`cloud` is the coordinator (the cloud's, or the agent's region); `fallbacks` the
        ones tried in turn after a connect to the current one failed, back to `cloud` after
        the last."""
        self._certs_dir, self._agent_id, self._identity = certs_dir, agent_id, identity
        self._targets = (cloud, *fallbacks)
        self._current = 0
        self._inference_cloud = inference_cloud
        self._files = ""
        self._bytes: tuple[bytes, bytes, bytes] | None = None  # the files the channels were made with
        self.coordinator: grpc.aio.Channel | None = None
        self.inference: grpc.aio.Channel | None = None  # the coordinator's channel unless inference_cloud is set
        self._retired: list[grpc.aio.Channel] = []
        self._closing: set[asyncio.Task[None]] = set()

    def _read(self) -> tuple[bytes, bytes, bytes]:
        """The CA bundle, certificate and key, checked to belong together (a renewal between
        its two renames is not: ValueError, and the files are read again next time)."""
        cert, key = self._identity(self._certs_dir, self._agent_id)
        ca_pem, cert_pem, key_pem = (path.read_bytes() for path in (self._certs_dir / "ca.pem", cert, key))
        tls.check_pair(cert_pem, key_pem, ca_pem, self._certs_dir)
        return ca_pem, cert_pem, key_pem

    async def open(self, files: tuple[bytes, bytes, bytes] | None = None) -> None:
        """Make the channels from `files` (CA bundle, certificate, key), read now if not given."""
        ca_pem, cert_pem, key_pem = files if files is not None else self._read()
        credentials = grpc.ssl_channel_credentials(root_certificates=ca_pem, private_key=key_pem,
                                                   certificate_chain=cert_pem)
        self.coordinator = grpcserver.secure_channel(self.target, credentials)
        self._bytes = (ca_pem, cert_pem, key_pem)
        self.inference = self.coordinator
        if self._inference_cloud:
            self.inference = grpcserver.secure_channel(self._inference_cloud, credentials)
        # Only once made: files that could not be used are tried again.
        self._files = hashlib.sha256(ca_pem + cert_pem + key_pem).hexdigest()

    @property
    def target(self) -> str:
        """The coordinator the channels lead to now."""
        return self._targets[self._current]

    async def fail_over(self) -> bool:
        """After a failed connect: the channels lead to the next coordinator (the old ones
        retired); False when there is no other."""
        if len(self._targets) < 2 or self._bytes is None:
            return False
        old = (self.coordinator, self.inference)
        self._current = (self._current + 1) % len(self._targets)
        await self.open(self._bytes)
        self._retired += [c for c in dict.fromkeys(old) if c is not None]
        log.warning("failing over to %s", self.target)
        return True

    async def refresh(self) -> bool:
        """Make the channels again if the certificate files changed; whether they were.
        The old ones are retired, not closed: what runs on them goes on (`drop_retired`)."""
        try:
            files = self._read()
            if hashlib.sha256(b"".join(files)).hexdigest() == self._files:
                return False
            old = (self.coordinator, self.inference)
            await self.open(files)
        except (OSError, ValueError) as exc:  # caught between the renames of a rotation: next time
            log.warning("certificate files unusable (%s); keeping the current channels", exc)
            return False
        self._retired += [c for c in dict.fromkeys(old) if c is not None]
        log.info("certificate files changed: new calls go on channels made with them")
        return True

    def drop_retired(self, grace: float = RETIRE_GRACE) -> None:
        """Close the retired channels once their calls end (at most `grace` seconds)."""
        for channel in self._retired:
            task = asyncio.create_task(channel.close(grace))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self._retired = []

    async def close(self) -> None:
        for channel in {c for c in (self.coordinator, self.inference, *self._retired) if c is not None}:
            await channel.close()
        self._retired = []
        for task in list(self._closing):
            task.cancel()
