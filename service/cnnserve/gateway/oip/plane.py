"""What the OIP's gRPC and REST transports share: each OIP call over the core, and its metrics.

:class:`OipPlane` answers in transport-neutral terms (:mod:`.tensors`' requests and responses, the
dataclasses below); the transports only convert, and map errors through :mod:`cnnserve.gateway.status`.
Inference is the core's ``classify`` with every class scored (top_k = all, which the worker clips to the
model's classes), so validation, limits, micro-batching, retries and revisions are cnnserve.v1's.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from cnnserve import __version__
from cnnserve.contract import MAX_TOP_K
from cnnserve.errors import NotFoundError, UnavailableError
from cnnserve.gateway.core import Gateway
from cnnserve.gateway.limits import ConcurrencyLimit
from cnnserve.gateway.metrics import GatewayMetrics, observed
from cnnserve.gateway.oip import tensors
from cnnserve.gateway.oip.tensors import IMAGE, INPUT, PROBABILITIES, InferRequest, InferResponse
from cnnserve.gateway.types import ClassifyCall, ModelDetails, ModelStatus

__all__ = [
    "SERVER_NAME",
    "SERVER_VERSION",
    "EXTENSIONS",
    "TensorInfo",
    "ModelMetadata",
    "ModelConfig",
    "IndexEntry",
    "OipPlane",
]

T = TypeVar("T")

SERVER_NAME = "cnnserve"
SERVER_VERSION = __version__
# Only what works: a client that sees an extension uses it.
EXTENSIONS = ("classification", "model_configuration", "binary_tensor_data")
# Triton's platform names for the runtimes a worker serves with.
_PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    datatype: str
    shape: tuple[int, ...]  # -1: any size


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


@dataclass(frozen=True)
class ModelConfig:
    """Triton's model configuration, the part cnnserve fills: dims exclude the batch dimension."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    input_shape: tuple[int, ...]  # (C, H, W)
    classes: int


@dataclass(frozen=True)
class IndexEntry:
    name: str
    version: str
    ready: bool


class OipPlane:
    """The OIP over one :class:`Gateway`, with the load limit and metrics the cnnserve.v1 servicer has."""

    def __init__(self, gateway: Gateway, metrics: GatewayMetrics, limit: ConcurrencyLimit) -> None:
        self.gateway = gateway
        self.metrics = metrics
        self.limit = limit

    async def observe(self, method: str, work: Callable[[], Awaitable[T]], shed: bool = True) -> T:
        """One OIP call under the gateway's limit, counted as cnnserve.v1's are (:func:`metrics.observed`)."""
        return await observed(self.metrics, self.limit, method, work, shed)

    # ---- health and metadata ----------------------------------------------------------------------

    def server_ready(self) -> bool:
        return self.gateway.serving

    async def model_ready(self, model: str, version: str) -> bool:
        """Whether ``model`` (at ``version``, empty: its default) has a READY worker; NotFoundError if the
        gateway does not know it. TorchServe unreachable: not ready."""
        try:
            status = await self._status(model, version)
        except UnavailableError:
            return False
        return status.serving

    async def model_metadata(self, model: str, version: str, timeout: float | None) -> ModelMetadata:
        details = await self.gateway.get_model(model, version, timeout)
        c, h, w = _input_shape(details)
        return ModelMetadata(
            name=details.status.name,
            versions=details.status.versions,
            platform=_platform(details),
            inputs=(TensorInfo(INPUT, "FP32", (-1, c, h, w)), TensorInfo(IMAGE, "BYTES", (-1,))),
            outputs=(TensorInfo(PROBABILITIES, "FP32", (-1, len(_labels(details)))),),
        )

    async def model_config(self, model: str, version: str, timeout: float | None) -> ModelConfig:
        details = await self.gateway.get_model(model, version, timeout)
        return ModelConfig(
            name=details.status.name,
            platform=_platform(details),
            backend=details.info.format,
            max_batch_size=self.gateway.settings.max_inputs,
            input_shape=_input_shape(details),
            classes=len(_labels(details)),
        )

    async def index(self, ready_only: bool) -> list[IndexEntry]:
        entries = [
            IndexEntry(status.name, version, status.serving)
            for status in await self.gateway.list_models()
            for version in status.versions
        ]
        return [e for e in entries if e.ready or not ready_only]

    # ---- inference ----------------------------------------------------------------------------------

    async def infer(self, request: InferRequest, timeout: float | None) -> InferResponse:
        """``timeout``: the transport's deadline (seconds); a ``timeout`` request parameter (Triton's, in
        microseconds; 0: none) shortens it."""
        limit_us = tensors.int_parameter(request.parameters, "timeout", "parameters")
        if limit_us:
            timeout = limit_us / 1e6 if timeout is None else min(timeout, limit_us / 1e6)
        call = ClassifyCall(
            model=request.model,
            version=request.version,
            inputs=tensors.model_inputs(request.inputs),
            top_k=MAX_TOP_K,  # every class: the worker clips to the model's
            revision=tensors.int_parameter(request.parameters, "revision", "parameters"),
            min_revision=tensors.int_parameter(request.parameters, "min_revision", "parameters"),
        )
        result = await self.gateway.classify(call, timeout)
        return InferResponse(
            model=result.model,
            version=result.version,
            outputs=tensors.output_tensors(request, result),
            parameters={"revision": result.revision},
            id=request.id,
        )

    async def _status(self, model: str, version: str) -> ModelStatus:
        for status in await self.gateway.list_models():
            if status.name == model:
                if version and version not in status.versions:
                    raise NotFoundError(
                        f"{model} has no version {version!r} (versions: {', '.join(status.versions)})"
                    )
                return status
        raise NotFoundError(f"unknown model {model!r}")


def _input_shape(details: ModelDetails) -> tuple[int, int, int]:
    c, h, w = details.info.input_shape  # the card's (C, H, W)
    return c, h, w


def _labels(details: ModelDetails) -> tuple[str, ...]:
    return details.info.labels


def _platform(details: ModelDetails) -> str:
    return _PLATFORMS.get(details.info.format, f"cnnserve_{details.info.format}")
