"""A Tandem task to copy: a GRU forecasting the next value of a time series (regression).

Each example is a window of the last 24 readings ([24, 1]); the target is the reading
after it ([1]). The model normalises each window by its own mean and spread and puts
them back on its output, so sites whose readings differ in level and scale share one
federated model (and a served model takes raw readings). Training is the task's own
loop: Huber loss, Adam, gradient clipping; evaluation reports MAE and RMSE.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own idiom

from tandem.task import Config, Signature, Task, TrainContext, TrainResult
from tandem_example_forecast import series

WINDOW = 24


@dataclass(frozen=True)
class Windows:
    """Examples `x` (float32 [n, WINDOW, 1]) and the values that followed them, `y` (float32 [n, 1])."""

    x: np.ndarray
    y: np.ndarray

    def __len__(self) -> int:
        return int(self.y.shape[0])

    @classmethod
    def of(cls, *all_series: np.ndarray) -> Windows:
        """The windows of each series (none crosses from one series into the next)."""
        pairs = [series.windows(values, WINDOW) for values in all_series]
        return cls(np.concatenate([x for x, _ in pairs]), np.concatenate([y for _, y in pairs]))


class Forecaster(nn.Module):
    """[batch, window, 1] readings -> [batch, 1], the next reading."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.gru = nn.GRU(1, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        level = x.mean(dim=1, keepdim=True)
        scale = x.std(dim=1, keepdim=True) + 1e-3
        states = self.gru((x - level) / scale)[0]  # every step's hidden state: [batch, window, hidden]
        predicted: torch.Tensor = self.head(states[:, -1]) * scale[:, 0] + level[:, 0]
        return predicted


def setting(config: Config, key: str, default: float, *, integer: bool = False, low: float = 0.0) -> float:
    """`config[key]` (or `default`) as a finite number above `low`; ValueError saying why not.
    Strings such as "0.01" are accepted, booleans are not."""
    value = config.get(key, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if integer and not number.is_integer():
            raise ValueError
    except ValueError:
        raise ValueError(f"config {key}={value!r} is not {'an integer' if integer else 'a number'}") from None
    if not math.isfinite(number) or number <= low:
        raise ValueError(f"config {key}={value!r} must be a finite number > {low:g}")
    return int(number) if integer else number


class ForecastTask(Task):
    """Next-value forecasting with `Forecaster`.

    Config, with the defaults used where a key is absent: epochs (3), batch_size (32),
    learning_rate (0.003, Adam's step), huber_delta (1.0), clip_norm (1.0). A job sends
    epochs, batch_size and learning_rate from `tandem job start --epochs --batch-size --lr`,
    overlaid with its `--config KEY=VALUE` pairs.
    Data (`--data` / `--eval`): a CSV file or a directory of CSV files (one series each,
    see `series.read_csv`); `synthetic:I/N` (site I of N of a generated series) or
    `synthetic` (held-out readings of four sites) for demos without files.
    """

    version = "1.0.0"
    input = Signature((WINDOW, 1))
    output = Signature((1,))

    def build(self, seed: int) -> nn.Module:
        # Tandem seeds torch's RNG with `seed` before calling build: use it, don't reseed.
        return Forecaster()

    def train(self, model: nn.Module, data: Any, config: Config, context: TrainContext) -> TrainResult:
        epochs = int(setting(config, "epochs", 3, integer=True))
        batch_size = int(setting(config, "batch_size", 32, integer=True))
        lr = setting(config, "learning_rate", 3e-3)
        delta = setting(config, "huber_delta", 1.0)
        clip_norm = setting(config, "clip_norm", 1.0)
        self.check_data(data)
        device = torch.device(context.device)
        model.to(device).train()
        x = torch.tensor(data.x, device=device)
        y = torch.tensor(data.y, device=device)
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(context.seed)  # the same shuffles for the same (round, agent)
        total_loss = total_error = 0.0
        for epoch in range(epochs):
            total_loss = total_error = 0.0  # metrics of the last epoch
            order = torch.randperm(len(y), generator=generator).to(device)
            for start in range(0, len(y), batch_size):
                index = order[start:start + batch_size]
                predicted = model(x[index])
                loss = F.huber_loss(predicted, y[index], delta=delta)
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(loss)
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                optimizer.step()
                total_loss += float(loss.detach()) * len(index)
                total_error += float((predicted.detach() - y[index]).abs().sum())
            context.report((epoch + 1) / epochs)
        return TrainResult({"loss": total_loss / len(y), "mae": total_error / len(y)}, num_examples=len(y))

    def evaluate(self, model: nn.Module, data: Any, config: Config) -> dict[str, float]:
        self.check_data(data)
        delta = setting(config, "huber_delta", 1.0)
        device = next(model.parameters()).device
        model.eval()
        with torch.no_grad():
            predicted = torch.cat([model(torch.tensor(data.x[start:start + 1024], device=device)).cpu()
                                   for start in range(0, len(data), 1024)])
        target = torch.tensor(data.y)
        return {"mae": float((predicted - target).abs().mean()),
                "rmse": float(((predicted - target) ** 2).mean().sqrt()),
                "loss": float(F.huber_loss(predicted, target, delta=delta))}

    def load_data(self, spec: str) -> Windows:
        if spec == "synthetic":  # held out: later readings (another seed) of four sites
            return Windows.of(*(series.synthetic(site, 4, length=240, seed=1) for site in range(4)))
        if spec.startswith("synthetic:"):
            site, _, sites = spec.removeprefix("synthetic:").partition("/")
            if not (site.isdigit() and sites.isdigit()):
                raise ValueError(f"bad data spec {spec!r}: expected 'synthetic:I/N', e.g. 'synthetic:0/3'")
            return Windows.of(series.synthetic(int(site), int(sites)))
        path = Path(spec)
        if path.is_dir():
            files = sorted(path.glob("*.csv"))
            if not files:
                raise ValueError(f"data directory {spec!r} holds no .csv files")
        elif path.is_file():
            files = [path]
        else:
            raise ValueError(f"data {spec!r} is neither a CSV file, a directory of them, nor 'synthetic:I/N'")
        try:
            return Windows.of(*(series.read_csv(file) for file in files))
        except ValueError as exc:
            raise ValueError(f"data {spec!r}: {exc}") from None

    def check_data(self, data: Any) -> None:
        x, y = getattr(data, "x", None), getattr(data, "y", None)
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray):
            raise ValueError(f"forecast takes data with arrays x and y (Windows), got {type(data).__name__}")
        if x.shape[1:] != self.input.shape or y.shape != (len(x), *self.output.shape):
            raise ValueError(f"forecast takes windows x [n, {WINDOW}, 1] and targets y [n, 1], "
                             f"got x {list(x.shape)} and y {list(y.shape)}")
        if x.dtype != np.float32 or y.dtype != np.float32:
            raise ValueError(f"forecast takes float32 windows and targets, got {x.dtype} and {y.dtype}")
        if len(x) == 0:
            raise ValueError("the data holds no windows")
