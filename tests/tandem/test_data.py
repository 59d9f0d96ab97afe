"""Datasets, the Dirichlet partition and the model zoo."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from torch import nn

from tandem.data import (
    Dataset,
    digits_split,
    dirichlet_partition,
    eval_dataset,
    load_data,
    partition_index,
)
from tandem.zoo import build_model, get_entry, model_names


def _check_partition(parts: list[np.ndarray], n: int, min_size: int) -> None:
    joined = np.concatenate(parts)
    assert joined.shape[0] == n, "indices overlap or are missing"
    assert np.array_equal(np.sort(joined), np.arange(n))
    assert all(p.shape[0] >= min_size for p in parts)
    assert all(np.array_equal(p, np.sort(p)) for p in parts)


def test_digits_split_matches_reference_workload() -> None:
    train, test = digits_split()
    assert (len(train), len(test)) == (1347, 450)
    assert train.x.dtype == np.float32 and train.x.shape == (1347, 64)
    assert train.y.dtype == np.int64 and test.y.dtype == np.int64
    assert 0.0 <= train.x.min() and train.x.max() <= 1.0
    assert digits_split() is digits_split()  # cached
    assert eval_dataset("digits") is test


@pytest.mark.parametrize("num_clients", [4, 8, 16])
def test_partition_of_digits(num_clients: int) -> None:
    labels = digits_split()[0].y
    parts = dirichlet_partition(labels, num_clients)
    assert len(parts) == num_clients
    _check_partition(parts, labels.shape[0], 10)
    again = dirichlet_partition(labels, num_clients)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_partition_is_label_skewed() -> None:
    labels = digits_split()[0].y
    parts = dirichlet_partition(labels, 4)
    histograms = np.stack([np.bincount(labels[p], minlength=10) / len(p) for p in parts])
    # IID clients would have near-identical histograms; Dir(0.5) gives visibly different ones.
    assert np.abs(histograms - histograms.mean(axis=0)).max() > 0.1


def test_partition_redraws_with_next_seed() -> None:
    labels = np.repeat(np.arange(10), 20)
    sizes = [
        min(p.shape[0] for p in dirichlet_partition(labels, 5, alpha=0.1, seed=s, min_size=0))
        for s in range(50)
    ]
    bad = next(s for s, m in enumerate(sizes) if m < 10)
    good = next(s for s in range(bad, 50) if sizes[s] >= 10)
    assert good > bad
    parts = dirichlet_partition(labels, 5, alpha=0.1, seed=bad)
    expected = dirichlet_partition(labels, 5, alpha=0.1, seed=good, min_size=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, expected, strict=True))
    _check_partition(parts, labels.shape[0], 10)


def test_partition_rejects_impossible_requests() -> None:
    labels = np.repeat(np.arange(10), 5)
    with pytest.raises(ValueError):
        dirichlet_partition(labels, 6)  # 6 * 10 > 50
    with pytest.raises(ValueError):
        dirichlet_partition(labels, 0)
    with pytest.raises(ValueError):
        dirichlet_partition(labels, 2, alpha=0.0)


def test_load_digits_partitions() -> None:
    train = digits_split()[0]
    parts = [load_data(f"digits:{i}/4") for i in range(4)]
    assert sum(len(p) for p in parts) == len(train)
    idx = dirichlet_partition(train.y, 4)[2]
    assert np.array_equal(parts[2].x, train.x[idx])
    assert np.array_equal(parts[2].y, train.y[idx])
    assert parts[2].x.dtype == np.float32 and parts[2].y.dtype == np.int64
    assert [partition_index(f"digits:{i}/4") for i in range(4)] == [0, 1, 2, 3]


def test_load_directory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x1, y1 = rng.random((5, 3)), rng.integers(0, 3, 5).astype(np.int32)
    x2, y2 = rng.random((4, 3)).astype(np.float32), rng.integers(0, 3, 4)
    x3, y3 = rng.random((2, 3)), rng.integers(0, 3, 2)
    np.savez(tmp_path / "b.npz", x=x1, y=y1)
    save_file({"x": x2, "y": y2}, str(tmp_path / "a.safetensors"))
    np.savez(tmp_path / "c.npz", x=x3, y=y3)
    (tmp_path / "notes.txt").write_text("ignored")
    data = load_data(str(tmp_path))
    assert data.x.dtype == np.float32 and data.y.dtype == np.int64
    assert np.allclose(data.x, np.concatenate([x2, x1, x3]))
    assert np.array_equal(data.y, np.concatenate([y2, y1, y3]))
    assert len(data) == 11
    assert partition_index(str(tmp_path)) == 0


@pytest.mark.parametrize(
    "spec",
    ["", "digits", "digits:", "digits:4/4", "digits:-1/4", "digits:0/0", "digits:a/b",
     "digits:1/4/5", "digits:0/1000", "/nonexistent/tandem-data"],
)
def test_bad_specs(spec: str) -> None:
    with pytest.raises(ValueError):
        load_data(spec)


def _bad_dir(tmp_path: Path, case: str) -> Path:
    if case == "empty":
        (tmp_path / "notes.txt").write_text("no data")
    elif case == "missing_y":
        np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)))
    elif case == "x_1d":
        np.savez(tmp_path / "d.npz", x=np.zeros(3), y=np.zeros(3, np.int64))
    elif case == "y_len":
        np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.zeros(2, np.int64))
    elif case == "y_float":
        np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.zeros(3))
    elif case == "features":
        np.savez(tmp_path / "a.npz", x=np.zeros((3, 2)), y=np.zeros(3, np.int64))
        np.savez(tmp_path / "b.npz", x=np.zeros((3, 4)), y=np.zeros(3, np.int64))
    elif case == "pickled":
        np.savez(tmp_path / "d.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
    elif case == "corrupt":
        (tmp_path / "d.safetensors").write_bytes(b"not a safetensors file")
    elif case == "file":
        np.savez(tmp_path / "d.npz", x=np.zeros((3, 2)), y=np.zeros(3, np.int64))
        return tmp_path / "d.npz"
    return tmp_path


@pytest.mark.parametrize(
    "case",
    ["empty", "missing_y", "x_1d", "y_len", "y_float", "features", "pickled", "corrupt", "file"],
)
def test_bad_directories(tmp_path: Path, case: str) -> None:
    with pytest.raises(ValueError):
        load_data(str(_bad_dir(tmp_path, case)))


def test_eval_dataset_unknown_name() -> None:
    with pytest.raises(ValueError, match="digits"):
        eval_dataset("mnist")


def test_dataset_len() -> None:
    assert len(Dataset(np.zeros((3, 2), np.float32), np.zeros(3, np.int64))) == 3


def test_mlp_weights_equal_plain_reference() -> None:
    torch.manual_seed(0)
    reference = nn.Sequential(
        nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )
    model = build_model("mlp", seed=0)
    ours = list(model.parameters())
    theirs = list(reference.parameters())
    assert len(ours) == len(theirs) == 6
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    x = torch.rand(7, 64)
    assert torch.equal(model(x), reference(x))


def test_mlp_is_split_into_stages() -> None:
    model = build_model("mlp")
    assert len(model) == 3
    x = torch.rand(2, 64)
    h = x
    for stage in model:
        h = stage(h)
    assert h.shape == (2, 10)
    entry = get_entry("mlp")
    assert (entry.input_shape, entry.num_classes) == ((64,), 10)
    assert "mlp" in model_names()


def test_build_model_is_deterministic_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(5)
    torch.manual_seed(123)
    a = build_model("mlp", seed=7)
    assert torch.equal(torch.rand(5), expected)
    b = build_model("mlp", seed=7)
    c = build_model("mlp", seed=8)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(next(a.parameters()), next(c.parameters()))


def test_unknown_model() -> None:
    with pytest.raises(KeyError, match="mlp"):
        build_model("no-such-model")  # (resnet is examples/resnet, installed by make install)
