"""Dynamic batching and staged models as plain logic, without gRPC."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from tandem import staged, training, zoo
from tandem.batching import Batcher
from tandem.errors import InvalidArgument, ResourceExhausted
from tandem.placement import Placement, parse, parse_all


class Recorder:
    """A forward pass that records the batches it was given and doubles them."""

    def __init__(self) -> None:
        self.batches: list[int] = []
        self.threads: set[str] = set()

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.batches.append(len(x))
        self.threads.add(threading.current_thread().name)
        return x * 2


async def test_requests_within_max_delay_share_one_batch_and_get_their_own_rows() -> None:
    batcher, run = Batcher(max_batch=64, max_delay=0.05, max_queue_rows=1000), Recorder()
    xs = [np.full((1 + i % 2, 3), i, np.float32) for i in range(10)]
    outs = await asyncio.gather(*(batcher.submit("k", x, run, "m") for x in xs))
    assert run.batches == [sum(len(x) for x in xs)]
    for x, out in zip(xs, outs):
        np.testing.assert_array_equal(out, x * 2)
    assert run.threads and threading.current_thread().name not in run.threads  # off the event loop
    await batcher.close()


async def test_a_full_batch_does_not_wait_for_the_delay() -> None:
    batcher, run = Batcher(max_batch=4, max_delay=10.0, max_queue_rows=1000), Recorder()
    outs = await asyncio.wait_for(
        asyncio.gather(*(batcher.submit("k", np.ones((1, 2), np.float32), run, "m") for _ in range(8))), 5
    )
    assert run.batches == [4, 4] and len(outs) == 8
    await batcher.close()


async def test_keys_are_batched_apart_and_large_requests_run_alone() -> None:
    batcher, run = Batcher(max_batch=4, max_delay=0.02, max_queue_rows=1000), Recorder()
    await asyncio.gather(
        batcher.submit("a", np.ones((1, 2), np.float32), run, "m"),
        batcher.submit("b", np.ones((1, 2), np.float32), run, "m"),
        batcher.submit("a", np.ones((9, 2), np.float32), run, "m"),
    )
    assert sorted(run.batches) == [1, 1, 9]
    await batcher.close()


async def test_overload_is_refused_and_cancelled_callers_are_skipped() -> None:
    batcher, run = Batcher(max_batch=64, max_delay=0.2, max_queue_rows=3), Recorder()
    first = asyncio.ensure_future(batcher.submit("k", np.ones((2, 2), np.float32), run, "m"))
    gone = asyncio.ensure_future(batcher.submit("k", np.ones((1, 2), np.float32), run, "m"))
    await asyncio.sleep(0.01)
    with pytest.raises(ResourceExhausted):
        await batcher.submit("k", np.ones((1, 2), np.float32), run, "m")
    gone.cancel()
    await first
    assert run.batches == [2]  # the cancelled request was not computed
    assert batcher.queued_rows == 0
    await batcher.close()


async def test_a_failing_forward_pass_fails_only_its_batch() -> None:
    batcher = Batcher(max_batch=64, max_delay=0.0, max_queue_rows=100)

    def broken(x: np.ndarray) -> np.ndarray:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await batcher.submit("bad", np.ones((1, 2), np.float32), broken, "m")
    out = await batcher.submit("good", np.ones((1, 2), np.float32), Recorder(), "m")
    np.testing.assert_array_equal(out, np.full((1, 2), 2, np.float32))
    await batcher.close()


async def test_a_batch_predicted_expensive_runs_on_the_worker_and_a_cheap_one_inline() -> None:
    batcher = Batcher(max_batch=64, max_delay=0.0, max_queue_rows=1000, inline_below=0.001)
    cheap, dear = Recorder(), Recorder()
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    out_cheap = await batcher.submit("cheap", x, cheap, "m", cost=lambda rows: rows * 1e-6)
    out_dear = await batcher.submit("dear", x, dear, "m", cost=lambda rows: rows * 0.01)
    loop_thread = threading.current_thread().name
    assert cheap.threads == {loop_thread}
    assert dear.threads and loop_thread not in dear.threads
    np.testing.assert_array_equal(out_cheap, out_dear)
    assert batcher.inline_batches == 1
    await batcher.close()


async def test_a_batch_measured_expensive_leaves_the_loop_whatever_the_prediction_said() -> None:
    """The prediction only decides until a batch has been measured: a lane whose batches
    cost more CPU than the threshold goes to the worker even if its profile says cheap."""
    batcher = Batcher(max_batch=64, max_delay=0.0, max_queue_rows=1000, inline_below=0.001)
    threads: list[str] = []

    def heavy(x: np.ndarray) -> np.ndarray:
        threads.append(threading.current_thread().name)
        end = time.thread_time() + 0.005  # 5 ms of CPU: five times the threshold
        while time.thread_time() < end:
            pass
        return x + 1

    for _ in range(3):
        await batcher.submit("k", np.ones((1, 2), np.float32), heavy, "m", cost=lambda rows: 0.0)
    loop_thread = threading.current_thread().name
    # An unknown cost (0: not profiled yet) never runs inline; once measured, still the worker.
    assert loop_thread not in threads
    await batcher.submit("k2", np.ones((1, 2), np.float32), heavy, "m", cost=lambda rows: 1e-6)
    await batcher.submit("k2", np.ones((1, 2), np.float32), heavy, "m", cost=lambda rows: 1e-6)
    assert threads[3] == loop_thread and threads[4] != loop_thread
    await batcher.close()


async def test_a_staged_model_answers_the_same_inline_and_on_the_worker() -> None:
    arrays = training.state_arrays(zoo.build_model("mlp", seed=3))
    model = staged.StagedModel("mlp", 1, "", arrays, "cpu")
    model.profile(0, model.num_stages)
    assert 0 < model.predicted_seconds(1) < model.predicted_seconds(8)
    x = np.random.default_rng(1).normal(size=(8, 64)).astype(np.float32)
    inline = Batcher(max_batch=64, max_delay=0.0, max_queue_rows=1000, inline_below=10.0)
    worker = Batcher(max_batch=64, max_delay=0.0, max_queue_rows=1000)
    a = await inline.submit("k", x, model.run, "mlp", model.predicted_seconds)
    b = await worker.submit("k", x, model.run, "mlp", model.predicted_seconds)
    assert inline.inline_batches == 1 and worker.inline_batches == 0
    np.testing.assert_array_equal(a, b)
    await inline.close()
    await worker.close()


def test_staged_model_runs_any_range_and_checks_inputs() -> None:
    arrays = training.state_arrays(zoo.build_model("mlp", seed=3))
    model = staged.StagedModel("mlp", 1, "", arrays, "cpu")
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    middle = model.run(x, 0, 2)
    np.testing.assert_allclose(model.run(middle, 2), model.run(x), rtol=1e-6)
    assert model.input_shape_at(2) == (512,)
    with pytest.raises(InvalidArgument, match="start_layer 3 is out of range"):
        model.check_input(x, 3)
    with pytest.raises(InvalidArgument, match="float32"):
        model.check_input(x.astype(np.float16), 0)


def test_the_camera_model_shrinks_its_activations_with_depth() -> None:
    input_shape, stages = staged.describe("cnn")
    sizes = [4 * int(np.prod(input_shape)), *(s.output_bytes for s in stages)]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes), sizes


def test_placements_parse_and_refuse_what_cannot_work() -> None:
    assert parse_all(["mlp=split:1", "mlp-small=cascade:0.9:mlp-heavy"]) == {
        "mlp": Placement("split", split=1), "mlp-small": Placement("cascade", threshold=0.9, cloud_model="mlp-heavy")
    }
    assert parse("mlp", "split:0") == Placement("cloud") and parse("mlp", "split:3") == Placement("edge")
    for model, text in [("mlp", "split:4"), ("mlp", "split:x"), ("mlp", "fast"), ("mlp", "cascade:2"),
                        ("mlp", "cascade:0.5:cnn-none")]:
        with pytest.raises((ValueError, KeyError)):
            parse(model, text)
    with pytest.raises(KeyError):
        parse("nope", "edge")
    with pytest.raises(ValueError, match="MODEL=MODE"):
        parse_all(["mlp"])
