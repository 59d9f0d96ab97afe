"""A hostile edge agent, for the reliability benchmark and its tests.

It is the real agent (real certificate, control stream, training, codecs and
uploads); only the update it sends is poisoned after honest local training:
- `scale:F` sends F times the honest update (F = -10: a sign-flipping boost);
- `noise:F` sends Gaussian noise whose L2 norm is F times the honest update's.

    python -m tandem_lab.hostile --attack scale:-10 --cloud HOST:PORT --certs DIR --id NAME --data digits:0/8
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
from pathlib import Path

import numpy as np

from edge.agent import Agent, AgentConfig
from tandem import lifecycle
from tandem.transfer import HeldVersion
from tandem.v1 import coordinator_pb2 as pb

log = logging.getLogger(__name__)


def parse_attack(text: str) -> tuple[str, float]:
    kind, _, value = text.partition(":")
    if kind not in ("scale", "noise") or not value:
        raise ValueError(f"attack {text!r} is not scale:F or noise:F")
    factor = float(value)
    if not math.isfinite(factor):
        raise ValueError(f"attack factor must be finite, got {value}")
    return kind, factor


def poison(delta: dict[str, np.ndarray], kind: str, factor: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    if kind == "scale":
        return {name: (factor * value).astype(np.float32) for name, value in delta.items()}
    norm = math.sqrt(sum(float(np.square(v, dtype=np.float64).sum()) for v in delta.values()))
    size = sum(v.size for v in delta.values())
    std = factor * norm / math.sqrt(size)  # the noise's expected L2 norm is factor x the honest one
    return {name: rng.normal(0.0, std, value.shape).astype(np.float32) for name, value in delta.items()}


class HostileAgent(Agent):
    def __init__(self, config: AgentConfig, attack: str, seed: int = 0) -> None:
        super().__init__(config)
        self.kind, self.factor = parse_attack(attack)
        self._rng = np.random.default_rng(seed)

    async def _train(self, task: pb.TrainTask, base: HeldVersion) -> tuple[dict[str, np.ndarray], float, float]:
        delta, loss, seconds = await super()._train(task, base)
        log.info("job %s round %d: sending a poisoned update (%s x %g)", task.job_id, task.round, self.kind, self.factor)
        return poison(delta, self.kind, self.factor, self._rng), loss, seconds


async def _run(args: argparse.Namespace) -> int:
    lifecycle.tune_for_serving(1)
    config = AgentConfig(cloud=args.cloud, certs=args.certs, agent_id=args.id, data=args.data)
    agent = HostileAgent(config, args.attack, args.seed)
    stop = lifecycle.stop_event()
    await agent.run(stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem_lab.hostile", description=__doc__.splitlines()[0])
    parser.add_argument("--attack", required=True, help="scale:F or noise:F")
    parser.add_argument("--cloud", required=True)
    parser.add_argument("--certs", type=Path, required=True)
    parser.add_argument("--id", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    parse_attack(args.attack)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return asyncio.run(_run(args))


if __name__ == "__main__":
    sys.exit(main())
