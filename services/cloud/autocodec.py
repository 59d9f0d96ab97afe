"""`--codec auto`: pick each agent's codec from its measured link throughput.

The goal is an upload that takes about the job's target time: a fibre-connected
agent sends dense float32, a slow link gets int8, and a very slow one a top-k
fraction sized to fit.
"""

from __future__ import annotations

import math

# Until an agent has reported a throughput, int8 is the safe middle: a quarter of
# dense, lossless enough, and large enough (about a byte per parameter) to measure
# the link with.
UNMEASURED = "int8"
MIN_FRACTION = 1e-4
MAX_FRACTION = 0.5


def _varint_bytes(gap: float) -> int:
    return max(1, math.ceil(math.log2(max(gap, 2.0)) / 7))


def topk_bytes_per_kept(fraction: float) -> float:
    """An int8 value plus a varint gap of about 1/fraction."""
    return 1 + _varint_bytes(1 / fraction)


def choose(num_params: int, throughput: float | None, target_seconds: float) -> str:
    """The least lossy codec whose upload fits `target_seconds` at `throughput` bytes/s."""
    if throughput is None or not math.isfinite(throughput) or throughput <= 0:
        return UNMEASURED
    budget = throughput * target_seconds
    for name, per_param in (("none", 4.0), ("fp16", 2.0), ("int8", 1.0)):
        if num_params * per_param <= budget:
            return name
    fraction = MAX_FRACTION
    while fraction > MIN_FRACTION and num_params * fraction * topk_bytes_per_kept(fraction) > budget:
        fraction = budget / (num_params * topk_bytes_per_kept(fraction)) * 0.999
    fraction = min(MAX_FRACTION, max(MIN_FRACTION, fraction))
    return f"topk:{float(f'{fraction:.2g}')!r}+int8"
