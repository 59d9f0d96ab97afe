"""A federated training job's settings: defaults, validation, wire form.

`JobSpec` holds what the job is (model, rounds, clients, deadline, evaluation, seed)
and one group per concern: what agents do locally, how the server steps, how updates
travel, how rounds defend themselves. A new concern is a new group, not more flat
fields. The wire form (`admin_pb2.JobSpec`) stays flat; `from_proto`/`to_proto` map it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from cloud import strategies
from cloud.aggregation import Defence
from cloud.canary import RolloutPolicy
from tandem import compression, config, tasks
from tandem.errors import InvalidArgument, NotFound
from tandem.task import ConfigValue
from tandem.v1 import admin_pb2

AUTO = "auto"
PROMOTE_POLICIES = ("if-better", "on-complete", "never")
SERVING = "serving"
MAX_EVAL_SPEC = 4096
MAX_AGENT_NAMES = 10_000


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
class LocalTraining:
    """What each agent does with its own data in a round (the TrainTask's TrainingConfig)."""

    epochs: int = 5
    batch_size: int = 32
    learning_rate: float = 0.1

    def validate(self) -> None:
        _check(1 <= self.epochs <= 1_000, f"epochs must be in 1..1000, got {self.epochs}")
        _check(1 <= self.batch_size <= 65_536, f"batch_size must be in 1..65536, got {self.batch_size}")
        _check(
            math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 100,
            f"learning_rate must be in (0, 100], got {self.learning_rate}",
        )


@dataclass(frozen=True)
class Transport:
    """How updates travel up and new versions down, and how large an update may be."""

    codec: str = "none"
    downlink_codec: str = ""  # "": derived from codec
    target_upload_seconds: float = 2.0  # what the auto codec aims for
    max_update_bytes: int = 256 << 20

    @property
    def effective_downlink(self) -> str:
        return self.downlink_codec or downlink_for(self.codec)

    def validate(self) -> None:
        _check(self.max_update_bytes > 0, f"max_update_bytes must be positive, got {self.max_update_bytes}")
        for name, text in (("codec", self.codec), ("downlink_codec", self.downlink_codec)):
            if text and text != AUTO:
                try:
                    compression.parse_codec(text)
                except ValueError as exc:
                    raise InvalidArgument(f"{name}: {exc}") from None
        _check(self.downlink_codec != AUTO, "downlink_codec cannot be auto")
        _check(math.isfinite(self.target_upload_seconds) and self.target_upload_seconds > 0,
               f"target_upload_seconds must be positive, got {self.target_upload_seconds}")


@dataclass(frozen=True)
class ServerStrategy:
    """How the server turns a round's mean update into the next version (a registered
    `cloud.strategies` name and its parameters)."""

    name: str = "fedavg"
    mu: float = 0.0  # FedProx's proximal term, sent to the agents
    server_lr: float = 0.0  # 0: the strategy's default

    def effective_server_lr(self, codec: str) -> float:
        """The server step size: the job's, or its strategy's default for the uplink `codec`."""
        return self.server_lr or strategies.get(self.name).default_lr(codec)

    def validate(self) -> None:
        _check(self.name in strategies.names(), f"unknown strategy {self.name!r}; known: {strategies.names()}")
        _check(math.isfinite(self.mu) and 0 <= self.mu <= 100, f"mu must be in [0, 100], got {self.mu}")
        _check(self.mu == 0 or strategies.get(self.name).proximal, "mu is FedProx's parameter: use strategy fedprox")
        _check(math.isfinite(self.server_lr) and 0 <= self.server_lr <= 100,
               f"server_lr must be in [0, 100], got {self.server_lr}")


@dataclass(frozen=True)
class Selection:
    """Which agents may train the job: label selectors `key=value` (all must match) and
    agent names (empty: any). An agent must also offer the job's task (cloud.eligibility)."""

    select: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()

    def __post_init__(self) -> None:  # the record form holds lists
        object.__setattr__(self, "select", tuple(self.select))
        object.__setattr__(self, "agents", tuple(self.agents))

    @property
    def selectors(self) -> dict[str, str]:
        return config.parse_labels(self.select, "select")

    def validate(self) -> None:
        try:
            config.parse_labels(self.select, "select")
        except config.ConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        _check(len(self.agents) <= MAX_AGENT_NAMES, f"agents: at most {MAX_AGENT_NAMES} names")
        for name in self.agents:
            _check(0 < len(name) <= 253, f"agents: {name!r} is not an agent name")


@dataclass(frozen=True)
class JobSpec:
    model: str
    rounds: int
    min_clients: int
    clients_per_round: int = 0
    deadline: float = 60.0
    eval: str = ""
    seed: int = 0
    training: LocalTraining = field(default_factory=LocalTraining)
    strategy: ServerStrategy = field(default_factory=ServerStrategy)
    transport: Transport = field(default_factory=Transport)
    # Differential privacy stays inside Defence: the aggregation rules read it there.
    defence: Defence = field(default_factory=Defence)
    selection: Selection = field(default_factory=Selection)
    # The user's config for the task (tandem.config); `task_config` is what the task sees.
    config: dict[str, ConfigValue] = field(default_factory=dict)
    # Model lifecycle (docs/lifecycle.md): the promotion policy at completion, the metric
    # if-better compares ("NAME", "NAME:max", "NAME:min"; "": accuracy, else loss), and
    # the version a warm start trains from ("N", "serving"; "": a seeded build).
    promote: str = "if-better"
    promote_metric: str = ""
    from_version: str = ""
    rollout: RolloutPolicy = field(default_factory=RolloutPolicy)  # how a promotion reaches the edge
    # A region's relay of its parent's task (region.relay): the parent's job, and the
    # parent's round number, which this job's only round takes (agents seed their
    # shuffles with it). Never on the Admin wire: users start jobs from round 1.
    parent_job: str = ""
    first_round: int = 1

    @property
    def from_version_number(self) -> int | None:
        """The warm start's version number (None: none, or "serving")."""
        return int(self.from_version) if self.from_version and self.from_version != SERVING else None

    def task_config(self) -> dict[str, ConfigValue]:
        """The training fields overlaid with the user's config (the user's value wins)."""
        base: dict[str, ConfigValue] = {
            "epochs": self.training.epochs, "batch_size": self.training.batch_size,
            "learning_rate": self.training.learning_rate, "mu": self.strategy.mu,
        }
        return config.merged(base, self.config)

    def validate(self) -> JobSpec:
        try:
            tasks.get(self.model)
        except tasks.UnknownTask as exc:
            raise NotFound(str(exc)) from None
        except tasks.TaskError as exc:
            raise InvalidArgument(str(exc)) from None
        try:
            config.check(self.config)
        except config.ConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        _check(1 <= self.rounds <= 100_000, f"rounds must be in 1..100000, got {self.rounds}")
        _check(1 <= self.first_round <= self.rounds, f"first_round must be in 1..rounds, got {self.first_round}")
        _check(1 <= self.min_clients <= 100_000, f"min_clients must be >= 1, got {self.min_clients}")
        _check(
            self.clients_per_round == 0 or self.clients_per_round >= self.min_clients,
            f"clients_per_round ({self.clients_per_round}) must be 0 (all) or >= min_clients ({self.min_clients})",
        )
        # Below a second a round could not even reach its agents, and retrying it would spin.
        _check(1 <= self.deadline <= 86_400, f"round deadline must be in [1, 86400] seconds, got {self.deadline}")
        _check(len(self.eval) <= MAX_EVAL_SPEC, f"eval: a data spec of at most {MAX_EVAL_SPEC} characters")
        _check(self.promote in PROMOTE_POLICIES, f"promote must be one of {', '.join(PROMOTE_POLICIES)}, "
                                                 f"got {self.promote!r}")
        _check(self.promote_metric == "" or promote_metric_parts(self.promote_metric) is not None,
               f"promote_metric must be NAME, NAME:max or NAME:min, got {self.promote_metric!r}")
        _check(self.from_version in ("", SERVING) or (self.from_version.isdigit() and 0 < int(self.from_version)
                                                       < 1 << 62),
               f"from_version must be a version number >= 1 or 'serving', got {self.from_version!r}")
        self.selection.validate()
        self.rollout.validate()
        self.training.validate()
        self._validate_overrides()
        self.transport.validate()
        self.strategy.validate()
        problems = self.defence.problems(self.min_clients)
        _check(not problems, "; ".join(problems))
        return self

    def _validate_overrides(self) -> None:
        """The config keys that stand for training fields are held to the fields' bounds:
        `--config epochs=0` is refused as `--epochs 0` is."""
        def whole(key: str) -> bool:
            return key not in self.config or type(self.config[key]) is int

        def number(key: str) -> bool:
            return key not in self.config or type(self.config[key]) in (int, float)

        for key in ("epochs", "batch_size"):
            _check(whole(key), f"config {key} must be an integer, got {self.config.get(key)!r}")
        for key in ("learning_rate", "mu"):
            _check(number(key), f"config {key} must be a number, got {self.config.get(key)!r}")
        merged = self.task_config()
        LocalTraining(int(merged["epochs"]), int(merged["batch_size"]), float(merged["learning_rate"])).validate()
        mu = float(merged["mu"])
        _check(math.isfinite(mu) and 0 <= mu <= 100, f"config mu must be in [0, 100], got {mu}")

    @classmethod
    def from_proto(cls, msg: admin_pb2.JobSpec) -> JobSpec:
        """The flat wire form, validated. Zero fields take the defaults (proto3 cannot
        tell unset from zero)."""
        defaults = cls(model="", rounds=0, min_clients=0)
        try:
            user_config = config.from_proto(msg.config)
        except config.ConfigError as exc:
            raise InvalidArgument(str(exc)) from None
        training, transport, strategy, defence = defaults.training, defaults.transport, defaults.strategy, defaults.defence
        return cls(
            model=msg.model,
            rounds=msg.rounds,
            min_clients=msg.min_clients,
            clients_per_round=msg.clients_per_round,
            deadline=msg.round_deadline_seconds or defaults.deadline,
            eval=msg.eval,
            seed=msg.seed,
            training=LocalTraining(
                epochs=msg.epochs or training.epochs,
                batch_size=msg.batch_size or training.batch_size,
                learning_rate=msg.learning_rate or training.learning_rate,
            ),
            strategy=ServerStrategy(name=msg.strategy or strategy.name, mu=msg.mu, server_lr=msg.server_lr),
            transport=Transport(
                codec=msg.codec or transport.codec,
                downlink_codec=msg.downlink_codec,
                target_upload_seconds=msg.target_upload_seconds or transport.target_upload_seconds,
                max_update_bytes=msg.max_update_bytes or transport.max_update_bytes,
            ),
            defence=Defence(
                aggregator=msg.aggregator or defence.aggregator,
                trim_fraction=msg.trim_fraction,
                hostile=msg.hostile_agents,
                krum_selected=msg.krum_selected,
                clip_norm=msg.clip_norm,
                clip_to_median=msg.clip_to_median,
                dp_noise_multiplier=msg.dp_noise_multiplier,
                dp_delta=msg.dp_delta or defence.dp_delta,
                max_examples=msg.max_examples or defence.max_examples,
                weight_cap=msg.weight_cap or defence.weight_cap,
            ),
            selection=Selection(select=tuple(msg.select), agents=tuple(msg.agents)),
            config=user_config,
            promote=msg.promote or "if-better",
            promote_metric=msg.promote_metric,
            from_version=msg.from_version,
            rollout=RolloutPolicy.from_proto(msg.rollout),
        ).validate()

    def to_proto(self) -> admin_pb2.JobSpec:
        training, strategy, transport, defence = self.training, self.strategy, self.transport, self.defence
        message = admin_pb2.JobSpec(
            model=self.model, rounds=self.rounds, min_clients=self.min_clients,
            clients_per_round=self.clients_per_round, round_deadline_seconds=self.deadline, eval=self.eval,
            seed=self.seed,
            epochs=training.epochs, batch_size=training.batch_size, learning_rate=training.learning_rate,
            strategy=strategy.name, mu=strategy.mu, server_lr=strategy.server_lr,
            codec=transport.codec, downlink_codec=transport.downlink_codec,
            target_upload_seconds=transport.target_upload_seconds, max_update_bytes=transport.max_update_bytes,
            aggregator=defence.aggregator, trim_fraction=defence.trim_fraction, hostile_agents=defence.hostile,
            krum_selected=defence.krum_selected, clip_norm=defence.clip_norm, clip_to_median=defence.clip_to_median,
            dp_noise_multiplier=defence.dp_noise_multiplier, dp_delta=defence.dp_delta,
            max_examples=defence.max_examples, weight_cap=defence.weight_cap,
            select=self.selection.select, agents=self.selection.agents,
            promote=self.promote, promote_metric=self.promote_metric, from_version=self.from_version,
            rollout=self.rollout.to_proto(),
        )
        config.to_proto(self.config, message.config)
        return message

    def to_dict(self) -> dict[str, Any]:
        """The persisted form: JSON-able, one nested object per group. The task's config
        and the agent selection (issue 15), and the lifecycle fields (issue 16), are left
        out while at their defaults, so a job without them is stored as before they existed."""
        record = asdict(self)
        if not self.config:
            del record["config"]
        if self.selection == Selection():
            del record["selection"]
        if self.rollout == RolloutPolicy():
            del record["rollout"]
        for key in ("promote", "promote_metric", "from_version", "parent_job", "first_round"):  # stored once set
            if record[key] == getattr(JobSpec, key):
                del record[key]
        return record

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobSpec:
        """Read `to_dict`'s form. A group absent from `data` takes its defaults, so a group
        added later with defaults needs no migration; flat specs are migration 2's job."""
        groups = {"training": LocalTraining, "strategy": ServerStrategy, "transport": Transport, "defence": Defence,
                  "selection": Selection, "rollout": RolloutPolicy}
        top = {key: value for key, value in data.items() if key not in groups}
        return cls(**top, **{key: group(**data.get(key, {})) for key, group in groups.items()})


def promote_metric_parts(text: str) -> tuple[str, bool] | None:
    """(metric name, higher is better) of a promote_metric, or None if malformed. A bare
    name is lower-is-better if it is a loss or an error (loss, *_loss, mae, mse, rmse,
    *error), else higher-is-better."""
    name, _, direction = text.partition(":")
    if not 0 < len(name) <= 64 or direction not in ("", "max", "min"):
        return None
    if direction:
        return name, direction == "max"
    lower = name == "loss" or name.endswith(("_loss", "error")) or name in ("mae", "mse", "rmse")
    return name, not lower


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidArgument(message)
