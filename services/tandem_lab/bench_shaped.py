"""`bench fl --rate R --rtt T`: every agent (Tandem) and every Flower client behind a link of its own.

Each peer runs in a network namespace (`netem.ShapedLink`, tc tbf at `rate` in both
directions on its veth pair) and reaches the server through a `netem.DelayRelay` on the
host end of its veth (half the round-trip time each way) chained to the run's
byte-counting relay (`relay.Relay`) on loopback:

    peer (namespace) --veth, tbf--> DelayRelay (host_ip) --> Relay (127.0.0.1) --> server

The same links carry Tandem's runs and Flower's, one after another. Needs root (`ip
netns`, `tc`); `refusal` says in one line why a run cannot be shaped. This module
imports neither torch nor the servers, so the command can refuse before loading them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import sys
from pathlib import Path

from tandem_lab.netem import DelayRelay, ShapedLink, _bits, unavailable_reason

LINK_BASE = 120  # namespaces tandem-120..: bench_auto uses 0, bench_placement 70.., tests 41

_RTT = re.compile(r"^(\d+(?:\.\d+)?)(ms|s)$")


def parse_rtt(text: str) -> float:
    """Seconds from `40ms` or `0.04s`; ValueError otherwise."""
    match = _RTT.match(text.strip())
    if not match:
        raise ValueError(f"--rtt {text!r}: use a number with ms or s, e.g. 40ms")
    value = float(match.group(1)) * (1e-3 if match.group(2) == "ms" else 1.0)
    if value > 10:
        raise ValueError(f"--rtt {text!r}: at most 10 s")
    return value


def check_rate(text: str) -> float:
    """Bits per second from tc's syntax (`20mbit`, `512kbit`); ValueError if malformed or not positive."""
    try:
        bits = _bits(text)
    except ValueError:
        raise ValueError(f"--rate {text!r}: use a number with kbit, mbit or gbit, e.g. 20mbit") from None
    if not bits > 0 or not re.fullmatch(r"\d+(?:\.\d+)?[kmg]?bit", text):
        raise ValueError(f"--rate {text!r}: use a positive number with kbit, mbit or gbit, e.g. 20mbit")
    return bits


def refusal(rate: str | None, rtt: str | None, clients: int) -> str | None:
    """Why `bench fl` cannot shape its links as asked (one line), or None."""
    if rtt and not rate:
        return "--rtt needs --rate (the delay is added on the shaped links)"
    if not rate:
        return None
    try:
        check_rate(rate)
        parse_rtt(rtt or "0ms")
    except ValueError as exc:
        return str(exc)
    if not 1 <= clients <= 250 - LINK_BASE:
        return f"--clients {clients}: shaped runs make one namespace per client, at most {250 - LINK_BASE}"
    return unavailable_reason()


class ShapedFleet:
    """`count` shaped links; `open(port)` puts a DelayRelay on each, towards 127.0.0.1:port."""

    def __init__(self, count: int, rate: str, rtt: float) -> None:
        self.links = [ShapedLink(LINK_BASE + i) for i in range(count)]
        self.rate, self.rtt = rate, rtt
        self._relays: list[DelayRelay] = []

    @property
    def hosts(self) -> list[str]:
        """The server's addresses as the peers see them (for the certificates' SANs)."""
        return [link.host_ip for link in self.links]

    def up(self) -> ShapedFleet:
        try:
            for link in self.links:
                link.up(self.rate)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        for link in self.links:
            link.down()

    async def open(self, port: int) -> list[str]:
        """One DelayRelay per link to 127.0.0.1:`port`; the address each peer dials."""
        await self.close()
        for link in self.links:
            relay = DelayRelay(("127.0.0.1", port), rtt=self.rtt)
            self._relays.append(relay)
            await relay.start(link.host_ip)
        return [f"{link.host_ip}:{relay.port}" for link, relay in zip(self.links, self._relays, strict=True)]

    async def close(self) -> None:
        relays, self._relays = self._relays, []
        for relay in relays:
            with contextlib.suppress(Exception):
                await relay.close()

    def prefix(self, index: int) -> list[str]:
        return self.links[index].prefix()

    def peer_ip(self, index: int) -> str:
        """Where a process in link `index`'s namespace can listen for the host (its metrics)."""
        return self.links[index].ns_ip


_DOWNLOAD = """
import asyncio, sys
from pathlib import Path
from tandem_lab.bench import _download_seconds
print(asyncio.run(_download_seconds(sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4]))))
"""


async def download_seconds(fleet: ShapedFleet, target: str, certs_dir: Path, model: str, version: int) -> float:
    """`bench._download_seconds` from inside link 0's namespace, through `target` (its DelayRelay)."""
    proc = await asyncio.create_subprocess_exec(
        *fleet.prefix(0), sys.executable, "-c", _DOWNLOAD, target, str(certs_dir), model, str(version),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=dict(os.environ))
    out, err = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"download through the shaped link failed: {err.decode().strip()[-300:]}")
    return float(out.decode().split()[-1])
