"""A small typed Python client for the cnnserve gateway.

::

    from cnnserve.client import ClassifierClient

    with ClassifierClient("127.0.0.1:50051") as client:
        result = client.classify("lenet", [open("digit.png", "rb").read()], top_k=3)
        print(result.revision, result.predictions[0][0].label)
        step = client.finetune_step("lenet", images, labels=[3, 1, 4], lr=0.01)
        print(client.layer_shapes("alexnet", (3, 224, 224)).table.format())

Inputs are encoded image bytes, or :class:`~cnnserve.gateway.types.TensorInput` (float32, the model's
preprocessed input). Every call returns the gateway's domain types (:mod:`cnnserve.gateway.types`), never
protobuf. Failures raise :class:`cnnserve.errors.CnnserveError` subclasses, rebuilt from the
gRPC status (with the field violations of INVALID_ARGUMENT).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from cnnserve.contract import DEFAULT_MOMENTUM, DEFAULT_TOP_K, DEFAULT_TRAIN_LAYERS, DEFAULT_WEIGHT_DECAY
from cnnserve.errors import CnnserveError, ErrorKind, FieldViolation, error_from_kind
from cnnserve.gateway.converters import (
    ClassifyRequestConverter,
    ClassifyResponseConverter,
    FineTuneRequestConverter,
    FineTuneResponseConverter,
    ModelConverter,
    ModelStatusConverter,
    RevisionChangeConverter,
    RevisionListConverter,
    ShapesRequestConverter,
    ShapesResponseConverter,
)
from cnnserve.gateway.types import (
    ClassifyCall,
    ClassifyResult,
    FineTuneCall,
    FineTuneResult,
    ModelDetails,
    ModelInput,
    ModelStatus,
    RevisionChange,
    RevisionList,
    ShapesCall,
    ShapesResult,
    TensorInput,
)
from cnnserve.v1 import classifier_pb2 as pb
from cnnserve.v1 import classifier_pb2_grpc as pb_grpc

__all__ = ["ClassifierClient", "LB_POLICIES", "error_from_rpc"]

T = TypeVar("T")
# gRPC's load-balancing policies over the addresses a target resolves to: pick_first holds one connection
# (one gateway); round_robin spreads calls over all of them (a headless Kubernetes Service, say).
LB_POLICIES = ("pick_first", "round_robin")
InputLike = bytes | TensorInput | ModelInput


def _model_input(item: InputLike) -> ModelInput:
    if isinstance(item, ModelInput):
        return item
    if isinstance(item, TensorInput):
        return ModelInput(tensor=item)
    return ModelInput(image=bytes(item))


def error_from_rpc(error: grpc.RpcError) -> CnnserveError:
    """The cnnserve error a failed call stands for, with BadRequest field violations when present."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    try:
        kind = ErrorKind[code.name]
    except KeyError:
        kind = ErrorKind.INTERNAL
    violations: list[FieldViolation] = []
    status = rpc_status.from_call(error) if isinstance(error, grpc.Call) else None
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad_request = error_details_pb2.BadRequest()
                detail.Unpack(bad_request)
                violations += [FieldViolation(v.field, v.description) for v in bad_request.field_violations]
    message = error.details() if hasattr(error, "details") else str(error)
    return error_from_kind(kind, message or code.name, tuple(violations))


class ClassifierClient:
    """Blocking client; ``token`` is sent as a bearer token, ``tls_ca`` (PEM path) turns TLS on.

    ``lb_policy="round_robin"`` with a target that resolves to several gateways
    (``dns:///cnnserve-gateway-headless.cnnserve.svc.cluster.local:50051``) spreads calls over all of them;
    a plain Service or one address keeps every call on one connection (gRPC balances connections, not calls).
    """

    def __init__(
        self,
        target: str = "127.0.0.1:50051",
        token: str | None = None,
        tls_ca: str | None = None,
        timeout: float = 30.0,
        lb_policy: str = LB_POLICIES[0],
    ) -> None:
        if lb_policy not in LB_POLICIES:
            raise ValueError(f"lb_policy must be one of {', '.join(LB_POLICIES)}, not {lb_policy!r}")
        options: list[tuple[str, Any]] = [
            ("grpc.max_send_message_length", 64 * 2**20),
            ("grpc.max_receive_message_length", 64 * 2**20),
            ("grpc.service_config", json.dumps({"loadBalancingConfig": [{lb_policy: {}}]})),
        ]
        if tls_ca:
            with open(tls_ca, "rb") as stream:
                self._channel = grpc.secure_channel(
                    target, grpc.ssl_channel_credentials(stream.read()), options=options
                )
        else:
            self._channel = grpc.insecure_channel(target, options=options)
        self._stub = pb_grpc.ClassifierStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self.timeout = timeout

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(
        self, *exc: tuple[type[BaseException] | None, BaseException | None, TracebackType | None]
    ) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., T], request: Any, timeout: float | None) -> T:
        try:
            return method(request, timeout=timeout or self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    def classify(
        self,
        model: str,
        inputs: Sequence[InputLike],
        top_k: int = DEFAULT_TOP_K,
        revision: int | None = None,
        min_revision: int | None = None,
        version: str = "",
        timeout: float | None = None,
    ) -> ClassifyResult:
        call = ClassifyCall(
            model, tuple(_model_input(i) for i in inputs), version, top_k, revision, min_revision
        )
        request = ClassifyRequestConverter.from_types(call)
        return ClassifyResponseConverter.to_types(self._call(self._stub.Classify, request, timeout))

    def classify_stream(
        self, calls: Iterable[ClassifyCall], timeout: float | None = None
    ) -> Iterator[ClassifyResult]:
        """Bulk classification: results in the order of ``calls``."""
        requests = (ClassifyRequestConverter.from_types(call) for call in calls)
        try:
            for response in self._stub.ClassifyStream(requests, timeout=timeout, metadata=self._metadata):
                yield ClassifyResponseConverter.to_types(response)
        except grpc.RpcError as error:
            raise error_from_rpc(error) from None

    def layer_shapes(
        self, model: str, input_shape: Sequence[int] = (), version: str = "", timeout: float | None = None
    ) -> ShapesResult:
        """The layer table (``result.table``) for ``input_shape`` (empty: the model's own)."""
        request = ShapesRequestConverter.from_types(ShapesCall(model, version, tuple(input_shape)))
        return ShapesResponseConverter.to_types(self._call(self._stub.GetLayerShapes, request, timeout))

    def finetune_step(
        self,
        model: str,
        inputs: Sequence[InputLike],
        labels: Sequence[int],
        lr: float,
        momentum: float = DEFAULT_MOMENTUM,
        weight_decay: float = DEFAULT_WEIGHT_DECAY,
        train_layers: str = DEFAULT_TRAIN_LAYERS,
        request_id: str = "",
        expected_revision: int | None = None,
        version: str = "",
        timeout: float | None = None,
        max_grad_norm: float | None = None,
    ) -> FineTuneResult:
        """One SGD step; every worker serves the new revision once this returns.

        ``max_grad_norm`` clips the gradient's total L2 norm (None: no clipping); ``result.grad_norm`` is
        the norm before clipping, ``result.grad_clipped`` says whether it was clipped. A step that diverges
        (non-finite loss, gradient or weights) raises :class:`~cnnserve.errors.FailedPreconditionError` and
        leaves the model at its revision; an lr above the worker's bound raises ``InvalidInputError``.
        """
        call = FineTuneCall(
            model=model,
            inputs=tuple(_model_input(i) for i in inputs),
            labels=tuple(labels),
            lr=lr,
            version=version,
            momentum=momentum,
            weight_decay=weight_decay,
            train_layers=train_layers,
            request_id=request_id,
            expected_revision=expected_revision,
            max_grad_norm=max_grad_norm,
        )
        request = FineTuneRequestConverter.from_types(call)
        return FineTuneResponseConverter.to_types(self._call(self._stub.FineTuneStep, request, timeout))

    def list_models(self, timeout: float | None = None) -> list[ModelStatus]:
        response = self._call(self._stub.ListModels, pb.ListModelsRequest(), timeout)
        return [ModelStatusConverter.to_types(m) for m in response.models]

    def get_model(self, model: str, version: str = "", timeout: float | None = None) -> ModelDetails:
        """The model's status and serving facts (``details.info``: card, device, parity, head revision)."""
        request = pb.GetModelRequest(model=model, version=version)
        return ModelConverter.to_types(self._call(self._stub.GetModel, request, timeout))

    def list_revisions(self, model: str, version: str = "", timeout: float | None = None) -> RevisionList:
        request = pb.ListRevisionsRequest(model=model, version=version)
        return RevisionListConverter.to_types(self._call(self._stub.ListRevisions, request, timeout))

    def rollback(
        self, model: str, to_revision: int, version: str = "", timeout: float | None = None
    ) -> RevisionChange:
        request = pb.RollbackRequest(model=model, version=version, to_revision=to_revision)
        return RevisionChangeConverter.to_types(self._call(self._stub.Rollback, request, timeout))

    def reset(self, model: str, version: str = "", timeout: float | None = None) -> RevisionChange:
        request = pb.ResetRequest(model=model, version=version)
        return RevisionChangeConverter.to_types(self._call(self._stub.Reset, request, timeout))

    def health(self, service: str = "", timeout: float | None = None) -> str:
        """SERVING or NOT_SERVING, for the gateway ('') or a model (``cnnserve.v1.Classifier/<model>``)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status))
