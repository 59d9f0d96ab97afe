"""Flower beside Tandem in one `bench fl` run (`--flower PYTHON`): the reference workload
on Flower 1.42's gRPC `start_server`/`start_client` path (tandem_lab.flower_peer, run by
an interpreter that has flwr==1.42.0 and torch==2.13.0), its clients connected through
the same kind of byte-counting relay as Tandem's agents, over TLS with the same certificates."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from tandem import data
from tandem_cli import procs
from tandem_lab.relay import Relay

if TYPE_CHECKING:
    from tandem_lab.bench_shaped import ShapedFleet

PEER = Path(__file__).with_name("flower_peer.py")  # run as a script: no Tandem import in that interpreter


def write_data(directory: Path, clients: int) -> None:
    """The reference partitions and test split as .npz files the peer reads."""
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(clients):
        part = data.load_data(f"digits:{index}/{clients}")
        np.savez(directory / f"client-{index}.npz", x=part.x, y=part.y)
    test = data.eval_dataset("digits")
    np.savez(directory / "test.npz", x=test.x, y=test.y)


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


async def run_flower(python: str, work: Path, certs_dir: Path, clients: int, rounds: int,
                     timeout: float = 1800, fleet: ShapedFleet | None = None) -> dict[str, Any]:
    """One Flower run; its rounds' seconds, accuracy and the bytes through the relay. With
    `fleet`, each client runs in its own shaped namespace and dials its DelayRelay, as Tandem's agents."""
    run = work / "flower"
    write_data(run / "data", clients)
    port = procs.free_port()
    out = run / "result.json"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    common = ["--data", str(run / "data"), "--certs", str(certs_dir)]
    logs = [open(run / name, "wb") for name in ("server.log", *(f"client-{i}.log" for i in range(clients)))]
    server = subprocess.Popen([python, str(PEER), "server", "--address", f"127.0.0.1:{port}", "--clients",
                               str(clients), "--rounds", str(rounds), "--out", str(out), *common],
                              stdout=logs[0], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    relay = Relay("127.0.0.1", port)
    await relay.start()
    children: list[subprocess.Popen[bytes]] = []
    try:
        deadline = time.monotonic() + 120
        while not _listening(port):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the Flower server did not start; see {run / 'server.log'}")
            await asyncio.sleep(0.2)
        addresses = await fleet.open(relay.port) if fleet else [f"localhost:{relay.port}"] * clients
        children = [subprocess.Popen([*(fleet.prefix(i) if fleet else []), python, str(PEER), "client",
                                      "--address", addresses[i],
                                      "--index", str(i), *common[:1], str(run / "data" / f"client-{i}.npz"),
                                      *common[2:]],
                                     stdout=logs[i + 1], stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
                    for i in range(clients)]
        started = time.monotonic()
        while server.poll() is None:
            if time.monotonic() - started > timeout:
                raise RuntimeError(f"the Flower run took more than {timeout:.0f} s; see {run}")
            await asyncio.sleep(0.2)
        if server.returncode != 0 or not out.exists():
            raise RuntimeError(f"the Flower server failed ({server.returncode}); see {run / 'server.log'}")
        result: dict[str, Any] = json.loads(out.read_text())
    finally:
        for proc in [*children, server]:
            procs.stop(proc)
        if fleet:
            await fleet.close()
        await relay.close()
        for log in logs:
            log.close()
    result["wire_bytes_up"], result["wire_bytes_down"] = relay.up, relay.down
    return result
