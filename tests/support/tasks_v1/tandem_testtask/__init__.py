"""A user's task for the tests, as a package installed apart from Tandem: a tiny
regression (float targets, MSE, its own loop, MAE), with batch norm (so its model
holds an integer counter, num_batches_tracked, that must never leave an agent).

`tests/support/tasks_v2/tandem_testtask` is this package again (a symbolic link), at
another version: the version is the N of the `tasks_vN` directory it is imported from,
so that one source plays both installations (and their two fingerprints).
Data specs: `regression:I/N` (partition I of N of the training set) and
`regression:test` (the held-out set). Train and evaluate require the config key
`marker` and report it back as a metric, so a test sees the config arrive.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tandem import Signature, Task, TrainContext, TrainResult

VERSION = Path(__file__).parents[1].name.removeprefix("tasks_v")  # "1" or "2": see above
FEATURES = 4
_WEIGHTS = np.array([1.5, -2.0, 0.5, 3.0], np.float32)


def _make(seed: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(count, FEATURES)).astype(np.float32)
    y = (x @ _WEIGHTS + 0.7 + 0.05 * rng.normal(size=count)).astype(np.float32)[:, None]
    return x, y


class Data:
    def __init__(self, x: np.ndarray, y: np.ndarray) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)


class Regression(Task):
    version = VERSION
    input = Signature((FEATURES,))
    output = Signature((1,))

    def build(self, seed: int) -> nn.Module:
        return nn.Sequential(nn.Linear(FEATURES, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 1))

    def load_data(self, spec: str) -> Any:
        kind, _, part = spec.partition(":")
        if kind != "regression":
            raise ValueError(f"{spec!r} is not regression:I/N or regression:test")
        if part == "test":
            return Data(*_make(999, 400))
        index, _, count = part.partition("/")
        x, y = _make(0, 1200)
        return Data(x[int(index)::int(count)], y[int(index)::int(count)])

    def train(self, model: nn.Module, data: Any, config: Any, context: TrainContext) -> TrainResult:
        marker = config["marker"]  # a KeyError if the job's config did not arrive
        generator = torch.Generator().manual_seed(context.seed)
        x, y = torch.tensor(data.x), torch.tensor(data.y)
        optimizer = torch.optim.Adam(model.parameters(), lr=float(config["learning_rate"]))
        model.train()
        total, batches = 0.0, 0
        for _ in range(int(config["epochs"])):
            order = torch.randperm(len(x), generator=generator)
            for start in range(0, len(x), int(config["batch_size"])):
                idx = order[start:start + int(config["batch_size"])]
                optimizer.zero_grad()
                loss = nn.functional.mse_loss(model(x[idx]), y[idx])
                loss.backward()
                optimizer.step()
                total, batches = total + float(loss.detach()), batches + 1
            context.report(1.0)
        return TrainResult({"loss": total / batches, "marker_seen": float(marker)}, len(x))

    def evaluate(self, model: nn.Module, data: Any, config: Any) -> dict[str, float]:
        model.eval()
        with torch.no_grad():
            error = model(torch.tensor(data.x)) - torch.tensor(data.y)
        return {"mae": float(error.abs().mean()), "mse": float((error ** 2).mean()),
                "marker_seen": float(config["marker"])}
