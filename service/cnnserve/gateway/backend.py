"""Backends the gateway core calls: TorchServe over its gRPC API, or anything with the same shape.

A backend sends one request to one model's handler (``op`` + JSON ``meta`` + raw input payloads, the
envelope of :mod:`cnnserve.serving.protocol`) and returns the handler's decoded JSON reply, which may be an
``{"error": ...}`` body: the core turns those into errors. Transport failures are raised here, already
translated into :mod:`cnnserve.errors`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.protobuf import empty_pb2

from cnnserve.errors import (
    CnnserveError,
    DeadlineExceededError,
    InternalError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    UnavailableError,
)
from cnnserve.gateway.types import ModelStatus
from cnnserve.serving.protocol import envelope
from cnnserve.torchserve import TorchServeKeys, read_key_file
from cnnserve.torchserve_api import inference_pb2, inference_pb2_grpc, management_pb2, management_pb2_grpc

__all__ = ["Backend", "TorchServeBackend"]

log = logging.getLogger(__name__)


class Backend(Protocol):
    async def call(
        self,
        model: str,
        version: str,
        op: str,
        meta: dict[str, Any],
        payloads: Sequence[bytes],
        timeout: float | None,
    ) -> dict[str, Any]:
        """The handler's JSON reply to one request."""
        ...

    async def models(self) -> list[ModelStatus]:
        """Every registered model with its worker counts."""
        ...

    async def close(self) -> None: ...


class TorchServeBackend:
    """TorchServe's gRPC inference (predictions) and management (model status) APIs, with its tokens."""

    def __init__(
        self,
        inference_target: str,
        management_target: str,
        key_file: str | Path | None = None,
        max_message_bytes: int = 64 * 2**20,
    ) -> None:
        options = [
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
        ]
        self._inference_channel = grpc.aio.insecure_channel(inference_target, options=options)
        self._management_channel = grpc.aio.insecure_channel(management_target, options=options)
        self._inference = inference_pb2_grpc.InferenceAPIsServiceStub(self._inference_channel)
        self._management = management_pb2_grpc.ManagementAPIsServiceStub(self._management_channel)
        self._key_file = Path(key_file) if key_file else None
        self._keys = TorchServeKeys(None, None)
        self._reload_keys()
        self.target = inference_target

    def _reload_keys(self) -> None:
        """Read TorchServe's key_file.json (absent: token authorization is off)."""
        if self._key_file is None:
            return
        try:
            self._keys = read_key_file(self._key_file)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cannot read TorchServe keys from %s: %s", self._key_file, exc)
            self._keys = TorchServeKeys(None, None)

    def _metadata(self, api: str) -> tuple[tuple[str, str], ...]:
        key = self._keys.key(api)
        return (("authorization", f"Bearer {key}"),) if key else ()

    async def _with_token(self, api: str, send: Any) -> Any:
        """Call ``send(metadata)``; on an auth failure re-read the key file (TorchServe restarted) once."""
        try:
            return await send(self._metadata(api))
        except grpc.aio.AioRpcError as error:
            if error.code() not in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                raise
            self._reload_keys()
            return await send(self._metadata(api))

    async def call(
        self,
        model: str,
        version: str,
        op: str,
        meta: dict[str, Any],
        payloads: Sequence[bytes],
        timeout: float | None,
    ) -> dict[str, Any]:
        request = inference_pb2.PredictionsRequest(
            model_name=model, model_version=version, input=envelope(op, meta, payloads)
        )
        try:
            response = await self._with_token(
                "inference",
                lambda metadata: self._inference.Predictions(request, timeout=timeout, metadata=metadata),
            )
        except grpc.aio.AioRpcError as error:
            raise translate_error(error, model) from None
        try:
            body: dict[str, Any] = json.loads(response.prediction)
        except ValueError:
            log.error("TorchServe returned a non-JSON reply for %s: %r", model, response.prediction[:200])
            raise InternalError("the model returned an unreadable reply") from None
        return body

    async def ping(self, timeout: float = 2.0) -> bool:
        try:
            reply = await self._inference.Ping(empty_pb2.Empty(), timeout=timeout)
        except grpc.aio.AioRpcError:
            return False
        return "Healthy" in reply.health

    async def models(self) -> list[ModelStatus]:
        try:
            listed = await self._with_token(
                "management",
                lambda metadata: self._management.ListModels(
                    management_pb2.ListModelsRequest(limit=1000), timeout=5.0, metadata=metadata
                ),
            )
            statuses = []
            for entry in json.loads(listed.msg).get("models", []):
                described = await self._with_token(
                    "management",
                    lambda metadata, name=entry["modelName"]: self._management.DescribeModel(
                        management_pb2.DescribeModelRequest(model_name=name, model_version="all"),
                        timeout=5.0,
                        metadata=metadata,
                    ),
                )
                statuses.append(_model_status(entry["modelName"], json.loads(described.msg)))
        except grpc.aio.AioRpcError as error:
            raise translate_error(error, "") from None
        return statuses

    async def close(self) -> None:
        await self._inference_channel.close()
        await self._management_channel.close()


def _model_status(name: str, described: list[dict[str, Any]]) -> ModelStatus:
    """DescribeModel's JSON (one entry per version) -> the default version's status."""
    versions = tuple(str(entry.get("modelVersion", "")) for entry in described)
    default = next(
        (e for e in described if e.get("defaultVersion") or e.get("isDefault")),
        described[0] if described else {},
    )
    workers = default.get("workers", [])
    return ModelStatus(
        name=name,
        version=str(default.get("modelVersion", "")),
        versions=versions,
        workers=len(workers),
        ready_workers=sum(1 for w in workers if w.get("status") == "READY"),
    )


def translate_error(error: grpc.aio.AioRpcError, model: str) -> CnnserveError:
    """TorchServe's gRPC failures -> cnnserve errors. Details go to the log, not to clients."""
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE:
        return UnavailableError("TorchServe is not reachable")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return DeadlineExceededError("the deadline passed before the model answered")
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInputError(details.splitlines()[0] if details else "the model rejected the request")
    if "not found" in details.lower() and ("model" in details.lower() or "version" in details.lower()):
        return NotFoundError(f"model {model!r} (or that version) is not served")
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED or "queue" in details.lower():
        return OverloadedError("TorchServe's queue for this model is full")
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        log.error("TorchServe refused the gateway's token: %s", details)
        return UnavailableError("the gateway is not authorized by TorchServe (check the key file)")
    if "worker" in details.lower() or code == grpc.StatusCode.INTERNAL:
        log.warning("TorchServe failed a request for %s: %s %s", model, code, details)
        return UnavailableError("the model worker failed; try again")
    log.error("unexpected TorchServe failure for %s: %s %s", model, code, details)
    return InternalError("internal error")
