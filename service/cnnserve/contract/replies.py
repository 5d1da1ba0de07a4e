"""The worker's replies, each with ``to_json`` (the worker writes it) and ``from_json`` (the gateway).

A classify reply also has a compact binary form (the gateway asks for it with ``"reply": "packed"``), see
:func:`pack_classify`: ``PACKED_MAGIC``, a version byte, the header's length (uint32), a JSON header once per
request, then ``int32 [N, k]`` class indices and ``float32 [N, k]`` probabilities, little-endian.
"""

from __future__ import annotations

import json
import struct
import sys
from array import array
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

from cnnserve.contract.defaults import DEFAULT_TRAIN_LAYERS
from cnnserve.errors import CnnserveError, ErrorKind, FieldViolation, error_from_kind
from cnnserve.layer_table import LayerInfo, LayerTable


def error_json(exc: CnnserveError) -> dict[str, Any]:
    """A failed request's reply body."""
    return {
        "error": {
            "code": exc.kind.code_name,
            "message": exc.message,
            "field_violations": [{"field": v.field, "description": v.description} for v in exc.violations],
        }
    }


def error_from_json(error: Mapping[str, Any]) -> CnnserveError:
    """The error an ``{"error": ...}`` body's inner object stands for (an unknown code is INTERNAL)."""
    try:
        kind = ErrorKind[str(error.get("code", "INTERNAL"))]
    except KeyError:
        kind = ErrorKind.INTERNAL
    violations = tuple(
        FieldViolation(str(v.get("field", "")), str(v.get("description", "")))
        for v in error.get("field_violations", [])
    )
    return error_from_kind(kind, str(error.get("message", "error")), violations)


class ClassScore(NamedTuple):
    """A NamedTuple, not a dataclass: a 64-input top-5 reply builds 320 of them, which took 151 µs as frozen
    dataclasses, 75 µs as NamedTuples and 48 µs as from_packed builds them (best of 7 rounds, 2 cores)."""

    label: str
    index: int  # type: ignore[assignment]  # the field hides tuple.index(), which nobody calls on a score
    probability: float


# One input's answer: its top-k scores, best first, or the error that input alone got (per_input_errors).
Prediction = Union[tuple[ClassScore, ...], CnnserveError]


@dataclass(frozen=True)
class WorkerTiming:
    preprocess_ms: float = 0.0
    inference_ms: float = 0.0
    batch_requests: int = 0  # requests TorchServe batched into this forward pass


def _prediction_json(prediction: Prediction) -> dict[str, Any]:
    if isinstance(prediction, CnnserveError):
        return error_json(prediction)
    return {"top_k": [{"label": s.label, "index": s.index, "probability": s.probability} for s in prediction]}


def _prediction(data: Mapping[str, Any]) -> Prediction:
    if "error" in data:
        return error_from_json(data["error"])
    return tuple(ClassScore(str(t["label"]), int(t["index"]), float(t["probability"])) for t in data["top_k"])


@dataclass(frozen=True)
class ClassifyReply:
    model: str
    version: str
    revision: int
    predictions: tuple[Prediction, ...]  # one per input, in order
    format: str = ""  # onnx | torchscript: the runtime that answered
    device: str = ""  # the device really used: cpu, cuda:N
    provider: str = ""  # CUDAExecutionProvider | CPUExecutionProvider | torch
    worker: int = 0  # the pid of the TorchServe worker process that answered
    timing: WorkerTiming = field(default_factory=WorkerTiming)

    def _head_json(self) -> dict[str, Any]:
        """Everything but the predictions (the JSON reply's fields, and the packed reply's header)."""
        return {
            "model": self.model,
            "version": self.version,
            "revision": self.revision,
            "format": self.format,
            "device": self.device,
            "provider": self.provider,
            "worker": self.worker,
            "timing_ms": {
                "preprocess": round(self.timing.preprocess_ms, 3),
                "inference": round(self.timing.inference_ms, 3),
                "batch_requests": self.timing.batch_requests,
            },
        }

    def to_json(self) -> dict[str, Any]:
        return {**self._head_json(), "predictions": [_prediction_json(p) for p in self.predictions]}

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ClassifyReply:
        return cls._from_head(body, tuple(_prediction(p) for p in body["predictions"]))

    @classmethod
    def _from_head(cls, body: Mapping[str, Any], predictions: tuple[Prediction, ...]) -> ClassifyReply:
        timing = body.get("timing_ms") or {}
        return cls(
            model=str(body["model"]),
            version=str(body["version"]),
            revision=int(body["revision"]),
            predictions=predictions,
            format=str(body.get("format", "")),
            device=str(body.get("device", "")),
            provider=str(body.get("provider", "")),
            worker=int(body.get("worker", 0)),
            timing=WorkerTiming(
                float(timing.get("preprocess", 0.0)),
                float(timing.get("inference", 0.0)),
                int(timing.get("batch_requests", 0)),
            ),
        )

    def to_packed(self) -> bytes:
        """This reply in the packed form (every input's scores must be as many: the request's k)."""
        scored = [p for p in self.predictions if not isinstance(p, CnnserveError)]
        k = len(scored[0]) if scored else 0
        if any(len(p) != k for p in scored):
            raise ValueError("a packed reply needs the same number of scores for every input")
        filler = ((-1, 0.0),) * k  # an error slot's row: never read
        pairs = [
            pair
            for p in self.predictions
            for pair in (filler if isinstance(p, CnnserveError) else ((s.index, s.probability) for s in p))
        ]
        errors = {i: p for i, p in enumerate(self.predictions) if isinstance(p, CnnserveError)}
        labels = {s.index: s.label for p in scored for s in p}
        indices = _little_endian(array("i", [i for i, _ in pairs]))
        probabilities = _little_endian(array("f", [q for _, q in pairs]))
        return pack_classify(self, len(self.predictions), k, indices, probabilities, errors, labels)

    @classmethod
    def from_packed(cls, data: bytes | bytearray | memoryview) -> ClassifyReply:
        """The reply :func:`pack_classify` wrote; ``ValueError`` (or ``KeyError``, ``TypeError``) when the
        bytes are not one."""
        view = memoryview(data).cast("B")
        if len(view) < _PACKED_PREFIX.size:
            raise ValueError(f"{len(view)} bytes are too short for a packed reply")
        magic, version, header_bytes = _PACKED_PREFIX.unpack_from(view)
        if magic != PACKED_MAGIC:
            raise ValueError("not a packed reply")
        if version != PACKED_VERSION:
            raise ValueError(f"packed reply version {version}; this cnnserve reads version {PACKED_VERSION}")
        body = _PACKED_PREFIX.size + header_bytes
        header = json.loads(bytes(view[_PACKED_PREFIX.size : body]))
        if not isinstance(header, dict):
            raise ValueError("the packed reply's header is not a JSON object")
        rows, k = header["rows"], header["k"]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in (rows, k)):
            raise ValueError(f"the packed reply's shape [{rows!r}, {k!r}] is not valid")
        if len(view) != body + 8 * rows * k:  # int32 [rows, k] then float32 [rows, k]
            raise ValueError(f"{len(view)} bytes do not hold a [{rows}, {k}] packed reply")
        values = rows * k
        indices = struct.unpack_from(f"<{values}i", view, body)
        probabilities = struct.unpack_from(f"<{values}f", view, body + 4 * values)
        label_of = _labels(header.get("labels"))
        errors = _slot_errors(header.get("errors"), rows)
        if errors:  # their rows are filler: keep the others' values only
            kept = [row for row in range(rows) if row not in errors]
            indices = tuple(i for row in kept for i in indices[row * k : (row + 1) * k])
            probabilities = tuple(p for row in kept for p in probabilities[row * k : (row + 1) * k])
        # One comprehension for every score, then a k-slice per input: the cheap way to build NamedTuples.
        # (tuple.__new__ is what ClassScore._make calls, less its length check: zip gives 3 fields.)
        new = tuple.__new__
        scores = [new(ClassScore, t) for t in zip(map(label_of.__getitem__, indices), indices, probabilities)]
        predictions: list[Prediction] = []
        taken = 0
        for row in range(rows):
            error = errors.get(row)
            if error is None:
                predictions.append(tuple(scores[taken : taken + k]))
                taken += k
            else:
                predictions.append(error)
        return cls._from_head(header, tuple(predictions))


PACKED_MAGIC = b"\x89CNR"  # 0x89 cannot start a JSON (nor any UTF-8) text: a packed reply is never JSON
PACKED_VERSION = 1
_PACKED_PREFIX = struct.Struct("<4sBI")  # magic, version, the header's length in bytes


def is_packed(data: bytes | bytearray | memoryview | str) -> bool:
    return not isinstance(data, str) and bytes(data[: len(PACKED_MAGIC)]) == PACKED_MAGIC


def pack_classify(
    reply: ClassifyReply,
    rows: int,
    k: int,
    indices: bytes,
    probabilities: bytes,
    errors: Mapping[int, CnnserveError],
    labels: Mapping[int, str],
) -> bytes:
    """A classify reply in the packed form: ``reply``'s fields but its predictions (which are not read),
    then the predictions as little-endian ``int32 [rows, k]`` class ``indices`` and ``float32 [rows, k]``
    ``probabilities`` (best first). ``errors`` are the per-input errors by slot (their rows are filler);
    ``labels`` names every class index that occurs."""
    if len(indices) != 4 * rows * k or len(probabilities) != 4 * rows * k:
        raise ValueError(f"{len(indices)} and {len(probabilities)} bytes do not hold [{rows}, {k}] values")
    header = {
        **reply._head_json(),
        "rows": rows,
        "k": k,
        "errors": [[slot, error_json(error)["error"]] for slot, error in sorted(errors.items())],
        "labels": {str(index): label for index, label in labels.items()},
    }
    encoded = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    return b"".join(
        (_PACKED_PREFIX.pack(PACKED_MAGIC, PACKED_VERSION, len(encoded)), encoded, indices, probabilities)
    )


def _little_endian(values: array[Any]) -> bytes:
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def _labels(value: Any) -> dict[int, str]:
    """A packed header's ``labels``: ``{"<class index>": label}``."""
    if not isinstance(value, dict):
        raise ValueError("the packed reply's labels are not a JSON object")
    labels = {int(index): str(label) for index, label in value.items()}
    if any(index < 0 for index in labels):
        raise ValueError("the packed reply names a negative class index")
    return labels


def _slot_errors(value: Any, rows: int) -> dict[int, CnnserveError]:
    """A packed header's ``errors``: ``[[slot, {"code", "message", "field_violations"}], ...]``."""
    if not isinstance(value, list):
        raise ValueError("the packed reply's errors are not a JSON list")
    errors: dict[int, CnnserveError] = {}
    for entry in value:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[1], dict)):
            raise ValueError("a packed reply's error is not a [slot, error] pair")
        slot = entry[0]
        if not isinstance(slot, int) or not 0 <= slot < rows:
            raise ValueError(f"a packed reply's error names slot {slot!r} of {rows}")
        errors[slot] = error_from_json(entry[1])
    return errors


@dataclass(frozen=True)
class ShapesReply:
    model: str
    version: str
    table: LayerTable

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version, **self.table.to_dict()}

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ShapesReply:
        table = LayerTable(
            input_shape=tuple(body["input_shape"]),
            output_shape=tuple(body["output_shape"]),
            layers=tuple(
                LayerInfo(
                    str(layer["name"]),
                    str(layer["type"]),
                    tuple(layer["input_shape"]),
                    tuple(layer["output_shape"]),
                    int(layer["parameters"]),
                    bool(layer["trainable"]),
                    int(layer["macs"]),
                )
                for layer in body["layers"]
            ),
            total_parameters=int(body["total_parameters"]),
            trainable_parameters=int(body["trainable_parameters"]),
            total_macs=int(body["total_macs"]),
            parameter_bytes=int(body["parameter_bytes"]),
            activation_bytes=int(body["activation_bytes"]),
        )
        return cls(str(body["model"]), str(body["version"]), table)


@dataclass(frozen=True)
class FineTuneReply:
    model: str
    version: str
    revision: int
    parent: int
    step: int
    loss_before: float
    loss_after: float
    batch_accuracy: float
    grad_norm: float  # before any clipping
    batch_size: int
    train_layers: str
    lr: float
    grad_clipped: bool = False  # the update used the gradient clipped to max_grad_norm
    max_grad_norm: float | None = None
    replayed: bool = False  # the stored first result of this request_id, not a new step

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "revision": self.revision,
            "parent": self.parent,
            "step": self.step,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "batch_accuracy": self.batch_accuracy,
            "grad_norm": self.grad_norm,
            "grad_clipped": self.grad_clipped,
            "max_grad_norm": self.max_grad_norm,
            "batch_size": self.batch_size,
            "train_layers": self.train_layers,
            "lr": self.lr,
            "replayed": self.replayed,
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> FineTuneReply:
        # Replays return what the revision store kept: an older worker's result lacks the newer fields.
        clip = body.get("max_grad_norm")
        return cls(
            model=str(body["model"]),
            version=str(body["version"]),
            revision=int(body["revision"]),
            parent=int(body["parent"]),
            step=int(body["step"]),
            loss_before=float(body["loss_before"]),
            loss_after=float(body["loss_after"]),
            batch_accuracy=float(body["batch_accuracy"]),
            grad_norm=float(body["grad_norm"]),
            batch_size=int(body.get("batch_size", 0)),
            train_layers=str(body.get("train_layers", DEFAULT_TRAIN_LAYERS)),
            lr=float(body.get("lr", 0.0)),
            grad_clipped=bool(body.get("grad_clipped", False)),
            max_grad_norm=None if clip is None else float(clip),
            replayed=bool(body.get("replayed", False)),
        )


@dataclass(frozen=True)
class ModelInfo:
    """The serving facts of a worker's model: its card, what it runs on, and its head revision."""

    model: str
    version: str
    architecture: str
    input_shape: tuple[int, ...]
    labels: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    resize: tuple[int, ...]
    pad: int
    formats: tuple[str, ...]  # exported formats in the archive
    format: str  # the one classify runs
    device: str  # really used: cpu, cuda:N
    provider: str
    requested_device: str  # what TorchServe and the archive asked for (cuda: a GPU asked for, none given)
    revision: int  # the head
    fine_tuning: bool
    retention: int
    base_sha256: str
    arch_args: Mapping[str, Any] = field(default_factory=dict)
    # Documents of the model card, passed through as the export wrote them (see card.py).
    dataset: Mapping[str, Any] = field(default_factory=dict)  # name, classes, sizes, ...
    training: Mapping[str, Any] = field(default_factory=dict)  # test_accuracy, steps, epochs_run, ...
    parity: Mapping[str, Any] = field(default_factory=dict)  # the export's parity report
    precision: str = "fp32"  # fp32 | int8: the graph served
    # The export's accuracy gate for it (fp32_accuracy, accuracy, top1_agreement, near_ties, held_out,
    # calibration: docs/precision.md); the figures are None for an export made without --precision.
    precision_report: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "architecture": self.architecture,
            "arch_args": dict(self.arch_args),
            "input_shape": list(self.input_shape),
            "labels": list(self.labels),
            "normalization": {"mean": list(self.mean), "std": list(self.std)},
            "preprocessing": {"resize": list(self.resize), "pad": self.pad},
            "dataset": dict(self.dataset),
            "training": dict(self.training),
            "formats": list(self.formats),
            "format": self.format,
            "device": self.device,
            "provider": self.provider,
            "requested_device": self.requested_device,
            "parity": dict(self.parity),
            "precision": self.precision,
            "precision_report": dict(self.precision_report),
            "base_sha256": self.base_sha256,
            "revision": self.revision,
            "fine_tuning": self.fine_tuning,
            "retention": self.retention,
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ModelInfo:
        normalization = body.get("normalization") or {}
        preprocessing = body.get("preprocessing") or {}
        return cls(
            model=str(body["model"]),
            version=str(body["version"]),
            architecture=str(body.get("architecture", "")),
            input_shape=tuple(int(d) for d in body.get("input_shape", [])),
            labels=tuple(str(label) for label in body.get("labels", [])),
            mean=tuple(float(v) for v in normalization.get("mean", [])),
            std=tuple(float(v) for v in normalization.get("std", [])),
            resize=tuple(int(d) for d in preprocessing.get("resize", [])),
            pad=int(preprocessing.get("pad", 0)),
            formats=tuple(str(f) for f in body.get("formats", [])),
            format=str(body.get("format", "")),
            device=str(body.get("device", "")),
            provider=str(body.get("provider", "")),
            requested_device=str(body.get("requested_device", "")),
            revision=int(body.get("revision", 0)),
            fine_tuning=bool(body.get("fine_tuning", False)),
            retention=int(body.get("retention", 0)),
            base_sha256=str(body.get("base_sha256", "")),
            arch_args=dict(body.get("arch_args") or {}),
            dataset=dict(body.get("dataset") or {}),
            training=dict(body.get("training") or {}),
            parity=dict(body.get("parity") or {}),
            precision=str(body.get("precision") or "fp32"),  # an older worker serves fp32 only
            precision_report=dict(body.get("precision_report") or {}),
        )


@dataclass(frozen=True)
class RevisionInfo:
    revision: int
    kind: str  # base | step | rollback | reset
    parent: int | None
    step: int  # SGD steps from the base to these weights
    sha256: str
    created: float  # unix seconds
    pruned: bool  # its weights were removed by retention
    request_id: str | None
    # A step's own reply as the store kept it (what replays return); None for the other kinds. Not in
    # cnnserve.v1's Revision: TorchServe-direct callers of the revisions op see it.
    result: Mapping[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "kind": self.kind,
            "parent": self.parent,
            "step": self.step,
            "sha256": self.sha256,
            "created": self.created,
            "pruned": self.pruned,
            "request_id": self.request_id,
            "result": None if self.result is None else dict(self.result),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RevisionInfo:
        parent = data.get("parent")
        return cls(
            revision=int(data["revision"]),
            kind=str(data["kind"]),
            parent=None if parent is None else int(parent),
            step=int(data.get("step", 0)),
            sha256=str(data.get("sha256", "")),
            created=float(data.get("created", 0.0)),
            pruned=bool(data.get("pruned", False)),
            request_id=data.get("request_id"),
            result=data.get("result"),
        )


@dataclass(frozen=True)
class RevisionsReply:
    model: str
    head: int
    revisions: tuple[RevisionInfo, ...]
    fine_tuning: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "head": self.head,
            "revisions": [r.to_json() for r in self.revisions],
            "fine_tuning": self.fine_tuning,
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> RevisionsReply:
        return cls(
            str(body["model"]),
            int(body["head"]),
            tuple(RevisionInfo.from_json(r) for r in body["revisions"]),
            bool(body.get("fine_tuning", True)),
        )


@dataclass(frozen=True)
class RevisionChangeReply:
    """A rollback or reset: the new head revision, which serves the weights of ``weights_of``."""

    model: str
    version: str
    revision: RevisionInfo
    weights_of: int

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            **self.revision.to_json(),
            "weights_of": self.weights_of,
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> RevisionChangeReply:
        return cls(
            str(body["model"]),
            str(body.get("version", "")),
            RevisionInfo.from_json(body),
            int(body["weights_of"]),
        )
