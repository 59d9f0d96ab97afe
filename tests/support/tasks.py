"""Tasks whose models are not flat Sequentials, loadable by name in the test process
(and by the servers the tests start in it): `tests.support.tasks:ResidualTask`, ..."""

from __future__ import annotations

import torch
from torch import nn

from tandem.task import Signature, Task

RESIDUAL = "tests.support.tasks:ResidualTask"
RESIDUAL_NAMED = "tests.support.tasks:NamedPointsTask"
UNTRACEABLE = "tests.support.tasks:UntraceableTask"


def _bn(channels: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels)
    with torch.no_grad():  # running statistics that are not the identity, so that they matter
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 1.5)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.2, 0.2)
    return bn


class PreActBlock(nn.Module):
    """A pre-activation residual block (batch norm, ReLU, convolution, twice, plus a skip
    connection: a 1x1 projection when the shape changes). Inside it the block's input
    stays live until the addition that ends it, so no split point lies inside."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = _bn(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = _bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(torch.relu(self.bn1(x)))
        out = self.conv2(torch.relu(self.bn2(out)))
        return out + self.shortcut(x)


class ResidualNet(nn.Module):
    """Stem, three residual blocks, and a 4x4 convolution to one map per class: its
    split points are exactly the four boundaries between those."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.block1 = PreActBlock(8, 8)
        self.block2 = PreActBlock(8, 16, stride=2)
        self.block3 = PreActBlock(16, 32, stride=2)
        self.head = nn.Conv2d(32, 10, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block3(self.block2(self.block1(self.stem(x)))))


class ResidualTask(Task):
    """A small ResNet on 3x16x16 inputs: split points found by tracing."""

    version = "1"
    input = Signature((3, 16, 16))
    output = Signature((10, 1, 1))

    def build(self, seed: int) -> nn.Module:
        return ResidualNet()


class NamedPointsTask(ResidualTask):
    """The same model, split only where the task says: after block2 (a module path)
    and inside block1 (a node where two values are live: dropped)."""

    def split_points(self, model: nn.Module) -> list[str] | None:
        return ["block1_conv2", "block2"]


class BranchingNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            return self.a(torch.relu(x))
        return self.b(x)


class UntraceableTask(Task):
    version = "1"
    input = Signature((8,))
    output = Signature((4,))

    def build(self, seed: int) -> nn.Module:
        return BranchingNet()
