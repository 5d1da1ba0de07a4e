"""The OIP tensor codec: request tensors -> the core's inputs, the core's results -> output tensors.

Transport-neutral and torch-free: the gRPC servicer and the REST app turn their messages into
:class:`InferRequest` (tensor data either raw bytes or a flat list of values) and :class:`OutputTensor` back
into theirs. Every check is here, once, and every message names the tensor it is about.

The interface (docs/oip.md):

- one input per request: ``input`` ``FP32 [N, C, H, W]`` (or ``[C, H, W]``: N = 1), already preprocessed, or
  ``image`` ``BYTES [N]`` (or ``[N, 1]``), encoded images;
- one output, ``probabilities`` ``FP32 [N, classes]`` in class-index order; requested with the parameter
  ``classification: k`` it is Triton's classification output instead: ``BYTES [N, k]`` of
  ``"probability:index:label"``, most probable first.

Raw data is what ``raw_input_contents`` and Triton's binary extension carry: little-endian, row-major; a
BYTES tensor is, per element, a 4-byte little-endian length and the bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cnnserve.errors import InvalidInputError
from cnnserve.gateway.types import ClassifyResult, ModelInput, TensorInput

__all__ = [
    "Scalar",
    "RequestInput",
    "RequestedOutput",
    "InferRequest",
    "OutputTensor",
    "InferResponse",
    "INPUT",
    "IMAGE",
    "PROBABILITIES",
    "model_inputs",
    "int_parameter",
    "output_tensors",
    "encode_bytes",
    "decode_bytes",
    "element_count",
]

Scalar = bool | int | float | str

INPUT = "input"  # FP32 [N, C, H, W]
IMAGE = "image"  # BYTES [N]
PROBABILITIES = "probabilities"  # FP32 [N, classes]
_DATATYPE = {INPUT: "FP32", IMAGE: "BYTES"}
_LENGTH = struct.Struct("<I")
# Shapes beyond this many elements are refused before anything is allocated for them.
_MAX_ELEMENTS = 2**31


@dataclass(frozen=True)
class RequestInput:
    name: str
    datatype: str
    shape: tuple[int, ...]
    # raw bytes (raw_input_contents, binary extension), or the values in row-major order (typed contents,
    # JSON; for BYTES, bytes objects)
    data: bytes | Sequence[Any]
    parameters: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    parameters: Mapping[str, Scalar] = field(default_factory=dict)


@dataclass(frozen=True)
class InferRequest:
    model: str
    version: str
    inputs: tuple[RequestInput, ...]
    outputs: tuple[RequestedOutput, ...] = ()
    parameters: Mapping[str, Scalar] = field(default_factory=dict)
    id: str = ""


@dataclass(frozen=True)
class OutputTensor:
    name: str
    datatype: str  # FP32 or BYTES
    shape: tuple[int, ...]
    raw: bytes  # the raw encoding (see the module's docstring)
    requested: RequestedOutput | None = None  # the request's entry for it, if any (the REST side reads it)

    def values(self) -> list[float] | list[bytes]:
        """The elements, row-major: floats for FP32, bytes for BYTES."""
        if self.datatype == "BYTES":
            return decode_bytes(self.raw, element_count(self.shape, self.name), self.name)
        return [float(v) for v in np.frombuffer(self.raw, dtype="<f4")]


@dataclass(frozen=True)
class InferResponse:
    model: str
    version: str
    outputs: tuple[OutputTensor, ...]
    parameters: Mapping[str, Scalar]
    id: str = ""


def element_count(shape: Sequence[int], name: str) -> int:
    """The number of elements of ``shape``, after checking every dimension is a positive integer."""
    if any(isinstance(d, bool) or not isinstance(d, int) or d <= 0 for d in shape):
        raise InvalidInputError.for_field(f"{name}.shape", f"{list(shape)} is not a shape of positive sizes")
    count = math.prod(shape)
    if count > _MAX_ELEMENTS:
        raise InvalidInputError.for_field(f"{name}.shape", f"{list(shape)} has too many elements")
    return count


def encode_bytes(elements: Sequence[bytes]) -> bytes:
    """BYTES elements in the raw encoding: a 4-byte little-endian length before each."""
    return b"".join(_LENGTH.pack(len(e)) + e for e in elements)


def decode_bytes(raw: bytes, count: int, name: str) -> list[bytes]:
    """``count`` BYTES elements out of their raw encoding, which they must fill exactly."""
    elements: list[bytes] = []
    offset = 0
    while offset < len(raw):
        if offset + _LENGTH.size > len(raw):
            raise InvalidInputError.for_field(
                name, f"raw BYTES data ends inside the length of element {len(elements)}"
            )
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise InvalidInputError.for_field(
                name, f"raw BYTES element {len(elements)} says {length} bytes, {len(raw) - offset} are left"
            )
        elements.append(raw[offset : offset + length])
        offset += length
    if len(elements) != count:
        raise InvalidInputError.for_field(name, f"{len(elements)} BYTES elements for a shape of {count}")
    return elements


def int_parameter(parameters: Mapping[str, Scalar], key: str, where: str, minimum: int = 0) -> int | None:
    """An integer parameter (absent: None); a bool, float or string is refused, not converted."""
    if key not in parameters:
        return None
    value = parameters[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInputError.for_field(f"{where}.{key}", f"expected an integer, got {value!r}")
    if value < minimum:
        raise InvalidInputError.for_field(f"{where}.{key}", f"must be >= {minimum}, got {value}")
    return value


def model_inputs(inputs: Sequence[RequestInput]) -> tuple[ModelInput, ...]:
    """The core's inputs for a request's tensors: one tensor, ``input`` or ``image``, split along N."""
    if len(inputs) != 1:
        raise InvalidInputError.for_field(
            "inputs", f"expected one input tensor ({INPUT!r} FP32 or {IMAGE!r} BYTES), got {len(inputs)}"
        )
    tensor = inputs[0]
    expected = _DATATYPE.get(tensor.name)
    if expected is None:
        raise InvalidInputError.for_field(
            f"inputs[{tensor.name!r}]",
            f"unknown input; this model takes {INPUT!r} (FP32) or {IMAGE!r} (BYTES)",
        )
    if tensor.datatype != expected:
        raise InvalidInputError.for_field(
            tensor.name, f"datatype {tensor.datatype!r}; {tensor.name!r} is {expected}"
        )
    return _images(tensor) if tensor.name == IMAGE else _tensors(tensor)


def _tensors(tensor: RequestInput) -> tuple[ModelInput, ...]:
    name, shape = tensor.name, tensor.shape
    if len(shape) not in (3, 4):
        raise InvalidInputError.for_field(
            f"{name}.shape", f"{list(shape)}: expected [N, C, H, W] or [C, H, W]"
        )
    count = element_count(shape, name)
    if isinstance(tensor.data, bytes):
        if len(tensor.data) != count * 4:
            raise InvalidInputError.for_field(
                name, f"{len(tensor.data)} bytes for FP32 {list(shape)}: expected {count * 4}"
            )
        data = tensor.data
    else:
        data = _fp32_values(tensor.data, count, name)
    item_shape = shape[1:] if len(shape) == 4 else shape  # (C, H, W)
    batch = shape[0] if len(shape) == 4 else 1
    size = len(data) // batch
    return tuple(
        ModelInput(tensor=TensorInput(item_shape, data[i * size : (i + 1) * size])) for i in range(batch)
    )


def _fp32_values(values: Sequence[Any], count: int, name: str) -> bytes:
    if len(values) != count:
        raise InvalidInputError.for_field(name, f"{len(values)} values for a shape of {count} elements")
    if not set(map(type, values)) <= {int, float}:  # exact types: bools and numeric strings are refused
        raise InvalidInputError.for_field(name, "FP32 data must be numbers")
    try:
        with np.errstate(over="ignore"):  # too large for float32 becomes Inf, which the core refuses by name
            return np.asarray(values, dtype="<f4").tobytes()
    except OverflowError:  # an integer beyond any float (JSON allows 10**400)
        raise InvalidInputError.for_field(name, "a value is too large for FP32") from None


def _images(tensor: RequestInput) -> tuple[ModelInput, ...]:
    name, shape = tensor.name, tensor.shape
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)):
        raise InvalidInputError.for_field(f"{name}.shape", f"{list(shape)}: expected [N] or [N, 1]")
    count = element_count(shape, name)
    if isinstance(tensor.data, bytes):
        elements = decode_bytes(tensor.data, count, name)
    else:
        if len(tensor.data) != count:
            raise InvalidInputError.for_field(name, f"{len(tensor.data)} elements for a shape of {count}")
        elements = [e for e in tensor.data if isinstance(e, bytes)]
        if len(elements) != count:
            raise InvalidInputError.for_field(name, "BYTES elements must be bytes")
    return tuple(ModelInput(image=element) for element in elements)


def output_tensors(request: InferRequest, result: ClassifyResult) -> tuple[OutputTensor, ...]:
    """The requested outputs (none requested: all) for a result that scored every class."""
    requested = request.outputs or (RequestedOutput(PROBABILITIES),)
    outputs = []
    for index, output in enumerate(requested):
        if output.name != PROBABILITIES:
            raise InvalidInputError.for_field(
                f"outputs[{index}].name", f"unknown output {output.name!r}; this model has {PROBABILITIES!r}"
            )
        classes = len(result.predictions[0])
        k = int_parameter(output.parameters, "classification", f"outputs[{index}].parameters", minimum=1)
        if k is None:
            outputs.append(_probabilities(result, classes, output if request.outputs else None))
            continue
        if k > classes:
            raise InvalidInputError.for_field(
                f"outputs[{index}].parameters.classification", f"{k} classes asked, the model has {classes}"
            )
        rows = [
            f"{score.probability:f}:{score.index}:{score.label}".encode()
            for scores in result.predictions
            for score in scores[:k]  # the core answers most probable first
        ]
        outputs.append(
            OutputTensor(PROBABILITIES, "BYTES", (len(result.predictions), k), encode_bytes(rows), output)
        )
    return tuple(outputs)


def _probabilities(result: ClassifyResult, classes: int, requested: RequestedOutput | None) -> OutputTensor:
    array = np.zeros((len(result.predictions), classes), dtype="<f4")  # (N, classes)
    for row, scores in enumerate(result.predictions):
        for score in scores:
            array[row, score.index] = score.probability
    return OutputTensor(PROBABILITIES, "FP32", array.shape, array.tobytes(), requested)
