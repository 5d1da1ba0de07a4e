"""The requests the gateway sends a worker: each checks itself when built, on either side of the hop."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Generic, TypeVar, Union

from cnnserve.contract.defaults import (
    DEFAULT_MOMENTUM,
    DEFAULT_REPLY,
    DEFAULT_TOP_K,
    DEFAULT_TRAIN_LAYERS,
    DEFAULT_WEIGHT_DECAY,
    MAX_REQUEST_ID_CHARS,
    MAX_TOP_K,
    REPLY_FORMATS,
    TRAIN_LAYERS,
)
from cnnserve.contract.replies import (
    ClassifyReply,
    FineTuneReply,
    ModelInfo,
    RevisionChangeReply,
    RevisionsReply,
    ShapesReply,
)
from cnnserve.errors import InvalidInputError

Reply = TypeVar("Reply")

# ---- inputs ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawInput:
    """One input before decoding: encoded image bytes, or little-endian float32 bytes with a shape.

    On the worker, an input of a packed envelope is a read-only ``memoryview`` slice of the request's one
    ``inputs`` blob, so no input is copied before its decoding reads it."""

    data: bytes | memoryview
    shape: tuple[int, ...] | None = None  # None: an encoded image


def check_image(data: bytes | memoryview, field: str) -> None:
    if not data:
        raise InvalidInputError.for_field(field, "empty image bytes")


def check_tensor(data: bytes | memoryview, shape: Sequence[int], field: str) -> tuple[int, ...]:
    """A tensor input's own consistency (``field``.shape, ``field``.data): a valid shape, as many
    little-endian float32 bytes as it holds, all finite. The model's input shape is the worker's check."""
    dims = tuple(int(d) for d in shape)
    if not dims or any(d <= 0 for d in dims):
        raise InvalidInputError.for_field(f"{field}.shape", f"{list(dims)} is not a valid shape")
    expected = math.prod(dims) * 4
    if len(data) != expected:
        raise InvalidInputError.for_field(
            f"{field}.data",
            f"{len(data)} bytes do not match shape {list(dims)}: expected {expected} bytes of little-endian "
            "float32",
        )
    import numpy as np  # here, not at import: the CLI reads this module's defaults and should start fast

    if not np.isfinite(np.frombuffer(data, dtype="<f4")).all():
        raise InvalidInputError.for_field(f"{field}.data", "contains NaN or Inf values")
    return dims


def _describe(inputs: Sequence[RawInput]) -> list[dict[str, Any]]:
    """The ``meta.inputs`` descriptors for an envelope carrying ``inputs``: kind, shape and length in bytes
    (which frames each input in a packed envelope's blob; an older worker reads kind and shape only)."""
    return [
        {"kind": "tensor", "shape": list(i.shape), "bytes": len(i.data)}
        if i.shape is not None
        else {"kind": "image", "bytes": len(i.data)}
        for i in inputs
    ]


def _check_revision(value: int | None, name: str) -> None:
    if value is not None and value < 0:
        raise InvalidInputError.for_field(name, f"expected an integer >= 0, got {value!r}")


def _check_some(inputs: Sequence[RawInput]) -> None:
    if not inputs:
        raise InvalidInputError.for_field("inputs", "at least one input is required")


# ---- requests ----------------------------------------------------------------------------------


class Operation(Generic[Reply]):
    """What every request type has: its ``op``, its JSON fields, its inputs, and how its reply reads."""

    op: ClassVar[str]

    def meta(self) -> dict[str, Any]:
        return {}

    def raw_inputs(self) -> tuple[RawInput, ...]:
        return ()

    def read(self, body: Mapping[str, Any]) -> Reply:
        raise NotImplementedError

    def read_packed(self, data: bytes | bytearray | memoryview) -> Reply:
        """The reply in the packed form: only classify answers one."""
        raise ValueError(f"a packed reply to a {self.op} request")


@dataclass(frozen=True)
class ClassifyRequest(Operation["ClassifyReply"]):
    op: ClassVar[str] = "classify"
    inputs: tuple[RawInput, ...]
    top_k: int = DEFAULT_TOP_K
    revision: int | None = None  # pin a revision (0 = the trained base)
    min_revision: int | None = None  # read-your-writes: serve this revision or a newer one
    per_input_errors: bool = False  # report a bad input in its slot instead of failing the request
    # How the worker answers: "json" (what TorchServe-direct clients get), or "packed" (a binary body that
    # only cnnserve's read_reply reads: ClassifyReply.from_packed). The gateway's envelope asks for packed.
    reply: str = DEFAULT_REPLY

    def __post_init__(self) -> None:
        _check_some(self.inputs)
        if not 1 <= self.top_k <= MAX_TOP_K:
            raise InvalidInputError.for_field("top_k", f"must be between 1 and {MAX_TOP_K}, got {self.top_k}")
        _check_revision(self.revision, "revision")
        _check_revision(self.min_revision, "min_revision")
        if self.reply not in REPLY_FORMATS:
            raise InvalidInputError.for_field("reply", f"expected one of {', '.join(REPLY_FORMATS)}")

    def meta(self) -> dict[str, Any]:
        return {
            "inputs": _describe(self.inputs),
            "top_k": self.top_k,
            "revision": self.revision,
            "min_revision": self.min_revision,
            "per_input_errors": self.per_input_errors,
            "reply": self.reply,
        }

    def raw_inputs(self) -> tuple[RawInput, ...]:
        return self.inputs

    def read(self, body: Mapping[str, Any]) -> ClassifyReply:
        return ClassifyReply.from_json(body)

    def read_packed(self, data: bytes | bytearray | memoryview) -> ClassifyReply:
        return ClassifyReply.from_packed(data)


@dataclass(frozen=True)
class ShapesRequest(Operation["ShapesReply"]):
    op: ClassVar[str] = "shapes"
    input_shape: tuple[int, ...] | None = None  # None: the model's own input shape

    def meta(self) -> dict[str, Any]:
        return {"input_shape": None if self.input_shape is None else list(self.input_shape)}

    def read(self, body: Mapping[str, Any]) -> ShapesReply:
        return ShapesReply.from_json(body)


@dataclass(frozen=True)
class FineTuneRequest(Operation["FineTuneReply"]):
    op: ClassVar[str] = "finetune"
    inputs: tuple[RawInput, ...]
    labels: tuple[int, ...]
    lr: float
    momentum: float = DEFAULT_MOMENTUM
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    train_layers: str = DEFAULT_TRAIN_LAYERS
    request_id: str | None = None  # a repeat returns the first result instead of stepping again
    expected_revision: int | None = None  # refuse (409) when the head has moved on
    max_grad_norm: float | None = None  # clip the gradient's total L2 norm to this; None: no clipping

    def __post_init__(self) -> None:
        # The lr's upper bound and the labels' range belong to the model: the worker checks those.
        _check_some(self.inputs)
        if len(self.labels) != len(self.inputs):
            raise InvalidInputError.for_field(
                "labels", f"{len(self.labels)} labels for {len(self.inputs)} inputs"
            )
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise InvalidInputError.for_field("lr", f"must be a finite number > 0, got {self.lr}")
        if not (math.isfinite(self.momentum) and 0 <= self.momentum < 1):
            raise InvalidInputError.for_field("momentum", f"must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise InvalidInputError.for_field("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.train_layers not in TRAIN_LAYERS:
            raise InvalidInputError.for_field("train_layers", f"expected one of {', '.join(TRAIN_LAYERS)}")
        clip = self.max_grad_norm
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise InvalidInputError.for_field(
                "max_grad_norm", f"must be a finite number > 0 (unset: no clipping), got {clip}"
            )
        if self.request_id is not None and not 0 < len(self.request_id) <= MAX_REQUEST_ID_CHARS:
            raise InvalidInputError.for_field(
                "request_id", f"expected a string of 1 to {MAX_REQUEST_ID_CHARS} characters"
            )
        _check_revision(self.expected_revision, "expected_revision")

    def meta(self) -> dict[str, Any]:
        return {
            "inputs": _describe(self.inputs),
            "labels": list(self.labels),
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "train_layers": self.train_layers,
            "request_id": self.request_id,
            "expected_revision": self.expected_revision,
            "max_grad_norm": self.max_grad_norm,
        }

    def raw_inputs(self) -> tuple[RawInput, ...]:
        return self.inputs

    def read(self, body: Mapping[str, Any]) -> FineTuneReply:
        return FineTuneReply.from_json(body)


@dataclass(frozen=True)
class InfoRequest(Operation["ModelInfo"]):
    op: ClassVar[str] = "info"

    def read(self, body: Mapping[str, Any]) -> ModelInfo:
        return ModelInfo.from_json(body)


@dataclass(frozen=True)
class RevisionsRequest(Operation["RevisionsReply"]):
    op: ClassVar[str] = "revisions"

    def read(self, body: Mapping[str, Any]) -> RevisionsReply:
        return RevisionsReply.from_json(body)


@dataclass(frozen=True)
class RollbackRequest(Operation["RevisionChangeReply"]):
    op: ClassVar[str] = "rollback"
    to_revision: int

    def __post_init__(self) -> None:
        _check_revision(self.to_revision, "to_revision")

    def meta(self) -> dict[str, Any]:
        return {"to_revision": self.to_revision}

    def read(self, body: Mapping[str, Any]) -> RevisionChangeReply:
        return RevisionChangeReply.from_json(body)


@dataclass(frozen=True)
class ResetRequest(Operation["RevisionChangeReply"]):
    op: ClassVar[str] = "reset"

    def read(self, body: Mapping[str, Any]) -> RevisionChangeReply:
        return RevisionChangeReply.from_json(body)


# typing.Union, not "A | B": this module runs in TorchServe workers, which may be Python 3.9.
Request = Union[
    ClassifyRequest,
    ShapesRequest,
    FineTuneRequest,
    InfoRequest,
    RevisionsRequest,
    RollbackRequest,
    ResetRequest,
]
