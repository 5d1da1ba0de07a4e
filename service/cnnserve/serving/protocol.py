"""The handler's request protocol: what a TorchServe request may carry, parsed into typed requests.

One TorchServe model serves every operation on a network; a request says which with ``op``. Three encodings
reach the handler (see ``docs/handler-protocol.md``):

1. **Raw bytes** (``curl -T digit.png``): TorchServe hands us ``{"body": <bytes>}``: classify one image.
2. **JSON** (``Content-Type: application/json``): ``{"op": ..., "inputs": [...], ...}``. Images travel as
   ``{"image_b64": ...}``, tensors as ``{"shape": [...], "data": [floats]}`` or with ``data_b64``.
   A bare ``{"shape": ..., "data": ...}`` is one tensor to classify.
3. **Envelope** (the gateway, over TorchServe's gRPC ``input`` map): ``op`` and ``meta`` (JSON, the same
   fields as 2 with inputs described as ``{"kind": "image"}`` or ``{"kind": "tensor", "shape": [...]}``),
   and the raw input bytes under ``input.0``, ``input.1``, ... so nothing is base64-encoded on the hot path.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import numpy as np

from cnnserve.errors import InvalidInputError

__all__ = [
    "OPS",
    "RawInput",
    "ClassifyRequest",
    "ShapesRequest",
    "FineTuneRequest",
    "InfoRequest",
    "RevisionsRequest",
    "RollbackRequest",
    "ResetRequest",
    "Request",
    "parse_request",
    "encode_json",
    "describe_inputs",
    "envelope",
    "DEFAULT_TOP_K",
    "TRAIN_LAYERS",
]

OPS = ("classify", "shapes", "finetune", "info", "revisions", "rollback", "reset")
TRAIN_LAYERS = ("all", "classifier")
DEFAULT_TOP_K = 5
_BODY_KEYS = ("body", "data")


@dataclass(frozen=True)
class RawInput:
    """One input before decoding: encoded image bytes, or little-endian float32 bytes with a shape."""

    data: bytes
    shape: tuple[int, ...] | None = None  # None: an encoded image

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None


@dataclass(frozen=True)
class ClassifyRequest:
    inputs: tuple[RawInput, ...]
    top_k: int = DEFAULT_TOP_K
    revision: int | None = None  # pin a revision (0 = the trained base)
    min_revision: int | None = None  # read-your-writes: serve this revision or a newer one
    per_input_errors: bool = False  # report a bad input in its slot instead of failing the request


@dataclass(frozen=True)
class ShapesRequest:
    input_shape: tuple[int, ...] | None = None  # None: the model's own input shape


@dataclass(frozen=True)
class FineTuneRequest:
    inputs: tuple[RawInput, ...]
    labels: tuple[int, ...]
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    train_layers: str = "all"
    request_id: str | None = None  # a repeat returns the first result instead of stepping again
    expected_revision: int | None = None  # refuse (409) when the head has moved on
    max_grad_norm: float | None = None  # clip the gradient's total L2 norm to this; None (or 0): no clipping


@dataclass(frozen=True)
class InfoRequest:
    pass


@dataclass(frozen=True)
class RevisionsRequest:
    pass


@dataclass(frozen=True)
class RollbackRequest:
    to_revision: int


@dataclass(frozen=True)
class ResetRequest:
    pass


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


def encode_json(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def _as_bytes(value: Any) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, str):
        return value.encode()
    raise InvalidInputError.for_field("body", f"expected bytes, got {type(value).__name__}")


def _looks_like_json(data: bytes) -> bool:
    return data[:1] == b"{"


def _load_json(data: bytes, field: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInputError.for_field(field, f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidInputError.for_field(field, "expected a JSON object")
    return value


def parse_request(raw: Mapping[str, Any]) -> Request:
    """One TorchServe request dict -> a typed request; raises :class:`InvalidInputError`."""
    if "meta" in raw or "op" in raw:
        return _parse_envelope(raw)
    for key in _BODY_KEYS:
        if key in raw and raw[key] is not None:
            body = raw[key]
            break
    else:
        if raw:  # e.g. a form post: TorchServe split the body into form fields
            got = ", ".join(sorted(str(k) for k in raw)[:5])
            raise InvalidInputError.for_field(
                "body", f"no request body (got fields: {got}); send the image as application/octet-stream"
            )
        raise InvalidInputError.for_field("body", "empty request: send an image, a tensor or a JSON request")
    if isinstance(body, dict):  # TorchServe already decoded an application/json body
        return _parse_json(body)
    data = _as_bytes(body)
    if _looks_like_json(data):
        return _parse_json(_load_json(data, "body"))
    if not data:
        raise InvalidInputError.for_field("body", "empty body: expected encoded image bytes")
    return ClassifyRequest(inputs=(RawInput(data),))


def _parse_envelope(raw: Mapping[str, Any]) -> Request:
    meta = _load_json(_as_bytes(raw["meta"]), "meta") if "meta" in raw else {}
    if "op" in raw:
        meta["op"] = _as_bytes(raw["op"]).decode(errors="replace")
    descriptors = meta.pop("inputs", [])
    if not isinstance(descriptors, list):
        raise InvalidInputError.for_field("meta.inputs", "expected a list")
    inputs = []
    for index, descriptor in enumerate(descriptors):
        key = f"input.{index}"
        if key not in raw:
            raise InvalidInputError.for_field(key, "described in meta.inputs but not sent")
        data = _as_bytes(raw[key])
        kind = descriptor.get("kind", "image") if isinstance(descriptor, dict) else None
        if kind == "image":
            inputs.append(RawInput(data))
        elif kind == "tensor":
            inputs.append(RawInput(data, _shape(descriptor.get("shape"), f"inputs[{index}].shape")))
        else:
            raise InvalidInputError.for_field(f"inputs[{index}].kind", "expected 'image' or 'tensor'")
    return _build(meta, tuple(inputs))


def _parse_json(body: dict[str, Any]) -> Request:
    if "shape" in body and "inputs" not in body:  # a bare tensor
        body = {
            "op": "classify",
            "inputs": [body],
            **{k: v for k, v in body.items() if k not in ("shape", "data", "data_b64")},
        }
    items = body.get("inputs", [])
    if not isinstance(items, list):
        raise InvalidInputError.for_field("inputs", "expected a list")
    return _build(body, tuple(_json_input(item, index) for index, item in enumerate(items)))


def _json_input(item: Any, index: int) -> RawInput:
    field = f"inputs[{index}]"
    if not isinstance(item, dict):
        raise InvalidInputError.for_field(field, "expected an object with image_b64, or shape and data")
    if "image_b64" in item:
        return RawInput(_b64(item["image_b64"], f"{field}.image_b64"))
    if "shape" not in item:
        raise InvalidInputError.for_field(field, "expected image_b64, or shape with data or data_b64")
    shape = _shape(item["shape"], f"{field}.shape")
    if "data_b64" in item:
        return RawInput(_b64(item["data_b64"], f"{field}.data_b64"), shape)
    values = item.get("data")
    if not isinstance(values, list):
        raise InvalidInputError.for_field(f"{field}.data", "expected a flat list of numbers")
    try:
        array = np.asarray(values, dtype="<f4")
    except (TypeError, ValueError):
        raise InvalidInputError.for_field(f"{field}.data", "expected a flat list of numbers") from None
    if array.ndim != 1:
        raise InvalidInputError.for_field(f"{field}.data", "expected a flat list of numbers")
    return RawInput(array.tobytes(), shape)


def _b64(value: Any, field: str) -> bytes:
    if not isinstance(value, str):
        raise InvalidInputError.for_field(field, "expected a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInputError.for_field(field, "not valid base64") from None


def _shape(value: Any, field: str) -> tuple[int, ...]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(d, int) and not isinstance(d, bool) for d in value)
    ):
        raise InvalidInputError.for_field(field, "expected a list of positive integers")
    if any(d <= 0 for d in value):
        raise InvalidInputError.for_field(field, f"{value} is not a valid shape")
    return tuple(value)


def _int(body: Mapping[str, Any], key: str, default: int | None, minimum: int = 0) -> int | None:
    value = body.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise InvalidInputError.for_field(key, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _float(body: Mapping[str, Any], key: str, default: float | None) -> float:
    value = body.get(key, default)
    if value is None:
        raise InvalidInputError.for_field(key, "is required")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError.for_field(key, f"expected a finite number, got {value!r}")
    return float(value)


def _build(body: Mapping[str, Any], inputs: tuple[RawInput, ...]) -> Request:
    op = body.get("op", "classify")
    if op not in OPS:
        raise InvalidInputError.for_field("op", f"unknown operation {op!r} (known: {', '.join(OPS)})")
    if op == "classify":
        if not inputs:
            raise InvalidInputError.for_field("inputs", "no inputs to classify")
        top_k = _int(body, "top_k", DEFAULT_TOP_K, minimum=1)
        return ClassifyRequest(
            inputs=inputs,
            top_k=top_k or DEFAULT_TOP_K,
            revision=_int(body, "revision", None),
            min_revision=_int(body, "min_revision", None),
            per_input_errors=bool(body.get("per_input_errors", False)),
        )
    if op == "shapes":
        shape = body.get("input_shape")
        return ShapesRequest(input_shape=None if shape is None else _shape(shape, "input_shape"))
    if op == "finetune":
        return _build_finetune(body, inputs)
    if op == "rollback":
        to_revision = _int(body, "to_revision", None)
        if to_revision is None:
            raise InvalidInputError.for_field("to_revision", "is required")
        return RollbackRequest(to_revision)
    simple: dict[str, Request] = {
        "info": InfoRequest(),
        "revisions": RevisionsRequest(),
        "reset": ResetRequest(),
    }
    return simple[op]


def _build_finetune(body: Mapping[str, Any], inputs: tuple[RawInput, ...]) -> FineTuneRequest:
    if not inputs:
        raise InvalidInputError.for_field("inputs", "a fine-tune step needs at least one input")
    labels = body.get("labels")
    if not isinstance(labels, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in labels
    ):
        raise InvalidInputError.for_field("labels", "expected a list of integer class indices")
    if len(labels) != len(inputs):
        raise InvalidInputError.for_field("labels", f"{len(labels)} labels for {len(inputs)} inputs")
    lr = _float(body, "lr", None)
    if lr <= 0:
        raise InvalidInputError.for_field("lr", f"must be > 0, got {lr}")
    momentum = _float(body, "momentum", 0.9)
    if not 0.0 <= momentum < 1.0:
        raise InvalidInputError.for_field("momentum", f"must be in [0, 1), got {momentum}")
    weight_decay = _float(body, "weight_decay", 0.0)
    if weight_decay < 0:
        raise InvalidInputError.for_field("weight_decay", f"must be >= 0, got {weight_decay}")
    train_layers = body.get("train_layers", "all")
    if train_layers not in TRAIN_LAYERS:
        raise InvalidInputError.for_field("train_layers", f"expected one of {', '.join(TRAIN_LAYERS)}")
    max_grad_norm = None
    if body.get("max_grad_norm") is not None:
        max_grad_norm = _float(body, "max_grad_norm", None)
        if max_grad_norm < 0:
            raise InvalidInputError.for_field(
                "max_grad_norm", f"must be > 0 (0 or null: no clipping), got {max_grad_norm}"
            )
    request_id = body.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or not 0 < len(request_id) <= 128):
        raise InvalidInputError.for_field("request_id", "expected a string of 1 to 128 characters")
    return FineTuneRequest(
        inputs=inputs,
        labels=tuple(labels),
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        train_layers=train_layers,
        request_id=request_id or None,
        expected_revision=_int(body, "expected_revision", None),
        max_grad_norm=max_grad_norm or None,
    )


def describe_inputs(inputs: Sequence[RawInput]) -> list[dict[str, Any]]:
    """The ``meta.inputs`` descriptors for an envelope carrying ``inputs``."""
    return [
        {"kind": "tensor", "shape": list(i.shape)} if i.shape is not None else {"kind": "image"}
        for i in inputs
    ]


def envelope(op: str, meta: Mapping[str, Any], payloads: Sequence[bytes]) -> dict[str, bytes]:
    """An envelope request (what :func:`parse_request` reads): ``op``, ``meta`` as JSON, ``input.<i>``."""
    request = {"op": op.encode(), "meta": json.dumps(meta, separators=(",", ":")).encode()}
    for index, payload in enumerate(payloads):
        request[f"input.{index}"] = payload
    return request
