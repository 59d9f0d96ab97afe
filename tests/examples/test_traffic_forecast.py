"""examples/traffic: the speed forecaster task (windows of road-segment readings, the
task, and the offline comparison of training regimes), on synthetic readings files of
the format the SUMO side writes. The task is named `PACKAGE.MODULE:ATTRIBUTE` here, so
these tests need the example importable, not installed (its entry point is
`traffic-speed`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.fx
from tandem_example_traffic import compare as comparison
from tandem_example_traffic.task import SpeedTask, scores
from tandem_example_traffic.windows import (
    FEATURES,
    FLOW_SCALE,
    HORIZONS,
    WINDOW,
    Readings,
    Windows,
    horizon_names,
    latest,
    window_features,
)

from tandem import split, staged, tasks
from tandem.task import Config, TrainContext

NAME = "tandem_example_traffic.task:SpeedTask"
SERIES = ("speed", "occupancy", "flow")


def synthetic(edges: int = 12, days: int = 5, intervals: int = 96, seed: int = 0, interval: float = 60.0,
              district: int = -1) -> dict[str, Any]:
    """Readings of a synthetic city ([days, intervals, edges]): each segment's congestion
    follows a morning and an evening peak (scaled by the segment's sensitivity and the
    day's demand) plus a slowly drifting disturbance; speed falls with congestion below
    the segment's limit, with measurement noise; occupancy and flow follow congestion."""
    rng = np.random.default_rng(seed)
    t = np.arange(intervals) / intervals
    profile = np.exp(-(((t - 0.3) / 0.08) ** 2)) + 0.8 * np.exp(-(((t - 0.7) / 0.1) ** 2))
    free_speed = rng.choice([8.33, 13.89, 19.44], size=edges).astype(np.float32)
    sensitivity = rng.uniform(0.3, 0.9, size=edges)
    demand = 1 + 0.1 * rng.standard_normal((days, 1, 1))
    drift = np.zeros((days, intervals, edges))
    for i in range(1, intervals):
        drift[:, i] = 0.9 * drift[:, i - 1] + 0.04 * rng.standard_normal((days, edges))
    congestion = np.clip(sensitivity * demand * profile[None, :, None] + drift, 0, 1)
    speed = free_speed * (1 - 0.75 * congestion) * (1 + 0.05 * rng.standard_normal(congestion.shape))
    occupancy = 100 * np.clip(0.03 + 0.5 * congestion + 0.02 * rng.standard_normal(congestion.shape), 0, 1)
    flow = np.clip(96 * congestion * (1 - congestion) + 2 * rng.standard_normal(congestion.shape), 0, None)
    return {"speed": np.clip(speed, 0, None).astype(np.float32), "occupancy": occupancy.astype(np.float32),
            "flow": flow.astype(np.float32), "free_speed": free_speed,
            "edges": np.array([f"edge-{i}" for i in range(edges)]), "interval": np.float64(interval),
            "district": np.int64(district)}


def part(arrays: dict[str, Any], days: slice = slice(None), edges: slice = slice(None),
         district: int = -1) -> dict[str, Any]:
    """Some days and edges of a city's readings, as one district's file holds them."""
    found = {key: arrays[key][days, :, edges] for key in SERIES}
    return {**arrays, **found, "free_speed": arrays["free_speed"][edges], "edges": arrays["edges"][edges],
            "district": np.int64(district)}


def write(path: Path, arrays: dict[str, Any]) -> Path:
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def city(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two districts of 6 segments each: 4 training days and a held-out fifth, laid out
    as the SUMO side writes them (district-I.npz, district-I-test.npz, all.npz, all-test.npz)."""
    directory = tmp_path_factory.mktemp("city")
    arrays = synthetic(edges=12, days=5)
    train, test = slice(0, 4), slice(4, 5)
    for district, edges in enumerate((slice(0, 6), slice(6, 12))):
        write(directory / f"district-{district}.npz", part(arrays, train, edges, district))
        write(directory / f"district-{district}-test.npz", part(arrays, test, edges, district))
    write(directory / "all.npz", part(arrays, train))
    write(directory / "all-test.npz", part(arrays, test))
    return directory


# -- windows


def test_windows_are_normalised_histories_and_the_speeds_ahead(tmp_path: Path) -> None:
    arrays = synthetic(edges=3, days=2, intervals=40)
    readings = Readings.load(write(tmp_path / "r.npz", arrays))
    data = Windows.of(readings)
    per_day = 40 - WINDOW - max(HORIZONS) + 1
    assert len(data) == 2 * per_day * 3 and data.interval == 60.0
    assert data.x.shape == (len(data), WINDOW, len(FEATURES)) and data.y.shape == (len(data), 3)
    assert data.x.dtype == data.y.dtype == data.free_speed.dtype == np.float32
    free = arrays["free_speed"]
    for day, t, edge in [(0, WINDOW - 1, 0), (1, 17, 2), (1, 40 - 1 - max(HORIZONS), 1)]:
        i = (day * per_day + t - (WINDOW - 1)) * 3 + edge  # ordered by day, time, edge
        rows = slice(t - WINDOW + 1, t + 1)
        np.testing.assert_allclose(data.x[i, :, 0], arrays["speed"][day, rows, edge] / free[edge], rtol=1e-6)
        np.testing.assert_allclose(data.x[i, :, 1], arrays["occupancy"][day, rows, edge] / 100, rtol=1e-6)
        np.testing.assert_allclose(data.x[i, :, 2], arrays["flow"][day, rows, edge] / FLOW_SCALE, rtol=1e-6)
        angle = 2 * np.pi * np.arange(t - WINDOW + 1, t + 1) / 40
        np.testing.assert_allclose(data.x[i, :, 3], np.sin(angle), atol=1e-6)
        np.testing.assert_allclose(data.x[i, :, 4], np.cos(angle), atol=1e-6)
        ahead = [arrays["speed"][day, t + h, edge] / free[edge] for h in HORIZONS]
        np.testing.assert_allclose(data.y[i], ahead, rtol=1e-6)
        assert data.free_speed[i] == free[edge]


def test_latest_is_what_inference_is_sent_for_every_edge() -> None:
    readings = Readings.of(synthetic(edges=4, days=2, intervals=40))
    data = Windows.of(readings)
    per_day = 40 - WINDOW - max(HORIZONS) + 1
    x = latest(readings, 1, 20)
    assert x.shape == (4, WINDOW, len(FEATURES)) and x.dtype == np.float32
    first = (per_day + 20 - (WINDOW - 1)) * 4
    np.testing.assert_array_equal(x, data.x[first:first + 4])
    rows = slice(20 - WINDOW + 1, 21)  # a road-side unit's last WINDOW readings
    np.testing.assert_array_equal(x, window_features(readings.speed[1, rows], readings.occupancy[1, rows],
                                                     readings.flow[1, rows], readings.free_speed, 20, 40))
    assert latest(readings, 0, 39).shape == (4, WINDOW, len(FEATURES))  # the day's last interval has no target
    for day, t in [(0, WINDOW - 2), (2, 20), (0, 40)]:
        with pytest.raises(IndexError, match="a full window of history"):
            latest(readings, day, t)


def test_horizons_are_named_by_minutes_of_the_interval() -> None:
    assert horizon_names(60) == ("1min", "5min", "10min")
    assert horizon_names(30) == ("30s", "150s", "5min")
    assert horizon_names(120.0) == ("2min", "10min", "20min")


def test_readings_save_and_load_round_trip(tmp_path: Path) -> None:
    readings = Readings.of(synthetic(edges=2, days=1, intervals=30, interval=30, district=3))
    readings.save(tmp_path / "r.npz")
    again = Readings.load(tmp_path / "r.npz")
    assert (again.interval, again.district, again.edges.tolist()) == (30.0, 3, ["edge-0", "edge-1"])
    np.testing.assert_array_equal(again.speed, readings.speed)
    arrays = synthetic(edges=2, days=1, intervals=30)
    del arrays["interval"], arrays["district"]
    defaults = Readings.load(write(tmp_path / "plain.npz", arrays))
    assert (defaults.interval, defaults.district) == (60.0, -1)


# -- the task


def test_loaded_by_name_with_its_signatures() -> None:
    loaded = tasks.get(NAME)
    assert isinstance(loaded.task, SpeedTask) and loaded.version == "1.0.0"
    assert loaded.task.input.shape == (WINDOW, len(FEATURES)) == (10, 5) and loaded.task.output.shape == (3,)
    assert set(loaded.specs) == {"encoder.1.weight", "encoder.1.bias", "hidden.0.weight", "hidden.0.bias",
                                 "head.weight", "head.bias"}
    assert loaded.local_keys == []


def test_build_is_deterministic_in_the_seed() -> None:
    loaded = tasks.get(NAME)
    first, again, other = (loaded.state_arrays(loaded.build(seed)) for seed in (3, 3, 4))
    assert all(np.array_equal(first[k], again[k]) for k in first)
    assert not np.array_equal(first["head.weight"], other["head.weight"])


def test_the_model_splits_at_its_stages() -> None:
    """The three stages of its Sequential are Tandem's split points; traced and staged,
    the pieces reproduce the whole model."""
    loaded = tasks.get(NAME)
    model = loaded.build(0).eval()
    x = torch.rand(200, WINDOW, len(FEATURES))
    traced = torch.fx.symbolic_trace(model)
    assert torch.equal(traced(x), model(x))
    plan = split.find(loaded.task, loaded.build(0))
    assert plan.note == "" and plan.dropped == () and len(plan.points) == 2
    layout = staged.layout(NAME)
    assert [s.output_shape for s in layout.stages] == [(128,), (64,), (3,)]
    arrays = loaded.state_arrays(loaded.build(seed=5))
    served = staged.StagedModel(NAME, 1, "", arrays)
    whole = loaded.build(0)
    loaded.load_arrays(whole, arrays)
    with torch.inference_mode():
        expected = whole.eval()(x).numpy()
    np.testing.assert_allclose(served.run(x.numpy()), expected, rtol=1e-5, atol=1e-6)
    for k in range(1, served.num_stages):
        np.testing.assert_allclose(served.run(served.run(x.numpy(), 0, k), k), expected, rtol=1e-5, atol=1e-6)


def test_training_beats_the_naive_forecasts(city: Path) -> None:
    """On the held-out day the trained model beats the speed-persists forecast at every
    horizon (it sees through the measurement noise at 1 minute, and the daily peaks
    further ahead). The historical average, which knows each segment's daily profile,
    is beaten at 1 minute only: 10 minutes ahead, on these regular synthetic days, it is
    better than the model (2.8 against 3.3 km/h)."""
    loaded = tasks.get(NAME)
    task = loaded.task
    train, test = task.load_data(str(city / "all.npz")), task.load_data(str(city / "all-test.npz"))
    assert isinstance(train, Windows) and isinstance(test, Windows)
    model = loaded.build(0)
    before = task.evaluate(model, test, {})
    progress: list[float] = []
    result = task.train(model, train, {"epochs": 4, "batch_size": 64}, TrainContext(round=1, seed=1, device="cpu",
                                                                  on_progress=progress.append))
    assert set(result.metrics) == {"loss", "mae"} and result.num_examples == len(train) == 4 * 77 * 12
    assert progress == [0.25, 0.5, 0.75, 1.0]
    after = task.evaluate(model, test, {})
    assert 0.5 < result.metrics["mae"] / task.evaluate(model, train, {})["mae"] < 2  # km/h, as evaluate's
    naive = scores(comparison.last_value(test), test, 0.1)
    average = scores(comparison.historical_average(Readings.load(city / "all.npz"), Readings.load(city / "all-test.npz")),
                     test, 0.1)
    assert after["mae"] < 0.5 * before["mae"]
    assert all(after[key] < naive[key] for key in ("mae", "mae_1min", "mae_5min", "mae_10min"))
    assert after["mae_1min"] < average["mae_1min"] and average["mae_10min"] < after["mae_10min"]


def test_evaluate_reports_km_per_hour_overall_and_per_horizon(tmp_path: Path) -> None:
    task = tasks.get(NAME).task
    data = task.load_data(str(write(tmp_path / "r.npz", synthetic(edges=3, days=1, intervals=40))))
    metrics = task.evaluate(tasks.get(NAME).build(0), data, {})
    assert set(metrics) == {"mae", "rmse", "loss", "mae_1min", "mae_5min", "mae_10min",
                            "rmse_1min", "rmse_5min", "rmse_10min"}
    off = scores(data.y + np.array([0.1, 0.0, -0.2], np.float32), data, 0.1)  # ratio errors -> km/h
    speed_limit = float(data.free_speed.mean()) * 3.6
    assert off["mae_1min"] == pytest.approx(0.1 * speed_limit, rel=1e-5) and off["mae_5min"] == 0
    assert off["mae_10min"] == pytest.approx(0.2 * speed_limit, rel=1e-5)
    assert off["rmse_10min"] == pytest.approx(0.2 * 3.6 * float(np.sqrt((data.free_speed.astype(float) ** 2).mean())))
    assert off["mae"] == pytest.approx(0.1 * speed_limit, rel=1e-5)
    half = task.load_data(str(write(tmp_path / "r.npz", synthetic(edges=3, days=1, intervals=40, interval=30))))
    assert {"mae_30s", "mae_150s", "mae_5min"} <= set(task.evaluate(tasks.get(NAME).build(0), half, {}))


def test_fedprox_keeps_the_update_near_the_round_s_start(city: Path) -> None:
    """Two districts, one round of FedAvg through the state arrays Tandem moves; `mu`
    pulls each update towards the round's starting point."""
    loaded = tasks.get(NAME)
    start = loaded.state_arrays(loaded.build(0))
    anchor = {k: torch.from_numpy(v) for k, v in start.items()}
    distances = []
    for mu in (0.0, 1.0):
        updates = []
        for district in range(2):
            model = loaded.build(0)
            data = loaded.task.load_data(str(city / f"district-{district}.npz"))
            result = loaded.task.train(model, data, {"epochs": 1, "mu": mu},
                                       TrainContext(round=1, seed=district, device="cpu", global_state=anchor))
            updates.append((loaded.state_arrays(model), result.num_examples))
        total = sum(n for _, n in updates)
        averaged = {k: sum(s[k] * (n / total) for s, n in updates) for k in start}
        distances.append(sum(float(np.sum((averaged[k] - start[k]) ** 2)) for k in start))
    assert 0 < distances[1] < distances[0]


@pytest.mark.parametrize(("config", "says"), [
    ({"epochs": 0}, "epochs=0 must be"), ({"learning_rate": "quick"}, "learning_rate='quick' is not a number"),
    ({"huber_delta": -1.0}, "huber_delta=-1.0 must be"), ({"batch_size": 0.5}, "batch_size=0.5 is not an integer"),
    ({"mu": -0.1}, "mu=-0.1 must be a finite number >= 0"),
])
def test_invalid_config_is_refused_saying_why(tmp_path: Path, config: Config, says: str) -> None:
    task = tasks.get(NAME).task
    data = task.load_data(str(write(tmp_path / "r.npz", synthetic(edges=2, days=1, intervals=24))))
    with pytest.raises(ValueError, match=says):
        task.train(tasks.get(NAME).build(0), data, config, TrainContext(round=1, seed=0, device="cpu"))


def test_load_data_reads_a_file_or_a_directory(tmp_path: Path) -> None:
    task = tasks.get(NAME).task
    write(tmp_path / "a.npz", synthetic(edges=2, days=1, intervals=30, seed=1))
    write(tmp_path / "b.npz", synthetic(edges=3, days=2, intervals=25, seed=2))
    both = task.load_data(str(tmp_path))
    assert len(both) == 2 * 11 + 3 * 2 * 6  # windows of each file, none across files or days
    assert len(task.load_data(str(tmp_path / "b.npz"))) == 36
    task.check_data(both)


def bad(arrays: dict[str, Any], **changes: Any) -> dict[str, Any]:
    found = {**arrays, **changes}
    return {key: value for key, value in found.items() if value is not None}


_GOOD = synthetic(edges=2, days=1, intervals=24)


@pytest.mark.parametrize(("arrays", "says"), [
    (bad(_GOOD, flow=None), r"missing arrays \['flow'\]"),
    (bad(_GOOD, occupancy=_GOOD["occupancy"][0]), r"occupancy must be \[days, intervals, edges\]"),
    (bad(_GOOD, speed=np.where(np.eye(24, 2, dtype=bool)[None], np.nan, _GOOD["speed"])),
     "speed has 2 values that are NaN or infinite"),
    (bad(_GOOD, flow=-_GOOD["flow"] - 1), "flow has 48 negative values"),
    (bad(_GOOD, free_speed=np.array([13.9, 0.0], np.float32)), "free_speed must be finite and > 0"),
    (bad(_GOOD, edges=np.array([1, 2])), "edges must be strings"),
    (bad(_GOOD, edges=np.array(["a", "b"], dtype=object)), "object array"),
    (bad(_GOOD, interval=np.float64(-60)), "interval must be a number of seconds > 0"),
    (bad(_GOOD, speed=_GOOD["speed"][:, :15], occupancy=_GOOD["occupancy"][:, :15], flow=_GOOD["flow"][:, :15]),
     "days of 15 intervals are too short: an example needs 20"),
])
def test_a_malformed_file_is_one_line_saying_why(tmp_path: Path, arrays: dict[str, Any], says: str) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=says) as raised:
        tasks.get(NAME).task.load_data(str(tmp_path / "bad.npz"))
    assert "\n" not in str(raised.value) and "bad.npz" in str(raised.value)


def test_missing_data_and_other_files_are_one_line(tmp_path: Path) -> None:
    task = tasks.get(NAME).task
    (tmp_path / "notes.txt").write_text("not readings")
    (tmp_path / "fake.npz").write_text("not a zip file")
    for spec, says in [(tmp_path / "nope.npz", "neither an .npz file"), (tmp_path / "notes.txt", "not a readable .npz"),
                       (tmp_path / "fake.npz", "not a readable .npz"), (tmp_path, "not a readable .npz")]:
        with pytest.raises(ValueError, match=says) as raised:
            task.load_data(str(spec))
        assert "\n" not in str(raised.value)
    (tmp_path / "fake.npz").unlink()
    with pytest.raises(ValueError, match="holds no .npz files"):
        task.load_data(str(tmp_path))
    write(tmp_path / "a.npz", synthetic(edges=2, days=1, intervals=24))
    write(tmp_path / "b.npz", synthetic(edges=2, days=1, intervals=24, interval=30))
    with pytest.raises(ValueError, match=r"different intervals \[30.0, 60.0\]"):
        task.load_data(str(tmp_path))


def test_check_data_refuses_what_cannot_feed_the_model() -> None:
    task = tasks.get(NAME).task
    x, y, free = np.zeros((4, WINDOW, 5), np.float32), np.zeros((4, 3), np.float32), np.ones(4, np.float32)
    task.check_data(Windows(x, y, free))
    with pytest.raises(ValueError, match=r"got x \[4, 10, 1\]"):
        task.check_data(Windows(x[..., :1], y, free))
    with pytest.raises(ValueError, match="float32"):
        task.check_data(Windows(x, y.astype(np.float64), free))
    with pytest.raises(ValueError, match="arrays x, y and free_speed"):
        task.check_data(object())
    with pytest.raises(ValueError, match="no windows"):
        task.check_data(Windows(x[:0], y[:0], free[:0]))


# -- the comparison of training regimes


def test_compare_scores_every_regime_per_horizon_and_is_deterministic(city: Path) -> None:
    files = comparison.files_in(city)
    assert [p.name for p in files[0]] == ["district-0.npz", "district-1.npz"]
    assert [p.name for p in files[1]] == ["district-0-test.npz", "district-1-test.npz"]
    # The federated weights given: the central model's, trained apart; scored the same way, the same figures.
    central = comparison.train_central(Windows.of(Readings.load(city / "all.npz")), seed=0, epochs=2)
    weights = tasks.get(NAME).state_arrays(central)
    result = comparison.compare(*files, weights, seed=0, epochs=2)
    regimes = result["regimes"]
    assert list(regimes) == ["last_value", "historical_average", "local", "central", "federated"]
    names = {"mae", "rmse", "loss", "mae_1min", "mae_5min", "mae_10min", "rmse_1min", "rmse_5min", "rmse_10min"}
    for regime in regimes.values():
        assert names <= set(regime) and regime["examples"] == 2 * 77 * 6
        assert set(regime["districts"]) == {"district-0", "district-1"}
        assert all(np.isfinite(regime[key]) and regime[key] >= 0 for key in names)
        districts = [regime["districts"][d]["mae_5min"] for d in ("district-0", "district-1")]
        assert regime["mae_5min"] == pytest.approx(sum(districts) / 2)  # districts of equal size
    assert "all" not in regimes["local"] and names <= set(regimes["central"]["all"])
    assert regimes["federated"] == regimes["central"]
    assert regimes["central"]["all"]["mae"] == pytest.approx(regimes["central"]["mae"])  # all = the districts' union
    assert result["train_examples"] == {"district-0": 4 * 77 * 6, "district-1": 4 * 77 * 6, "all": 4 * 77 * 12}
    last = regimes["last_value"]
    assert last["mae_1min"] < last["mae_5min"] < last["mae_10min"]  # the speed now says less the further ahead
    again = comparison.compare(*files, None, seed=0, epochs=2)
    assert "federated" not in again["regimes"]
    assert again["regimes"]["local"] == regimes["local"] and again["regimes"]["central"] == regimes["central"]
    other = comparison.compare(*files, None, seed=1, epochs=2)["regimes"]
    assert other["local"]["mae"] != regimes["local"]["mae"] and other["last_value"] == regimes["last_value"]


def test_historical_average_is_the_mean_of_the_training_days() -> None:
    arrays = synthetic(edges=3, days=3, intervals=30)
    train, test = Readings.of(part(arrays, slice(0, 2))), Readings.of(part(arrays, slice(2, 3), slice(2, 0, -1)))
    forecast = comparison.historical_average(train, test)
    data = Windows.of(test)
    assert forecast.shape == data.y.shape
    ratio = arrays["speed"] / arrays["free_speed"]
    t, k = 15, 2  # the example at t = 15 of test edge 1 (edge-1), the 10-interval horizon
    assert forecast[(t - (WINDOW - 1)) * 2 + 1, k] == pytest.approx(ratio[:2, t + HORIZONS[k], 1].mean())
    one_day = Readings.of(part(arrays, slice(2, 3)))
    assert scores(comparison.historical_average(one_day, one_day), Windows.of(one_day), 0.1)["mae"] == 0
    with pytest.raises(ValueError, match="no training readings"):
        comparison.historical_average(Readings.of(part(arrays, slice(0, 2), slice(0, 1))), one_day)


def test_compare_command_prints_the_table_and_writes_json(city: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    weights = tasks.get(NAME).state_arrays(tasks.get(NAME).build(0))
    write(tmp_path / "w.npz", dict(weights))
    assert comparison.main([str(city), "--epochs", "1", "--federated", str(tmp_path / "w.npz"),
                            "--out", str(tmp_path / "r.json")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["regime", "mae", "mae_1min", "mae_5min", "mae_10min", "examples"]
    assert [line.split()[0] for line in lines[1:]] == list(comparison.REGIMES)
    assert set(json.loads((tmp_path / "r.json").read_text())["regimes"]) == set(comparison.REGIMES)
    assert comparison.main([str(tmp_path)]) == 2
    assert "needs district-I.npz files" in capsys.readouterr().err
