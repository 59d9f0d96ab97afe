"""A coordinator and its agents as real processes on loopback, for the reliability runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

from tandem import certs
from tandem.v1 import admin_pb2
from tandem_cli import procs
from tandem_cli.admin import admin_channel, admin_stub, wait_connected, wait_job


def make_certs(directory: Path, agents: list[str]) -> Path:
    if not (directory / "ca.pem").exists():
        certs.init_deployment(directory, agents)
    return directory


class Fleet:
    """`agents` maps each agent name to its attack ("" for an honest agent). The data is
    cut into `partitions` shares (default: one per agent), agent i holding share i."""

    def __init__(self, work: Path, certs_dir: Path, agents: dict[str, str], cloud_extra: list[str] | None = None,
                 listen: str = "127.0.0.1:0", partitions: int = 0) -> None:
        self.work, self.certs_dir, self.agents = work, certs_dir, agents
        self.partitions = partitions or len(agents)
        self.cloud_extra, self.listen = cloud_extra, listen
        work.mkdir(parents=True, exist_ok=True)
        self.cloud, self.ports, self.target = self._cloud()
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for index, name in enumerate(agents):
            self.start_agent(name, index)

    def start_cloud(self) -> None:
        """Restart the coordinator, after it died, on the same state and address."""
        self.cloud, self.ports, self.target = self._cloud()

    def _cloud(self) -> tuple[subprocess.Popen[bytes], dict[str, Any], str]:
        cloud, ports = procs.start_cloud(self.certs_dir, self.work / "state", self.work / "cloud.log",
                                         listen=self.listen, extra=self.cloud_extra)
        return cloud, ports, f"localhost:{ports['port']}"

    def data(self, index: int) -> str:
        return f"digits:{index}/{self.partitions}"

    def start_agent(self, name: str, index: int) -> None:
        """Start (or restart) agent `name`. A process of that name still running is
        stopped first: two restarts due at once must not leave one untracked."""
        running = self.procs.get(name)
        if running is not None and running.poll() is None:
            procs.stop(running)
        attack, log = self.agents[name], self.work / f"{name}.log"
        if attack:
            with open(log, "ab") as out:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "tandem_lab.hostile", "--attack", attack, "--cloud", self.target,
                     "--certs", str(self.certs_dir), "--id", name, "--data", self.data(index)],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                )
        else:
            self.procs[name] = procs.start_agent(self.target, self.certs_dir, name, self.data(index), log)

    async def run_job(self, spec: admin_pb2.JobSpec, connected: int | None = None, timeout: float = 1800,
                      stop_after: float = 0.0) -> dict[str, Any]:
        """Run a job to its end. With `stop_after`, a job still running then is stopped and
        returned as it stands (a poisoned job can stall); otherwise anything but completion raises."""
        async with admin_channel(self.target, self.certs_dir) as channel:
            stub = admin_stub(channel)
            await wait_connected(stub, len(self.agents) if connected is None else connected, timeout=180)
            job_id = (await stub.StartJob(admin_pb2.StartJobRequest(spec=spec))).job_id
            job = await wait_job(stub, job_id, timeout=stop_after or timeout, echo=False)
            if stop_after and job["state"] == "running":
                await stub.StopJob(admin_pb2.StopJobRequest(job_id=job_id))
                return await wait_job(stub, job_id, timeout=60, echo=False)
        if job["state"] != "completed":
            raise RuntimeError(f"job {job_id} {job['state']}: {job['message']}; logs in {self.work}")
        return job

    def close(self) -> None:
        for proc in [*self.procs.values(), self.cloud]:
            procs.stop(proc)
