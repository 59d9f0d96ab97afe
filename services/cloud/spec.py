"""A federated training job's settings: defaults, validation, wire form."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from cloud import strategies
from cloud.aggregation import Defence
from tandem import compression, zoo
from tandem.errors import InvalidArgument, NotFound
from tandem.v1 import admin_pb2

EVAL_SETS = ("", "digits")
AUTO = "auto"


def downlink_for(uplink: str) -> str:
    """The default downlink codec for an uplink codec: whole models for lossless jobs,
    and for top-k a sparse delta a few times denser than one agent's update (the
    aggregate of several sparse updates is the union of their supports)."""
    if uplink == AUTO:
        return "topk:0.05+int8"
    codec = compression.parse_codec(uplink)
    if codec.kind == "topk":
        return str(compression.Codec("topk", min(1.0, 5 * codec.fraction), int8=True))
    return str(codec)


@dataclass(frozen=True)
class JobSpec:
    model: str
    rounds: int
    min_clients: int
    clients_per_round: int = 0
    deadline: float = 60.0
    eval: str = ""
    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 0.1
    codec: str = "none"
    seed: int = 0
    max_update_bytes: int = 256 << 20
    strategy: str = "fedavg"
    mu: float = 0.0
    server_lr: float = 0.0  # 0: the strategy's default
    downlink_codec: str = ""  # "": derived from codec
    target_upload_seconds: float = 2.0
    aggregator: str = "mean"
    trim_fraction: float = 0.0
    hostile_agents: int = 0
    krum_selected: int = 0
    clip_norm: float = 0.0
    clip_to_median: bool = False
    dp_noise_multiplier: float = 0.0
    dp_delta: float = 1e-5

    @property
    def defence(self) -> Defence:
        return Defence(
            aggregator=self.aggregator, trim_fraction=self.trim_fraction, hostile=self.hostile_agents,
            krum_selected=self.krum_selected, clip_norm=self.clip_norm, clip_to_median=self.clip_to_median,
            dp_noise_multiplier=self.dp_noise_multiplier, dp_delta=self.dp_delta,
        )

    @property
    def effective_server_lr(self) -> float:
        """The server step size: the job's, or its strategy's default for its codec."""
        return self.server_lr or strategies.get(self.strategy).default_lr(self.codec)

    @property
    def effective_downlink(self) -> str:
        return self.downlink_codec or downlink_for(self.codec)

    def validate(self) -> JobSpec:
        if self.model not in zoo.model_names():
            raise NotFound(f"unknown model {self.model!r}; the zoo has {zoo.model_names()}")
        _check(1 <= self.rounds <= 100_000, f"rounds must be in 1..100000, got {self.rounds}")
        _check(1 <= self.min_clients <= 100_000, f"min_clients must be >= 1, got {self.min_clients}")
        _check(
            self.clients_per_round == 0 or self.clients_per_round >= self.min_clients,
            f"clients_per_round ({self.clients_per_round}) must be 0 (all) or >= min_clients ({self.min_clients})",
        )
        # Below a second a round could not even reach its agents, and retrying it would spin.
        _check(1 <= self.deadline <= 86_400, f"round deadline must be in [1, 86400] seconds, got {self.deadline}")
        _check(self.eval in EVAL_SETS, f"unknown eval set {self.eval!r}; known: {[e for e in EVAL_SETS if e]}")
        _check(1 <= self.epochs <= 1_000, f"epochs must be in 1..1000, got {self.epochs}")
        _check(1 <= self.batch_size <= 65_536, f"batch_size must be in 1..65536, got {self.batch_size}")
        _check(
            math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 100,
            f"learning_rate must be in (0, 100], got {self.learning_rate}",
        )
        _check(self.max_update_bytes > 0, f"max_update_bytes must be positive, got {self.max_update_bytes}")
        for name, text in (("codec", self.codec), ("downlink_codec", self.downlink_codec)):
            if text and text != AUTO:
                try:
                    compression.parse_codec(text)
                except ValueError as exc:
                    raise InvalidArgument(f"{name}: {exc}") from None
        _check(self.downlink_codec != AUTO, "downlink_codec cannot be auto")
        _check(self.strategy in strategies.names(),
               f"unknown strategy {self.strategy!r}; known: {strategies.names()}")
        _check(math.isfinite(self.mu) and 0 <= self.mu <= 100, f"mu must be in [0, 100], got {self.mu}")
        _check(self.mu == 0 or strategies.get(self.strategy).proximal, "mu is FedProx's parameter: use strategy fedprox")
        _check(math.isfinite(self.server_lr) and 0 <= self.server_lr <= 100,
               f"server_lr must be in [0, 100], got {self.server_lr}")
        _check(math.isfinite(self.target_upload_seconds) and self.target_upload_seconds > 0,
               f"target_upload_seconds must be positive, got {self.target_upload_seconds}")
        problems = self.defence.problems(self.min_clients)
        _check(not problems, "; ".join(problems))
        return self

    @classmethod
    def from_proto(cls, msg: admin_pb2.JobSpec) -> JobSpec:
        """Zero fields take the defaults (proto3 cannot tell unset from zero)."""
        defaults = cls(model="", rounds=0, min_clients=0)
        return cls(
            model=msg.model,
            rounds=msg.rounds,
            min_clients=msg.min_clients,
            clients_per_round=msg.clients_per_round,
            deadline=msg.round_deadline_seconds or defaults.deadline,
            eval=msg.eval,
            epochs=msg.epochs or defaults.epochs,
            batch_size=msg.batch_size or defaults.batch_size,
            learning_rate=msg.learning_rate or defaults.learning_rate,
            codec=msg.codec or defaults.codec,
            seed=msg.seed,
            max_update_bytes=msg.max_update_bytes or defaults.max_update_bytes,
            strategy=msg.strategy or defaults.strategy,
            mu=msg.mu,
            server_lr=msg.server_lr,
            downlink_codec=msg.downlink_codec,
            target_upload_seconds=msg.target_upload_seconds or defaults.target_upload_seconds,
            aggregator=msg.aggregator or defaults.aggregator,
            trim_fraction=msg.trim_fraction,
            hostile_agents=msg.hostile_agents,
            krum_selected=msg.krum_selected,
            clip_norm=msg.clip_norm,
            clip_to_median=msg.clip_to_median,
            dp_noise_multiplier=msg.dp_noise_multiplier,
            dp_delta=msg.dp_delta or defaults.dp_delta,
        ).validate()

    def to_proto(self) -> admin_pb2.JobSpec:
        return admin_pb2.JobSpec(
            model=self.model, rounds=self.rounds, min_clients=self.min_clients,
            clients_per_round=self.clients_per_round, round_deadline_seconds=self.deadline, eval=self.eval,
            epochs=self.epochs, batch_size=self.batch_size, learning_rate=self.learning_rate, codec=self.codec,
            seed=self.seed, max_update_bytes=self.max_update_bytes, strategy=self.strategy, mu=self.mu,
            server_lr=self.server_lr, downlink_codec=self.downlink_codec,
            target_upload_seconds=self.target_upload_seconds, aggregator=self.aggregator,
            trim_fraction=self.trim_fraction, hostile_agents=self.hostile_agents, krum_selected=self.krum_selected,
            clip_norm=self.clip_norm, clip_to_median=self.clip_to_median,
            dp_noise_multiplier=self.dp_noise_multiplier, dp_delta=self.dp_delta,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        return cls(**data)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)
