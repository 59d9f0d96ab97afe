"""The model zoo: Tandem's built-in tasks, each an ``nn.Sequential`` of stages.

Each is a classifier over 10 classes with the SDK's default training and evaluation;
its split points are the boundaries between the Sequential's top-level children (the
``start_layer`` of an inference request indexes them), as tracing would find.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tandem import tasks
from tandem.task import Signature, Task


class ZooTask(Task):
    """A zoo model as a task: a classifier over 10 classes, trained and evaluated with
    the defaults (SGD on cross-entropy; accuracy and loss)."""

    version = "1"

    def __init__(self, input_shape: tuple[int, ...], builder: Callable[[], nn.Sequential]) -> None:
        self.input = Signature(input_shape)
        self.output = Signature((10,))
        self._builder = builder

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.input.shape

    @property
    def num_classes(self) -> int:
        return self.output.shape[0]

    def build(self, seed: int) -> nn.Module:
        return self._builder()

    def split_points(self, model: nn.Module) -> list[str] | None:
        # The zoo's stages are the top-level children of its Sequential: the same points
        # tracing finds, named without tracing.
        return [str(index) for index in range(len(model) - 1)] if isinstance(model, nn.Sequential) else None


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


# Registered as entry points of the group `tandem.tasks` (pyproject.toml) and known to
# `tandem.tasks` without installation.
MLP = ZooTask((64,), _mlp)
MLP10M = ZooTask((64,), _mlp10m)
MLP250M = ZooTask((64,), _mlp250m)
MLP_SMALL = ZooTask((64,), _mlp_small)
MLP_HEAVY = ZooTask((64,), _mlp_heavy)
CNN = ZooTask((3, 96, 96), _cnn)
NAMES = ("cnn", "mlp", "mlp-heavy", "mlp-small", "mlp10m", "mlp250m")


def model_names() -> list[str]:
    """The names of the zoo's models, sorted."""
    return list(NAMES)


def get_entry(name: str) -> ZooTask:
    """The zoo's task called `name`; KeyError naming the zoo's models otherwise."""
    task = {"mlp": MLP, "mlp10m": MLP10M, "mlp250m": MLP250M, "mlp-small": MLP_SMALL, "mlp-heavy": MLP_HEAVY,
            "cnn": CNN}.get(name)
    if task is None:
        raise KeyError(f"unknown model {name!r}; known: {', '.join(NAMES)}")
    return task


def build_model(name: str, seed: int = 0) -> nn.Module:
    """A fresh model of task `name` (zoo or not) whose weights depend only on (name, seed)."""
    return tasks.get(name).build(seed)
