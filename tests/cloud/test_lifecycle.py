"""Model lifecycle (issue 16): what is served is what was promoted. A real coordinator
in this process over mutual TLS; jobs driven by raw agent clients (tests.support.clients).

Each case first failed before the fix: a job's initial model was served by default
(untrained weights), and nothing could promote, roll back, warm-start or record why."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from cloud.app import CloudConfig, Coordinator
from cloud.spec import JobSpec
from cloud.store import JobState
from cloud.tensorfile import write_tensors
from tandem import data, training, zoo
from tandem.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc
from tandem.v1 import inference_pb2 as ipb
from tests.support.clients import admin_channel, send, start_job, streams
from tests.support.inference import arrays_for, close, forward, inputs, request, serve
from tests.support.waiting import wait_for


def trained_mlp() -> dict[str, np.ndarray]:
    """mlp trained for a few epochs on the digits' training split: far better than untrained."""
    net = zoo.build_model("mlp", seed=0)
    train, _ = data.digits_split()
    training.train_local(net, train, epochs=3, batch_size=32, lr=0.1, seed=0)
    return training.state_arrays(net)


def zeros_mlp() -> dict[str, np.ndarray]:
    """An mlp of all zeros: it predicts one class for everything."""
    return {k: np.zeros_like(v) for k, v in arrays_for("mlp", 0).items()}


async def infer_error(stub: inference_pb2_grpc.InferenceStub, model: str, version: int = 0) -> tuple[grpc.StatusCode, str]:
    try:
        await stub.Infer(request(model, inputs(2), version=version), timeout=30)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def run_job(coordinator: Coordinator, certs_dir: Path, **spec: object) -> admin_pb2.Job:
    """A one-round job on mlp answered by one raw agent with a zero update (the new
    version equals its base), waited for until its promotion decision is recorded."""
    job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=1,
                          round_deadline_seconds=30, **spec)
    [agent] = await streams(coordinator.port, certs_dir, ["agent-0"])
    try:
        task = (await agent.next("task")).task
        await send(coordinator.port, certs_dir, "agent-0", task, 0.0)
    finally:
        await agent.close()

    async def decided() -> admin_pb2.Job | None:
        async with admin_channel(coordinator.port, certs_dir) as channel:
            done = await admin_pb2_grpc.AdminStub(channel).GetJob(admin_pb2.GetJobRequest(job_id=job.job_id))
        return done if done.state == admin_pb2.JOB_STATE_COMPLETED and "promot" in done.message else None

    finished: admin_pb2.Job = await wait_for(decided, timeout=60, interval=0.05, message="the promotion decision")
    return finished


async def history(coordinator: Coordinator, certs_dir: Path, model: str = "mlp") -> admin_pb2.ModelHistory:
    async with admin_channel(coordinator.port, certs_dir) as channel:
        found: admin_pb2.ModelHistory = await admin_pb2_grpc.AdminStub(channel).GetModelHistory(
            admin_pb2.GetModelHistoryRequest(model=model))
        return found


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_starting_a_job_never_serves_its_untrained_initial_model(coordinator: Coordinator, certs_dir: Path) -> None:
    job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=3, min_clients=2)
    async with admin_channel(coordinator.port, certs_dir) as channel:
        stub = inference_pb2_grpc.InferenceStub(channel)
        code, details = await infer_error(stub, "mlp")
        assert code == grpc.StatusCode.FAILED_PRECONDITION, details
        assert "tandem models promote mlp VERSION" in details
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetModelInfo(ipb.ModelInfoRequest(model="mlp"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        # The candidate stays addressable by its number.
        x = inputs(2)
        close(await stub.Infer(request("mlp", x, version=job.version)), forward("mlp", arrays_for("mlp", 0), x))
    found = await history(coordinator, certs_dir)
    assert found.serving_version == 0 and not found.events
    [initial] = found.versions
    assert (initial.version, initial.origin, initial.stage, initial.job_id) == (job.version, "initial", "candidate",
                                                                                job.job_id)


async def test_promote_and_rollback_are_recorded_with_who_and_when(coordinator: Coordinator, certs_dir: Path) -> None:
    first = await coordinator.models.publish("mlp", arrays_for("mlp", 1))
    second = await coordinator.models.publish("mlp", arrays_for("mlp", 2))
    before = sample("tandem_model_promotions_total", model="mlp", kind="promote")
    x = inputs(3)
    async with admin_channel(coordinator.port, certs_dir) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.RollbackModel(admin_pb2.RollbackModelRequest(model="mlp"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.PromoteModel(admin_pb2.PromoteModelRequest(model="mlp", version=9))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

        await admin.PromoteModel(admin_pb2.PromoteModelRequest(model="mlp", version=first.version, reason="baseline"))
        close(await stub.Infer(request("mlp", x)), forward("mlp", arrays_for("mlp", 1), x))
        with pytest.raises(grpc.aio.AioRpcError) as err:  # nothing served before the first one
            await admin.RollbackModel(admin_pb2.RollbackModelRequest(model="mlp"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION

        await admin.PromoteModel(admin_pb2.PromoteModelRequest(model="mlp", version=second.version))

        async def serves(version: int) -> bool:
            return bool((await stub.Infer(request("mlp", x))).version == version)

        await wait_for(lambda: serves(second.version), timeout=30, message="v2 to be swapped in")
        rolled = await admin.RollbackModel(admin_pb2.RollbackModelRequest(model="mlp", reason="v2 regressed"))
        assert (rolled.version, rolled.stage) == (first.version, "serving")
        await wait_for(lambda: serves(first.version), timeout=30, message="the rollback to be swapped in")
        close(await stub.Infer(request("mlp", x)), forward("mlp", arrays_for("mlp", 1), x))
        close(await stub.Infer(request("mlp", x, version=second.version)), forward("mlp", arrays_for("mlp", 2), x))

    found = await history(coordinator, certs_dir)
    assert found.serving_version == first.version
    assert [(v.version, v.stage, v.origin) for v in found.versions] == [(1, "serving", "publish"),
                                                                        (2, "retired", "publish")]
    assert [(e.event, e.version, e.previous, e.reason) for e in found.events] == [
        ("promote", 1, 0, "baseline"), ("promote", 2, 1, "promoted by an operator"), ("rollback", 1, 2, "v2 regressed")]
    assert {e.actor for e in found.events} == {"admin"}  # the admin certificate's identity
    assert all(e.at.seconds > 0 for e in found.events)
    assert sample("tandem_model_promotions_total", model="mlp", kind="promote") == before + 2
    assert sample("tandem_model_serving_version", model="mlp") == first.version


async def test_job_policies_at_completion(coordinator: Coordinator, certs_dir: Path) -> None:
    # No serving version: if-better (the default) promotes the first completed job's result.
    first = await run_job(coordinator, certs_dir, eval="digits")
    assert first.message.startswith(f"promoted mlp v{first.version}: if-better: the model had no serving version")
    assert coordinator.models.serving("mlp").version == first.version  # type: ignore[union-attr]

    # --promote never: the result stays a candidate, and what is served does not change.
    kept = await run_job(coordinator, certs_dir, promote="never")
    assert "not promoted" in kept.message and "--promote never" in kept.message
    assert coordinator.models.serving("mlp").version == first.version  # type: ignore[union-attr]

    # if-better against a serving version: better on the same held-out data is promoted, worse is not.
    zero = await serve(coordinator.models, "mlp", zeros_mlp())
    good = await coordinator.models.publish("mlp", trained_mlp())
    better = await run_job(coordinator, certs_dir, eval="digits", from_version=str(good.version))
    assert better.message.startswith(f"promoted mlp v{better.version}: if-better: accuracy"), better.message
    assert f"serving v{zero.version}'s" in better.message
    worse = await run_job(coordinator, certs_dir, eval="digits", from_version=str(zero.version),
                          promote_metric="accuracy")
    assert worse.message.startswith(f"not promoted (mlp v{worse.version} stays a candidate): if-better: accuracy")
    assert coordinator.models.serving("mlp").version == better.version  # type: ignore[union-attr]
    # Lower-is-better metrics work too: loss of the zero model's copy is higher.
    by_loss = await run_job(coordinator, certs_dir, eval="digits", from_version=str(zero.version),
                            promote_metric="loss")
    assert "loss" in by_loss.message and "not promoted" in by_loss.message

    # Without --eval there is nothing to compare with: the serving version stays.
    blind = await run_job(coordinator, certs_dir)
    assert "no --eval data" in blind.message

    # on-complete: promoted whatever it scores.
    forced = await run_job(coordinator, certs_dir, promote="on-complete", from_version=str(zero.version))
    assert forced.message.startswith(f"promoted mlp v{forced.version}: the job's policy is --promote on-complete")

    found = await history(coordinator, certs_dir)
    jobs = [e for e in found.events if e.actor.startswith("job ")]
    assert [e.event for e in jobs] == ["promote", "kept", "promote", "kept", "kept", "kept", "promote"]
    by_version = {v.version: v for v in found.versions}
    assert by_version[better.version].origin == "round" and by_version[better.version].eval == "digits"
    assert by_version[better.version].metrics["accuracy"] > 0.5
    assert by_version[good.version].stage == "candidate" and by_version[first.version].stage == "retired"


async def test_warm_start_checks_the_version_it_starts_from(coordinator: Coordinator, certs_dir: Path) -> None:
    for from_version, code in (("7", grpc.StatusCode.NOT_FOUND), ("serving", grpc.StatusCode.FAILED_PRECONDITION),
                               ("latest", grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=1, from_version=from_version)
        assert err.value.code() == code, (from_version, err.value.details())
    served = await serve(coordinator.models, "mlp", arrays_for("mlp", 4))
    job = await start_job(coordinator.port, certs_dir, model="mlp", rounds=1, min_clients=1, from_version="serving")
    assert job.version == served.version and job.spec.from_version == "serving"
    assert [v.version for v in coordinator.store.list_versions("mlp")] == [served.version]  # nothing new published
    [agent] = await streams(coordinator.port, certs_dir, ["agent-0"])
    try:
        task = (await agent.next("task")).task
    finally:
        await agent.close()
    assert (task.base_version, task.base_sha256, task.HasField("base_seed")) == (served.version, served.sha256, False)


async def tandem(*args: str) -> subprocess.CompletedProcess[str]:
    """The command line, in a thread: the coordinator runs on this process's event loop."""
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "tandem_cli", *args], capture_output=True,
                                   text=True, timeout=120)


@pytest.mark.process
async def test_the_models_commands(coordinator: Coordinator, certs_dir: Path, tmp_path: Path) -> None:
    common = ["--cloud", f"localhost:{coordinator.port}", "--certs", str(certs_dir)]
    path = tmp_path / "mlp.safetensors"
    write_tensors(path, arrays_for("mlp", 5))
    published = await tandem("models", "publish", "mlp", str(path), *common)
    assert published.returncode == 0, published.stderr
    assert "published mlp v1 (a candidate" in published.stdout
    listed = await tandem("models", *common)
    assert listed.returncode == 0, listed.stderr
    assert any(line.split()[:3] == ["mlp", "yes", "none"] for line in listed.stdout.splitlines()), listed.stdout
    both = await tandem("models", "publish", "mlp", str(path), "--promote", *common)
    assert both.returncode == 0 and "mlp v2 is serving" in both.stdout, both.stderr
    assert (await tandem("models", "promote", "mlp", "1", "--reason", "the first", *common)).returncode == 0
    rolled = await tandem("models", "rollback", "mlp", *common)
    assert rolled.returncode == 0 and "mlp v2 is serving again" in rolled.stdout, rolled.stderr
    shown = await tandem("models", "history", "mlp", *common)
    assert shown.returncode == 0 and shown.stdout.startswith("mlp: serving v2"), shown.stderr
    assert re.search(r"rollback +v2 ", shown.stdout) and "by admin" in shown.stdout and "the first" in shown.stdout
    as_json = json.loads((await tandem("models", "history", "mlp", "--json", *common)).stdout)
    assert [e["event"] for e in as_json["events"]] == ["promote", "promote", "rollback"]
    assert [v["stage"] for v in as_json["versions"]] == ["retired", "serving"]
    summary = json.loads((await tandem("models", "--json", *common)).stdout)["models"]
    assert {"model": "mlp", "installed": True, "serving_version": 2, "versions": 2, "newest_version": 2,
            "rollout": None} in summary
    assert any(m["model"] == "cnn" and m["installed"] and m["versions"] == 0 for m in summary)
    wrong = tmp_path / "cnn.safetensors"
    write_tensors(wrong, arrays_for("cnn", 1))
    refused = await tandem("models", "publish", "mlp", str(wrong), *common)
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr, refused.stderr
    missing = await tandem("models", "publish", "mlp", str(tmp_path / "none.safetensors"), *common)
    assert missing.returncode == 2 and "not a readable safetensors file" in missing.stderr


async def test_a_decision_lost_to_a_restart_is_taken_at_start(tmp_path: Path, certs_dir: Path) -> None:
    """A job that completed just before the coordinator stopped (no decision recorded)
    gets its promotion decision when the coordinator starts again."""
    config = CloudConfig(listen="127.0.0.1:0", certs=certs_dir, state=tmp_path / "state", grace=0.5)
    first = Coordinator(config)
    await first.start()
    try:
        row = await first.models.publish("mlp", arrays_for("mlp", 3), "job-1", 1)
        first.store.create_job("job-1", JobSpec(model="mlp", rounds=1, min_clients=1).to_dict(), row.version)
        first.store.set_job_state("job-1", JobState.COMPLETED)
    finally:
        await first.stop()
    again = Coordinator(config)
    await again.start()
    try:
        await wait_for(lambda: again.models.serving("mlp") is not None, timeout=30, message="the decision")
        job = again.store.get_job("job-1")
        assert job is not None and job.promotion == "promoted" and "no serving version" in job.message
    finally:
        await again.stop()
