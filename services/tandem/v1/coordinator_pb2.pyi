import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tandem.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskFailure(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_FAILURE_UNSPECIFIED: _ClassVar[TaskFailure]
    TASK_FAILURE_DATA_MISMATCH: _ClassVar[TaskFailure]
    TASK_FAILURE_TASK_UNKNOWN: _ClassVar[TaskFailure]
    TASK_FAILURE_OUT_OF_MEMORY: _ClassVar[TaskFailure]
    TASK_FAILURE_EXCEPTION: _ClassVar[TaskFailure]
TASK_FAILURE_UNSPECIFIED: TaskFailure
TASK_FAILURE_DATA_MISMATCH: TaskFailure
TASK_FAILURE_TASK_UNKNOWN: TaskFailure
TASK_FAILURE_OUT_OF_MEMORY: TaskFailure
TASK_FAILURE_EXCEPTION: TaskFailure

class UploadProgress(_message.Message):
    __slots__ = ("chunks_received",)
    CHUNKS_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    chunks_received: int
    def __init__(self, chunks_received: _Optional[int] = ...) -> None: ...

class AgentMessage(_message.Message):
    __slots__ = ("hello", "heartbeat", "declined", "failed")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    DECLINED_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    heartbeat: Heartbeat
    declined: TaskDeclined
    failed: TaskFailed
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., heartbeat: _Optional[_Union[Heartbeat, _Mapping]] = ..., declined: _Optional[_Union[TaskDeclined, _Mapping]] = ..., failed: _Optional[_Union[TaskFailed, _Mapping]] = ...) -> None: ...

class TaskOffer(_message.Message):
    __slots__ = ("name", "fingerprint", "ready", "reason")
    NAME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    name: str
    fingerprint: str
    ready: bool
    reason: str
    def __init__(self, name: _Optional[str] = ..., fingerprint: _Optional[str] = ..., ready: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class TaskDeclined(_message.Message):
    __slots__ = ("job_id", "round", "code", "reason")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    code: str
    reason: str
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., code: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class TaskFailed(_message.Message):
    __slots__ = ("job_id", "round", "reason", "detail")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    reason: TaskFailure
    detail: str
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., reason: _Optional[_Union[TaskFailure, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class ConfigValue(_message.Message):
    __slots__ = ("text", "integer", "number", "flag")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    text: str
    integer: int
    number: float
    flag: bool
    def __init__(self, text: _Optional[str] = ..., integer: _Optional[int] = ..., number: _Optional[float] = ..., flag: _Optional[bool] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("agent_version", "num_examples", "device", "models", "labels", "tasks", "agents")
    class ModelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class LabelsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    agent_version: str
    num_examples: int
    device: str
    models: _containers.ScalarMap[str, int]
    labels: _containers.ScalarMap[str, str]
    tasks: _containers.RepeatedCompositeFieldContainer[TaskOffer]
    agents: int
    def __init__(self, agent_version: _Optional[str] = ..., num_examples: _Optional[int] = ..., device: _Optional[str] = ..., models: _Optional[_Mapping[str, int]] = ..., labels: _Optional[_Mapping[str, str]] = ..., tasks: _Optional[_Iterable[_Union[TaskOffer, _Mapping]]] = ..., agents: _Optional[int] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("seq", "measurements", "serving")
    class MeasurementsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MEASUREMENTS_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    seq: int
    measurements: _containers.ScalarMap[str, float]
    serving: _containers.RepeatedCompositeFieldContainer[ServingSignals]
    def __init__(self, seq: _Optional[int] = ..., measurements: _Optional[_Mapping[str, float]] = ..., serving: _Optional[_Iterable[_Union[ServingSignals, _Mapping]]] = ...) -> None: ...

class ServingSignals(_message.Message):
    __slots__ = ("model", "version", "requests", "errors", "latency_seconds", "previous_version", "compared", "agreed", "confidence", "previous_confidence")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPARED_FIELD_NUMBER: _ClassVar[int]
    AGREED_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    requests: int
    errors: int
    latency_seconds: float
    previous_version: int
    compared: int
    agreed: int
    confidence: float
    previous_confidence: float
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., requests: _Optional[int] = ..., errors: _Optional[int] = ..., latency_seconds: _Optional[float] = ..., previous_version: _Optional[int] = ..., compared: _Optional[int] = ..., agreed: _Optional[int] = ..., confidence: _Optional[float] = ..., previous_confidence: _Optional[float] = ...) -> None: ...

class CoordinatorMessage(_message.Message):
    __slots__ = ("welcome", "task", "model", "shutdown", "placement", "heartbeat_ack")
    WELCOME_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    SHUTDOWN_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_ACK_FIELD_NUMBER: _ClassVar[int]
    welcome: Welcome
    task: TrainTask
    model: ModelNotice
    shutdown: Shutdown
    placement: PlacementDecision
    heartbeat_ack: HeartbeatAck
    def __init__(self, welcome: _Optional[_Union[Welcome, _Mapping]] = ..., task: _Optional[_Union[TrainTask, _Mapping]] = ..., model: _Optional[_Union[ModelNotice, _Mapping]] = ..., shutdown: _Optional[_Union[Shutdown, _Mapping]] = ..., placement: _Optional[_Union[PlacementDecision, _Mapping]] = ..., heartbeat_ack: _Optional[_Union[HeartbeatAck, _Mapping]] = ...) -> None: ...

class HeartbeatAck(_message.Message):
    __slots__ = ("seq",)
    SEQ_FIELD_NUMBER: _ClassVar[int]
    seq: int
    def __init__(self, seq: _Optional[int] = ...) -> None: ...

class PlacementDecision(_message.Message):
    __slots__ = ("model", "placement", "predicted_seconds", "pinned")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    model: str
    placement: str
    predicted_seconds: float
    pinned: bool
    def __init__(self, model: _Optional[str] = ..., placement: _Optional[str] = ..., predicted_seconds: _Optional[float] = ..., pinned: _Optional[bool] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("agent_id", "heartbeat_interval_seconds", "models")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    heartbeat_interval_seconds: float
    models: _containers.RepeatedCompositeFieldContainer[ModelNotice]
    def __init__(self, agent_id: _Optional[str] = ..., heartbeat_interval_seconds: _Optional[float] = ..., models: _Optional[_Iterable[_Union[ModelNotice, _Mapping]]] = ...) -> None: ...

class TrainingConfig(_message.Message):
    __slots__ = ("epochs", "batch_size", "learning_rate", "mu")
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MU_FIELD_NUMBER: _ClassVar[int]
    epochs: int
    batch_size: int
    learning_rate: float
    mu: float
    def __init__(self, epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., learning_rate: _Optional[float] = ..., mu: _Optional[float] = ...) -> None: ...

class TrainTask(_message.Message):
    __slots__ = ("job_id", "round", "model", "base_version", "base_sha256", "training", "codec", "deadline", "max_update_bytes", "base_seed", "config", "task_fingerprint", "weight_cap")
    class ConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ConfigValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ConfigValue, _Mapping]] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    BASE_SHA256_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    MAX_UPDATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    BASE_SEED_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    TASK_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_CAP_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    model: str
    base_version: int
    base_sha256: str
    training: TrainingConfig
    codec: str
    deadline: _timestamp_pb2.Timestamp
    max_update_bytes: int
    base_seed: int
    config: _containers.MessageMap[str, ConfigValue]
    task_fingerprint: str
    weight_cap: float
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., model: _Optional[str] = ..., base_version: _Optional[int] = ..., base_sha256: _Optional[str] = ..., training: _Optional[_Union[TrainingConfig, _Mapping]] = ..., codec: _Optional[str] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., max_update_bytes: _Optional[int] = ..., base_seed: _Optional[int] = ..., config: _Optional[_Mapping[str, ConfigValue]] = ..., task_fingerprint: _Optional[str] = ..., weight_cap: _Optional[float] = ...) -> None: ...

class ModelNotice(_message.Message):
    __slots__ = ("model", "version", "sha256", "job_id", "serving", "canary")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    CANARY_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    sha256: str
    job_id: str
    serving: bool
    canary: bool
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., job_id: _Optional[str] = ..., serving: _Optional[bool] = ..., canary: _Optional[bool] = ...) -> None: ...

class Shutdown(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class UpdateChunk(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: UpdateHeader
    tensor: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[UpdateHeader, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class UpdateHeader(_message.Message):
    __slots__ = ("job_id", "round", "base_version", "num_examples", "codec", "local_loss", "content_sha256", "skip_chunks", "metrics", "task_fingerprint", "phase_seconds", "contributors")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class PhaseSecondsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    LOCAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    CONTENT_SHA256_FIELD_NUMBER: _ClassVar[int]
    SKIP_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    TASK_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    PHASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTORS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    base_version: int
    num_examples: int
    codec: str
    local_loss: float
    content_sha256: str
    skip_chunks: int
    metrics: _containers.ScalarMap[str, float]
    task_fingerprint: str
    phase_seconds: _containers.ScalarMap[str, float]
    contributors: int
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., base_version: _Optional[int] = ..., num_examples: _Optional[int] = ..., codec: _Optional[str] = ..., local_loss: _Optional[float] = ..., content_sha256: _Optional[str] = ..., skip_chunks: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., task_fingerprint: _Optional[str] = ..., phase_seconds: _Optional[_Mapping[str, float]] = ..., contributors: _Optional[int] = ...) -> None: ...

class UpdateReceipt(_message.Message):
    __slots__ = ("job_id", "round", "agent_id", "digest", "duplicate", "bytes_received")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    round: int
    agent_id: str
    digest: str
    duplicate: bool
    bytes_received: int
    def __init__(self, job_id: _Optional[str] = ..., round: _Optional[int] = ..., agent_id: _Optional[str] = ..., digest: _Optional[str] = ..., duplicate: _Optional[bool] = ..., bytes_received: _Optional[int] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("model", "version", "have_version", "skip_chunks")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    HAVE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SKIP_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    have_version: int
    skip_chunks: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., have_version: _Optional[int] = ..., skip_chunks: _Optional[int] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("header", "tensor")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    header: ModelHeader
    tensor: _tensor_pb2.TensorChunk
    def __init__(self, header: _Optional[_Union[ModelHeader, _Mapping]] = ..., tensor: _Optional[_Union[_tensor_pb2.TensorChunk, _Mapping]] = ...) -> None: ...

class ModelHeader(_message.Message):
    __slots__ = ("model", "version", "sha256", "tensors", "total_bytes", "steps", "total_chunks")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    sha256: str
    tensors: _containers.RepeatedCompositeFieldContainer[_tensor_pb2.TensorSpec]
    total_bytes: int
    steps: _containers.RepeatedCompositeFieldContainer[DeltaStep]
    total_chunks: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_tensor_pb2.TensorSpec, _Mapping]]] = ..., total_bytes: _Optional[int] = ..., steps: _Optional[_Iterable[_Union[DeltaStep, _Mapping]]] = ..., total_chunks: _Optional[int] = ...) -> None: ...

class DeltaStep(_message.Message):
    __slots__ = ("from_version", "to_version", "codec")
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    TO_VERSION_FIELD_NUMBER: _ClassVar[int]
    CODEC_FIELD_NUMBER: _ClassVar[int]
    from_version: int
    to_version: int
    codec: str
    def __init__(self, from_version: _Optional[int] = ..., to_version: _Optional[int] = ..., codec: _Optional[str] = ...) -> None: ...

class ProbeRequest(_message.Message):
    __slots__ = ("payload", "reply_bytes")
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    REPLY_BYTES_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    reply_bytes: int
    def __init__(self, payload: _Optional[bytes] = ..., reply_bytes: _Optional[int] = ...) -> None: ...

class ProbeResponse(_message.Message):
    __slots__ = ("payload",)
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    payload: bytes
    def __init__(self, payload: _Optional[bytes] = ...) -> None: ...
