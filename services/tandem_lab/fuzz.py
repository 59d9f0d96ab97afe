"""Hostile messages against every RPC of the coordinator and of an edge agent's Inference.

Cases are hypothesis-generated from the request types' descriptors (huge and negative
numbers, NaN, huge or odd strings and bytes, huge repeated fields, unknown enum
numbers), valid messages with one field made hostile, and byte-level mutations of
valid messages; streaming RPCs get sequences. Everything is sent as raw bytes, so
malformed wire data reaches the server too, mostly with the role allowed to call
(so validation, not only authorisation, is exercised) and sometimes with a wrong one.
A case fails when it ends INTERNAL or UNKNOWN, or hangs past its timeout; the server
must still answer afterwards. `python -m tandem_lab.fuzz --cases N --out FILE` runs
N cases against an in-process coordinator and edge agent and writes the tallies.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from tandem import certs, grpcserver, tls, training, wire, zoo
from tandem.errors import peer_error
from tandem.v1 import admin_pb2, admin_pb2_grpc, coordinator_pb2_grpc, inference_pb2, inference_pb2_grpc
from tandem.v1 import coordinator_pb2 as pb
from tandem_cli.admin import publish_messages, publish_serving
from tandem_lab.fuzz_cases import MODEL, Context, Seeds, message_strategy, mutated, serialize, spliced

AGENTS = [f"agent-{i}" for i in range(6)]
APP = "app-0"
TIMEOUT = 10.0  # a call still unfinished after this is a hang
BAD = ("INTERNAL", "UNKNOWN", "HANG", "SERVER_ERROR", "STATUS_TOO_LARGE")
# Raw channels may send more than the server accepts, so its own limit is what is tested.
OPTIONS = [(k, 64 << 20 if k == "grpc.max_send_message_length" else v) for k, v in grpcserver.CHANNEL_OPTIONS]

# ---- the RPCs -----------------------------------------------------------------------

_SERVICES = [pb.DESCRIPTOR.services_by_name["Coordinator"], admin_pb2.DESCRIPTOR.services_by_name["Admin"],
             inference_pb2.DESCRIPTOR.services_by_name["Inference"]]
# Who may call (most cases) and who may not (some cases); the rest of Admin is admin only.
_CALLERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "Connect": (("agent-4",), ("admin",)),  # agent-4 only, so that no fuzzed hello replaces a session in use
    "UploadUpdate": (("agent-0", "agent-2"), ("admin",)),  # selected for the open round, and not
    "DownloadModel": (("agent-3", "admin", "replica"), (APP,)),
    "UploadStatus": (("agent-0",), ("replica",)),
    "Probe": (("agent-3",), ("admin",)),
    "ListModelVersions": (("admin", "replica"), ("agent-3",)),
}


@dataclass(frozen=True)
class Rpc:
    target: str  # "cloud" or "edge"
    method: MethodDescriptor
    allowed: tuple[str, ...]
    wrong: tuple[str, ...]

    @property
    def name(self) -> str:
        return f"{self.target}:{self.method.containing_service.name}.{self.method.name}"

    @property
    def path(self) -> str:
        return f"/{self.method.containing_service.full_name}/{self.method.name}"


def _rpcs() -> list[Rpc]:
    rpcs = []
    for service in _SERVICES:
        for method in service.methods:
            if service.name == "Inference":
                rpcs.append(Rpc("cloud", method, ("agent-3", "admin", "replica", APP), ()))
            else:
                rpcs.append(Rpc("cloud", method, *_CALLERS.get(method.name, (("admin",), ("agent-3",)))))
    return rpcs + [Rpc("edge", m, (APP, "agent-3"), ()) for m in _SERVICES[2].methods]


RPCS = _rpcs()


def _arrays(model: str, seed: int) -> dict[str, np.ndarray]:
    return training.state_arrays(zoo.build_model(model, seed=seed))


def _credentials(certs_dir: Path, who: str) -> grpc.ChannelCredentials:
    if who == "admin":
        return tls.admin_credentials(certs_dir)
    if who == "replica":
        return tls.replica_credentials(certs_dir)
    return tls.agent_credentials(certs_dir, who) if who.startswith("agent-") else tls.app_credentials(certs_dir, who)


async def _hold(first: pb.AgentMessage) -> AsyncIterator[pb.AgentMessage]:
    yield first
    await asyncio.Event().wait()  # the control stream stays open until cancelled


async def _collect_tasks(call: Any, tasks: asyncio.Queue[pb.TrainTask]) -> None:
    try:
        async for message in call:
            if message.HasField("task"):
                tasks.put_nowait(message.task)
    except (grpc.aio.AioRpcError, asyncio.CancelledError):
        pass


_CODES = collections.defaultdict(lambda: "UNKNOWN", {c.value[0]: c.name for c in grpc.StatusCode})


@dataclass(frozen=True)
class Outcome:
    code: str  # a status code name, or HANG
    details: str
    seconds: float


class ServerErrors(logging.Handler):
    """Errors the in-process servers log: a sanitized INTERNAL, an exception gRPC caught
    (UNKNOWN), a job or a background task of ours that failed. Not asyncio's: in a shared
    test process it also reports other tests' garbage."""

    SOURCES = ("tandem", "cloud", "edge", "grpc")

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.split(".")[0] in self.SOURCES:
            self.records.append(f"{record.name}: {record.getMessage()[:300]}")


class Harness:
    """Channels for every identity, the server state that cases refer to, valid seeds, and the calls."""

    def __init__(self, certs_dir: Path, cloud_port: int) -> None:
        self.server_errors = ServerErrors()
        logging.getLogger().addHandler(self.server_errors)
        self.certs_dir = certs_dir
        self.ports = {"cloud": cloud_port}
        self._channels: dict[tuple[str, str], grpc.aio.Channel] = {}
        self._readers: list[asyncio.Task[None]] = []
        self.seeds: dict[str, list[Sequence[Message]]] = {}
        self.strings: list[str] = [*AGENTS, APP]
        self.ints: tuple[int, ...] = ()
        self.job_id = self.victim = "no-such-job"

    def channel(self, target: str, who: str) -> grpc.aio.Channel:
        if (target, who) not in self._channels:
            self._channels[(target, who)] = grpc.aio.secure_channel(
                f"localhost:{self.ports[target]}", _credentials(self.certs_dir, who), options=OPTIONS)
        return self._channels[(target, who)]

    def context(self, rpc: Rpc) -> Context:
        # StopJob only ever names the job meant to be stopped: the open round must stay open.
        job = self.victim if rpc.method.name == "StopJob" else self.job_id
        return Context(tuple([job, *self.strings]), self.ints)

    async def setup(self, job: bool = True) -> None:
        """Publish the models that cases name; with `job`, open a round that agent-0 may upload to."""
        admin = admin_pb2_grpc.AdminStub(self.channel("cloud", "admin"))
        for name in (MODEL, "mlp"):
            await publish_serving(admin, name, _arrays(name, 1), timeout=60)
        x = wire.to_proto(np.zeros((2, 64), np.float32))
        infer = inference_pb2.InferRequest(request_id="r", model=MODEL, input=x)
        other = inference_pb2.InferRequest(model="mlp", version=1, input=x, deadline_ms=50)
        hello = pb.AgentMessage(hello=pb.Hello(num_examples=100, device="cpu", models={MODEL: 1}))
        self.seeds = dict(
            Infer=[[infer], [other]], InferStream=[[infer, other]],
            GetModelInfo=[[inference_pb2.ModelInfoRequest(model=MODEL)]],
            Connect=[[hello, pb.AgentMessage(heartbeat=pb.Heartbeat(seq=1, measurements={"rtt_seconds": 0.01}))]],
            DownloadModel=[[pb.ModelRequest(model=MODEL)], [pb.ModelRequest(model=MODEL, version=2, have_version=1)]],
            Probe=[[pb.ProbeRequest(payload=b"x" * 100, reply_bytes=100)]],
            ListModelVersions=[[admin_pb2.ListModelVersionsRequest(model=MODEL)]],
            PublishModel=[publish_messages(MODEL, _arrays(MODEL, 2))],
            ListPlacements=[[admin_pb2.ListPlacementsRequest(agent="agent-3")]],
            PinPlacement=[[admin_pb2.PinPlacementRequest(agent="agent-3", model=MODEL, placement="split:1")]],
            UnpinPlacement=[[admin_pb2.UnpinPlacementRequest(agent="agent-3", model=MODEL)]],
            StartJob=[[admin_pb2.StartJobRequest(spec=admin_pb2.JobSpec(model=MODEL, rounds=2, min_clients=5))]],
        )
        if job:
            await self._open_round(admin)

    async def _open_round(self, admin: admin_pb2_grpc.AdminStub) -> None:
        tasks: asyncio.Queue[pb.TrainTask] = asyncio.Queue()
        for who in ("agent-0", "agent-1"):  # both selected; agent-1 never answers, so the round stays open
            hello = pb.AgentMessage(hello=pb.Hello(num_examples=1000, device="cpu"))
            call = coordinator_pb2_grpc.CoordinatorStub(self.channel("cloud", who)).Connect(_hold(hello))
            mine = tasks if who == "agent-0" else asyncio.Queue()
            self._readers.append(asyncio.create_task(_collect_tasks(call, mine)))
        spec = admin_pb2.JobSpec(model=MODEL, rounds=1000, min_clients=2, clients_per_round=2,
                                 round_deadline_seconds=3600)
        self.job_id = (await admin.StartJob(admin_pb2.StartJobRequest(spec=spec), timeout=60)).job_id
        task = await asyncio.wait_for(tasks.get(), 60)
        spec = admin_pb2.JobSpec(model=MODEL, rounds=1, min_clients=6, round_deadline_seconds=3600)
        self.victim = (await admin.StartJob(admin_pb2.StartJobRequest(spec=spec), timeout=60)).job_id
        flat = {name: np.full(a.size, 1e-3, np.float32) for name, a in _arrays(MODEL, 0).items()}
        chunks = wire.iter_chunks(flat)
        header = pb.UpdateHeader(job_id=self.job_id, round=task.round, base_version=task.base_version, num_examples=100,
                                 codec=task.codec, local_loss=0.5, content_sha256=wire.state_sha256(flat))
        self.seeds.update(
            UploadUpdate=[[pb.UpdateChunk(header=header), *(pb.UpdateChunk(tensor=c) for c in chunks)]],
            UploadStatus=[[header]], GetJob=[[admin_pb2.GetJobRequest(job_id=self.job_id)]],
            StopJob=[[admin_pb2.StopJobRequest(job_id=self.victim)]],
        )
        self.ints = (task.round, task.base_version)
        self.strings += [*flat, task.base_sha256, task.codec]

    async def call(self, rpc: Rpc, who: str, messages: list[bytes]) -> Outcome:
        """Send raw messages as `who`; the status code it ends with, or HANG past the timeout."""
        channel, m, start = self.channel(rpc.target, who), rpc.method, time.perf_counter()
        try:
            if m.client_streaming and m.server_streaming:
                responses = [r async for r in channel.stream_stream(rpc.path)(iter(messages), timeout=TIMEOUT)]
            elif m.client_streaming:
                responses = [await channel.stream_unary(rpc.path)(iter(messages), timeout=TIMEOUT)]
            elif m.server_streaming:
                responses = [r async for r in channel.unary_stream(rpc.path)(messages[0], timeout=TIMEOUT)]
            else:
                responses = [await channel.unary_unary(rpc.path)(messages[0], timeout=TIMEOUT)]
        except grpc.aio.AioRpcError as raw:
            exc = peer_error(raw)  # a refused upload ends at once, its status also in the initial metadata
            seconds = time.perf_counter() - start
            code = exc.code().name
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and seconds >= 0.95 * TIMEOUT:
                code = "HANG"
            elif "metadata size exceeds" in (exc.details() or ""):  # the client dropped the server's status
                code = "STATUS_TOO_LARGE"
            elif "SendMessageOperation" in exc.debug_error_string() and \
                    any(len(b) > grpcserver.MAX_MESSAGE_BYTES for b in messages):
                # grpc/grpc#36066: the aio client reports INTERNAL for a write that fails once the
                # server has answered, losing the server's status. The server reads the rest of a
                # stream it refuses, but gRPC itself ends one at a message over the size limit.
                code = "CLIENT_WRITE_AFTER_END"
            return Outcome(code, exc.details() or "", seconds)
        seconds = time.perf_counter() - start
        if m.name == "InferStream":  # per-request errors travel in the responses
            codes = {_CODES[inference_pb2.InferResponse.FromString(r).error_code] for r in responses}
            bad = codes & {"INTERNAL", "UNKNOWN"}
            if bad:
                return Outcome(bad.pop(), "in a stream response", seconds)
        if m.name == "StartJob":  # stop what a fuzzed spec started, so that nothing runs on behind the cases
            stop = admin_pb2.StopJobRequest(job_id=admin_pb2.Job.FromString(responses[0]).job_id)
            try:
                await admin_pb2_grpc.AdminStub(self.channel("cloud", "admin")).StopJob(stop, timeout=TIMEOUT)
            except grpc.aio.AioRpcError:
                pass  # it finished or failed meanwhile
        return Outcome("OK", "", seconds)

    async def alive(self) -> bool:
        """Whether every server still answers health checks and real requests."""
        try:
            for target in self.ports:
                channel = self.channel(target, "admin" if target == "cloud" else APP)
                health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                info = inference_pb2.ModelInfoRequest(model=MODEL)
                await inference_pb2_grpc.InferenceStub(channel).GetModelInfo(info, timeout=5)
                if health.status != health_pb2.HealthCheckResponse.SERVING:
                    return False
            admin = admin_pb2_grpc.AdminStub(self.channel("cloud", "admin"))
            await admin.ListJobs(admin_pb2.ListJobsRequest(), timeout=5)
        except grpc.aio.AioRpcError:
            return False
        return True

    async def close(self) -> None:
        """Stop the jobs set up here and close every channel. (A runner still waiting for agents
        when the coordinator stops can miss its cancellation on Python 3.11, and the stop hangs:
        Registry.wait_changed uses asyncio.wait_for, CPython gh-86296.)"""
        logging.getLogger().removeHandler(self.server_errors)
        admin = admin_pb2_grpc.AdminStub(self.channel("cloud", "admin"))
        for job_id in {self.job_id, self.victim} - {"no-such-job"}:
            try:
                await admin.StopJob(admin_pb2.StopJobRequest(job_id=job_id), timeout=TIMEOUT)
            except grpc.aio.AioRpcError:
                pass  # stopped by a case already
        for reader in self._readers:
            reader.cancel()
        for channel in self._channels.values():
            await channel.close()


def case_strategy(rpc: Rpc, harness: Harness) -> st.SearchStrategy[tuple[str, list[bytes]]]:
    """(caller, raw messages): generated, valid-but-one-field, or byte-mutated; a wrong caller one time in five."""
    ctx = harness.context(rpc)
    seeds = Seeds(harness.seeds.get(rpc.method.name) or [[message_factory.GetMessageClass(rpc.method.input_type)()]])
    generated = message_strategy(rpc.method.input_type, ctx)
    made = st.lists(generated, max_size=4) if rpc.method.client_streaming else generated.map(lambda m: [m])
    raw = st.one_of(st.sampled_from(seeds).map(serialize), made.map(serialize), spliced(seeds, ctx).map(serialize),
                    mutated(seeds))
    who = st.sampled_from([*rpc.allowed * 4, *rpc.wrong])
    return st.tuples(who, raw)


@dataclass
class Tally:
    cases: collections.Counter[str] = field(default_factory=collections.Counter)
    codes: collections.defaultdict[str, collections.Counter[str]] = field(
        default_factory=lambda: collections.defaultdict(collections.Counter))
    slowest: dict[str, float] = field(default_factory=dict)
    failures: list[dict[str, Any]] = field(default_factory=list)
    crashes: list[str] = field(default_factory=list)  # RPCs after whose cases a server stopped answering

    def add(self, rpc: Rpc, who: str, outcome: Outcome, messages: list[bytes]) -> None:
        self.cases[rpc.name] += 1
        self.codes[rpc.name][outcome.code] += 1
        self.slowest[rpc.name] = max(self.slowest.get(rpc.name, 0.0), outcome.seconds)
        if outcome.code in BAD and len(self.failures) < 50:
            self.failures.append({"rpc": rpc.name, "caller": who, "code": outcome.code,
                                  "details": outcome.details[:300],
                                  "messages": [m[:256].hex() for m in messages[:8]]})

    def total(self, code: str) -> int:
        return sum(c[code] for c in self.codes.values())


def explore(harness: Harness, rpc: Rpc, loop: asyncio.AbstractEventLoop, examples: int, tally: Tally,
            check: bool = True, seed: int | None = None) -> None:
    """Run hypothesis cases against `rpc` from a worker thread, the calls on `loop`. With `check`,
    a bad outcome fails (and hypothesis shrinks it); without, outcomes are only tallied."""
    phases = tuple(Phase) if check else (Phase.explicit, Phase.generate)
    config = settings(max_examples=examples, derandomize=seed is None, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck), phases=phases)

    @config
    @given(case_strategy(rpc, harness))
    def case(args: tuple[str, list[bytes]]) -> None:
        who, messages = args
        outcome = asyncio.run_coroutine_threadsafe(harness.call(rpc, who, messages), loop).result()
        errors = harness.server_errors.records
        if errors:  # logged by a server during this case
            outcome = Outcome("SERVER_ERROR", errors[-1], outcome.seconds)
            errors.clear()
        tally.add(rpc, who, outcome, messages)
        assert not check or outcome.code not in BAD, f"{rpc.name} as {who}: {outcome.code} {outcome.details!r}"

    if seed is not None:
        case = hypothesis_seed(seed)(case)
    case()


# ---- the long run ---------------------------------------------------------------------


async def run(work: Path, cases: int = 10_000) -> dict[str, Any]:
    """`cases` cases over every RPC against an in-process coordinator and edge agent; the tallies."""
    from cloud.app import CloudConfig, Coordinator
    from edge.agent import AgentConfig
    from edge.app import EdgeApp

    certs_dir = work / "certs"
    work.mkdir(parents=True, exist_ok=True)
    certs.init_deployment(certs_dir, AGENTS)
    certs.add_client(certs_dir, APP)
    cloud = Coordinator(CloudConfig(listen="127.0.0.1:0", certs=certs_dir, state=work / "state", grace=1.0))
    await cloud.start()
    harness = Harness(certs_dir, cloud.port)
    await harness.setup()
    edge = EdgeApp(AgentConfig(cloud=f"localhost:{cloud.port}", certs=certs_dir, agent_id="agent-5",
                               data="digits:0/4", listen="127.0.0.1:0", placements=(f"{MODEL}=split:1", "mlp=cloud"),
                               backoff_initial=0.1, backoff_max=0.5))
    await edge.start()
    stop = asyncio.Event()
    edge_run = asyncio.create_task(edge.run(stop))
    async with asyncio.timeout(60):
        while not edge.agent.models.held_version(MODEL):
            await asyncio.sleep(0.05)
    harness.ports["edge"] = edge.inference_port
    tally, loop, start = Tally(), asyncio.get_running_loop(), time.perf_counter()
    for i, rpc in enumerate(RPCS):
        quota, attempt = cases // len(RPCS) + (i < cases % len(RPCS)), 0
        while tally.cases[rpc.name] < quota and attempt < 20:  # hypothesis may stop short of max_examples
            await asyncio.to_thread(explore, harness, rpc, loop, quota - tally.cases[rpc.name], tally, False, attempt)
            attempt += 1
        if not await harness.alive():
            tally.crashes.append(rpc.name)
        print(f"{rpc.name:36} {tally.cases[rpc.name]:6} {dict(tally.codes[rpc.name].most_common(4))}", flush=True)
    seconds = time.perf_counter() - start
    await harness.close()
    stop.set()
    await edge_run
    await cloud.stop()
    codes: collections.Counter[str] = sum(tally.codes.values(), collections.Counter())
    return {
        "goal_cases": cases, "cases": sum(tally.cases.values()), "seconds": round(seconds, 1),
        "crashes": len(tally.crashes), "crashed_after": tally.crashes, "hangs": tally.total("HANG"),
        "internal": tally.total("INTERNAL"), "unknown": tally.total("UNKNOWN"),
        "server_errors": tally.total("SERVER_ERROR"), "status_too_large": tally.total("STATUS_TOO_LARGE"),
        "codes": dict(codes.most_common()),
        "per_rpc": {name: {"cases": n, "codes": dict(tally.codes[name].most_common()),
                           "slowest_seconds": round(tally.slowest[name], 3)} for name, n in tally.cases.items()},
        "failures": tally.failures,
    }


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """No crash, no hang, no INTERNAL or UNKNOWN, and as many cases as asked for."""

    def target(measured: int, goal: int, op: str, how: str) -> dict[str, Any]:
        met = measured >= goal if op == ">=" else measured <= goal
        return {"measured": measured, "goal": goal, "op": op, "met": met, "how": how}

    return {
        "fuzz_cases": target(result["cases"], result["goal_cases"], ">=", "hostile cases sent, all RPCs together"),
        "fuzz_crashes": target(result["crashes"], 0, "<=", "RPC batches after which a server failed its health check"),
        "fuzz_hangs": target(result["hangs"], 0, "<=", f"cases unfinished after {TIMEOUT:g} s"),
        "fuzz_internal_or_unknown": target(
            sum(result[k] for k in ("internal", "unknown", "server_errors", "status_too_large")), 0, "<=",
            "cases answered INTERNAL or UNKNOWN or with a status too large to arrive, or after which a server "
            "logged an error"),
    }


def main(argv: list[str] | None = None) -> int:
    from tandem_lab.bench import machine

    parser = argparse.ArgumentParser(prog="python -m tandem_lab.fuzz", description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases in all, spread evenly over the RPCs")
    parser.add_argument("--out", type=Path, default=Path("bench/results/fuzz.json"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tandem-fuzz-") as tmp:
        result = asyncio.run(run(Path(tmp), args.cases))
    command = "python -m tandem_lab.fuzz " + " ".join(sys.argv[1:] if argv is None else argv)
    report = {"name": "fuzz", "command": command,
              "machine": machine(), **result, "targets": targets(result)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"{result['cases']} cases in {result['seconds']} s: {result['crashes']} crashes, {result['hangs']} hangs, "
          f"{result['internal']} INTERNAL, {result['unknown']} UNKNOWN, {result['server_errors']} server errors, "
          f"{result['status_too_large']} statuses too large -> {args.out}")
    return 0 if all(t["met"] for t in report["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
