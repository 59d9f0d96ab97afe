"""examples/forecast: the GRU forecaster task, loaded by its entry point `forecast`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tandem_example_forecast import Windows, make_csv, series

from tandem import tasks
from tandem.data import Dataset
from tandem.task import Config, TrainContext


def small(data: Windows, n: int) -> Windows:
    return Windows(data.x[:n], data.y[:n])


def test_loaded_by_entry_point() -> None:
    loaded = tasks.get("forecast")
    assert loaded.version == "1.0.0"
    assert loaded.task.input.shape == (24, 1) and loaded.task.output.shape == (1,)
    assert set(loaded.specs) == {"gru.weight_ih_l0", "gru.weight_hh_l0", "gru.bias_ih_l0", "gru.bias_hh_l0",
                                 "head.weight", "head.bias"}


def test_build_is_deterministic_in_the_seed() -> None:
    loaded = tasks.get("forecast")
    first, again, other = (loaded.state_arrays(loaded.build(seed)) for seed in (3, 3, 4))
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["head.weight"], other["head.weight"])


def test_rounds_of_training_lower_the_error() -> None:
    task = tasks.get("forecast").task
    model = tasks.get("forecast").build(0)
    train, test = task.load_data("synthetic:1/3"), small(task.load_data("synthetic"), 400)
    before = task.evaluate(model, test, {})
    assert set(before) == {"mae", "rmse", "loss"}
    maes = []
    for round_ in (1, 2):
        result = task.train(model, train, {"epochs": 1}, TrainContext(round=round_, seed=round_, device="cpu"))
        assert set(result.metrics) == {"loss", "mae"} and result.num_examples == len(train) == 720 - 24
        maes.append(task.evaluate(model, test, {})["mae"])
    assert maes[-1] < 0.5 * before["mae"] and maes[-1] <= maes[0] * 1.1


@pytest.mark.parametrize(("config", "says"), [
    ({"epochs": 0}, "epochs=0 must be"), ({"learning_rate": "quick"}, "learning_rate='quick' is not a number"),
    ({"huber_delta": -1.0}, "huber_delta=-1.0 must be"), ({"batch_size": 0.5}, "batch_size=0.5 is not an integer"),
])
def test_invalid_config_is_refused_saying_why(config: Config, says: str) -> None:
    task = tasks.get("forecast").task
    data = small(task.load_data("synthetic:0/2"), 16)
    with pytest.raises(ValueError, match=says):
        task.train(tasks.get("forecast").build(0), data, config, TrainContext(round=1, seed=0, device="cpu"))


def test_config_reaches_train() -> None:
    task = tasks.get("forecast").task
    data = small(task.load_data("synthetic:0/2"), 16)
    progress: list[float] = []
    task.train(tasks.get("forecast").build(0), data, {"epochs": 2, "learning_rate": "0.001"},
               TrainContext(round=1, seed=0, device="cpu", on_progress=progress.append))
    assert progress == [0.5, 1.0]


def test_load_data_from_csv_files(tmp_path: Path) -> None:
    task = tasks.get("forecast").task
    written = make_csv.make_csv(tmp_path, sites=2, length=100)
    assert written == [tmp_path / "site-0" / "readings.csv", tmp_path / "site-1" / "readings.csv"]
    assert written[0].read_text().startswith("timestamp,value\n2024-01-01T00:00:00,")
    site = task.load_data(str(tmp_path / "site-1"))
    assert site.x.shape == (76, 24, 1) and site.y.shape == (76, 1)
    np.testing.assert_allclose(site.y[:, 0], series.synthetic(1, 2, 100)[24:], atol=1e-4)
    (tmp_path / "site-1" / "more.csv").write_text("value\n" + "\n".join(str(v) for v in range(30)) + "\n")
    both = task.load_data(str(tmp_path / "site-1"))  # windows of each file, none across them
    assert len(both) == 6 + 76 and both.y[:6, 0].tolist() == [24, 25, 26, 27, 28, 29]  # more.csv sorts first
    assert len(task.load_data(str(written[0]))) == 76
    task.check_data(both)


@pytest.mark.parametrize(("text", "says"), [
    ("timestamp,value\n2024-01-01T00:00:00,1.5\n2024-01-01T01:00:00,n/a\n", r"bad\.csv, line 3: no number in column 'value'"),
    ("timestamp,reading\n2024-01-01T00:00:00,1.5\n", "header with a 'value' column"),
    ("", "header with a 'value' column"),
    ("value\n1\ninf\n", "line 3: value inf is not finite"),
    ("value\n1\n2\n", "too short"),
])
def test_a_malformed_csv_is_one_line_saying_why(tmp_path: Path, text: str, says: str) -> None:
    (tmp_path / "bad.csv").write_text(text)
    with pytest.raises(ValueError, match=says) as raised:
        tasks.get("forecast").task.load_data(str(tmp_path))
    assert "\n" not in str(raised.value) and str(tmp_path) in str(raised.value)


def test_bad_specs_are_refused(tmp_path: Path) -> None:
    task = tasks.get("forecast").task
    for spec, says in [(str(tmp_path), "holds no .csv files"), (str(tmp_path / "nope"), "neither a CSV file"),
                       ("synthetic:x/3", "expected 'synthetic:I/N'"), ("synthetic:3/3", "need 0 <= site < sites")]:
        with pytest.raises(ValueError, match=says):
            task.load_data(spec)


def test_check_data_refuses_what_cannot_feed_the_model() -> None:
    task = tasks.get("forecast").task
    with pytest.raises(ValueError, match=r"got x \[4, 12, 1\]"):
        task.check_data(Windows(np.zeros((4, 12, 1), np.float32), np.zeros((4, 1), np.float32)))
    with pytest.raises(ValueError, match="float32"):  # a classifier's data: integer labels
        task.check_data(Windows(np.zeros((4, 24, 1), np.float32), np.zeros((4, 1), np.int64)))
    with pytest.raises(ValueError, match=r"y \[4\]"):
        task.check_data(Dataset(np.zeros((4, 24, 1), np.float32), np.zeros(4, np.int64)))


def test_make_csv_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    make_csv.main([str(tmp_path), "--sites", "3", "--length", "48"])
    assert capsys.readouterr().out.split() == [str(tmp_path / f"site-{i}" / "readings.csv") for i in range(3)]
    assert len(tasks.get("forecast").task.load_data(str(tmp_path / "site-2"))) == 24


def test_the_forecast_follows_level_and_scale() -> None:
    """The model normalises each window: shifting and scaling the input does the same to its output."""
    model = tasks.get("forecast").build(0).eval()
    x = torch.rand(3, 24, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x * 100 + 50), model(x) * 100 + 50, rtol=1e-3, atol=1e-2)
