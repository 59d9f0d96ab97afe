"""Test accuracy of a global version on held-out data kept in the cloud."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from tandem import data, training, zoo


def evaluate(model: str, arrays: Mapping[str, np.ndarray], eval_set: str) -> tuple[float, float]:
    """(accuracy, mean cross-entropy loss) of `arrays` on `eval_set`. Runs torch: call off the loop."""
    net = zoo.build_model(model)
    training.load_state_arrays(net, arrays)
    return training.evaluate(net, data.eval_dataset(eval_set))
