"""`python -m tandem_lab.bench_placement`: the adaptive placement controller against
every static placement of the camera model (`cnn`), on a weak edge whose link follows
a trace: 100 Mbit/s 5 ms, 2 Mbit/s 80 ms, 20 Mbit/s 30 ms, cut, 100 Mbit/s 5 ms.

Each run is fresh: a cloud on the host, and per agent a network namespace joined by a
veth pair shaped with tc tbf (`netem.ShapedLink`), a delay relay for the round trip
(`netem.DelayRelay`) chained to a byte-counting relay (`relay.Relay`) in front of the
cloud, a cgroup CPU quota (`netem.CpuLimit`) that makes the agent a weak device, and a
camera process inside the namespace (`bench_placement_client`) sending frames with a
deadline at a steady rate. Static runs switch the controller off and fix the agent's
flag; the adaptive run lets the controller decide. Then the adaptive controller again
with four agents behind four links following the same trace. Results, targets and the
plot come from `bench_placement_report`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tandem_cli import procs
from tandem_lab.netem import CpuLimit, DelayRelay, ShapedLink, unavailable_reason
from tandem_lab.relay import Relay

MODEL = "cnn"
STATIC = ("edge", "split:4", "split:3", "split:2", "split:1", "cloud")
LINK_BASE = 70  # namespaces tandem-70.. (tests use others)


@dataclass(frozen=True)
class Phase:
    name: str
    rate: str  # tc rate; "" = link cut
    rtt: float
    seconds: float

    @property
    def cut(self) -> bool:
        return not self.rate


def trace(phase_seconds: float, cut_seconds: float = 10.0) -> list[Phase]:
    return [
        Phase("100M/5ms", "100mbit", 0.005, phase_seconds),
        Phase("2M/80ms", "2mbit", 0.080, phase_seconds),
        Phase("20M/30ms", "20mbit", 0.030, phase_seconds),
        Phase("cut", "", 0.030, cut_seconds),
        Phase("100M/5ms'", "100mbit", 0.005, phase_seconds),
    ]


@dataclass
class Edge:
    name: str
    link: ShapedLink
    delay: DelayRelay
    counter: Relay
    log: Path
    out: Path
    proc: subprocess.Popen[bytes] | None = None
    client: subprocess.Popen[bytes] | None = None
    bytes_at: list[tuple[int, int]] | None = None  # relay (up, down) at each phase start, then at the end


async def publish(target: str, certs_dir: Path) -> None:
    from tandem import training, zoo
    from tandem.v1 import admin_pb2_grpc
    from tandem_cli.admin import admin_channel, publish_serving

    arrays = training.state_arrays(zoo.build_model(MODEL, seed=1))
    async with admin_channel(target, certs_dir) as channel:
        await publish_serving(admin_pb2_grpc.AdminStub(channel), MODEL, arrays)


def scrape_cloud(port: int) -> dict[str, Any]:
    """The cloud's queue wait (sum, count), queue rows, compute seconds so far and the controller's split per agent."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
    out: dict[str, Any] = {"wait_sum": 0.0, "wait_count": 0.0, "queue_rows": 0.0, "busy": 0.0, "split": {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tandem_inference_queue_wait_seconds_sum":
                out["wait_sum"] += s.value
            elif s.name == "tandem_inference_queue_wait_seconds_count":
                out["wait_count"] += s.value
            elif s.name == "tandem_inference_stage_duration_seconds_sum":
                out["busy"] += s.value
            elif s.name == "tandem_inference_queue_rows":
                out["queue_rows"] += s.value
            elif s.name == "tandem_placement_split_layer" and s.labels.get("model") == MODEL:
                out["split"][s.labels["agent"]] = s.value
    return out


_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_DECIDED = re.compile(r"placement (\S+) " + MODEL + r" -> (\S+) \((.*?)\) \[(.*)\]")
_APPLIED = re.compile(r"placement of " + MODEL + r": (?:\S+ -> )?(\S+)")  # "OLD -> NEW (by whom)" or "NEW"


def _log_time(line: str) -> float | None:
    m = _STAMP.match(line)
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if m else None


def controller_decisions(log: Path) -> list[dict[str, Any]]:
    """Every push in the cloud's log: when, to whom, what, and J(k) of each k in ms."""
    found = []
    for line in log.read_text(errors="replace").splitlines():
        t, m = _log_time(line), _DECIDED.search(line)
        if t is not None and m:
            costs = [float(c) for c in re.findall(r"k=\d+: ([-\d.e+]+) ms", m.group(4))]
            found.append({"t": t, "agent": m.group(1), "placement": m.group(2), "costs_ms": costs})
    return found


def applied_placements(log: Path, initial: str) -> list[list[Any]]:
    """[time, placement] each time the agent's placement changed (first: its flag, at start)."""
    changes: list[list[Any]] = []
    for line in log.read_text(errors="replace").splitlines():
        t, m = _log_time(line), _APPLIED.search(line)
        if t is not None and m:
            if (changes[-1][1] if changes else initial) != m.group(1):
                changes.append([t, m.group(1)])
    return changes


async def _sleep_until(wall: float) -> None:
    await asyncio.sleep(max(wall - time.time(), 0.0))


async def _apply(edge: Edge, phase: Phase, previous: Phase | None) -> None:
    if phase.cut:
        await asyncio.to_thread(edge.link.cut)
        return
    if previous is not None and previous.cut:
        await asyncio.to_thread(edge.link.restore)
    await asyncio.to_thread(edge.link.set_rate, phase.rate)
    edge.delay.rtt = phase.rtt


async def _drive(edges: list[Edge], phases: list[Phase], offset: float) -> list[float]:
    """Play the trace on every link (agent i shifted by i*offset); phase start wall times + end."""
    start = time.time()
    starts: list[float] = []
    at = start
    for edge in edges:
        edge.bytes_at = []
    for index, phase in enumerate(phases):
        starts.append(at)
        previous = phases[index - 1] if index else None

        async def one(i: int, edge: Edge, phase: Phase = phase, previous: Phase | None = previous,
                      at: float = at) -> None:
            await _sleep_until(at + i * offset)
            assert edge.bytes_at is not None
            edge.bytes_at.append((edge.counter.up, edge.counter.down))
            await _apply(edge, phase, previous)

        await asyncio.gather(*(one(i, e) for i, e in enumerate(edges)))
        at += phase.seconds
        await _sleep_until(at)
    await _sleep_until(at + offset * (len(edges) - 1))
    for edge in edges:
        assert edge.bytes_at is not None
        edge.bytes_at.append((edge.counter.up, edge.counter.down))
    starts.append(at)
    return starts


async def _watch_cloud(port: int, samples: list[list[Any]]) -> None:
    while True:
        try:
            samples.append([time.time(), await asyncio.to_thread(scrape_cloud, port)])
        except OSError:
            pass
        await asyncio.sleep(1.0)


async def _controller_ready(port: int, names: list[str], timeout: float) -> float:
    """Seconds until the controller has a placement for every agent (or the timeout)."""
    begin = time.monotonic()
    while time.monotonic() - begin < timeout:
        with contextlib.suppress(OSError):
            if set(names) <= set((await asyncio.to_thread(scrape_cloud, port))["split"]):
                break
        await asyncio.sleep(0.5)
    return time.monotonic() - begin


async def run_one(work: Path, certs_dir: Path, mode: str, agents: int, args: argparse.Namespace) -> dict[str, Any]:
    """One run of the whole trace: `mode` is "adaptive" or a static placement."""
    run = work / f"{mode.replace(':', '')}-{agents}"
    run.mkdir(parents=True)
    phases = trace(args.phase_seconds, args.cut_seconds)
    adaptive = mode == "adaptive"
    flags = ["--placement-interval", "1", "--min-dwell", str(args.min_dwell), "--min-gain", str(args.min_gain),
             "--confirm-ticks", str(args.confirm_ticks), "--alpha", str(args.alpha)]
    flags = flags if adaptive else ["--placement-interval", "0"]
    initial = args.initial if adaptive else mode
    edges: list[Edge] = []
    cloud_samples: list[list[Any]] = []
    async with contextlib.AsyncExitStack() as stack:
        # Links and quotas first, so that on the way out (LIFO) every process is gone before they are.
        links, quotas = [], []
        for i in range(agents):
            link = ShapedLink(LINK_BASE + i)
            stack.callback(link.down)
            link.up(phases[0].rate)
            links.append(link)
            quotas.append(stack.enter_context(CpuLimit(f"bench-placement-{i}", args.share)))
        started: list[subprocess.Popen[bytes]] = []
        stack.callback(_stop_all, started)
        # Registered as soon as started: an interrupt cannot fall between a start and its registration.
        cloud, ports = procs.start_cloud(certs_dir, run / "state", run / "cloud.log", "0.0.0.0:0",
                                         [*flags, "--heartbeat", "1"])
        started.append(cloud)
        await publish(f"localhost:{ports['port']}", certs_dir)
        for i, link in enumerate(links):
            name = f"edge-{i}"
            counter = Relay("127.0.0.1", ports["port"])
            await counter.start()
            stack.push_async_callback(counter.close)
            delay = DelayRelay(("127.0.0.1", counter.port), rtt=phases[0].rtt)
            await delay.start(link.host_ip)
            stack.push_async_callback(delay.close)
            edges.append(Edge(name, link, delay, counter, run / f"{name}.log", run / f"{name}.requests.json"))
        stack.callback(_stop_all, started)  # again: the processes go before the relays they talk through
        for i, edge in enumerate(edges):
            # As procs.start_serving_agent, but registered as soon as it exists, and waited for in a
            # thread: the relays of the agents already running live in this event loop.
            ready = edge.log.with_suffix(".ready.json")
            ready.unlink(missing_ok=True)
            proc = procs.start_agent(
                f"{edge.link.host_ip}:{edge.delay.port}", certs_dir, edge.name, f"digits:{i}/{agents}", edge.log,
                extra=["--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0", "--ready-file", str(ready),
                       "--placement", f"{MODEL}={initial}", "--probe-interval", str(args.probe)],
                prefix=edge.link.prefix(),
            )
            started.append(proc)
            edge.proc = proc
            agent_ports = await asyncio.to_thread(procs.wait_ready, proc, ready, edge.log, f"agent {edge.name}")
            quotas[i].add(proc.pid)
            edge.client = _start_client(edge, run, certs_dir, agent_ports, args)
            started.append(edge.client)
        watcher = asyncio.create_task(_watch_cloud(ports["metrics_port"], cloud_samples))
        stack.callback(watcher.cancel)
        await asyncio.sleep(args.warmup)
        waited = 0.0
        if adaptive:  # until every agent has a decision, then one dwell for the first switch
            waited = await _controller_ready(ports["metrics_port"], [e.name for e in edges], 60) + args.min_dwell + 1
            await asyncio.sleep(args.min_dwell + 1)
        print(f"  {mode} x{agents}: warm-up {args.warmup + waited:.0f} s, trace starts", flush=True)
        starts = await _drive(edges, phases, args.offset)
        await asyncio.sleep(1.0)
        for edge in edges:
            _stop_client(edge)
    result_agents = []
    for edge in edges:
        client: dict[str, Any] = json.loads(edge.out.read_text()) if edge.out.exists() else {"requests": [], "samples": []}
        assert edge.bytes_at is not None
        result_agents.append({
            "name": edge.name, "requests": client["requests"], "samples": client["samples"],
            "applied": applied_placements(edge.log, initial), "phase_bytes": [
                [b[0] - a[0], b[1] - a[1]] for a, b in zip(edge.bytes_at, edge.bytes_at[1:])],
        })
    return {
        "mode": mode, "agents": len(edges), "initial": initial, "offset": args.offset,
        "phases": [{"name": p.name, "rate": p.rate or "cut", "rtt": p.rtt, "start": s, "end": e}
                   for p, s, e in zip(phases, starts, starts[1:])],
        "per_agent": result_agents, "cloud": cloud_samples, "decisions": controller_decisions(run / "cloud.log"),
    }


def _start_client(
    edge: Edge, run: Path, certs_dir: Path, agent_ports: dict[str, Any], args: argparse.Namespace
) -> subprocess.Popen[bytes]:
    """The camera, inside the agent's namespace, talking to it on 127.0.0.1."""
    command = [
        *edge.link.prefix(), sys.executable, "-m", "tandem_lab.bench_placement_client",
        "--port", str(agent_ports["inference_port"]), "--metrics-port", str(agent_ports["metrics_port"]),
        "--certs", str(certs_dir), "--rate", str(args.rate), "--deadline-ms", str(args.deadline_ms),
        "--out", str(edge.out),
    ]
    with open(run / f"{edge.name}.client.log", "ab") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _stop_all(started: list[subprocess.Popen[bytes]], grace: float = 20.0) -> None:
    """SIGTERM every process still running (newest first), then wait for them all; SIGKILL stragglers."""
    for proc in reversed(started):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in reversed(started):
        try:
            proc.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _stop_client(edge: Edge) -> None:
    """SIGTERM the camera (it writes its records and exits), wait for it."""
    proc = edge.client
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from tandem import certs

    counts = [int(n) for n in str(args.agents).split(",") if n]
    modes = [m for m in str(args.modes).split(",") if m]
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tandem-bench-placement-"))
    work.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    main_task = asyncio.current_task()
    assert main_task is not None
    for signum in (signal.SIGTERM, signal.SIGHUP):  # like Ctrl-C: unwind and tear everything down
        asyncio.get_running_loop().add_signal_handler(signum, main_task.cancel)
    try:
        certs_dir = work / "certs"
        names = [f"edge-{i}" for i in range(max(counts))]
        certs.init_deployment(certs_dir, names, hosts=[f"10.204.{LINK_BASE + i}.1" for i in range(max(counts))])
        certs.add_client(certs_dir, "camera")
        for count in counts:
            for mode in (modes if count == 1 else ["adaptive"]):
                print(f"running {mode} with {count} agent(s) ...", flush=True)
                runs.append(await run_one(work, certs_dir, mode, count, args))
    finally:
        if args.keep:
            print(f"logs kept in {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return {"runs": runs}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tandem_lab.bench_placement", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase-seconds", type=float, default=30.0, help="length of each link phase but the cut")
    p.add_argument("--cut-seconds", type=float, default=10.0)
    p.add_argument("--agents", default="1,4", help="comma-separated agent counts; static placements run with 1")
    p.add_argument("--modes", default=",".join(["adaptive", *STATIC]), help="runs with one agent")
    p.add_argument("--share", type=float, default=0.08, help="each agent's CPU quota, in cores")
    p.add_argument("--rate", type=float, default=3.0, help="frames per second per agent")
    p.add_argument("--deadline-ms", type=int, default=500)
    p.add_argument("--probe-interval", dest="probe", type=float, default=0.5, help="agents' link probe interval")
    p.add_argument("--min-dwell", type=float, default=5.0, help="controller's --min-dwell")
    p.add_argument("--min-gain", type=float, default=0.1, help="controller's --min-gain")
    p.add_argument("--confirm-ticks", type=int, default=2, help="controller's --confirm-ticks")
    p.add_argument("--alpha", type=float, default=0.0, help="controller's price of a byte, seconds")
    p.add_argument("--initial", default="edge", help="the adaptive agents' placement flag before the first decision")
    p.add_argument("--warmup", type=float, default=15.0, help="seconds before the trace starts")
    p.add_argument("--offset", type=float, default=0.0, help="with several agents, agent i's trace lags i*OFFSET s")
    p.add_argument("--out", type=Path, default=Path("bench/results/placement.json"))
    p.add_argument("--plot", type=Path, default=None, help="default: OUT with .png")
    p.add_argument("--work", default=None, help="working directory (default: a temporary one)")
    p.add_argument("--keep", action="store_true", help="keep the working directory and its logs")
    p.add_argument("--from-raw", type=Path, default=None,
                   help="no runs: rebuild the results from OUT.raw.json that an interrupted report left")
    args = p.parse_args(argv)
    reason = unavailable_reason()
    if reason is not None:
        print(f"bench placement needs shaped links: {reason}", file=sys.stderr)
        return 2
    from tandem_lab import bench_placement_report as report
    from tandem_lab.bench import machine

    if args.from_raw is not None:
        raw = json.loads(args.from_raw.read_text())
    else:
        try:
            raw = asyncio.run(run_bench(args))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("interrupted: processes, namespaces and cgroups are torn down", file=sys.stderr)
            return 130
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".raw.json").write_text(json.dumps(raw))
    command = " ".join(["python -m tandem_lab.bench_placement", *sys.argv[1:]])
    result = report.build(raw["runs"], args, raw.get("machine") or machine(), raw.get("command") or command)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.from_raw is None:
        args.out.with_suffix(".raw.json").unlink(missing_ok=True)
    report.print_table(result)
    report.plot(result, args.plot or args.out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
