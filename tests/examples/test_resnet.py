"""examples/resnet: the residual CNN task, loaded by its entry point `resnet`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.fx

from tandem import tasks
from tandem.data import Dataset
from tandem.task import Config, TrainContext


def small(data: Dataset, n: int) -> Dataset:
    return Dataset(data.x[:n], data.y[:n])


def test_loaded_by_entry_point() -> None:
    loaded = tasks.get("resnet")
    assert "resnet" in tasks.names()
    assert loaded.version == "1.0.0" and loaded.task.input.shape == (1, 8, 8) and loaded.task.output.shape == (10,)


def test_build_is_deterministic_in_the_seed() -> None:
    loaded = tasks.get("resnet")
    first, again, other = loaded.build(1), loaded.build(1), loaded.build(2)
    for key, tensor in first.state_dict().items():
        assert torch.equal(tensor, again.state_dict()[key])
    assert not torch.equal(first.state_dict()["stem.weight"], other.state_dict()["stem.weight"])


def test_batch_norm_statistics_are_federated_and_its_counters_are_not() -> None:
    loaded = tasks.get("resnet")
    assert {"block1.bn1.running_mean", "block1.bn1.running_var", "head.0.running_mean"} <= set(loaded.specs)
    assert not [key for key in loaded.specs if key.endswith("num_batches_tracked")]
    assert "block1.bn1.num_batches_tracked" in loaded.local_keys


def test_federated_rounds_raise_accuracy() -> None:
    """Two agents, two rounds of FedAvg through the state arrays Tandem moves."""
    loaded = tasks.get("resnet")
    task = loaded.task
    parts = [task.load_data(f"digits:{i}/2") for i in range(2)]
    test = small(task.load_data("digits"), 300)
    model = loaded.build(0)
    before = task.evaluate(model, test, {})["accuracy"]
    for round_ in (1, 2):
        start = loaded.state_arrays(model)
        updates = []
        for index, part in enumerate(parts):
            local = loaded.build(0)
            loaded.load_arrays(local, start)
            context = TrainContext(round=round_, seed=round_ * 1000 + index, device="cpu",
                                   global_state={k: torch.from_numpy(v) for k, v in start.items()})
            result = task.train(local, part, {"epochs": 1}, context)
            assert set(result.metrics) == {"loss", "accuracy"} and result.num_examples == len(part)
            updates.append((loaded.state_arrays(local), result.num_examples))
        total = sum(n for _, n in updates)
        loaded.load_arrays(model, {k: sum(s[k] * (n / total) for s, n in updates) for k in loaded.specs})
    after = task.evaluate(model, test, {})
    assert before < 0.2 and after["accuracy"] > 0.6 and np.isfinite(after["loss"])


def test_config_reaches_train() -> None:
    loaded = tasks.get("resnet")
    data = small(loaded.task.load_data("digits:0/4"), 40)
    progress: list[float] = []
    context = TrainContext(round=1, seed=0, device="cpu", on_progress=progress.append)
    loaded.task.train(loaded.build(0), data, {"epochs": 3, "batch_size": "16", "learning_rate": 0.001, "mu": 0.1}, context)
    assert progress == pytest.approx([1 / 3, 2 / 3, 1.0])


@pytest.mark.parametrize(("config", "says"), [
    ({"epochs": 0}, "epochs=0 must be"), ({"epochs": 1.5}, "epochs=1.5 is not an integer"),
    ({"learning_rate": "fast"}, "learning_rate='fast' is not a number"),
    ({"learning_rate": float("nan")}, "learning_rate=nan must be"),
    ({"batch_size": True}, "batch_size=True is not an integer"), ({"weight_decay": -1}, "weight_decay=-1 must be"),
])
def test_invalid_config_is_refused_saying_why(config: Config, says: str) -> None:
    loaded = tasks.get("resnet")
    data = small(loaded.task.load_data("digits:0/4"), 8)
    with pytest.raises(ValueError, match=says):
        loaded.task.train(loaded.build(0), data, config, TrainContext(round=1, seed=0, device="cpu"))


def test_load_data_from_a_directory_of_npz_files(tmp_path: Path) -> None:
    task = tasks.get("resnet").task
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "a.npz", x=rng.random((5, 64), dtype=np.float32), y=np.arange(5))
    np.savez(tmp_path / "b.npz", x=rng.random((3, 64), dtype=np.float32), y=np.arange(3))
    data = task.load_data(str(tmp_path))
    assert data.x.shape == (8, 1, 8, 8) and data.y.tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    task.check_data(data)
    (tmp_path / "a.npz").unlink()
    (tmp_path / "b.npz").unlink()
    np.savez(tmp_path / "c.npz", x=np.zeros((2, 10), np.float32), y=np.zeros(2, np.int64))
    with pytest.raises(ValueError, match="examples have 10 values"):
        task.load_data(str(tmp_path))


def test_check_data_refuses_what_cannot_feed_the_model() -> None:
    task = tasks.get("resnet").task
    with pytest.raises(ValueError, match=r"shape \[64\]"):
        task.check_data(Dataset(np.zeros((2, 64), np.float32), np.zeros(2, np.int64)))
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        task.check_data(Dataset(np.zeros((2, 1, 8, 8), np.float32), np.array([0, 10])))
    with pytest.raises(ValueError, match="integers"):
        task.check_data(Dataset(np.zeros((2, 1, 8, 8), np.float32), np.zeros(2, np.float32)))


def test_the_model_traces_with_torch_fx() -> None:
    """Split points come from tracing: a plain forward that torch.fx follows."""
    model = tasks.get("resnet").build(0).eval()
    traced = torch.fx.symbolic_trace(model)
    x = torch.rand(4, 1, 8, 8)
    assert torch.equal(traced(x), model(x))
    assert [n.name for n in traced.graph.nodes if n.op == "call_function" and "add" in n.name] == ["add", "add_1", "add_2"]


def test_split_points_are_the_block_boundaries() -> None:
    """Tracing offers the stem's and each block's end (and the head's layers), nothing inside a block."""
    split = pytest.importorskip("tandem.split")
    loaded = tasks.get("resnet")
    plan = split.find(loaded.task, loaded.build(0).eval())
    assert plan.points[:4] == ("stem", "add", "add_1", "add_2") and all(p.startswith("head") for p in plan.points[4:])
    assert plan.names[:4] == ("Conv2d", "Block", "Block", "Block")
