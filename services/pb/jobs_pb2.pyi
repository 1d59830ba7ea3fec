from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_KIND_UNSPECIFIED: _ClassVar[JobKind]
    JOB_KIND_CONVERT: _ClassVar[JobKind]
    JOB_KIND_PREPROCESS: _ClassVar[JobKind]
    JOB_KIND_FINETUNE: _ClassVar[JobKind]
    JOB_KIND_EXPORT: _ClassVar[JobKind]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_KIND_UNSPECIFIED: JobKind
JOB_KIND_CONVERT: JobKind
JOB_KIND_PREPROCESS: JobKind
JOB_KIND_FINETUNE: JobKind
JOB_KIND_EXPORT: JobKind
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class ConvertJob(_message.Message):
    __slots__ = ("source", "output", "dtype", "overwrite", "quantize")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    source: str
    output: str
    dtype: str
    overwrite: bool
    quantize: str
    def __init__(self, source: _Optional[str] = ..., output: _Optional[str] = ..., dtype: _Optional[str] = ..., overwrite: _Optional[bool] = ..., quantize: _Optional[str] = ...) -> None: ...

class PreprocessJob(_message.Message):
    __slots__ = ("source", "output", "format", "seq_length", "pack", "min_length", "tokenizer", "overwrite")
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SEQ_LENGTH_FIELD_NUMBER: _ClassVar[int]
    PACK_FIELD_NUMBER: _ClassVar[int]
    MIN_LENGTH_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    source: str
    output: str
    format: str
    seq_length: int
    pack: bool
    min_length: int
    tokenizer: str
    overwrite: bool
    def __init__(self, source: _Optional[str] = ..., output: _Optional[str] = ..., format: _Optional[str] = ..., seq_length: _Optional[int] = ..., pack: _Optional[bool] = ..., min_length: _Optional[int] = ..., tokenizer: _Optional[str] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class FinetuneJob(_message.Message):
    __slots__ = ("base_model", "preset", "dataset", "output", "method", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets", "learning_rate", "min_lr_ratio", "warmup_ratio", "max_steps", "epochs", "batch_size", "grad_accum", "weight_decay", "grad_clip", "save_every", "keep_last", "eval_every", "eval_ratio", "seed", "dtype", "overwrite", "loss_scale", "recompute", "quantize")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    PRESET_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    LORA_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_ALPHA_FIELD_NUMBER: _ClassVar[int]
    LORA_DROPOUT_FIELD_NUMBER: _ClassVar[int]
    LORA_TARGETS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_RATIO_FIELD_NUMBER: _ClassVar[int]
    WARMUP_RATIO_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRAD_ACCUM_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_FIELD_NUMBER: _ClassVar[int]
    SAVE_EVERY_FIELD_NUMBER: _ClassVar[int]
    KEEP_LAST_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_FIELD_NUMBER: _ClassVar[int]
    EVAL_RATIO_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    LOSS_SCALE_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    QUANTIZE_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    preset: str
    dataset: str
    output: str
    method: str
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    lora_targets: str
    learning_rate: float
    min_lr_ratio: float
    warmup_ratio: float
    max_steps: int
    epochs: float
    batch_size: int
    grad_accum: int
    weight_decay: float
    grad_clip: float
    save_every: int
    keep_last: int
    eval_every: int
    eval_ratio: float
    seed: int
    dtype: str
    overwrite: bool
    loss_scale: str
    recompute: bool
    quantize: str
    def __init__(self, base_model: _Optional[str] = ..., preset: _Optional[str] = ..., dataset: _Optional[str] = ..., output: _Optional[str] = ..., method: _Optional[str] = ..., lora_rank: _Optional[int] = ..., lora_alpha: _Optional[float] = ..., lora_dropout: _Optional[float] = ..., lora_targets: _Optional[str] = ..., learning_rate: _Optional[float] = ..., min_lr_ratio: _Optional[float] = ..., warmup_ratio: _Optional[float] = ..., max_steps: _Optional[int] = ..., epochs: _Optional[float] = ..., batch_size: _Optional[int] = ..., grad_accum: _Optional[int] = ..., weight_decay: _Optional[float] = ..., grad_clip: _Optional[float] = ..., save_every: _Optional[int] = ..., keep_last: _Optional[int] = ..., eval_every: _Optional[int] = ..., eval_ratio: _Optional[float] = ..., seed: _Optional[int] = ..., dtype: _Optional[str] = ..., overwrite: _Optional[bool] = ..., loss_scale: _Optional[str] = ..., recompute: _Optional[bool] = ..., quantize: _Optional[str] = ...) -> None: ...

class ExportJob(_message.Message):
    __slots__ = ("model", "output", "max_batch", "max_len", "dynamic", "overwrite")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_LEN_FIELD_NUMBER: _ClassVar[int]
    DYNAMIC_FIELD_NUMBER: _ClassVar[int]
    OVERWRITE_FIELD_NUMBER: _ClassVar[int]
    model: str
    output: str
    max_batch: int
    max_len: int
    dynamic: bool
    overwrite: bool
    def __init__(self, model: _Optional[str] = ..., output: _Optional[str] = ..., max_batch: _Optional[int] = ..., max_len: _Optional[int] = ..., dynamic: _Optional[bool] = ..., overwrite: _Optional[bool] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("idempotency_key", "convert", "preprocess", "finetune", "export")
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CONVERT_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_FIELD_NUMBER: _ClassVar[int]
    FINETUNE_FIELD_NUMBER: _ClassVar[int]
    EXPORT_FIELD_NUMBER: _ClassVar[int]
    idempotency_key: str
    convert: ConvertJob
    preprocess: PreprocessJob
    finetune: FinetuneJob
    export: ExportJob
    def __init__(self, idempotency_key: _Optional[str] = ..., convert: _Optional[_Union[ConvertJob, _Mapping]] = ..., preprocess: _Optional[_Union[PreprocessJob, _Mapping]] = ..., finetune: _Optional[_Union[FinetuneJob, _Mapping]] = ..., export: _Optional[_Union[ExportJob, _Mapping]] = ...) -> None: ...

class JobProgress(_message.Message):
    __slots__ = ("step", "total_steps", "bytes_done", "bytes_total", "loss", "learning_rate", "tokens_per_second", "eta_seconds", "fraction")
    STEP_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    ETA_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FRACTION_FIELD_NUMBER: _ClassVar[int]
    step: int
    total_steps: int
    bytes_done: int
    bytes_total: int
    loss: float
    learning_rate: float
    tokens_per_second: float
    eta_seconds: float
    fraction: float
    def __init__(self, step: _Optional[int] = ..., total_steps: _Optional[int] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., loss: _Optional[float] = ..., learning_rate: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., eta_seconds: _Optional[float] = ..., fraction: _Optional[float] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "kind", "state", "progress", "message", "error", "output", "idempotency_key", "created_at", "started_at", "finished_at", "executions", "cancel_requested", "worker", "result_json", "request", "loss_curve")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_AT_FIELD_NUMBER: _ClassVar[int]
    EXECUTIONS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REQUESTED_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    RESULT_JSON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    LOSS_CURVE_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: JobKind
    state: JobState
    progress: JobProgress
    message: str
    error: str
    output: str
    idempotency_key: str
    created_at: float
    started_at: float
    finished_at: float
    executions: int
    cancel_requested: bool
    worker: str
    result_json: str
    request: SubmitJobRequest
    loss_curve: _containers.RepeatedCompositeFieldContainer[LossPoint]
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[JobKind, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., progress: _Optional[_Union[JobProgress, _Mapping]] = ..., message: _Optional[str] = ..., error: _Optional[str] = ..., output: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., created_at: _Optional[float] = ..., started_at: _Optional[float] = ..., finished_at: _Optional[float] = ..., executions: _Optional[int] = ..., cancel_requested: _Optional[bool] = ..., worker: _Optional[str] = ..., result_json: _Optional[str] = ..., request: _Optional[_Union[SubmitJobRequest, _Mapping]] = ..., loss_curve: _Optional[_Iterable[_Union[LossPoint, _Mapping]]] = ...) -> None: ...

class LossPoint(_message.Message):
    __slots__ = ("step", "loss")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    step: int
    loss: float
    def __init__(self, step: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("state", "kind", "limit")
    STATE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    kind: JobKind
    limit: int
    def __init__(self, state: _Optional[_Union[JobState, str]] = ..., kind: _Optional[_Union[JobKind, str]] = ..., limit: _Optional[int] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListStoreRequest(_message.Message):
    __slots__ = ("area",)
    AREA_FIELD_NUMBER: _ClassVar[int]
    area: str
    def __init__(self, area: _Optional[str] = ...) -> None: ...

class StoreEntry(_message.Message):
    __slots__ = ("area", "name", "kind", "size_bytes", "modified_at")
    AREA_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MODIFIED_AT_FIELD_NUMBER: _ClassVar[int]
    area: str
    name: str
    kind: str
    size_bytes: int
    modified_at: float
    def __init__(self, area: _Optional[str] = ..., name: _Optional[str] = ..., kind: _Optional[str] = ..., size_bytes: _Optional[int] = ..., modified_at: _Optional[float] = ...) -> None: ...

class ListStoreResponse(_message.Message):
    __slots__ = ("entries",)
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    entries: _containers.RepeatedCompositeFieldContainer[StoreEntry]
    def __init__(self, entries: _Optional[_Iterable[_Union[StoreEntry, _Mapping]]] = ...) -> None: ...
