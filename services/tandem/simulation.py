"""The reference workload (docs/design.md) as a sequential in-process FedAvg simulation.

This is the yardstick a networked run with dense updates must match: same data
partition, same initial weights, same shuffle seeds, same float32 aggregation order.
"""

from __future__ import annotations

import copy

import numpy as np

from tandem.data import Dataset, digits_split, dirichlet_partition
from tandem.training import (
    evaluate,
    load_state_arrays,
    shuffle_seed,
    state_arrays,
    train_local,
)
from tandem.zoo import build_model


def simulate_fedavg(
    num_clients: int,
    rounds: int,
    alpha: float = 0.5,
    seed: int = 0,
    epochs: int = 5,
    batch_size: int = 32,
    lr: float = 0.1,
) -> list[tuple[float, float]]:
    """Run FedAvg over the digits partition; return test ``(accuracy, loss)`` per round.

    ``seed`` is the Dirichlet partition seed; the model is always built with seed 0.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    train, test = digits_split()
    parts = dirichlet_partition(train.y, num_clients, alpha=alpha, seed=seed)
    clients = [Dataset(train.x[idx], train.y[idx]) for idx in parts]
    total = np.float32(sum(len(c) for c in clients))

    model = build_model("mlp", seed=0)
    history: list[tuple[float, float]] = []
    for round_ in range(1, rounds + 1):
        global_state = state_arrays(model)
        acc = {name: np.zeros_like(a) for name, a in global_state.items()}
        for client_index, data in enumerate(clients):
            local = copy.deepcopy(model)
            train_local(
                local, data, epochs, batch_size, lr, shuffle_seed(round_, client_index)
            )
            weight = np.float32(len(data))
            for name, value in state_arrays(local).items():
                acc[name] += weight * (value - global_state[name])
        load_state_arrays(
            model, {name: global_state[name] + acc[name] / total for name in global_state}
        )
        history.append(evaluate(model, test))
    return history
