"""The cloud's Inference server over real gRPC and mutual TLS: outputs, batching,
split execution, every bad-input code, overload, streams and hot swaps."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import pytest_asyncio
from prometheus_client import REGISTRY, generate_latest

from cloud.app import CloudConfig, Coordinator
from cloud.serving import ServingConfig
from tandem import wire
from tandem.v1 import admin_pb2, admin_pb2_grpc, inference_pb2_grpc, tensor_pb2
from tandem.v1 import inference_pb2 as pb
from tests.support.clients import admin_channel, agent_channel
from tests.support.inference import arrays_for, forward, inputs, publish_messages, request, serve

Served = tuple[inference_pb2_grpc.InferenceStub, dict[str, np.ndarray]]


@pytest_asyncio.fixture
async def served(coordinator: Coordinator, certs_dir: Path) -> AsyncIterator[Served]:
    """The coordinator with mlp v1 published, and an agent's Inference stub."""
    arrays = arrays_for("mlp", seed=1)
    await serve(coordinator.models, "mlp", arrays)
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        yield inference_pb2_grpc.InferenceStub(channel), arrays


async def test_cloud_output_matches_a_direct_forward_pass(served: Served) -> None:
    stub, arrays = served
    x = inputs(5)
    response = await stub.Infer(request("mlp", x, request_id="r1"))
    assert (response.request_id, response.model, response.version) == ("r1", "mlp", 1)
    assert response.placement == pb.PLACEMENT_CLOUD
    np.testing.assert_allclose(wire.from_proto(response.output), forward("mlp", arrays, x), rtol=1e-5, atol=1e-6)


async def test_every_split_point_matches_a_direct_forward_pass(served: Served) -> None:
    stub, arrays = served
    x = inputs(3)
    expected = forward("mlp", arrays, x)
    for k in range(3):  # mlp has 3 stages; start_layer k sends the output of stage k
        activation = forward("mlp", arrays, x, 0, k)
        response = await stub.Infer(request("mlp", activation, start_layer=k))
        np.testing.assert_allclose(wire.from_proto(response.output), expected, rtol=1e-5, atol=1e-6)


async def test_concurrent_callers_each_get_their_own_rows(
    coordinator: Coordinator, served: tuple[inference_pb2_grpc.InferenceStub, dict[str, np.ndarray]]
) -> None:
    stub, arrays = served
    xs = [inputs(1 + i % 3) for i in range(60)]
    batches_before = coordinator.serving.batcher.batches
    responses = await asyncio.gather(*(stub.Infer(request("mlp", x, request_id=str(i))) for i, x in enumerate(xs)))
    for i, (x, response) in enumerate(zip(xs, responses)):
        assert response.request_id == str(i)
        np.testing.assert_allclose(wire.from_proto(response.output), forward("mlp", arrays, x), rtol=1e-5, atol=1e-6)
    assert coordinator.serving.batcher.batches - batches_before < len(xs), "no two requests shared a batch"


async def test_bad_inputs_get_precise_codes(served: Served) -> None:
    stub, _ = served
    bad_length = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1, 64], data=b"\0" * 12)
    nan = inputs(2)
    nan[1, 3] = np.nan
    cases: list[tuple[pb.InferRequest, grpc.StatusCode, str]] = [
        (request("nope", inputs(1)), grpc.StatusCode.NOT_FOUND, "nope"),
        (request("mlp", inputs(1), version=9), grpc.StatusCode.NOT_FOUND, "no version 9"),
        (request("mlp-small", inputs(1)), grpc.StatusCode.NOT_FOUND, "mlp-small"),
        (request("mlp", inputs(1, width=63)), grpc.StatusCode.INVALID_ARGUMENT, "expected [batch, 64]"),
        (request("mlp", inputs(1), start_layer=1), grpc.StatusCode.INVALID_ARGUMENT, "expected [batch, 512]"),
        (request("mlp", inputs(1), start_layer=3), grpc.StatusCode.INVALID_ARGUMENT, "start_layer"),
        (request("mlp", inputs(1), start_layer=-1), grpc.StatusCode.INVALID_ARGUMENT, "start_layer"),
        (request("mlp", inputs(1).astype(np.float16)), grpc.StatusCode.INVALID_ARGUMENT, "float32"),
        (request("mlp", np.zeros((1, 64), np.int32)), grpc.StatusCode.INVALID_ARGUMENT, "float32"),
        (request("mlp", nan), grpc.StatusCode.INVALID_ARGUMENT, "non-finite"),
        (request("mlp", inputs(1)[0]), grpc.StatusCode.INVALID_ARGUMENT, "batch"),
        (request("mlp", inputs(0)), grpc.StatusCode.INVALID_ARGUMENT, "empty"),
        (request("mlp", inputs(1025)), grpc.StatusCode.INVALID_ARGUMENT, "limit of 1024"),
        (pb.InferRequest(model="mlp", input=bad_length), grpc.StatusCode.INVALID_ARGUMENT, "needs 256"),
        (pb.InferRequest(model="mlp"), grpc.StatusCode.INVALID_ARGUMENT, "input tensor is required"),
        (pb.InferRequest(input=wire.to_proto(inputs(1))), grpc.StatusCode.INVALID_ARGUMENT, "model name"),
        (request("mlp", inputs(1), version=-2), grpc.StatusCode.INVALID_ARGUMENT, "version"),
    ]
    for bad, code, words in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Infer(bad)
        assert err.value.code() == code, (bad.model, err.value.details())
        assert words in (err.value.details() or ""), err.value.details()
    # Nothing above disturbed the server, and names from the wire made no metric series.
    assert (await stub.Infer(request("mlp", inputs(1)))).version == 1
    exposition = generate_latest(REGISTRY).decode()
    assert 'model="nope"' not in exposition and 'model="unknown"' in exposition


async def test_stream_reports_errors_in_order_and_stays_open(served: Served) -> None:
    stub, arrays = served
    good = [inputs(2) for _ in range(4)]
    requests = [
        request("mlp", good[0], request_id="a"),
        request("nope", good[1], request_id="b"),
        request("mlp", good[1], request_id="c"),
        request("mlp", inputs(1, width=5), request_id="d"),
        request("mlp", good[2], request_id="e"),
    ]
    responses = [r async for r in stub.InferStream(iter(requests))]
    assert [r.request_id for r in responses] == ["a", "b", "c", "d", "e"]
    assert [r.error_code for r in responses] == [
        0, grpc.StatusCode.NOT_FOUND.value[0], 0, grpc.StatusCode.INVALID_ARGUMENT.value[0], 0
    ]
    assert "expected [batch, 64]" in responses[3].error_message
    for response, x in zip([responses[0], responses[2], responses[4]], good):
        np.testing.assert_allclose(wire.from_proto(response.output), forward("mlp", arrays, x), rtol=1e-5, atol=1e-6)


async def test_model_info_reports_stages_sizes_and_measured_times(served: Served) -> None:
    stub, _ = served
    await stub.Infer(request("mlp", inputs(4)))
    info = await stub.GetModelInfo(pb.ModelInfoRequest(model="mlp"))
    assert (info.model, info.version, info.device, list(info.input_shape)) == ("mlp", 1, "cpu", [64])
    assert [list(s.output_shape) for s in info.stages] == [[512], [512], [10]]
    assert [s.output_bytes for s in info.stages] == [2048, 2048, 40]
    assert all(s.seconds_per_example > 0 for s in info.stages)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await stub.GetModelInfo(pb.ModelInfoRequest(model="mlp", version=7))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_hot_swap_under_load_fails_nothing_and_keeps_old_versions(
    coordinator: Coordinator, served: tuple[inference_pb2_grpc.InferenceStub, dict[str, np.ndarray]]
) -> None:
    stub, v1 = served
    v2 = arrays_for("mlp", seed=2)
    x = inputs(1)
    seen: list[int] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            response = await stub.Infer(request("mlp", x))
            expected = forward("mlp", v1 if response.version == 1 else v2, x)
            np.testing.assert_allclose(wire.from_proto(response.output), expected, rtol=1e-5, atol=1e-6)
            seen.append(response.version)

    clients = [asyncio.create_task(client()) for _ in range(8)]
    await asyncio.sleep(0.3)
    await serve(coordinator.models, "mlp", v2)
    for _ in range(100):
        if seen and seen[-1] == 2:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.gather(*clients)  # any failed request would raise here
    assert 1 in seen and seen[-1] == 2
    assert seen.index(2) > 0 and all(v == 2 for v in seen[seen.index(2) + 8:])
    old = await stub.Infer(request("mlp", x, version=1))
    assert old.version == 1
    np.testing.assert_allclose(wire.from_proto(old.output), forward("mlp", v1, x), rtol=1e-5, atol=1e-6)


async def test_overload_is_refused_not_queued(tmp_path: Path, certs_dir: Path) -> None:
    config = CloudConfig(
        listen="127.0.0.1:0", certs=certs_dir, state=tmp_path / "state", grace=0.5,
        serving=ServingConfig(device="cpu", max_delay=0.5, max_queue_rows=4),
    )
    server = Coordinator(config)
    await server.start()
    try:
        await serve(server.models, "mlp", arrays_for("mlp", seed=1))
        await server.serving.get("mlp", 0)
        async with agent_channel(server.port, certs_dir, "agent-0") as channel:
            stub = inference_pb2_grpc.InferenceStub(channel)
            first = [asyncio.ensure_future(stub.Infer(request("mlp", inputs(2)))) for _ in range(2)]
            await asyncio.sleep(0.1)  # both wait for their batch (max-delay 0.5 s), holding 4 rows
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.Infer(request("mlp", inputs(1)))
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "queue is full" in (err.value.details() or "")
            assert all(r.version == 1 for r in await asyncio.gather(*first))  # the queued ones still succeed
    finally:
        await server.stop()


async def test_publish_model_checks_everything_and_swaps_it_in(
    coordinator: Coordinator, certs_dir: Path
) -> None:
    arrays = arrays_for("mlp-small", seed=3)
    x = inputs(2)
    async with admin_channel(coordinator.port, certs_dir) as channel:
        admin = admin_pb2_grpc.AdminStub(channel)
        nan = {k: v.copy() for k, v in arrays.items()}
        next(iter(nan.values())).flat[0] = np.inf
        wrong = dict(arrays)
        wrong.pop(sorted(wrong)[0])
        for messages, words in [
            (publish_messages("mlp-small", arrays, sha256="0" * 64), "not to the header's sha256"),
            (publish_messages("mlp-small", nan), "non-finite"),
            (publish_messages("mlp-small", wrong), "missing"),
            (publish_messages("mlp-small", arrays_for("mlp", 0)), "where [32] is expected"),
            (publish_messages("mlp-small", arrays)[1:], "must start with a ModelHeader"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await admin.PublishModel(iter(messages))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert words in (err.value.details() or ""), err.value.details()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin.PublishModel(iter(publish_messages("nope", arrays)))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        version = await admin.PublishModel(iter(publish_messages("mlp-small", arrays)))
        assert (version.model, version.version, version.stage, version.origin) == ("mlp-small", 1, "candidate",
                                                                                   "publish")
        stub = inference_pb2_grpc.InferenceStub(channel)  # an admin may call inference too
        with pytest.raises(grpc.aio.AioRpcError) as err:  # a candidate: served by explicit version only
            await stub.Infer(request("mlp-small", x))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "tandem models promote mlp-small" in (err.value.details() or "")
        candidate = await stub.Infer(request("mlp-small", x, version=1))
        np.testing.assert_allclose(wire.from_proto(candidate.output), forward("mlp-small", arrays, x), rtol=1e-5,
                                   atol=1e-6)
        await admin.PromoteModel(admin_pb2.PromoteModelRequest(model="mlp-small", version=1))
        response = await stub.Infer(request("mlp-small", x))
        np.testing.assert_allclose(wire.from_proto(response.output), forward("mlp-small", arrays, x), rtol=1e-5, atol=1e-6)
    async with agent_channel(coordinator.port, certs_dir, "agent-0") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await admin_pb2_grpc.AdminStub(channel).PublishModel(iter(publish_messages("mlp-small", arrays)))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_gpu_check_logic_runs_on_cpu(tmp_path: Path) -> None:
    """`make gpu-check` is run on the rare GPU machine: keep its logic exercised here on CPU."""
    from tandem_lab.gpu_check import check

    results = await check("cpu", tmp_path)
    assert results["device"] == "cpu" and results["passed"], results
    assert set(results["models"]["mlp"]["relative_error"]) == {"batched", "start_layer_0", "start_layer_1", "start_layer_2"}
