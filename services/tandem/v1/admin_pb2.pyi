import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tandem.v1 import coordinator_pb2 as _coordinator_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_COMPLETED: _ClassVar[JobState]
    JOB_STATE_STOPPED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_COMPLETED: JobState
JOB_STATE_STOPPED: JobState
JOB_STATE_FAILED: JobState

class ListAgentsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentInfo(_message.Message):
    __slots__ = ("agent_id", "connected", "connected_since", "last_seen", "num_examples", "device", "connects", "measurements", "labels", "tasks", "agents")
    class MeasurementsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_FIELD_NUMBER: _ClassVar[int]
    CONNECTED_SINCE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CONNECTS_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    connected: bool
    connected_since: _timestamp_pb2.Timestamp
    last_seen: _timestamp_pb2.Timestamp
    num_examples: int
    device: str
    connects: int
    measurements: _containers.ScalarMap[str, float]
    labels: _containers.ScalarMap[str, str]
    tasks: _containers.RepeatedCompositeFieldContainer[_coordinator_pb2.TaskOffer]
    agents: int
    def __init__(self, agent_id: _Optional[str] = ..., connected: _Optional[bool] = ..., connected_since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_seen: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., num_examples: _Optional[int] = ..., device: _Optional[str] = ..., connects: _Optional[int] = ..., measurements: _Optional[_Mapping[str, float]] = ..., labels: _Optional[_Mapping[str, str]] = ..., tasks: _Optional[_Iterable[_Union[_coordinator_pb2.TaskOffer, _Mapping]]] = ..., agents: _Optional[int] = ...) -> None: ...

class ListAgentsResponse(_message.Message):
    __slots__ = ("agents",)
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentInfo]
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentInfo, _Mapping]]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("model", "rounds", "min_clients", "clients_per_round", "round_deadline_seconds", "eval", "epochs", "batch_size", "learning_rate", "codec", "seed", "max_update_bytes", "strategy", "mu", "server_lr", "downlink_codec", "target_upload_seconds", "aggregator", "trim_fraction", "hostile_agents", "krum_selected", "clip_norm", "clip_to_median", "dp_noise_multiplier", "dp_delta", "max_examples", "weight_cap", "config", "select", "agents", "promote", "promote_metric", "from_version", "rollout")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _coordinator_pb2.ConfigValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_coordinator_pb2.ConfigValue, _Mapping]] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    MIN_CLIENTS_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_PER_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    SERVER_LR_FIELD_NUMBER: _ClassVar[int]
    DOWNLINK_CODEC_FIELD_NUMBER: _ClassVar[int]
    TARGET_UPLOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_FIELD_NUMBER: _ClassVar[int]
    TRIM_FRACTION_FIELD_NUMBER: _ClassVar[int]
    HOSTILE_AGENTS_FIELD_NUMBER: _ClassVar[int]
    KRUM_SELECTED_FIELD_NUMBER: _ClassVar[int]
    CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIP_TO_MEDIAN_FIELD_NUMBER: _ClassVar[int]
    DP_NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    DP_DELTA_FIELD_NUMBER: _ClassVar[int]
    MAX_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_CAP_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    SELECT_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_FIELD_NUMBER: _ClassVar[int]
    PROMOTE_METRIC_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    model: str
    rounds: int
    min_clients: int
    clients_per_round: int
    round_deadline_seconds: float
    eval: str
    epochs: int
    batch_size: int
    learning_rate: float
    codec: str
    seed: int
    max_update_bytes: int
    strategy: str
    mu: float
    server_lr: float
    downlink_codec: str
    target_upload_seconds: float
    aggregator: str
    trim_fraction: float
    hostile_agents: int
    krum_selected: int
    clip_norm: float
    clip_to_median: bool
    dp_noise_multiplier: float
    dp_delta: float
    max_examples: int
    weight_cap: float
    config: _containers.MessageMap[str, _coordinator_pb2.ConfigValue]
    select: _containers.RepeatedScalarFieldContainer[str]
    agents: _containers.RepeatedScalarFieldContainer[str]
    promote: str
    promote_metric: str
    from_version: str
    rollout: RolloutPolicy
    def __init__(self, model: _Optional[str] = ..., rounds: _Optional[int] = ..., min_clients: _Optional[int] = ..., clients_per_round: _Optional[int] = ..., round_deadline_seconds: _Optional[float] = ..., eval: _Optional[str] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., codec: _Optional[str] = ..., seed: _Optional[int] = ..., max_update_bytes: _Optional[int] = ..., strategy: _Optional[str] = ..., mu: _Optional[float] = ..., server_lr: _Optional[float] = ..., downlink_codec: _Optional[str] = ..., target_upload_seconds: _Optional[float] = ..., aggregator: _Optional[str] = ..., trim_fraction: _Optional[float] = ..., hostile_agents: _Optional[int] = ..., krum_selected: _Optional[int] = ..., clip_norm: _Optional[float] = ..., clip_to_median: _Optional[bool] = ..., dp_noise_multiplier: _Optional[float] = ..., dp_delta: _Optional[float] = ..., max_examples: _Optional[int] = ..., weight_cap: _Optional[float] = ..., config: _Optional[_Mapping[str, _coordinator_pb2.ConfigValue]] = ..., select: _Optional[_Iterable[str]] = ..., agents: _Optional[_Iterable[str]] = ..., promote: _Optional[str] = ..., promote_metric: _Optional[str] = ..., from_version: _Optional[str] = ..., rollout: _Optional[_Union[RolloutPolicy, _Mapping]] = ...) -> None: ...

class RolloutPolicy(_message.Message):
    __slots__ = ("canary", "window_seconds", "min_requests", "max_error_rate", "max_latency_ratio", "min_agreement", "max_confidence_drop")
    CANARY_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MIN_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_LATENCY_RATIO_FIELD_NUMBER: _ClassVar[int]
    MIN_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_CONFIDENCE_DROP_FIELD_NUMBER: _ClassVar[int]
    canary: str
    window_seconds: float
    min_requests: int
    max_error_rate: float
    max_latency_ratio: float
    min_agreement: float
    max_confidence_drop: float
    def __init__(self, canary: _Optional[str] = ..., window_seconds: _Optional[float] = ..., min_requests: _Optional[int] = ..., max_error_rate: _Optional[float] = ..., max_latency_ratio: _Optional[float] = ..., min_agreement: _Optional[float] = ..., max_confidence_drop: _Optional[float] = ...) -> None: ...

class RolloutStatus(_message.Message):
    __slots__ = ("model", "version", "previous", "canary_agents", "state", "policy", "started", "ended", "actor", "reason", "canary", "baseline")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    CANARY_AGENTS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    BASELINE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    previous: int
    canary_agents: _containers.RepeatedScalarFieldContainer[str]
    state: str
    policy: RolloutPolicy
    started: _timestamp_pb2.Timestamp
    ended: _timestamp_pb2.Timestamp
    actor: str
    reason: str
    canary: _coordinator_pb2.ServingSignals
    baseline: _coordinator_pb2.ServingSignals
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., previous: _Optional[int] = ..., canary_agents: _Optional[_Iterable[str]] = ..., state: _Optional[str] = ..., policy: _Optional[_Union[RolloutPolicy, _Mapping]] = ..., started: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ..., canary: _Optional[_Union[_coordinator_pb2.ServingSignals, _Mapping]] = ..., baseline: _Optional[_Union[_coordinator_pb2.ServingSignals, _Mapping]] = ...) -> None: ...

class StartJobRequest(_message.Message):
    __slots__ = ("spec",)
    SPEC_FIELD_NUMBER: _ClassVar[int]
    spec: JobSpec
    def __init__(self, spec: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class StopJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class RoundResult(_message.Message):
    __slots__ = ("round", "accuracy", "loss", "local_loss", "seconds", "bytes_up", "bytes_down", "accepted", "rejected", "version", "sha256", "attempts", "agents", "codecs", "delta_bytes", "epsilon", "example_cap", "capped_agents", "train_metrics", "eval_metrics", "phases")
    class CodecsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class TrainMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class EvalMetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PhasesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_UP_FIELD_NUMBER: _ClassVar[int]
    BYTES_DOWN_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    CODECS_FIELD_NUMBER: _ClassVar[int]
    DELTA_BYTES_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_CAP_FIELD_NUMBER: _ClassVar[int]
    CAPPED_AGENTS_FIELD_NUMBER: _ClassVar[int]
    TRAIN_METRICS_FIELD_NUMBER: _ClassVar[int]
    EVAL_METRICS_FIELD_NUMBER: _ClassVar[int]
    PHASES_FIELD_NUMBER: _ClassVar[int]
    round: int
    accuracy: float
    loss: float
    local_loss: float
    seconds: float
    bytes_up: int
    bytes_down: int
    accepted: int
    rejected: int
    version: int
    sha256: str
    attempts: int
    agents: _containers.RepeatedScalarFieldContainer[str]
    codecs: _containers.ScalarMap[str, str]
    delta_bytes: int
    epsilon: float
    example_cap: float
    capped_agents: _containers.RepeatedScalarFieldContainer[str]
    train_metrics: _containers.ScalarMap[str, float]
    eval_metrics: _containers.ScalarMap[str, float]
    phases: _containers.ScalarMap[str, float]
    def __init__(self, round: _Optional[int] = ..., accuracy: _Optional[float] = ..., loss: _Optional[float] = ..., local_loss: _Optional[float] = ..., seconds: _Optional[float] = ..., bytes_up: _Optional[int] = ..., bytes_down: _Optional[int] = ..., accepted: _Optional[int] = ..., rejected: _Optional[int] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., attempts: _Optional[int] = ..., agents: _Optional[_Iterable[str]] = ..., codecs: _Optional[_Mapping[str, str]] = ..., delta_bytes: _Optional[int] = ..., epsilon: _Optional[float] = ..., example_cap: _Optional[float] = ..., capped_agents: _Optional[_Iterable[str]] = ..., train_metrics: _Optional[_Mapping[str, float]] = ..., eval_metrics: _Optional[_Mapping[str, float]] = ..., phases: _Optional[_Mapping[str, float]] = ...) -> None: ...

class Exclusion(_message.Message):
    __slots__ = ("agent", "code", "reason")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    agent: str
    code: str
    reason: str
    def __init__(self, agent: _Optional[str] = ..., code: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class TaskFailureRecord(_message.Message):
    __slots__ = ("round", "agent", "reason", "detail", "count")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    round: int
    agent: str
    reason: str
    detail: str
    count: int
    def __init__(self, round: _Optional[int] = ..., agent: _Optional[str] = ..., reason: _Optional[str] = ..., detail: _Optional[str] = ..., count: _Optional[int] = ...) -> None: ...

class OpenRound(_message.Message):
    __slots__ = ("round", "attempt", "base_version", "selected", "accepted_agents", "rejected", "deadline")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_AGENTS_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    round: int
    attempt: int
    base_version: int
    selected: _containers.RepeatedScalarFieldContainer[str]
    accepted_agents: _containers.RepeatedScalarFieldContainer[str]
    rejected: int
    deadline: _timestamp_pb2.Timestamp
    def __init__(self, round: _Optional[int] = ..., attempt: _Optional[int] = ..., base_version: _Optional[int] = ..., selected: _Optional[_Iterable[str]] = ..., accepted_agents: _Optional[_Iterable[str]] = ..., rejected: _Optional[int] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "spec", "state", "current_round", "version", "rounds", "open_round", "message", "created", "excluded", "failures")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    OPEN_ROUND_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    EXCLUDED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    spec: JobSpec
    state: JobState
    current_round: int
    version: int
    rounds: _containers.RepeatedCompositeFieldContainer[RoundResult]
    open_round: OpenRound
    message: str
    created: _timestamp_pb2.Timestamp
    excluded: _containers.RepeatedCompositeFieldContainer[Exclusion]
    failures: _containers.RepeatedCompositeFieldContainer[TaskFailureRecord]
    def __init__(self, job_id: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., current_round: _Optional[int] = ..., version: _Optional[int] = ..., rounds: _Optional[_Iterable[_Union[RoundResult, _Mapping]]] = ..., open_round: _Optional[_Union[OpenRound, _Mapping]] = ..., message: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., excluded: _Optional[_Iterable[_Union[Exclusion, _Mapping]]] = ..., failures: _Optional[_Iterable[_Union[TaskFailureRecord, _Mapping]]] = ...) -> None: ...

class ListModelVersionsRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelVersion(_message.Message):
    __slots__ = ("model", "version", "sha256", "job_id", "round", "created", "bytes", "origin", "metrics", "eval", "stage")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    sha256: str
    job_id: str
    round: int
    created: _timestamp_pb2.Timestamp
    bytes: int
    origin: str
    metrics: _containers.ScalarMap[str, float]
    eval: str
    stage: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., job_id: _Optional[str] = ..., round: _Optional[int] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., bytes: _Optional[int] = ..., origin: _Optional[str] = ..., metrics: _Optional[_Mapping[str, float]] = ..., eval: _Optional[str] = ..., stage: _Optional[str] = ...) -> None: ...

class ModelSummary(_message.Message):
    __slots__ = ("model", "installed", "serving_version", "versions", "newest_version", "rollout")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INSTALLED_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NEWEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    model: str
    installed: bool
    serving_version: int
    versions: int
    newest_version: int
    rollout: RolloutStatus
    def __init__(self, model: _Optional[str] = ..., installed: _Optional[bool] = ..., serving_version: _Optional[int] = ..., versions: _Optional[int] = ..., newest_version: _Optional[int] = ..., rollout: _Optional[_Union[RolloutStatus, _Mapping]] = ...) -> None: ...

class ListModelVersionsResponse(_message.Message):
    __slots__ = ("versions", "models")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    models: _containers.RepeatedCompositeFieldContainer[ModelSummary]
    def __init__(self, versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., models: _Optional[_Iterable[_Union[ModelSummary, _Mapping]]] = ...) -> None: ...

class PromoteModelRequest(_message.Message):
    __slots__ = ("model", "version", "reason", "rollout")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROLLOUT_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    reason: str
    rollout: RolloutPolicy
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., reason: _Optional[str] = ..., rollout: _Optional[_Union[RolloutPolicy, _Mapping]] = ...) -> None: ...

class RollbackModelRequest(_message.Message):
    __slots__ = ("model", "reason")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    model: str
    reason: str
    def __init__(self, model: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetModelHistoryRequest(_message.Message):
    __slots__ = ("model",)
    MODEL_FIELD_NUMBER: _ClassVar[int]
    model: str
    def __init__(self, model: _Optional[str] = ...) -> None: ...

class ModelEvent(_message.Message):
    __slots__ = ("event", "version", "previous", "actor", "reason", "at")
    EVENT_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    AT_FIELD_NUMBER: _ClassVar[int]
    event: str
    version: int
    previous: int
    actor: str
    reason: str
    at: _timestamp_pb2.Timestamp
    def __init__(self, event: _Optional[str] = ..., version: _Optional[int] = ..., previous: _Optional[int] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ..., at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ModelHistory(_message.Message):
    __slots__ = ("model", "serving_version", "versions", "events", "rollouts")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SERVING_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    ROLLOUTS_FIELD_NUMBER: _ClassVar[int]
    model: str
    serving_version: int
    versions: _containers.RepeatedCompositeFieldContainer[ModelVersion]
    events: _containers.RepeatedCompositeFieldContainer[ModelEvent]
    rollouts: _containers.RepeatedCompositeFieldContainer[RolloutStatus]
    def __init__(self, model: _Optional[str] = ..., serving_version: _Optional[int] = ..., versions: _Optional[_Iterable[_Union[ModelVersion, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[ModelEvent, _Mapping]]] = ..., rollouts: _Optional[_Iterable[_Union[RolloutStatus, _Mapping]]] = ...) -> None: ...

class ListPlacementsRequest(_message.Message):
    __slots__ = ("agent", "model")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    agent: str
    model: str
    def __init__(self, agent: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...

class PlacementInfo(_message.Message):
    __slots__ = ("agent", "model", "placement", "pinned", "predicted_seconds", "since")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SINCE_FIELD_NUMBER: _ClassVar[int]
    agent: str
    model: str
    placement: str
    pinned: bool
    predicted_seconds: _containers.RepeatedScalarFieldContainer[float]
    since: _timestamp_pb2.Timestamp
    def __init__(self, agent: _Optional[str] = ..., model: _Optional[str] = ..., placement: _Optional[str] = ..., pinned: _Optional[bool] = ..., predicted_seconds: _Optional[_Iterable[float]] = ..., since: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ListPlacementsResponse(_message.Message):
    __slots__ = ("placements",)
    PLACEMENTS_FIELD_NUMBER: _ClassVar[int]
    placements: _containers.RepeatedCompositeFieldContainer[PlacementInfo]
    def __init__(self, placements: _Optional[_Iterable[_Union[PlacementInfo, _Mapping]]] = ...) -> None: ...

class PinPlacementRequest(_message.Message):
    __slots__ = ("agent", "model", "placement")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    agent: str
    model: str
    placement: str
    def __init__(self, agent: _Optional[str] = ..., model: _Optional[str] = ..., placement: _Optional[str] = ...) -> None: ...

class UnpinPlacementRequest(_message.Message):
    __slots__ = ("agent", "model")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    agent: str
    model: str
    def __init__(self, agent: _Optional[str] = ..., model: _Optional[str] = ...) -> None: ...
