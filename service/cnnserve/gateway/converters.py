"""Protobuf messages <-> the gateway's domain types: one function per direction per message.

The only module, with :mod:`.servicer` and the client, that knows protobuf. Used by the server (requests in,
responses out) and by :mod:`cnnserve.client` (the other way round).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cnnserve.errors import InvalidInputError
from cnnserve.gateway.types import (
    ClassifyCall,
    ClassifyResult,
    ClassScore,
    FineTuneCall,
    FineTuneResult,
    ModelDetails,
    ModelInput,
    ModelStatus,
    RevisionChange,
    RevisionInfo,
    RevisionList,
    ShapesCall,
    TensorInput,
    Timing,
)
from cnnserve.layer_table import LayerInfo, LayerTable
from cnnserve.v1 import classifier_pb2 as pb

__all__ = [
    "classify_call",
    "classify_request",
    "classify_response",
    "classify_result",
    "shapes_call",
    "shapes_response",
    "layer_table",
    "finetune_call",
    "finetune_request",
    "finetune_response",
    "finetune_result",
    "model_status",
    "model_status_message",
    "model_message",
    "revision_list_response",
    "revision_list",
    "revision_change_response",
    "revision_change",
    "inputs_to_proto",
]

_TRAIN_LAYERS = {
    pb.TRAIN_LAYERS_UNSPECIFIED: "all",
    pb.TRAIN_LAYERS_ALL: "all",
    pb.TRAIN_LAYERS_CLASSIFIER: "classifier",
}


# ---- inputs ------------------------------------------------------------------------------------


def _inputs(messages: Sequence[pb.Input]) -> tuple[ModelInput, ...]:
    inputs = []
    for index, message in enumerate(messages):
        kind = message.WhichOneof("kind")
        if kind == "image":
            inputs.append(ModelInput(image=message.image))
        elif kind == "tensor":
            inputs.append(ModelInput(tensor=TensorInput(tuple(message.tensor.shape), message.tensor.data)))
        else:
            raise InvalidInputError.for_field(f"inputs[{index}]", "set image or tensor")
    return tuple(inputs)


def inputs_to_proto(inputs: Sequence[ModelInput]) -> list[pb.Input]:
    messages = []
    for item in inputs:
        if item.tensor is not None:
            messages.append(pb.Input(tensor=pb.Tensor(shape=list(item.tensor.shape), data=item.tensor.data)))
        else:
            messages.append(pb.Input(image=item.image or b""))
    return messages


def _timing(timing: Timing) -> pb.Timing:
    return pb.Timing(
        server_ms=timing.server_ms, backend_ms=timing.backend_ms, batch_inputs=timing.batch_inputs
    )


def _timing_from(message: pb.Timing) -> Timing:
    return Timing(message.server_ms, message.backend_ms, message.batch_inputs)


# ---- Classify ----------------------------------------------------------------------------------


def classify_call(request: pb.ClassifyRequest) -> ClassifyCall:
    return ClassifyCall(
        model=request.model,
        version=request.version,
        inputs=_inputs(request.inputs),
        top_k=request.top_k,
        revision=request.revision if request.HasField("revision") else None,
        min_revision=request.min_revision if request.HasField("min_revision") else None,
    )


def classify_request(call: ClassifyCall) -> pb.ClassifyRequest:
    request = pb.ClassifyRequest(
        model=call.model, version=call.version, inputs=inputs_to_proto(call.inputs), top_k=call.top_k
    )
    if call.revision is not None:
        request.revision = call.revision
    if call.min_revision is not None:
        request.min_revision = call.min_revision
    return request


def classify_response(result: ClassifyResult) -> pb.ClassifyResponse:
    return pb.ClassifyResponse(
        model=result.model,
        version=result.version,
        revision=result.revision,
        predictions=[
            pb.Prediction(
                top_k=[pb.ClassScore(label=s.label, index=s.index, probability=s.probability) for s in scores]
            )
            for scores in result.predictions
        ],
        timing=_timing(result.timing),
    )


def classify_result(response: pb.ClassifyResponse) -> ClassifyResult:
    return ClassifyResult(
        model=response.model,
        version=response.version,
        revision=response.revision,
        predictions=tuple(
            tuple(ClassScore(s.label, s.index, s.probability) for s in prediction.top_k)
            for prediction in response.predictions
        ),
        timing=_timing_from(response.timing),
    )


# ---- GetLayerShapes ----------------------------------------------------------------------------


def shapes_call(request: pb.GetLayerShapesRequest) -> ShapesCall:
    return ShapesCall(model=request.model, version=request.version, input_shape=tuple(request.input_shape))


def shapes_response(table: dict[str, Any]) -> pb.GetLayerShapesResponse:
    return pb.GetLayerShapesResponse(
        model=table["model"],
        version=table["version"],
        input_shape=table["input_shape"],
        output_shape=table["output_shape"],
        layers=[
            pb.Layer(
                name=layer["name"],
                type=layer["type"],
                input_shape=layer["input_shape"],
                output_shape=layer["output_shape"],
                parameters=layer["parameters"],
                trainable=layer["trainable"],
                macs=layer["macs"],
            )
            for layer in table["layers"]
        ],
        total_parameters=table["total_parameters"],
        trainable_parameters=table["trainable_parameters"],
        total_macs=table["total_macs"],
        parameter_bytes=table["parameter_bytes"],
        activation_bytes=table["activation_bytes"],
    )


def layer_table(response: pb.GetLayerShapesResponse) -> LayerTable:
    return LayerTable(
        input_shape=tuple(response.input_shape),
        output_shape=tuple(response.output_shape),
        layers=tuple(
            LayerInfo(
                layer.name,
                layer.type,
                tuple(layer.input_shape),
                tuple(layer.output_shape),
                layer.parameters,
                layer.trainable,
                layer.macs,
            )
            for layer in response.layers
        ),
        total_parameters=response.total_parameters,
        trainable_parameters=response.trainable_parameters,
        total_macs=response.total_macs,
        parameter_bytes=response.parameter_bytes,
        activation_bytes=response.activation_bytes,
    )


# ---- FineTuneStep ------------------------------------------------------------------------------


def finetune_call(request: pb.FineTuneStepRequest) -> FineTuneCall:
    if request.train_layers not in _TRAIN_LAYERS:
        raise InvalidInputError.for_field("train_layers", f"unknown value {request.train_layers}")
    return FineTuneCall(
        model=request.model,
        version=request.version,
        inputs=_inputs(request.inputs),
        labels=tuple(request.labels),
        lr=request.lr,
        momentum=request.momentum if request.HasField("momentum") else 0.9,
        weight_decay=request.weight_decay,
        train_layers=_TRAIN_LAYERS[request.train_layers],
        request_id=request.request_id,
        expected_revision=request.expected_revision if request.HasField("expected_revision") else None,
        # proto3 style: unset and 0 both mean no clipping (the core checks the rest)
        max_grad_norm=request.max_grad_norm or None,
    )


def finetune_request(call: FineTuneCall) -> pb.FineTuneStepRequest:
    request = pb.FineTuneStepRequest(
        model=call.model,
        version=call.version,
        inputs=inputs_to_proto(call.inputs),
        labels=list(call.labels),
        lr=call.lr,
        momentum=call.momentum,
        weight_decay=call.weight_decay,
        train_layers=pb.TRAIN_LAYERS_CLASSIFIER if call.train_layers == "classifier" else pb.TRAIN_LAYERS_ALL,
        request_id=call.request_id,
    )
    if call.expected_revision is not None:
        request.expected_revision = call.expected_revision
    if call.max_grad_norm is not None:
        request.max_grad_norm = call.max_grad_norm
    return request


def finetune_response(result: FineTuneResult) -> pb.FineTuneStepResponse:
    return pb.FineTuneStepResponse(
        model=result.model,
        version=result.version,
        revision=result.revision,
        parent=result.parent,
        step=result.step,
        loss_before=result.loss_before,
        loss_after=result.loss_after,
        batch_accuracy=result.batch_accuracy,
        grad_norm=result.grad_norm,
        replayed=result.replayed,
        request_id=result.request_id,
        timing=_timing(result.timing),
        grad_clipped=result.grad_clipped,
    )


def finetune_result(response: pb.FineTuneStepResponse) -> FineTuneResult:
    return FineTuneResult(
        model=response.model,
        version=response.version,
        revision=response.revision,
        parent=response.parent,
        step=response.step,
        loss_before=response.loss_before,
        loss_after=response.loss_after,
        batch_accuracy=response.batch_accuracy,
        grad_norm=response.grad_norm,
        replayed=response.replayed,
        request_id=response.request_id,
        timing=_timing_from(response.timing),
        grad_clipped=response.grad_clipped,
    )


# ---- models and revisions ----------------------------------------------------------------------


def model_status_message(status: ModelStatus) -> pb.ModelStatus:
    return pb.ModelStatus(
        name=status.name,
        version=status.version,
        versions=list(status.versions),
        workers=status.workers,
        ready_workers=status.ready_workers,
        serving=status.serving,
    )


def model_status(message: pb.ModelStatus) -> ModelStatus:
    return ModelStatus(
        message.name, message.version, tuple(message.versions), message.workers, message.ready_workers
    )


def model_message(details: ModelDetails) -> pb.Model:
    info = details.info
    parity = info.get("parity") or {}
    return pb.Model(
        status=model_status_message(details.status),
        architecture=info.get("architecture", ""),
        input_shape=info.get("input_shape", []),
        labels=info.get("labels", []),
        formats=info.get("formats", []),
        serving_format=info.get("format", ""),
        device=info.get("device", ""),
        provider=info.get("provider", ""),
        requested_device=info.get("requested_device", ""),
        parity=pb.ParityReport(
            passed=bool(parity.get("passed", False)),
            samples=int(parity.get("samples", 0)),
            dataset=str(parity.get("dataset", "")),
            formats={
                name: pb.FormatParity(max_abs_diff=row["max_abs_diff"], top1_agreement=row["top1_agreement"])
                for name, row in parity.get("formats", {}).items()
            },
        ),
        revision=int(info.get("revision", 0)),
        fine_tuning=bool(info.get("fine_tuning", False)),
        mean=info.get("normalization", {}).get("mean", []),
        std=info.get("normalization", {}).get("std", []),
        resize=info.get("preprocessing", {}).get("resize", []),
        pad=int(info.get("preprocessing", {}).get("pad", 0)),
        test_accuracy=float(info.get("training", {}).get("test_accuracy") or 0.0),
        dataset=str(info.get("dataset", {}).get("name", "")),
    )


def _revision_message(info: RevisionInfo) -> pb.Revision:
    return pb.Revision(
        revision=info.revision,
        kind=info.kind,
        parent=info.parent or 0,
        step=info.step,
        sha256=info.sha256,
        created_unix=info.created,
        pruned=info.pruned,
        request_id=info.request_id or "",
    )


def _revision_info(message: pb.Revision) -> RevisionInfo:
    return RevisionInfo(
        revision=message.revision,
        kind=message.kind,
        parent=message.parent if message.kind != "base" else None,
        step=message.step,
        sha256=message.sha256,
        created=message.created_unix,
        pruned=message.pruned,
        request_id=message.request_id or None,
    )


def revision_list_response(revisions: RevisionList) -> pb.ListRevisionsResponse:
    return pb.ListRevisionsResponse(
        model=revisions.model,
        head=revisions.head,
        revisions=[_revision_message(r) for r in revisions.revisions],
    )


def revision_list(response: pb.ListRevisionsResponse) -> RevisionList:
    return RevisionList(response.model, response.head, tuple(_revision_info(r) for r in response.revisions))


def revision_change_response(change: RevisionChange) -> pb.RevisionChange:
    return pb.RevisionChange(
        model=change.model, revision=_revision_message(change.revision), weights_of=change.weights_of
    )


def revision_change(response: pb.RevisionChange) -> RevisionChange:
    return RevisionChange(response.model, _revision_info(response.revision), response.weights_of)
