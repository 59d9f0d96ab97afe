"""Pay torch's first-use costs when the agent starts, not when its first task arrives.

Measured on the reference workload (cProfile of an agent's first `train`): the first
optimiser construction imports `torch._dynamo` (`torch.optim.Optimizer.__init__` is
wrapped by `torch._compile._disable_dynamo`, which imports it on first call): about 2 s
on a quiet 2-core machine, 4.5 s on a loaded one, 4.5 of the 4.8 s the first round's
training took there, against 0.22 s for later rounds. With eight agents importing it at
once on two cores, a job's first round took 17.7 s where later rounds took 0.6-1.1 s.

What is warmed, off the event loop and before the agent says hello (so that a job
started once agents are connected finds them at full speed):
- an optimiser constructed and stepped once (the import above, and the step's code);
- for every ready task of at most WARM_MAX_BYTES of state, one forward and backward
  pass of a freshly built model on a batch of BATCH zero examples of its input
  signature (the first kernels and autograd at a training batch's size). Larger models
  are not built twice: their own compute dwarfs these costs.
A task whose model does not take such a batch is skipped; warming is best effort and
never stops the agent. Without the size bound, an agent offering every zoo task spent
16.5 s warming (it built `mlp250m`, 1 GB).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from edge.offers import Offers

log = logging.getLogger(__name__)
BATCH = 32  # the reference workload's batch size
WARM_MAX_BYTES = 16 << 20  # float32 state of a task warmed with a forward and backward pass


def warm_torch() -> None:
    """The platform's first-use costs: an optimiser's construction and step, autograd."""
    weight = torch.zeros(2, 2, requires_grad=True)
    optimizer = torch.optim.SGD([weight], lr=0.0)
    torch.autograd.backward(weight.sum() * 0.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def warm_task(offers: Offers, name: str) -> bool:
    """One forward and backward pass of task `name`'s model on zeros; False if it could not run."""
    prepared = offers.get(name)
    if prepared is None or not prepared.ready or prepared.loaded is None:
        return False
    if sum(spec.nbytes for spec in prepared.loaded.specs.values()) > WARM_MAX_BYTES:
        return False
    signature = prepared.loaded.task.input
    try:
        model = prepared.loaded.build(0)
        model.train()
        batch = torch.from_numpy(np.zeros((BATCH, *signature.shape), dtype=np.dtype(signature.dtype)))
        output = model(batch)
        if isinstance(output, torch.Tensor) and output.requires_grad:
            torch.autograd.backward(output.float().sum())
    except Exception as exc:  # noqa: BLE001 - the user's model may want other inputs: warming is best effort
        log.debug("task %s not warmed: %s: %s", name, type(exc).__name__, exc)
        return False
    return True


def warm(offers: Offers) -> float:
    """Warm torch and every ready task (blocking: call off the event loop); the seconds it took."""
    start = time.perf_counter()
    warm_torch()
    warmed = [o.name for o in offers.offers() if o.ready and warm_task(offers, o.name)]
    seconds = time.perf_counter() - start
    log.info("warmed up torch and tasks %s in %.2f s", warmed, seconds)
    return seconds
