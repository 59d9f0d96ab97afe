"""Real processes for end-to-end tests: a coordinator and agents, each its own process."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tandem.v1 import admin_pb2, admin_pb2_grpc
from tandem_cli import procs
from tandem_cli.procs import free_port
from tests.support.clients import admin_channel
from tests.support.waiting import wait_for


class Cluster:
    """Starts processes in `workdir` and makes sure every one of them ends."""

    def __init__(self, workdir: Path, certs_dir: Path) -> None:
        self.workdir = workdir
        self.certs = certs_dir
        self.state = workdir / "state"
        self.cloud: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, Any] = {}
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        self.agent_metrics: dict[str, int] = {}

    @property
    def port(self) -> int:
        return int(self.ports["port"])

    @property
    def target(self) -> str:
        return f"localhost:{self.port}"

    def start_cloud(self) -> None:
        """Start the coordinator; a restart binds the same port so agents find it again."""
        listen = f"127.0.0.1:{self.ports['port']}" if self.ports else "127.0.0.1:0"
        self.cloud, self.ports = procs.start_cloud(self.certs, self.state, self.workdir / "cloud.log", listen)

    def start_agents(self, count: int) -> list[str]:
        names = [f"agent-{i}" for i in range(count)]
        for i, name in enumerate(names):
            self.agent_metrics[name] = free_port()
            self.agents[name] = procs.start_agent(
                self.target, self.certs, name, f"digits:{i}/{count}", self.workdir / f"{name}.log",
                metrics=f"127.0.0.1:{self.agent_metrics[name]}",
            )
        return names

    def signal_agent(self, name: str, sig: signal.Signals) -> None:
        self.agents[name].send_signal(sig)
        if sig == signal.SIGKILL:
            self.agents[name].wait()

    async def admin(self, method: str, request: Any) -> Any:
        """One Admin call on a new channel. It waits for the channel (wait_for_ready): a
        poll may fall on a coordinator just restarted, or on a handshake a loaded machine
        did not finish in time (UNAVAILABLE "Handshake read failed"); either is retried
        within the call's 10 s, not reported as the coordinator's failure."""
        async with admin_channel(self.port, self.certs) as channel:
            return await getattr(admin_pb2_grpc.AdminStub(channel), method)(request, timeout=10, wait_for_ready=True)

    async def wait_connected(self, count: int, timeout: float = 90) -> None:
        """Return once `count` agents hold a control stream to the coordinator."""
        async def connected() -> bool:
            agents = (await self.admin("ListAgents", admin_pb2.ListAgentsRequest())).agents
            return sum(a.connected for a in agents) >= count

        await wait_for(connected, timeout=timeout, interval=0.2, message=f"{count} agents to connect")

    async def job(self, job_id: str) -> admin_pb2.Job:
        job: admin_pb2.Job = await self.admin("GetJob", admin_pb2.GetJobRequest(job_id=job_id))
        return job

    async def wait_job(
        self, job_id: str, until: Callable[[admin_pb2.Job], bool] | None = None, timeout: float = 120, interval: float = 0.2
    ) -> admin_pb2.Job:
        """The job once `until` holds for it (by default: once it no longer runs)."""
        done = until or (lambda job: job.state != admin_pb2.JOB_STATE_RUNNING)

        async def finished() -> admin_pb2.Job | None:
            job = await self.job(job_id)
            return job if done(job) else None

        return await wait_for(finished, timeout=timeout, interval=interval, message=f"job {job_id} to reach the awaited state")

    def logs(self) -> str:
        parts = []
        for log in sorted(self.workdir.glob("*.log")):
            parts.append(f"--- {log.name} ---\n{log.read_text()[-3000:]}")
        return "\n".join(parts)

    def stop_all(self) -> None:
        for proc in [*self.agents.values(), *([self.cloud] if self.cloud else [])]:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
            procs.stop(proc, timeout=10)
