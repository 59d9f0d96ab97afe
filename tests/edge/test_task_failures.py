"""How an agent names a training failure for the coordinator (TaskFailed): a typed reason
and the exception's text on one line, trimmed."""

from __future__ import annotations

import pytest
import torch

from edge.trainer import MAX_DETAIL, UnknownTask, classify, failure_detail
from tandem import tasks
from tandem.v1 import coordinator_pb2 as pb


@pytest.mark.parametrize(("exc", "reason"), [
    (RuntimeError("mat1 and mat2 shapes cannot be multiplied (32x10 and 64x32)"), pb.TASK_FAILURE_DATA_MISMATCH),
    (ValueError("Expected input batch_size (32) to match target batch_size (16)."), pb.TASK_FAILURE_DATA_MISMATCH),
    (IndexError("Target 12 is out of bounds."), pb.TASK_FAILURE_DATA_MISMATCH),
    (MemoryError(), pb.TASK_FAILURE_OUT_OF_MEMORY),
    (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), pb.TASK_FAILURE_OUT_OF_MEMORY),
    (UnknownTask("task x is not offered here"), pb.TASK_FAILURE_TASK_UNKNOWN),
    (tasks.UnknownTask("no task x"), pb.TASK_FAILURE_TASK_UNKNOWN),
    (KeyError("learning_rate"), pb.TASK_FAILURE_EXCEPTION),
    (RuntimeError("the GPU fell off the bus"), pb.TASK_FAILURE_EXCEPTION),
])
def test_a_failure_is_classified(exc: Exception, reason: int) -> None:
    assert classify(exc) == reason


def test_a_failure_detail_is_one_line_of_at_most_300_characters() -> None:
    assert failure_detail(ValueError("bad\n  data\tshape")) == "ValueError: bad data shape"
    long = failure_detail(RuntimeError("x" * 5000))
    assert len(long) == MAX_DETAIL == 300 and long.startswith("RuntimeError: xxx") and long.endswith("...")
