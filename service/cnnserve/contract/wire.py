"""The bytes on the wire: the envelope the gateway sends, the encodings the worker parses, the replies (JSON,
or packed for the gateway's classify requests) the gateway reads back."""

from __future__ import annotations

import base64
import binascii
import json
import logging
import math
from collections.abc import Mapping
from typing import Any

from cnnserve.contract.defaults import (
    DEFAULT_MOMENTUM,
    DEFAULT_REPLY,
    DEFAULT_TOP_K,
    DEFAULT_TRAIN_LAYERS,
    DEFAULT_WEIGHT_DECAY,
    MAX_REQUEST_ID_CHARS,
    OPS,
    PACKED_REPLY,
    TRAIN_LAYERS,
)
from cnnserve.contract.replies import error_from_json, is_packed
from cnnserve.contract.requests import (
    ClassifyRequest,
    FineTuneRequest,
    InfoRequest,
    Operation,
    RawInput,
    Reply,
    Request,
    ResetRequest,
    RevisionsRequest,
    RollbackRequest,
    ShapesRequest,
)
from cnnserve.errors import InternalError, InvalidInputError

_BODY_KEYS = ("body", "data")

log = logging.getLogger(__name__)


def encode_json(payload: Mapping[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), allow_nan=False).encode()


def envelope(request: Operation[Any]) -> dict[str, bytes]:
    """``request`` as TorchServe's gRPC ``input`` map, packed: ``op``, ``meta`` as JSON (its ``inputs`` give
    each input's kind, shape and length in bytes) and every input's bytes concatenated under ``inputs``.
    A classify request asks for the packed reply, which :func:`read_reply` reads."""
    meta = request.meta()
    if isinstance(request, ClassifyRequest):
        meta["reply"] = PACKED_REPLY
    encoded = {"op": request.op.encode(), "meta": encode_json(meta)}
    inputs = request.raw_inputs()
    if inputs:
        encoded["inputs"] = b"".join([item.data for item in inputs])  # the one copy of the inputs
    return encoded


def legacy_envelope(request: Operation[Any]) -> dict[str, bytes]:
    """``request`` as an older gateway sends it: ``op``, ``meta``, and one ``input.<i>`` entry per input,
    answered in JSON. Workers older than the packed envelope read only this form."""
    encoded = {"op": request.op.encode(), "meta": encode_json(request.meta())}
    for index, item in enumerate(request.raw_inputs()):
        encoded[f"input.{index}"] = bytes(item.data)
    return encoded


def read_reply(request: Operation[Reply], data: bytes | str) -> Reply:
    """The worker's answer to ``request``: its reply type, or the error it answered raised here. A packed
    reply (its magic prefix tells) or JSON: an older worker answers JSON whatever the request asked."""
    try:
        if is_packed(data):
            assert not isinstance(data, str)
            return request.read_packed(data)
        body = json.loads(data)
        if not isinstance(body, dict):
            raise ValueError("not a JSON object")
        if "error" in body:
            error = body["error"]
            raise error_from_json(error if isinstance(error, dict) else {"message": str(error)})
        return request.read(body)
    except (ValueError, KeyError, TypeError, AttributeError) as exc:  # AttributeError: a list for an object
        log.error("an unreadable %s reply (%s): %r", request.op, exc, data[:200])
        raise InternalError(f"the model returned an unreadable {request.op} reply") from None


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
    if "inputs" in raw:
        return _build(meta, _split_blob(raw["inputs"], descriptors, raw))
    inputs = []
    for index, descriptor in enumerate(descriptors):  # an older gateway's envelope: input.<i> each
        key = f"input.{index}"
        if key not in raw:
            raise InvalidInputError.for_field(key, "described in meta.inputs but not sent")
        inputs.append(RawInput(_as_bytes(raw[key]), _descriptor_shape(descriptor, index)))
    return _build(meta, tuple(inputs))


def _descriptor_shape(descriptor: Any, index: int) -> tuple[int, ...] | None:
    """A ``meta.inputs`` descriptor's input shape: None for an image."""
    kind = descriptor.get("kind", "image") if isinstance(descriptor, dict) else None
    if kind == "image":
        return None
    if kind == "tensor":
        return _shape(descriptor.get("shape"), f"inputs[{index}].shape")
    raise InvalidInputError.for_field(f"inputs[{index}].kind", "expected 'image' or 'tensor'")


def _split_blob(value: Any, descriptors: list[Any], raw: Mapping[str, Any]) -> tuple[RawInput, ...]:
    """A packed envelope's inputs: read-only views into its one blob, framed by the descriptors' lengths."""
    if "input.0" in raw:
        raise InvalidInputError.for_field(
            "inputs", "send the inputs either as one inputs blob or as input.<i> entries, not both"
        )
    if isinstance(value, str):
        value = value.encode()
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise InvalidInputError.for_field("inputs", f"expected bytes, got {type(value).__name__}")
    blob = memoryview(value).cast("B").toreadonly()  # bytearray from TorchServe: viewed, not copied
    inputs = []
    offset = 0
    for index, descriptor in enumerate(descriptors):
        shape = _descriptor_shape(descriptor, index)
        length = descriptor.get("bytes")  # a dict: _descriptor_shape checked it
        if not isinstance(length, int) or isinstance(length, bool) or length < 0:
            raise InvalidInputError.for_field(
                f"inputs[{index}].bytes", "expected the input's length in bytes, an integer >= 0"
            )
        end = offset + length
        if end > len(blob):
            raise InvalidInputError.for_field(
                f"inputs[{index}].bytes",
                f"inputs[0..{index}] need {end} bytes but the inputs blob has {len(blob)}",
            )
        inputs.append(RawInput(blob[offset:end], shape))
        offset = end
    if offset != len(blob):
        raise InvalidInputError.for_field(
            "inputs", f"meta.inputs describe {offset} bytes but the inputs blob has {len(blob)}"
        )
    return tuple(inputs)


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
    import numpy as np

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


def _int(body: Mapping[str, Any], key: str, default: int | None = None) -> int | None:
    """An optional integer field; its range is the request type's check."""
    value = body.get(key, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidInputError.for_field(key, f"expected an integer, got {value!r}")
    return value


def _float(body: Mapping[str, Any], key: str, default: float | None = None) -> float | None:
    """An optional number field; its range is the request type's check."""
    value = body.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInputError.for_field(key, f"expected a finite number, got {value!r}")
    return float(value)


def _string(body: Mapping[str, Any], key: str, default: str) -> str:
    """An optional string field (absent or null: ``default``); its values are the request type's check."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, str):
        raise InvalidInputError.for_field(key, f"expected a string, got {value!r}")
    return value


def _build(body: Mapping[str, Any], inputs: tuple[RawInput, ...]) -> Request:
    op = body.get("op", "classify")
    if op not in OPS:
        raise InvalidInputError.for_field("op", f"unknown operation {op!r} (known: {', '.join(OPS)})")
    if op == "classify":
        top_k = _int(body, "top_k")
        return ClassifyRequest(
            inputs=inputs,
            top_k=DEFAULT_TOP_K if top_k is None else top_k,  # absent or null: the default
            revision=_int(body, "revision"),
            min_revision=_int(body, "min_revision"),
            per_input_errors=bool(body.get("per_input_errors", False)),
            reply=_string(body, "reply", DEFAULT_REPLY),
        )
    if op == "shapes":
        shape = body.get("input_shape")
        return ShapesRequest(input_shape=None if shape is None else _shape(shape, "input_shape"))
    if op == "finetune":
        return _build_finetune(body, inputs)
    if op == "rollback":
        to_revision = _int(body, "to_revision")
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
    labels = body.get("labels")
    if not isinstance(labels, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in labels
    ):
        raise InvalidInputError.for_field("labels", "expected a list of integer class indices")
    lr = _float(body, "lr")
    if lr is None:
        raise InvalidInputError.for_field("lr", "is required")
    train_layers = body.get("train_layers", DEFAULT_TRAIN_LAYERS)
    if not isinstance(train_layers, str):
        raise InvalidInputError.for_field("train_layers", f"expected one of {', '.join(TRAIN_LAYERS)}")
    request_id = body.get("request_id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidInputError.for_field(
            "request_id", f"expected a string of 1 to {MAX_REQUEST_ID_CHARS} characters"
        )
    momentum = _float(body, "momentum", DEFAULT_MOMENTUM)
    weight_decay = _float(body, "weight_decay", DEFAULT_WEIGHT_DECAY)
    return FineTuneRequest(
        inputs=inputs,
        labels=tuple(labels),
        lr=lr,
        momentum=DEFAULT_MOMENTUM if momentum is None else momentum,
        weight_decay=DEFAULT_WEIGHT_DECAY if weight_decay is None else weight_decay,
        train_layers=train_layers,
        request_id=request_id,
        expected_revision=_int(body, "expected_revision"),
        max_grad_norm=_float(body, "max_grad_norm") or None,  # absent, null or 0: no clipping
    )
