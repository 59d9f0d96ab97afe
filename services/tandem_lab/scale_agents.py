"""Light agents for `make bench-scale`: many in one process, each with its own channel
(its own TLS connection) and control stream, heartbeating and answering tasks with a
ready-made update, as the 500-agent load scenario's (tandem_lab.reliability_load) do,
but reconnecting when a stream breaks (a region is killed and comes back) and counting
every acknowledged upload.

Run as a process of its own (`python -m tandem_lab.scale_agents`), it holds a share of
the fleet: it reads commands on stdin (`measure`: forget the heartbeat times so far;
`stop`: close every stream, write the result to --out and exit) and writes one JSON
line to stdout whenever its count of open streams changes. Imports no torch.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import random
import resource
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from tandem import compression, deltas, grpcserver, tls, wire
from tandem.v1 import coordinator_pb2 as pb
from tandem.v1 import coordinator_pb2_grpc

# Made-up update values: small, so that what the cloud publishes stays a sane model.
UPDATE_SCALE = 1e-3
UPLOAD_RETRY_SECONDS = 120.0  # an upload refused UNAVAILABLE (its coordinator is down) is tried again this long


@dataclass(frozen=True)
class Update:
    """One pre-encoded update, sent by every light agent of a process (each task adds only a header)."""

    codec: str
    chunks: tuple[Any, ...]  # TensorChunk messages
    sha256: str
    nbytes: int


def model_specs(model: str) -> dict[str, tuple[int, ...]]:
    """The shapes of a zoo model's tensors. It imports torch: the benchmark calls it and
    writes them to the file (--shapes) its fleet processes read."""
    from tandem import training, zoo

    return {name: tuple(a.shape) for name, a in training.state_arrays(zoo.build_model(model, seed=0)).items()}


def make_update(shapes: dict[str, tuple[int, ...]], codec: str, seed: int = 0) -> Update:
    rng = np.random.default_rng(seed)
    delta = {name: (rng.standard_normal(shape, dtype=np.float32) * UPDATE_SCALE) for name, shape in shapes.items()}
    components = deltas.encode_all(delta, compression.parse_codec(codec))
    return Update(codec, tuple(wire.iter_chunks(components)), wire.state_sha256(components),
                  deltas.nbytes(components))


@dataclass
class Acked:
    """An upload the coordinator acknowledged (OK), or answered otherwise."""

    agent: str
    job_id: str
    round: int
    code: str
    at: float


@dataclass
class Tally:
    """What the light agents of one process saw (one event loop: no locks)."""

    measuring: bool = True
    rtts: list[tuple[float, float]] = field(default_factory=list)  # (when acknowledged, seconds)
    notices: int = 0  # ModelNotices received (every version a coordinator publishes is announced to all)
    downloads: int = 0
    download_bytes: int = 0
    uploads: list[Acked] = field(default_factory=list)
    drops: int = 0  # control streams that ended while the fleet ran
    failed_connects: int = 0  # attempts that never got a Welcome (a handshake timed out in a connect storm)
    reasons: collections.Counter[str] = field(default_factory=collections.Counter)  # why they ended
    connected: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class LightAgent:
    """One member: a channel, a control stream (reopened when it breaks), heartbeats timed
    by the coordinator's acknowledgement, and tasks answered as a real agent answers them
    (the base version downloaded unless held or seeded), with `update` in place of
    training, after `delay` seconds in the rounds `delay_rounds` (every round: None).
    `offers` in its Hello (a task nobody trains keeps a probe out of every job).

    A task for a round whose update was acknowledged is not answered again: a coordinator
    that lost an acknowledged update does not get it back from here (it is counted in
    `resent`), so a loss shows."""

    def __init__(self, target: str, certs_dir: Path, name: str, tally: Tally, update: Update | None,
                 interval: float = 0.0, delay: float = 0.0, delay_rounds: frozenset[int] | None = None,
                 offers: Sequence[str] = (), examples: int = 100) -> None:
        self.target, self.name, self.tally, self.update = target, name, tally, update
        self.interval, self.delay, self.delay_rounds, self.examples = interval, delay, delay_rounds, examples
        self.answered: set[tuple[str, int]] = set()  # (job, round) answered OK or being answered
        self.acked: set[tuple[str, int]] = set()
        self.held: dict[str, int] = {}  # model -> the version last downloaded
        self.resent = 0  # tasks received again for a round already acknowledged
        self.offers = [pb.TaskOffer(name=n, ready=False, reason="a probe: trains nothing") for n in offers]
        self.channel = grpcserver.secure_channel(target, tls.agent_credentials(certs_dir, name))
        self.stub = coordinator_pb2_grpc.CoordinatorStub(self.channel)
        self.streams = 0  # control streams opened (1 + reconnections)
        self.drops: list[float] = []  # when a stream ended while running (time.time())
        self._answering: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event, reconnect: bool = True) -> None:
        delay = 0.2
        try:
            while not stop.is_set():
                welcomed = await self._session(stop)
                if stop.is_set():
                    break
                if welcomed:  # an open stream broke (one that never opened is a failed connect)
                    self.drops.append(time.time())
                    self.tally.drops += 1
                else:
                    self.tally.failed_connects += 1
                if not reconnect:
                    break
                delay = 0.2 if welcomed else min(2 * delay, 3.0)
                try:
                    async with asyncio.timeout(delay * random.uniform(0.5, 1.5)):
                        await stop.wait()
                except TimeoutError:
                    pass
        finally:
            await self.channel.close()

    async def _session(self, stop: asyncio.Event) -> bool:
        """One control stream, until it breaks or `stop`: whether it was welcomed. Messages
        go out with `call.write` (cheaper than a request iterator: one fewer task per message)."""
        sent: dict[int, float] = {}
        call = self.stub.Connect()
        self.streams += 1
        beating: list[asyncio.Task[None]] = []
        welcomed = False

        async def read() -> None:
            nonlocal welcomed
            await call.write(pb.AgentMessage(hello=pb.Hello(num_examples=self.examples, device="cpu",
                                                            tasks=self.offers)))
            async for message in call:
                kind = message.WhichOneof("kind")
                if kind == "heartbeat_ack":
                    started = sent.pop(message.heartbeat_ack.seq, None)
                    if started is not None and self.tally.measuring:
                        self.tally.rtts.append((time.time(), time.perf_counter() - started))
                elif kind == "welcome":
                    welcomed = True
                    self.tally.connected += 1
                    self.tally.changed.set()
                    interval = self.interval or message.welcome.heartbeat_interval_seconds or 5.0
                    beating.append(asyncio.create_task(self._heartbeats(call, sent, interval)))
                elif kind == "model":
                    self.tally.notices += 1
                elif kind == "task" and self.update is not None:
                    answer = asyncio.create_task(self._answer(message.task))
                    self._answering.add(answer)
                    answer.add_done_callback(self._answering.discard)

        reader = asyncio.create_task(read())
        stopper = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({reader, stopper}, return_when=asyncio.FIRST_COMPLETED)
            if reader.done() and not stop.is_set():
                exc = reader.exception()
                reason = f"{exc.code().name}: {exc.details()}" if isinstance(exc, grpc.aio.AioRpcError) else (
                    repr(exc) if exc else "the coordinator ended the stream")
                self.tally.reasons[reason[:200]] += 1
            return welcomed
        finally:
            if welcomed:
                self.tally.connected -= 1
                self.tally.changed.set()
            for task in (*beating, reader, stopper):
                task.cancel()
            call.cancel()

    async def _heartbeats(self, call: Any, sent: dict[int, float], interval: float) -> None:
        await asyncio.sleep(random.uniform(0, interval))  # spread the fleet's heartbeats over the interval
        seq = 0
        while True:
            seq += 1
            sent[seq] = time.perf_counter()
            try:
                await call.write(pb.AgentMessage(heartbeat=pb.Heartbeat(seq=seq)))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError):
                return  # the stream is gone: the reader says why
            await asyncio.sleep(interval)

    async def _fetch(self, task: pb.TrainTask) -> None:
        """The task's base version, as a real agent gets it: nothing when it is the job's
        seeded initial model or the version held, else downloaded (the differences from
        the version held, when the coordinator has them). What arrives is counted, not kept."""
        if task.HasField("base_seed"):  # built from the seed, as a real agent does: held from now on
            self.held[task.model] = task.base_version
        if self.held.get(task.model) == task.base_version:
            return
        request = pb.ModelRequest(model=task.model, version=task.base_version,
                                  have_version=self.held.get(task.model, 0))
        try:
            async for message in self.stub.DownloadModel(request, timeout=120):
                self.tally.download_bytes += message.ByteSize()
        except grpc.aio.AioRpcError:
            return  # the upload goes ahead: the coordinator does not know what was downloaded
        self.tally.downloads += 1
        self.held[task.model] = task.base_version

    async def _answer(self, task: pb.TrainTask) -> None:
        update = self.update
        assert update is not None
        key = (task.job_id, task.round)
        if key in self.answered:  # being answered (a reconnect brings the open round's task again), or acknowledged
            self.resent += key in self.acked
            return
        self.answered.add(key)
        await self._fetch(task)
        if self.delay and (self.delay_rounds is None or task.round in self.delay_rounds):
            await asyncio.sleep(self.delay)
        if task.codec and task.codec != update.codec:
            self.tally.uploads.append(Acked(self.name, task.job_id, task.round, f"codec {task.codec}", time.time()))
            return
        header = pb.UpdateHeader(job_id=task.job_id, round=task.round, base_version=task.base_version,
                                 num_examples=self.examples, codec=task.codec, local_loss=0.5,
                                 content_sha256=update.sha256)

        async def messages() -> AsyncIterator[pb.UpdateChunk]:
            yield pb.UpdateChunk(header=header)
            for chunk in update.chunks:
                yield pb.UpdateChunk(tensor=chunk)

        code = "OK"
        give_up = time.monotonic() + UPLOAD_RETRY_SECONDS
        while True:  # a coordinator killed mid-upload: sent again once it is back
            try:
                await self.stub.UploadUpdate(messages(), timeout=60)
                code = "OK"
                break
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > give_up:
                    break
                await asyncio.sleep(0.5)
        if code == "OK":
            self.acked.add(key)
        else:
            self.answered.discard(key)  # not acknowledged: a task sent again is answered
        self.tally.uploads.append(Acked(self.name, task.job_id, task.round, code, time.time()))


# ---- a fleet process -----------------------------------------------------------


def raise_open_files() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def parse_group(text: str) -> tuple[str, str, int, int]:
    """TARGET=PREFIX:FIRST:COUNT (agents PREFIX00000... connected to TARGET)."""
    target, _, names = text.partition("=")
    prefix, first, count = names.split(":")
    return target, prefix, int(first), int(count)


def agent_name(prefix: str, i: int) -> str:
    return f"{prefix}{i:05d}"


async def fleet(args: argparse.Namespace) -> dict[str, Any]:
    raise_open_files()
    shapes = {k: tuple(v) for k, v in json.loads(args.shapes.read_text()).items()}
    update = make_update(shapes, args.codec)
    tally = Tally(measuring=False)
    stop = asyncio.Event()
    agents: list[LightAgent] = []
    groups = [parse_group(g) for g in args.group]
    rss_idle = rss_bytes()
    started = time.monotonic()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def say(**fields: Any) -> None:
        print(json.dumps(fields), flush=True)

    async def report() -> None:
        last = -1
        while True:
            await tally.changed.wait()
            tally.changed.clear()
            if tally.connected != last:
                last = tally.connected
                say(connected=last, drops=tally.drops, seconds=round(time.monotonic() - started, 1),
                    rss=rss_bytes())
            await asyncio.sleep(0.5)

    reporter = asyncio.create_task(report())
    running: list[asyncio.Task[None]] = []
    for target, prefix, first, count in groups:
        for i in range(first, first + count):
            agent = LightAgent(target, args.certs, agent_name(prefix, i), tally, update, interval=args.interval)
            agents.append(agent)
            running.append(asyncio.create_task(agent.run(stop)))
            await asyncio.sleep(args.pace)  # a fleet coming online, not a connection storm
    measured_at = time.time()
    while line := (await reader.readline()).decode().strip():
        if line == "measure":
            tally.rtts.clear()
            tally.measuring = True
            measured_at = time.time()
            say(measuring=True)
        elif line == "stop":
            break
    rss_connected = rss_bytes()
    stopped_at = time.time()
    stop.set()
    await asyncio.gather(*running, return_exceptions=True)
    reporter.cancel()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "agents": len(agents), "rtts": [(round(t, 3), round(r, 6)) for t, r in tally.rtts],
        "notices": tally.notices, "downloads": tally.downloads, "download_bytes": tally.download_bytes, "drops": tally.drops,
        "drop_reasons": dict(tally.reasons), "failed_connects": tally.failed_connects,
        "dropped_agents": sorted(a.name for a in agents if a.drops and a.drops[0] >= measured_at),
        "drops_while_measuring": sum(1 for a in agents for t in a.drops if measured_at <= t <= stopped_at),
        "streams_opened": sum(a.streams for a in agents),
        "uploads": [a.__dict__ for a in tally.uploads], "update_bytes": update.nbytes,
        "rss_idle_bytes": rss_idle, "rss_connected_bytes": rss_connected,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem_lab.scale_agents", description=__doc__)
    p.add_argument("--certs", type=Path, required=True)
    p.add_argument("--group", action="append", default=[], metavar="TARGET=PREFIX:FIRST:COUNT",
                   help="agents PREFIX<FIRST>..PREFIX<FIRST+COUNT-1> (5 digits) connected to TARGET; repeatable")
    p.add_argument("--shapes", type=Path, required=True, help="JSON: the model's tensor shapes")
    p.add_argument("--codec", default="none")
    p.add_argument("--interval", type=float, default=0.0, help="heartbeat seconds (0: the coordinator's)")
    p.add_argument("--pace", type=float, default=0.002, help="seconds between two agents' first connects")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    result = asyncio.run(fleet(args))
    args.out.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
