"""Local training, evaluation and state-dict <-> numpy conversion, shared by agents and cloud.

Everything is deterministic given its seed, so a networked federated run can be
reproduced exactly by the in-process simulation.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812 - torch's own idiom

from tandem import tasks, wire
from tandem.data import Dataset


def shuffle_seed(round_: int, client_index: int) -> int:
    """The local-training shuffle seed for a (round, client): one rule for agents and simulation."""
    return round_ * 1000 + client_index


def _tensors(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    # torch.tensor copies: shared datasets may be read-only, which from_numpy warns about.
    return (
        torch.tensor(data.x, dtype=torch.float32),
        torch.tensor(data.y, dtype=torch.int64),
    )


def train_local(
    model: nn.Module,
    data: Dataset,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    mu: float = 0.0,
) -> float:
    """Train ``model`` in place with plain SGD; return the mean loss over every batch.

    ``mu > 0`` adds FedProx's proximal term ``mu/2 * ||w - w_start||^2``, which keeps
    local models near the global one when clients' data differ. The reported loss
    is the task loss alone, so it stays comparable across strategies.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not (np.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive finite number, got {lr}")
    if len(data) == 0:
        raise ValueError("cannot train on an empty dataset")
    if not (np.isfinite(mu) and mu >= 0):
        raise ValueError(f"mu must be a non-negative finite number, got {mu}")
    x, y = _tensors(data)
    anchor = [p.detach().clone() for p in model.parameters()] if mu > 0 else []
    n = x.shape[0]
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.0)
    model.train()
    total = 0.0
    batches = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            objective = loss
            if anchor:
                proximal = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor, strict=True))
                objective = loss + 0.5 * mu * proximal
            torch.autograd.backward(objective)
            optimizer.step()
            total += float(loss.detach())
            batches += 1
    return total / batches


def evaluate(model: nn.Module, data: Dataset) -> tuple[float, float]:
    """``(accuracy, mean cross-entropy)`` of ``model`` on ``data``."""
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty dataset")
    x, y = _tensors(data)
    model.eval()
    with torch.inference_mode():
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        accuracy = (logits.argmax(dim=1) == y).float().mean()
    return float(accuracy), float(loss)


def state_specs(name: str) -> dict[str, wire.TensorSpec]:
    """The federated tensors of task `name` (float32 on the wire), without building its model."""
    return tasks.get(name).specs


def state_arrays(model: nn.Module) -> dict[str, np.ndarray]:
    """C-contiguous float32 numpy copies of ``model``'s state dict, safe to mutate or send."""
    return {
        name: np.array(tensor.detach().cpu().numpy(), dtype=np.float32, order="C")
        for name, tensor in model.state_dict().items()
    }


def load_state_arrays(model: nn.Module, arrays: Mapping[str, np.ndarray]) -> None:
    """Load numpy arrays into ``model``; names and shapes must match exactly (ValueError)."""
    state = model.state_dict()
    missing = sorted(set(state) - set(arrays))
    unexpected = sorted(set(arrays) - set(state))
    if missing or unexpected:
        raise ValueError(f"state mismatch: missing {missing}, unexpected {unexpected}")
    for name, tensor in state.items():
        shape = tuple(np.shape(arrays[name]))
        if shape != tuple(tensor.shape):
            raise ValueError(
                f"state mismatch for {name!r}: expected shape {tuple(tensor.shape)}, got {shape}"
            )
    with torch.no_grad():
        for name, tensor in state.items():
            # np.array copies, so read-only inputs are fine; copy_ casts to the tensor's dtype.
            tensor.copy_(torch.from_numpy(np.array(arrays[name])))
