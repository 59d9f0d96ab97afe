"""The speed forecaster as a Tandem task (entry point `traffic-speed`): each road
segment's speed 1, 5 and 10 intervals ahead from its last 10 intervals of readings.

Inputs and targets are `windows.Windows` (speeds as ratios of the segment's speed
limit, so one model serves segments of every limit in every district). The model is
a small MLP, an `nn.Sequential` of three named stages (`encoder`, `hidden`, `head`)
that Tandem may split between an edge and the cloud. Training is the task's own loop:
Adam, Huber loss on the ratios, gradient clipping, FedProx's proximal term when the
job sets `mu`; it reports `loss` (Huber on the ratios) and `mae` (km/h) of its last
epoch. Evaluation reports errors in km/h, the unit a transport engineer reads: `mae`,
`rmse` and `loss` overall, and `mae_1min`, `rmse_1min`, ... per horizon (named by
minutes of the readings' interval).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own idiom

from tandem.task import Config, Signature, Task, TrainContext, TrainResult
from tandem_example_traffic.windows import FEATURES, HORIZONS, KMH_PER_MS, WINDOW, Readings, Windows, horizon_names

HIDDEN = (128, 64)
EVAL_BATCH = 4096


def speed_model(hidden: tuple[int, int] = HIDDEN) -> nn.Sequential:
    """[batch, WINDOW, FEATURES] -> [batch, len(HORIZONS)] speed ratios: three stages,
    each a point where Tandem may split it."""
    return nn.Sequential(OrderedDict([
        ("encoder", nn.Sequential(nn.Flatten(), nn.Linear(WINDOW * len(FEATURES), hidden[0]), nn.ReLU())),
        ("hidden", nn.Sequential(nn.Linear(hidden[0], hidden[1]), nn.ReLU())),
        ("head", nn.Linear(hidden[1], len(HORIZONS))),
    ]))


def setting(config: Config, key: str, default: float, *, integer: bool = False, low: float = 0.0,
            inclusive: bool = False) -> float:
    """`config[key]` (or `default`) as a finite number above `low` (or equal to it when
    `inclusive`); ValueError saying why not. Strings such as "0.01" are accepted,
    booleans are not."""
    value = config.get(key, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if integer and not number.is_integer():
            raise ValueError
    except ValueError:
        raise ValueError(f"config {key}={value!r} is not {'an integer' if integer else 'a number'}") from None
    if not math.isfinite(number) or number < low or (number == low and not inclusive):
        raise ValueError(f"config {key}={value!r} must be a finite number {'>=' if inclusive else '>'} {low:g}")
    return int(number) if integer else number


def scores(predicted: np.ndarray, data: Windows, delta: float) -> dict[str, float]:
    """Errors of `predicted` speed ratios ([n, len(HORIZONS)]) against `data`'s targets:
    `mae` and `rmse` in km/h over every example and horizon, `mae_1min`, `rmse_1min`,
    ... per horizon, and `loss` (the training loss, Huber on the ratios)."""
    predicted = np.asarray(predicted, np.float64)
    if predicted.shape != data.y.shape:
        raise ValueError(f"predictions {list(predicted.shape)} do not match the targets {list(data.y.shape)}")
    ratio_error = predicted - data.y
    error = ratio_error * data.free_speed[:, None].astype(np.float64) * KMH_PER_MS  # km/h
    absolute = np.abs(ratio_error)
    huber = np.where(absolute <= delta, 0.5 * ratio_error ** 2, delta * (absolute - 0.5 * delta))
    metrics = {"mae": float(np.abs(error).mean()), "rmse": float(np.sqrt((error ** 2).mean())),
               "loss": float(huber.mean())}
    for k, name in enumerate(horizon_names(data.interval)):
        metrics[f"mae_{name}"] = float(np.abs(error[:, k]).mean())
        metrics[f"rmse_{name}"] = float(np.sqrt((error[:, k] ** 2).mean()))
    return metrics


def predict(model: nn.Module, x: np.ndarray) -> np.ndarray:
    """The model's speed ratios for examples `x`, in batches, without gradients."""
    device = next(model.parameters()).device
    model.eval()
    with torch.inference_mode():
        parts = [model(torch.from_numpy(np.ascontiguousarray(x[start:start + EVAL_BATCH])).to(device)).cpu()
                 for start in range(0, len(x), EVAL_BATCH)]
    return torch.cat(parts).numpy() if parts else np.zeros((0, len(HORIZONS)), np.float32)


class SpeedTask(Task):
    """Speed forecasting for road segments with `speed_model`.

    Config, with the defaults used where a key is absent: epochs (3), batch_size (256),
    learning_rate (0.001, Adam's step), huber_delta (0.1, in speed ratio), clip_norm
    (1.0), weight_decay (0), mu (0: FedProx's proximal weight). A job sends epochs,
    batch_size, learning_rate and mu from `tandem job start` (whose defaults, --lr 0.1
    and --batch-size 32, are SGD's: start a job of this task with --lr 0.001
    --batch-size 256).
    Data (`--data` / `--eval`): a readings file (.npz, see `windows`) or a directory of
    them (every *.npz in it, sorted; all of one interval).
    """

    version = "1.0.0"
    input = Signature((WINDOW, len(FEATURES)))
    output = Signature((len(HORIZONS),))

    def build(self, seed: int) -> nn.Module:
        # Tandem seeds torch's RNG with `seed` before calling build: use it, don't reseed.
        return speed_model()

    def split_points(self, model: nn.Module) -> list[str] | None:
        # The stages' ends, named without tracing (the module paths of the Sequential's children).
        if isinstance(model, nn.Sequential):
            return [name for name, _ in model.named_children()][:-1]
        return None

    def train(self, model: nn.Module, data: Any, config: Config, context: TrainContext) -> TrainResult:
        epochs = int(setting(config, "epochs", 3, integer=True))
        batch_size = int(setting(config, "batch_size", 256, integer=True))
        lr = setting(config, "learning_rate", 1e-3)
        delta = setting(config, "huber_delta", 0.1)
        clip_norm = setting(config, "clip_norm", 1.0)
        weight_decay = setting(config, "weight_decay", 0.0, inclusive=True)
        mu = setting(config, "mu", 0.0, inclusive=True)
        self.check_data(data)
        device = torch.device(context.device)
        model.to(device).train()
        x = torch.from_numpy(data.x).to(device)
        y = torch.from_numpy(data.y).to(device)
        kmh = torch.from_numpy(data.free_speed * KMH_PER_MS).to(device)[:, None]  # ratio -> km/h, per example
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        anchors = [(param, context.global_state[name].to(device)) for name, param in model.named_parameters()
                   if mu > 0 and name in context.global_state]
        generator = torch.Generator().manual_seed(context.seed)  # the same shuffles for the same (round, agent)
        total_loss = total_error = 0.0
        for epoch in range(epochs):
            total_loss = total_error = 0.0  # metrics of the last epoch
            order = torch.randperm(len(y), generator=generator).to(device)
            for start in range(0, len(y), batch_size):
                index = order[start:start + batch_size]
                predicted = model(x[index])
                loss = F.huber_loss(predicted, y[index], delta=delta)
                objective = loss
                if anchors:
                    objective = loss + 0.5 * mu * sum((((p - a) ** 2).sum() for p, a in anchors), torch.zeros(()))
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(objective)
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                optimizer.step()
                total_loss += float(loss.detach()) * len(index)
                total_error += float(((predicted.detach() - y[index]).abs() * kmh[index]).sum())
            context.report((epoch + 1) / epochs)
        # The last epoch's, as it trained: loss (Huber on the ratios) and mae (km/h, as evaluate's)
        return TrainResult({"loss": total_loss / len(y), "mae": total_error / (len(y) * len(HORIZONS))},
                           num_examples=len(y))

    def evaluate(self, model: nn.Module, data: Any, config: Config) -> dict[str, float]:
        self.check_data(data)
        return scores(predict(model, data.x), data, setting(config, "huber_delta", 0.1))

    def load_data(self, spec: str) -> Windows:
        path = Path(spec)
        if path.is_dir():
            files = sorted(path.glob("*.npz"))
            if not files:
                raise ValueError(f"data directory {spec!r} holds no .npz files")
        elif path.is_file():
            files = [path]
        else:
            raise ValueError(f"data {spec!r} is neither an .npz file of readings nor a directory of them")
        try:
            return Windows.of(*(Readings.load(file) for file in files))
        except ValueError as exc:
            raise ValueError(f"data {spec!r}: {exc}") from None

    def check_data(self, data: Any) -> None:
        x, y, free_speed = (getattr(data, key, None) for key in ("x", "y", "free_speed"))
        if not all(isinstance(a, np.ndarray) for a in (x, y, free_speed)):
            raise ValueError(f"traffic-speed takes data with arrays x, y and free_speed (Windows), got {type(data).__name__}")
        assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray) and isinstance(free_speed, np.ndarray)
        if x.shape[1:] != self.input.shape or y.shape != (len(x), *self.output.shape) or free_speed.shape != (len(x),):
            raise ValueError(f"traffic-speed takes windows x [n, {WINDOW}, {len(FEATURES)}], targets y "
                             f"[n, {len(HORIZONS)}] and free_speed [n], got x {list(x.shape)}, y {list(y.shape)} "
                             f"and free_speed {list(free_speed.shape)}")
        if x.dtype != np.float32 or y.dtype != np.float32 or free_speed.dtype != np.float32:
            raise ValueError(f"traffic-speed takes float32 arrays, got x {x.dtype}, y {y.dtype}, "
                             f"free_speed {free_speed.dtype}")
        if len(x) == 0:
            raise ValueError("the data holds no windows")
