"""The gateway's domain types: what the core takes and returns, free of protobuf and of transport.

Where the gateway returns what the worker answered, the type is the contract's (:mod:`cnnserve.contract`)
or extends it, so a field the worker adds reaches every transport without a copy here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cnnserve.contract import (
    DEFAULT_MOMENTUM,
    DEFAULT_TOP_K,
    DEFAULT_TRAIN_LAYERS,
    DEFAULT_WEIGHT_DECAY,
    ClassScore,
    FineTuneReply,
    ModelInfo,
    RevisionChangeReply,
    RevisionInfo,
    RevisionsReply,
    ShapesReply,
)

__all__ = [
    "TensorInput",
    "ModelInput",
    "ClassifyCall",
    "ClassScore",
    "Timing",
    "ClassifyResult",
    "ShapesCall",
    "ShapesResult",
    "FineTuneCall",
    "FineTuneResult",
    "ModelStatus",
    "ModelDetails",
    "RevisionInfo",
    "RevisionList",
    "RevisionChange",
]


@dataclass(frozen=True)
class TensorInput:
    shape: tuple[int, ...]
    data: bytes  # float32, little-endian, row-major


@dataclass(frozen=True)
class ModelInput:
    """Exactly one of ``image`` (encoded bytes) and ``tensor``."""

    image: bytes | None = None
    tensor: TensorInput | None = None


@dataclass(frozen=True)
class ClassifyCall:
    model: str
    inputs: tuple[ModelInput, ...]
    version: str = ""
    top_k: int = DEFAULT_TOP_K  # 0: the default
    revision: int | None = None
    min_revision: int | None = None


@dataclass(frozen=True)
class Timing:
    server_ms: float = 0.0
    backend_ms: float = 0.0
    batch_inputs: int = 0


@dataclass(frozen=True)
class ClassifyResult:
    model: str
    version: str
    revision: int
    predictions: tuple[tuple[ClassScore, ...], ...]
    timing: Timing = field(default_factory=Timing)


@dataclass(frozen=True)
class ShapesCall:
    model: str
    version: str = ""
    input_shape: tuple[int, ...] = ()  # empty: the model's own


@dataclass(frozen=True)
class FineTuneCall:
    model: str
    inputs: tuple[ModelInput, ...]
    labels: tuple[int, ...]
    lr: float
    version: str = ""
    momentum: float = DEFAULT_MOMENTUM
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    train_layers: str = DEFAULT_TRAIN_LAYERS  # all | classifier
    request_id: str = ""  # empty: the gateway makes one
    expected_revision: int | None = None
    max_grad_norm: float | None = None  # clip the gradient's total L2 norm to this; None: no clipping


@dataclass(frozen=True)
class FineTuneResult(FineTuneReply):
    """The worker's reply to the step, with the request id it ran under and the gateway's timing."""

    request_id: str = ""
    timing: Timing = field(default_factory=Timing)


@dataclass(frozen=True)
class ModelStatus:
    name: str
    version: str
    versions: tuple[str, ...]
    workers: int
    ready_workers: int

    @property
    def serving(self) -> bool:
        return self.ready_workers > 0


@dataclass(frozen=True)
class ModelDetails:
    status: ModelStatus
    info: ModelInfo  # the worker's: card, formats, parity, device, head revision, ...


# What the worker answers is what the gateway returns for these: one type, not a copy.
ShapesResult = ShapesReply  # the layer table of GetLayerShapes
RevisionList = RevisionsReply
RevisionChange = RevisionChangeReply
