"""The worker's replies, each with ``to_json`` (the worker writes it) and ``from_json`` (the gateway)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

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


@dataclass(frozen=True)
class ClassScore:
    label: str
    index: int
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

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "revision": self.revision,
            "format": self.format,
            "device": self.device,
            "provider": self.provider,
            "worker": self.worker,
            "predictions": [_prediction_json(p) for p in self.predictions],
            "timing_ms": {
                "preprocess": round(self.timing.preprocess_ms, 3),
                "inference": round(self.timing.inference_ms, 3),
                "batch_requests": self.timing.batch_requests,
            },
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ClassifyReply:
        timing = body.get("timing_ms") or {}
        return cls(
            model=str(body["model"]),
            version=str(body["version"]),
            revision=int(body["revision"]),
            predictions=tuple(_prediction(p) for p in body["predictions"]),
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
