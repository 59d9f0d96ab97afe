"""Local training, evaluation, state conversion and the FedAvg reference simulation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tandem.data import Dataset, eval_dataset, load_data
from tandem.simulation import simulate_fedavg
from tandem.training import (
    evaluate,
    load_state_arrays,
    shuffle_seed,
    state_arrays,
    train_local,
)
from tandem.zoo import build_model


def test_shuffle_seed() -> None:
    assert shuffle_seed(3, 7) == 3007
    assert shuffle_seed(1, 0) != shuffle_seed(0, 1)


def test_train_local_lowers_loss_and_is_deterministic() -> None:
    data = load_data("digits:0/4")
    model = build_model("mlp")
    _, before = evaluate(model, data)
    mean_loss = train_local(model, data, epochs=2, batch_size=32, lr=0.1, seed=5)
    _, after = evaluate(model, data)
    assert after < before and np.isfinite(mean_loss)
    again = build_model("mlp")
    assert train_local(again, data, epochs=2, batch_size=32, lr=0.1, seed=5) == mean_loss
    for a, b in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "kwargs",
    [{"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"lr": float("nan")}],
)
def test_train_local_validates(kwargs: dict[str, float]) -> None:
    args: dict[str, float] = {"epochs": 1, "batch_size": 8, "lr": 0.1, "seed": 0}
    args.update(kwargs)
    data = Dataset(np.zeros((4, 64), np.float32), np.zeros(4, np.int64))
    with pytest.raises(ValueError):
        train_local(build_model("mlp"), data, **args)  # type: ignore[arg-type]


def test_evaluate() -> None:
    test = eval_dataset("digits")
    accuracy, loss = evaluate(build_model("mlp"), test)
    assert 0.0 <= accuracy <= 0.3  # untrained: near chance
    assert loss == pytest.approx(np.log(10), abs=0.2)
    # A model that always predicts the true class scores 1.0.
    single = Dataset(test.x[:1], test.y[:1])
    model = build_model("mlp")
    with torch.no_grad():
        model[2].weight.zero_()
        model[2].bias.zero_()
        model[2].bias[int(test.y[0])] = 10.0
    assert evaluate(model, single)[0] == 1.0


def test_state_arrays_round_trip() -> None:
    source, target = build_model("mlp", seed=1), build_model("mlp", seed=2)
    arrays = state_arrays(source)
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays.values())
    scratch = state_arrays(source)
    scratch["0.0.bias"][0] += 1.0  # a copy: the model must not change
    assert torch.equal(source.state_dict()["0.0.bias"], torch.from_numpy(arrays["0.0.bias"]))
    load_state_arrays(target, arrays)
    for a, b in zip(source.parameters(), target.parameters(), strict=True):
        assert torch.equal(a, b)


def test_load_state_arrays_is_strict() -> None:
    model = build_model("mlp")
    good = state_arrays(model)
    missing = dict(good)
    del missing["2.bias"]
    extra = {**good, "3.weight": np.zeros(1, np.float32)}
    wrong_shape = {**good, "2.bias": np.zeros(11, np.float32)}
    for arrays in (missing, extra, wrong_shape):
        with pytest.raises(ValueError):
            load_state_arrays(model, arrays)
    assert all(np.array_equal(a, b) for a, b in zip(
        state_arrays(model).values(), good.values(), strict=True))


def test_simulate_fedavg_learns() -> None:
    history = simulate_fedavg(num_clients=4, rounds=3)
    assert len(history) == 3
    accuracies = [accuracy for accuracy, _ in history]
    assert accuracies[-1] > 0.85
    assert history[-1][1] < history[0][1]
