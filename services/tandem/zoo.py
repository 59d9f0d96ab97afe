"""The model zoo: partitionable models, each an ``nn.Sequential`` of stages.

Inference can be split between edge and cloud only at a stage boundary (the
``start_layer`` of an inference request indexes these stages), so every model here
is a flat ``nn.Sequential`` whose top-level children are the stages.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ZooEntry:
    """A named model: its per-example input shape, class count and an unseeded builder."""

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    builder: Callable[[], nn.Sequential]


def _mlp() -> nn.Sequential:
    # Layers are created in the same order as the flat reference
    # Sequential(Linear, ReLU, Linear, ReLU, Linear), so after the same seed the
    # weights are identical to the reference model (docs/design.md).
    return nn.Sequential(
        nn.Sequential(nn.Linear(64, 512), nn.ReLU()),
        nn.Sequential(nn.Linear(512, 512), nn.ReLU()),
        nn.Linear(512, 10),
    )


def _mlp10m() -> nn.Sequential:
    # The same shape of model at 10.5 million parameters, for measuring the
    # coordinator's memory and transfer costs at a size where they matter.
    return nn.Sequential(
        nn.Sequential(nn.Linear(64, 3200), nn.ReLU()),
        nn.Sequential(nn.Linear(3200, 3200), nn.ReLU()),
        nn.Linear(3200, 10),
    )


def _mlp250m() -> nn.Sequential:
    # 252 million parameters (1.01 GB of float32) in 18 stages of at most 63 MB each:
    # the size at which moving and aggregating a model must not cost a model's memory.
    width = 3968
    return nn.Sequential(
        nn.Sequential(nn.Linear(64, width), nn.ReLU()),
        *(nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(16)),
        nn.Linear(width, 10),
    )


def _mlp_small() -> nn.Sequential:
    # A weak, cheap digits model for a small edge device: the edge half of a cascade.
    return nn.Sequential(
        nn.Sequential(nn.Linear(64, 32), nn.ReLU()),
        nn.Linear(32, 10),
    )


def _mlp_heavy() -> nn.Sequential:
    # A larger digits model (8.5 million parameters) whose batch-1 forward pass costs
    # more than an RPC: the cloud half of a cascade, and the model on which dynamic
    # batching pays most.
    return nn.Sequential(
        nn.Sequential(nn.Linear(64, 2048), nn.ReLU()),
        nn.Sequential(nn.Linear(2048, 2048), nn.ReLU()),
        nn.Sequential(nn.Linear(2048, 2048), nn.ReLU()),
        nn.Linear(2048, 10),
    )


def _cnn() -> nn.Sequential:
    # A camera-style model on 3x96x96 frames whose activations shrink with depth:
    # the input is 110,592 bytes, then 73,728, 36,864, 18,432, 9,216 and 40 bytes
    # after the five stages, each 20-50 million multiply-adds (a wide convolution at
    # full resolution, then a strided one that narrows). Early stages are large to
    # send and late ones small, so where to split depends on the link and on how
    # fast the edge is.
    def block(cin: int, wide: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, wide, 3, padding=1), nn.ReLU(),
            nn.Conv2d(wide, cout, 3, stride=2, padding=1), nn.ReLU(),
        )

    return nn.Sequential(
        block(3, 96, 8),  # 8x48x48
        block(8, 192, 16),  # 16x24x24
        block(16, 384, 32),  # 32x12x12
        block(32, 768, 64),  # 64x6x6
        nn.Sequential(nn.Conv2d(64, 1024, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(1024, 10)),
    )


_ZOO: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry(name="mlp", input_shape=(64,), num_classes=10, builder=_mlp),
        ZooEntry(name="mlp10m", input_shape=(64,), num_classes=10, builder=_mlp10m),
        ZooEntry(name="mlp250m", input_shape=(64,), num_classes=10, builder=_mlp250m),
        ZooEntry(name="mlp-small", input_shape=(64,), num_classes=10, builder=_mlp_small),
        ZooEntry(name="mlp-heavy", input_shape=(64,), num_classes=10, builder=_mlp_heavy),
        ZooEntry(name="cnn", input_shape=(3, 96, 96), num_classes=10, builder=_cnn),
    )
}


_BUILD_LOCK = threading.Lock()


def model_names() -> list[str]:
    """The names of every model in the zoo, sorted."""
    return sorted(_ZOO)


def get_entry(name: str) -> ZooEntry:
    """The zoo entry called ``name``; KeyError naming the known models otherwise."""
    try:
        return _ZOO[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(model_names())}") from None


def build_model(name: str, seed: int = 0) -> nn.Sequential:
    """A fresh model whose weights depend only on ``(name, seed)``.

    The seed is applied inside a forked RNG so the caller's global torch RNG is untouched.
    That RNG is one per process, so builds are serialised: a model loaded on a worker
    thread would otherwise draw from the generator in the middle of a seeded build.
    """
    entry = get_entry(name)
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return entry.builder()


def state_shapes(name: str) -> dict[str, tuple[int, ...]]:
    """The shape of every tensor in the model's state dict, without allocating it
    (built on torch's meta device)."""
    entry = get_entry(name)
    with _BUILD_LOCK, torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = entry.builder()
    return {key: tuple(tensor.shape) for key, tensor in model.state_dict().items()}
