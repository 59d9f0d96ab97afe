"""`tandem infer` against a real coordinator and a real edge agent, through main() on a
worker thread (its own event loop), and `tandem agents` showing labels and offers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from cloud.app import Coordinator
from tandem import data
from tandem_cli.main import main
from tests.support.deployment import APP
from tests.support.inference import arrays_for, forward, inputs, publish, start_edge
from tests.support.waiting import wait_for

Served = tuple[list[str], dict[str, np.ndarray]]


@pytest_asyncio.fixture
async def served(coordinator: Coordinator, certs_dir: Path) -> AsyncIterator[Served]:
    """mlp v1 published through the Admin API; the flags that point the CLI at the coordinator."""
    arrays = arrays_for("mlp", seed=1)
    await publish(f"localhost:{coordinator.port}", certs_dir, "mlp", arrays)
    yield ["--cloud", f"localhost:{coordinator.port}", "--certs", str(certs_dir)], arrays


async def tandem(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


def json_rows(out: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def softmax_top(values: np.ndarray) -> float:
    e = np.exp(values.astype(np.float64) - values.max())
    return float(e.max() / e.sum())


async def test_an_npy_file_is_answered_row_by_row_as_json(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where, arrays = served
    x = inputs(5).astype(np.float64)  # float64, as numpy makes it: sent as float32
    np.save(tmp_path / "x.npy", x)
    assert await tandem("infer", "mlp", "--input", str(tmp_path / "x.npy"), "--json", "--batch", "2", *where) == 0
    rows = json_rows(capsys.readouterr().out)
    expected = forward("mlp", arrays, x.astype(np.float32))
    assert [r["row"] for r in rows] == list(range(5))
    for row, want in zip(rows, expected):
        np.testing.assert_allclose(np.asarray(row["output"]), want, rtol=1e-5, atol=1e-6)
        assert row["argmax"] == int(np.argmax(want))
        assert row["probability"] == pytest.approx(softmax_top(want), rel=1e-5)
        assert (row["version"], row["placement"]) == (1, "cloud")


async def test_data_sends_the_first_rows_of_the_tasks_own_data(
    served: Served, capsys: pytest.CaptureFixture[str]
) -> None:
    where, arrays = served
    assert await tandem("infer", "mlp", "--data", "digits:0/4", "--rows", "3", *where) == 0
    lines = capsys.readouterr().out.splitlines()
    expected = forward("mlp", arrays, data.load_data("digits:0/4").x[:3])
    assert len(lines) == 3
    for i, (line, want) in enumerate(zip(lines, expected)):
        assert line.split()[:3] == [str(i), "argmax", str(int(np.argmax(want)))], line
        assert line.endswith("v1 cloud")

    assert await tandem("infer", "mlp", "--data", "digits:0/4", "--json", *where) == 0
    assert len(json_rows(capsys.readouterr().out)) == 8  # the default --rows


async def test_start_layer_sends_an_activation(served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where, arrays = served
    x = inputs(3)
    np.savez(tmp_path / "h1.npz", x=forward("mlp", arrays, x, 0, 1))
    assert await tandem("infer", "mlp", "--input", str(tmp_path / "h1.npz"), "--start-layer", "1", "--json",
                        *where) == 0
    rows = json_rows(capsys.readouterr().out)
    np.testing.assert_allclose(np.asarray([r["output"] for r in rows]), forward("mlp", arrays, x), rtol=1e-5, atol=1e-6)


async def test_info_lists_the_stages(served: Served, capsys: pytest.CaptureFixture[str]) -> None:
    where, _ = served
    assert await tandem("infer", "mlp", "--info", "--json", *where) == 0
    info = json.loads(capsys.readouterr().out)
    assert (info["model"], info["version"], info["input_shape"], info["split_note"]) == ("mlp", 1, [64], "")
    assert [s["index"] for s in info["stages"]] == [1, 2, 3]
    assert info["stages"][0]["output_shape"] == [512]
    assert await tandem("infer", "mlp", "--info", *where) == 0
    out = capsys.readouterr().out
    assert "--start-layer K" in out and len(out.splitlines()) == 2 + 3 + 1


async def test_a_wrong_shape_is_one_line_with_its_code(
    served: Served, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where, _ = served
    np.save(tmp_path / "x.npy", inputs(2, width=63))
    assert await tandem("infer", "mlp", "--input", str(tmp_path / "x.npy"), *where) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: INVALID_ARGUMENT: ") and captured.err.count("\n") == 1, captured.err
    assert await tandem("infer", "nope", "--info", *where) == 1
    assert capsys.readouterr().err.startswith("error: NOT_FOUND: ")


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "not found"),
        (b"not numpy", "not a .npy or .npz"),
        (np.zeros(64, np.float32), "[rows, ...]"),
        ({"y": np.zeros((2, 64), np.float32)}, "has no array x"),
        (np.zeros((2, 64), np.complex64), "no wire encoding"),
    ],
    ids=["missing", "garbage", "one-dimensional", "npz-without-x", "complex"],
)
def test_a_bad_input_file_is_one_line_and_exit_2(
    content: object, says: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / ("x.npz" if isinstance(content, dict) else "x.npy")
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, dict):
        np.savez(path, **content)
    elif isinstance(content, np.ndarray):
        np.save(path, content)
    # Checked before any connection: no coordinator is listening there.
    assert main(["infer", "mlp", "--input", str(path), "--cloud", "localhost:1", "--certs", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1, err


def test_data_with_start_layer_or_no_input_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["infer", "mlp", "--data", "digits", "--start-layer", "1"]) == 2
    assert "--start-layer needs --input" in capsys.readouterr().err
    assert main(["infer", "mlp"]) == 2
    assert "--input FILE or --data SPEC" in capsys.readouterr().err


async def test_an_edge_agent_answers_with_a_client_certificate_and_agents_shows_its_offers(
    coordinator: Coordinator, served: Served, certs_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    where, arrays = served
    app = await start_edge(coordinator.port, certs_dir, ("mlp=edge",), tasks=("mlp",), labels=(("site", "lab"),))
    stop = asyncio.Event()
    runner = asyncio.create_task(app.run(stop))
    try:
        await wait_for(lambda: app.agent.models.held_version("mlp") == 1)
        edge = ["--server", f"localhost:{app.inference_port}", "--as", APP, "--certs", str(certs_dir)]
        assert await tandem("infer", "mlp", "--data", "digits:0/4", "--rows", "2", "--json", *edge) == 0
        rows = json_rows(capsys.readouterr().out)
        expected = forward("mlp", arrays, data.load_data("digits:0/4").x[:2])
        assert [(r["placement"], r["argmax"]) for r in rows] == [("edge", int(np.argmax(e))) for e in expected]

        assert await tandem("agents", "--json", *where) == 0
        (agent,) = json.loads(capsys.readouterr().out)
        assert agent["labels"] == {"site": "lab"}
        assert [(t["name"], t["ready"]) for t in agent["tasks"]] == [("mlp", True)]
        assert await tandem("agents", *where) == 0
        assert "labels site=lab  tasks mlp" in capsys.readouterr().out
    finally:
        stop.set()
        await runner
