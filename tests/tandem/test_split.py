"""Split points found in models that are not flat Sequentials: only where one value is
live, each checked; models that cannot be traced are served whole, saying why."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from tandem import split, staged, tasks
from tandem.inference import model_info
from tandem.task import Signature, Task
from tests.support.tasks import RESIDUAL, RESIDUAL_NAMED, UNTRACEABLE


def whole(name: str, arrays: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """The model's own forward pass with these weights: the reference."""
    loaded = tasks.get(name)
    net = loaded.build(0)
    loaded.load_arrays(net, arrays)
    with torch.inference_mode():
        out: np.ndarray = net.eval()(torch.from_numpy(x)).numpy()
    return out


def batch(name: str, rows: int = 3) -> np.ndarray:
    shape = tasks.get(name).task.input.shape
    return np.random.default_rng(7).normal(size=(rows, *shape)).astype(np.float32)


def test_a_residual_cnn_splits_only_at_block_boundaries() -> None:
    loaded = tasks.get(RESIDUAL)
    gm = split.trace(loaded.build(0))
    points = [node.name for node in split.live_points(gm.graph)]
    # The stem's convolution, then the addition that ends each block: inside a block
    # its input is live beside the branch until that addition.
    assert points == ["stem", "add", "add_1", "add_2"]
    layout = staged.layout(RESIDUAL)
    assert layout.plan.points == ("stem", "add", "add_1", "add_2")
    assert [s.name for s in layout.stages] == ["Conv2d", "PreActBlock", "PreActBlock", "PreActBlock", "Conv2d"]
    assert [s.output_shape for s in layout.stages] == [(8, 16, 16), (8, 16, 16), (16, 8, 8), (32, 4, 4), (10, 1, 1)]
    assert layout.split_note == ""


def test_every_point_s_halves_reproduce_the_whole_model() -> None:
    arrays = tasks.get(RESIDUAL).state_arrays(tasks.get(RESIDUAL).build(seed=3))
    model = staged.StagedModel(RESIDUAL, 1, "", arrays)
    x = batch(RESIDUAL)
    expected = whole(RESIDUAL, arrays, x)
    np.testing.assert_allclose(model.run(x), expected, rtol=1e-5, atol=1e-6)
    for k in range(1, model.num_stages):
        activation = model.run(x, 0, k)
        assert activation.shape[1:] == model.stages[k - 1].output_shape
        np.testing.assert_allclose(model.run(activation, k), expected, rtol=1e-5, atol=1e-6)


def test_an_untraceable_model_is_served_whole_with_the_reason() -> None:
    arrays = tasks.get(UNTRACEABLE).state_arrays(tasks.get(UNTRACEABLE).build(seed=1))
    model = staged.StagedModel(UNTRACEABLE, 1, "", arrays)
    assert model.num_stages == 1
    assert [(s.index, s.name, s.output_shape) for s in model.stages] == [(1, "BranchingNet", (4,))]
    assert "torch.fx cannot trace it" in model.split_note and "control flow" in model.split_note
    for sign in (1, -1):  # both branches of its forward
        x = sign * np.abs(batch(UNTRACEABLE))
        np.testing.assert_allclose(model.run(x), whole(UNTRACEABLE, arrays, x), rtol=1e-5, atol=1e-6)
    info = model_info(model)
    assert (len(info.stages), info.split_note) == (1, model.split_note)


def test_a_task_s_named_points_are_the_only_ones_and_bad_ones_are_dropped() -> None:
    plan = staged.layout(RESIDUAL_NAMED).plan
    # "block2" is a module path: the point after its last node; the node inside block1
    # has two values live after it and is dropped, saying so.
    assert plan.points == ("add_1",)
    assert plan.dropped == ("block1_conv2: more than one value is live after it",)
    assert staged.layout(RESIDUAL_NAMED).stages[0].output_shape == (16, 8, 8)


class _Transposing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)).t().t())


class _TransposingTask(Task):
    input = Signature((4,))
    output = Signature((2,))

    def build(self, seed: int) -> nn.Module:
        return _Transposing()


def test_a_point_whose_activation_loses_the_batch_dimension_is_dropped() -> None:
    plan = split.find(_TransposingTask(), _Transposing())
    assert plan.points == ("a", "relu", "t_1")  # after the first t, the batch is the second dimension
    assert any(reason.startswith("t:") and "batch" in reason for reason in plan.dropped), plan.dropped


def test_the_zoo_keeps_its_stages() -> None:
    assert [s.name for s in staged.describe("mlp")[1]] == ["Linear+ReLU", "Linear+ReLU", "Linear"]
    names = [s.name for s in staged.describe("cnn")[1]]
    assert names == ["Conv2d+ReLU+Conv2d+ReLU"] * 4 + ["Conv2d+ReLU+AdaptiveAvgPool2d+Flatten+Linear"]
    assert all(staged.layout(name).split_note == "" for name in ("mlp", "cnn", "mlp-small", "mlp-heavy"))
