from tandem.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Placement(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLACEMENT_UNSPECIFIED: _ClassVar[Placement]
    PLACEMENT_EDGE: _ClassVar[Placement]
    PLACEMENT_CLOUD: _ClassVar[Placement]
    PLACEMENT_SPLIT: _ClassVar[Placement]
    PLACEMENT_CASCADE: _ClassVar[Placement]
PLACEMENT_UNSPECIFIED: Placement
PLACEMENT_EDGE: Placement
PLACEMENT_CLOUD: Placement
PLACEMENT_SPLIT: Placement
PLACEMENT_CASCADE: Placement

class InferRequest(_message.Message):
    __slots__ = ("request_id", "model", "version", "input", "start_layer", "deadline_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    START_LAYER_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: int
    input: _tensor_pb2.Tensor
    start_layer: int
    deadline_ms: int
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., input: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., start_layer: _Optional[int] = ..., deadline_ms: _Optional[int] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("request_id", "model", "version", "output", "placement", "error_code", "error_message", "server_seconds")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    ERROR_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SERVER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    model: str
    version: int
    output: _tensor_pb2.Tensor
    placement: Placement
    error_code: int
    error_message: str
    server_seconds: float
    def __init__(self, request_id: _Optional[str] = ..., model: _Optional[str] = ..., version: _Optional[int] = ..., output: _Optional[_Union[_tensor_pb2.Tensor, _Mapping]] = ..., placement: _Optional[_Union[Placement, str]] = ..., error_code: _Optional[int] = ..., error_message: _Optional[str] = ..., server_seconds: _Optional[float] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ("model", "version")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("index", "name", "output_shape", "output_bytes", "seconds_per_example")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_BYTES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_PER_EXAMPLE_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    output_shape: _containers.RepeatedScalarFieldContainer[int]
    output_bytes: int
    seconds_per_example: float
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., output_shape: _Optional[_Iterable[int]] = ..., output_bytes: _Optional[int] = ..., seconds_per_example: _Optional[float] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model", "version", "sha256", "input_shape", "stages", "device", "split_note")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    SPLIT_NOTE_FIELD_NUMBER: _ClassVar[int]
    model: str
    version: int
    sha256: str
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    device: str
    split_note: str
    def __init__(self, model: _Optional[str] = ..., version: _Optional[int] = ..., sha256: _Optional[str] = ..., input_shape: _Optional[_Iterable[int]] = ..., stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ..., device: _Optional[str] = ..., split_note: _Optional[str] = ...) -> None: ...
