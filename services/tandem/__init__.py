"""Tandem's shared library: wire contracts, tensor codec, TLS, metrics, models, data.

The SDK's front door is `tandem.task` (`from tandem import Task, TrainContext,
TrainResult, Signature`); its names are loaded on first use, so that importing a
light part of the package does not import torch.
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers: `from tandem import Task` is typed as tandem.task's
    from tandem.task import Signature, Task, TrainContext, TrainResult

__version__ = "0.1.0"
__all__ = ["Signature", "Task", "TrainContext", "TrainResult"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from tandem import task

        return getattr(task, name)
    raise AttributeError(f"module 'tandem' has no attribute {name!r}")
