"""A Tandem task to copy: a small residual CNN classifying 8x8 digit images.

The model is a stem convolution, three pre-activation residual blocks (batch norm, skip
connections) and a linear head over a global average pool. Its forward pass is plain
Python with no data-dependent control flow, so `torch.fx` traces it: Tandem finds where
inference may be split by tracing (a point where one tensor crosses), and the skip
connections leave only the boundaries between blocks as candidates inside the body.

Training is Adam with a cosine learning-rate schedule over the round's local steps,
gradient clipping, and an optional FedProx term (config `mu`) pulling the weights
towards the round's starting point (`context.global_state`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own idiom

from tandem import data as tandem_data
from tandem.task import Config, Signature, Task, TrainContext, TrainResult

CLASSES = 10


class Block(nn.Module):
    """A pre-activation residual block: (batch norm, ReLU, 3x3 convolution) twice, added to
    a shortcut of the input. It ends with the addition, so the block's output is the one
    value that crosses its end, and nothing inside it qualifies as a split point."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels_out)
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, padding=1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or channels_in != channels_out:  # a 1x1 projection where the shape changes
            self.shortcut = nn.Conv2d(channels_in, channels_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        shortcut: torch.Tensor = self.shortcut(x)
        return out + shortcut


class ResNet(nn.Module):
    """1x8x8 images -> 10 class logits: a stem convolution, 3 residual blocks, and a head
    (batch norm, ReLU, global average pool, linear). Split points, found by tracing:
    after the stem, after each block, and between the head's layers."""

    def __init__(self, width: int = 16, classes: int = CLASSES) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, width, 3, padding=1, bias=False)  # width x 8 x 8
        self.block1 = Block(width, width)
        self.block2 = Block(width, 2 * width, stride=2)  # 2width x 4 x 4
        self.block3 = Block(2 * width, 2 * width)
        self.head = nn.Sequential(nn.BatchNorm2d(2 * width), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                  nn.Linear(2 * width, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.block3(self.block2(self.block1(self.stem(x)))))
        return logits


def setting(config: Config, key: str, default: float, *, integer: bool = False, low: float = 0.0,
            allow_low: bool = False) -> float:
    """`config[key]` (or `default`) as a number above `low` (or equal, if `allow_low`);
    ValueError saying why not. Strings such as "0.01" are accepted, booleans are not."""
    value = config.get(key, default)
    try:
        if isinstance(value, bool):
            raise ValueError
        number = float(value)
        if integer and not number.is_integer():
            raise ValueError
    except ValueError:
        kind = "an integer" if integer else "a number"
        raise ValueError(f"config {key}={value!r} is not {kind}") from None
    if not math.isfinite(number) or number < low or (number == low and not allow_low):
        bound = ">=" if allow_low else ">"
        raise ValueError(f"config {key}={value!r} must be a finite number {bound} {low:g}")
    return int(number) if integer else number


class ResNetTask(Task):
    """Digits as 1x8x8 images, classified by `ResNet`.

    Config, with the defaults used where a key is absent: epochs (2), batch_size (32),
    learning_rate (0.003, Adam's peak step), weight_decay (0.0001), clip_norm (5.0), mu (0,
    FedProx off). A job sends epochs, batch_size, learning_rate and mu from `tandem job start
    --epochs --batch-size --lr --mu`, overlaid with its `--config KEY=VALUE` pairs.
    Data (`--data` / `--eval`): `digits` (the held-out test split), `digits:I/N` (partition
    I of N of the training split) or a directory of `.npz` files holding `x` [n, 64]
    (pixel values in 0..1, row by row) and integer labels `y` [n].
    """

    version = "1.0.0"
    input = Signature((1, 8, 8))
    output = Signature((CLASSES,))

    def build(self, seed: int) -> nn.Module:
        # Tandem seeds torch's RNG with `seed` before calling build: use it, don't reseed.
        return ResNet()

    def train(self, model: nn.Module, data: Any, config: Config, context: TrainContext) -> TrainResult:
        epochs = int(setting(config, "epochs", 2, integer=True))
        batch_size = int(setting(config, "batch_size", 32, integer=True))
        lr = setting(config, "learning_rate", 3e-3)
        weight_decay = setting(config, "weight_decay", 1e-4, allow_low=True)
        clip_norm = setting(config, "clip_norm", 5.0)
        mu = setting(config, "mu", 0.0, allow_low=True)
        self.check_data(data)
        if len(data) == 0:
            raise ValueError("cannot train on an empty dataset")
        device = torch.device(context.device)
        model.to(device).train()
        x = torch.tensor(data.x, dtype=torch.float32, device=device)
        y = torch.tensor(data.y, dtype=torch.int64, device=device)
        anchor = {name: context.global_state[name].to(device) for name, _ in model.named_parameters()
                  if mu > 0 and name in context.global_state}
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(y) / batch_size)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs * steps_per_epoch)
        generator = torch.Generator().manual_seed(context.seed)  # the same shuffles for the same (round, agent)
        total_loss, correct = 0.0, 0
        for epoch in range(epochs):
            order = torch.randperm(len(y), generator=generator).to(device)
            for start in range(0, len(y), batch_size):
                index = order[start:start + batch_size]
                logits = model(x[index])
                loss = F.cross_entropy(logits, y[index])
                objective = loss
                if anchor:  # FedProx: mu/2 * ||w - w_round_start||^2
                    objective = loss + 0.5 * mu * sum(((p - anchor[n]) ** 2).sum()
                                                      for n, p in model.named_parameters() if n in anchor)
                optimizer.zero_grad(set_to_none=True)
                torch.autograd.backward(objective)
                nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
                optimizer.step()
                schedule.step()
                if epoch == epochs - 1:  # metrics of the last epoch
                    total_loss += float(loss.detach()) * len(index)
                    correct += int((logits.argmax(1) == y[index]).sum())
            context.report((epoch + 1) / epochs)
        return TrainResult({"loss": total_loss / len(y), "accuracy": correct / len(y)}, num_examples=len(y))

    def evaluate(self, model: nn.Module, data: Any, config: Config) -> dict[str, float]:
        self.check_data(data)
        if len(data) == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        device = next(model.parameters()).device
        model.eval()
        total_loss, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(data), 512):
                x = torch.tensor(data.x[start:start + 512], dtype=torch.float32, device=device)
                y = torch.tensor(data.y[start:start + 512], dtype=torch.int64, device=device)
                logits = model(x)
                total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
                correct += int((logits.argmax(1) == y).sum())
        return {"accuracy": correct / len(data), "loss": total_loss / len(data)}

    def load_data(self, spec: str) -> tandem_data.Dataset:
        flat = tandem_data.eval_dataset(spec) if spec == "digits" else tandem_data.load_data(spec)
        pixels = int(np.prod(self.input.shape))
        if flat.x.shape[1] != pixels:
            raise ValueError(f"data {spec!r}: examples have {flat.x.shape[1]} values; "
                             f"resnet takes {pixels} (a 8x8 image, row by row)")
        return tandem_data.Dataset(flat.x.reshape(-1, *self.input.shape), flat.y)

    def check_data(self, data: Any) -> None:
        super().check_data(data)  # x's examples against the input signature
        x, y = getattr(data, "x", None), getattr(data, "y", None)
        if x is None or y is None:
            raise ValueError(f"resnet takes data with arrays x and y, got {type(data).__name__}")
        y = np.asarray(y)
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise ValueError(f"labels y must be {len(x)} integers, got shape {list(y.shape)} of {y.dtype}")
        if y.size and (y.min() < 0 or y.max() >= CLASSES):
            raise ValueError(f"labels must be in 0..{CLASSES - 1}, got {int(y.min())}..{int(y.max())}")
