"""Corrupt model files (issue 14, item 4): a real coordinator on a state directory whose
tensor files were truncated or had bytes flipped behind its back. Every file is checked
against its recorded hash before it is served; a corrupt one is quarantined, logged once
and answered DATA_LOSS, and the rest keeps serving."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest

from cloud.app import CloudConfig, Coordinator
from cloud.models import ModelRepository
from cloud.store import FileKind, Store, VersionRow
from cloud.tensorfile import write_tensors
from tandem import wire
from tandem.v1 import coordinator_pb2 as cpb
from tandem.v1 import coordinator_pb2_grpc, inference_pb2_grpc
from tandem_cli import procs
from tandem_cli.main import main
from tandem_lab.reliability_corrupt import invert
from tests.support.clients import agent_channel, download
from tests.support.inference import arrays_for, inputs, request


@asynccontextmanager
async def running(state: Path, certs_dir: Path) -> AsyncIterator[Coordinator]:
    """A coordinator in this process on `state`, stopped on exit."""
    server = Coordinator(CloudConfig(listen="127.0.0.1:0", certs=certs_dir, state=state, grace=0.5))
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def published(state: Path, certs_dir: Path, count: int) -> list[VersionRow]:
    """`count` versions of mlp published, each promoted in turn (the last serves), on a
    coordinator that is then stopped."""
    async with running(state, certs_dir) as cloud:
        rows = []
        for i in range(1, count + 1):
            rows.append(await cloud.models.publish("mlp", arrays_for("mlp", seed=i)))
            cloud.models.promote("mlp", rows[-1].version, "test")
        return rows


def truncate(row: VersionRow) -> None:
    os.truncate(row.path, row.bytes // 2)


def flip(row: VersionRow, at: int = -64, count: int = 16) -> None:
    """Invert `count` bytes at `at` (from the end when negative): the size stays as recorded."""
    invert(Path(row.path), at, count)


async def download_code(stub: coordinator_pb2_grpc.CoordinatorStub, version: int) -> tuple[grpc.StatusCode, int, str]:
    """How a download of mlp `version` ends, the messages received before, and the details."""
    received = 0
    try:
        async for _ in stub.DownloadModel(cpb.ModelRequest(model="mlp", version=version), timeout=30):
            received += 1
    except grpc.aio.AioRpcError as exc:
        return exc.code(), received, exc.details() or ""
    return grpc.StatusCode.OK, received, ""


async def infer_code(stub: inference_pb2_grpc.InferenceStub, version: int) -> tuple[grpc.StatusCode, str]:
    try:
        await stub.Infer(request("mlp", inputs(2), version=version), timeout=30)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_a_truncated_newest_version_is_quarantined_and_the_previous_one_served(
    tmp_path: Path, certs_dir: Path
) -> None:
    state = tmp_path / "state"
    rows = await published(state, certs_dir, 3)
    truncate(rows[-1])
    async with running(state, certs_dir) as cloud, agent_channel(cloud.port, certs_dir, "agent-0") as channel:
        assert cloud.models.newest("mlp") == rows[1]
        assert cloud.models.serving("mlp") == rows[1]  # the one that served before the corrupt one
        quarantined = cloud.store.quarantined("mlp", 3)
        assert quarantined is not None and "bytes" in quarantined.reason
        response = await inference_pb2_grpc.InferenceStub(channel).Infer(request("mlp", inputs(2)), timeout=30)
        assert response.version == 2
        header, arrays = await download(coordinator_pb2_grpc.CoordinatorStub(channel), "mlp", 0)
        assert (header.version, wire.state_sha256(arrays)) == (2, rows[1].sha256)
        code, received, details = await download_code(coordinator_pb2_grpc.CoordinatorStub(channel), 3)
        assert (code, received) == (grpc.StatusCode.DATA_LOSS, 0) and "corrupt" in details, details
        code, details = await infer_code(inference_pb2_grpc.InferenceStub(channel), 3)
        assert code == grpc.StatusCode.DATA_LOSS and "corrupt" in details, details
        assert [v.version for v in cloud.store.list_versions("mlp")] == [1, 2]


async def test_flipped_bytes_in_an_older_version_never_reach_a_client(
    tmp_path: Path, certs_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "state"
    rows = await published(state, certs_dir, 2)
    flip(rows[0])
    caplog.set_level(logging.WARNING)
    async with running(state, certs_dir) as cloud, agent_channel(cloud.port, certs_dir, "agent-0") as channel:
        coordinator = coordinator_pb2_grpc.CoordinatorStub(channel)
        inference = inference_pb2_grpc.InferenceStub(channel)
        for _ in range(2):
            code, received, details = await download_code(coordinator, 1)
            assert (code, received) == (grpc.StatusCode.DATA_LOSS, 0), (code, received, details)
            assert "mlp v1" in details and "corrupt" in details, details
            code, details = await infer_code(inference, 1)
            assert code == grpc.StatusCode.DATA_LOSS and "corrupt" in details, (code, details)
        # The rest keeps serving.
        header, arrays = await download(coordinator, "mlp", 2)
        assert wire.state_sha256(arrays) == rows[1].sha256
        assert (await infer_code(inference, 2))[0] == grpc.StatusCode.OK
        assert cloud.store.quarantined("mlp", 1) is not None
    said = [r for r in caplog.records if "mlp v1" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING, [r.getMessage() for r in said]
    # The coordinator's own loggers: asyncio's reports of tasks an earlier test left to the
    # garbage collector can land in any test's capture.
    ours = [r for r in caplog.records if r.name.split(".")[0] in ("cloud", "tandem", "edge")]
    assert not [r for r in ours if r.exc_info], "no traceback for a corrupt file"


async def test_a_file_changed_after_it_was_verified_is_verified_again(tmp_path: Path, certs_dir: Path) -> None:
    state = tmp_path / "state"
    rows = await published(state, certs_dir, 2)
    async with running(state, certs_dir) as cloud, agent_channel(cloud.port, certs_dir, "agent-0") as channel:
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        assert (await download_code(stub, 1))[0] == grpc.StatusCode.OK
        flip(rows[0], at=-8, count=4)
        code, received, _ = await download_code(stub, 1)
        assert (code, received) == (grpc.StatusCode.DATA_LOSS, 0)


async def test_a_corrupt_delta_is_quarantined_and_the_whole_version_sent(tmp_path: Path) -> None:
    store = Store(tmp_path / "state")
    models = ModelRepository(store)
    first = await models.publish("mlp", arrays_for("mlp", seed=1))
    second = await models.publish("mlp", arrays_for("mlp", seed=2))
    # A small delta: what a round's downlink codec writes beside the version.
    path = store.delta_path("mlp", 2)
    small = min(arrays_for("mlp", seed=3).values(), key=lambda a: a.size)
    write_tensors(path, {"w": small})
    with_delta = VersionRow(**{**second.__dict__, "delta_path": str(path), "delta_from": 1, "delta_codec": "none",
                               "delta_bytes": path.stat().st_size})
    store.add_version(with_delta)
    models.published(with_delta)  # records the delta's hash, as a round's close does
    header, _ = await models.response("mlp", 2, first.version)
    assert [s.to_version for s in header.steps] == [2]
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\xff\xff\xff\xff")
    header, chunks = await models.response("mlp", 2, first.version)
    assert not header.steps and header.sha256 == second.sha256
    assert sum(1 for _ in chunks()) == header.total_chunks
    assert store.quarantined("mlp", 2, FileKind.DELTA) is not None
    assert store.quarantined("mlp", 2) is None  # the version itself is good
    store.close()


@pytest.mark.process
def test_tandem_cloud_starts_on_a_truncated_newest_version(tmp_path: Path, certs_dir: Path) -> None:
    state = tmp_path / "state"
    store = Store(state)
    rows = [_write_version(store, n) for n in (1, 2)]
    store.close()
    truncate(rows[-1])
    log = tmp_path / "cloud.log"
    cloud, _ = procs.start_cloud(certs_dir, state, log)  # raises if it exits instead
    procs.stop(cloud)
    text = log.read_text()
    assert "Traceback" not in text, text
    assert "mlp v2" in text and "serving mlp v1" in text, text


def _write_version(store: Store, number: int) -> VersionRow:
    """Version `number` of mlp recorded, and promoted (the last written serves)."""
    path = store.model_path("mlp", number)
    size, sha = write_tensors(path, arrays_for("mlp", seed=number))
    row = VersionRow("mlp", number, sha, str(path), None, None, 0.0, size)
    store.add_version(row)
    store.add_event("mlp", "promote", number, number - 1, "test", "")
    return row


def test_models_verify_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state = tmp_path / "state"
    store = Store(state)
    rows = [_write_version(store, n) for n in (1, 2, 3)]
    store.close()
    assert main(["models", "verify", "--state", str(state)]) == 0
    assert "3 files" in capsys.readouterr().out
    truncate(rows[2])
    flip(rows[0])
    assert main(["models", "verify", "--state", str(state)]) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[:2] for line in lines if line.startswith("mlp")] == [["mlp", "v1"], ["mlp", "v3"]], lines
    assert main(["models", "verify", "--state", str(tmp_path / "none")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
