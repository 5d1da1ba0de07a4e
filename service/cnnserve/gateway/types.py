"""The gateway's domain types: what the core takes and returns, free of protobuf and of transport."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TensorInput",
    "ModelInput",
    "ClassifyCall",
    "ClassScore",
    "Timing",
    "ClassifyResult",
    "ShapesCall",
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
    top_k: int = 5
    revision: int | None = None
    min_revision: int | None = None


@dataclass(frozen=True)
class ClassScore:
    label: str
    index: int
    probability: float


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
    momentum: float = 0.9
    weight_decay: float = 0.0
    train_layers: str = "all"  # all | classifier
    request_id: str = ""
    expected_revision: int | None = None
    max_grad_norm: float | None = None  # clip the gradient's total L2 norm to this; None: no clipping


@dataclass(frozen=True)
class FineTuneResult:
    model: str
    version: str
    revision: int
    parent: int
    step: int
    loss_before: float
    loss_after: float
    batch_accuracy: float
    grad_norm: float  # before any clipping
    replayed: bool
    request_id: str
    timing: Timing = field(default_factory=Timing)
    grad_clipped: bool = False  # grad_norm was above max_grad_norm: the update used the clipped gradient


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
    info: dict[str, Any]  # the handler's info reply: card, formats, parity, head revision, ...


@dataclass(frozen=True)
class RevisionInfo:
    revision: int
    kind: str
    parent: int | None
    step: int
    sha256: str
    created: float
    pruned: bool
    request_id: str | None


@dataclass(frozen=True)
class RevisionList:
    model: str
    head: int
    revisions: tuple[RevisionInfo, ...]


@dataclass(frozen=True)
class RevisionChange:
    model: str
    revision: RevisionInfo
    weights_of: int
