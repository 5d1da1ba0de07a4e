"""Backends the gateway core calls: TorchServe over its gRPC API, or anything with the same shape.

A backend sends one typed request of :mod:`cnnserve.contract` to one model's worker and returns the
request's own reply type; an error the worker answered is raised as the :mod:`cnnserve.errors` error it
names. Transport failures are raised too, translated by :func:`translate_error` from what TorchServe 0.12
was observed to answer (the table is in docs/architecture.md, "Errors").
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, TypeVar, runtime_checkable

import grpc
from google.protobuf import empty_pb2

from cnnserve.contract import Operation, envelope, legacy_envelope, read_reply
from cnnserve.errors import (
    CnnserveError,
    DeadlineExceededError,
    InternalError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    QueueFullError,
    UnavailableError,
    WorkerDiedError,
)
from cnnserve.gateway.types import ModelStatus
from cnnserve.torchserve import TorchServeKeys, read_key_file
from cnnserve.torchserve_api import inference_pb2, inference_pb2_grpc, management_pb2, management_pb2_grpc

__all__ = ["Backend", "ConnectionWatcher", "Reply", "Request", "TorchServeBackend", "translate_error"]

log = logging.getLogger(__name__)

Reply = TypeVar("Reply")
Request = Operation  # Request[R]: a contract request whose reply type is R


class Backend(Protocol):
    async def call(self, model: str, version: str, request: Request[Reply], timeout: float | None) -> Reply:
        """The worker's reply to ``request`` (its error raised as a CnnserveError)."""
        ...

    async def models(self) -> list[ModelStatus]:
        """Every registered model with its worker counts."""
        ...

    async def close(self) -> None: ...


@runtime_checkable
class ConnectionWatcher(Protocol):
    """A backend that can tell at once when its connection drops (the gateway then re-checks health)."""

    async def watch_connection(self, on_drop: Callable[[], None]) -> None:
        """Run until cancelled, calling ``on_drop()`` each time a connection that was up goes down."""
        ...


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
            # gRPC's reconnect back-off grows to 120 s by default: a TorchServe restarted after a long outage
            # would stay unused that long. Reconnecting to a loopback port costs nothing.
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000),
        ]
        self._inference_channel = grpc.aio.insecure_channel(inference_target, options=options)
        self._management_channel = grpc.aio.insecure_channel(management_target, options=options)
        self._inference = inference_pb2_grpc.InferenceAPIsServiceStub(self._inference_channel)
        self._management = management_pb2_grpc.ManagementAPIsServiceStub(self._management_channel)
        self._key_file = Path(key_file) if key_file else None
        self._keys = TorchServeKeys(None, None)
        self._reload_keys()
        self.target = inference_target
        # (model, version) whose workers predate the packed envelope (an older archive): sent the legacy one.
        self._legacy: set[tuple[str, str]] = set()

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

    async def call(self, model: str, version: str, request: Request[Reply], timeout: float | None) -> Reply:
        deadline = None if timeout is None else time.monotonic() + timeout
        if (model, version) in self._legacy:
            return await self._predict(model, version, request, legacy_envelope(request), deadline)
        try:
            return await self._predict(model, version, request, envelope(request), deadline)
        except InvalidInputError as exc:
            if not _predates_packed_envelope(exc):
                raise
        log.warning(
            "the %s workers predate the packed envelope (an older archive): sending them the legacy one",
            model,
        )
        self._legacy.add((model, version))
        return await self._predict(model, version, request, legacy_envelope(request), deadline)

    async def _predict(
        self,
        model: str,
        version: str,
        request: Request[Reply],
        encoded: dict[str, bytes],
        deadline: float | None,
    ) -> Reply:
        message = inference_pb2.PredictionsRequest(model_name=model, model_version=version, input=encoded)
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0)
        try:
            response = await self._with_token(
                "inference",
                lambda metadata: self._inference.Predictions(message, timeout=timeout, metadata=metadata),
            )
        except grpc.aio.AioRpcError as error:
            passed = deadline is not None and time.monotonic() >= deadline
            raise translate_error(error, model, deadline_passed=passed) from None
        return read_reply(request, response.prediction)

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

    async def watch_connection(self, on_drop: Callable[[], None]) -> None:
        await asyncio.gather(
            _watch_channel(self._inference_channel, on_drop),
            _watch_channel(self._management_channel, on_drop),
        )

    async def close(self) -> None:
        await self._inference_channel.close()
        await self._management_channel.close()


def _predates_packed_envelope(error: InvalidInputError) -> bool:
    """What a worker older than the packed envelope answers it: it looks for ``input.0`` only (a current
    worker never names that field for a packed envelope)."""
    return any(
        v.field == "input.0" and "described in meta.inputs but not sent" in v.description
        for v in error.violations
    )


async def _watch_channel(channel: grpc.aio.Channel, on_drop: Callable[[], None]) -> None:
    """Call ``on_drop`` whenever ``channel`` leaves READY (TorchServe died: it goes IDLE within ~20 ms)."""
    state = channel.get_state()
    while True:
        await channel.wait_for_state_change(state)
        new_state = channel.get_state()
        if state == grpc.ChannelConnectivity.READY and new_state != grpc.ChannelConnectivity.READY:
            log.warning("the connection to TorchServe dropped (%s)", new_state.name)
            on_drop()
        state = new_state


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


# TorchServe's own error answers end with a line naming a Java exception ("org.pytorch.serve.http.
# InternalServerException", "InternalServerException.()"); failures of the channel itself never do.
_JAVA_EXCEPTION = re.compile(r"^(org\.pytorch\.serve\.\S+|\w*Exception(\.\(\))?)$")
# 503s TorchServe's Python worker answers for a handler that raised or returned a wrong reply (ts/service.py).
_HANDLER_FAILED = ("Prediction failed", "Invalid model predict output", "number of batch response mismatched")


def _answered_by_torchserve(details: str) -> bool:
    lines = details.strip().splitlines()
    return len(lines) >= 2 and _JAVA_EXCEPTION.match(lines[-1].strip()) is not None


def _internal(summary: str, model: str, code: grpc.StatusCode, details: str) -> InternalError:
    error_id = uuid.uuid4().hex[:12]
    log.error("error id %s: %s (%s): %s %r", error_id, summary, model or "-", code.name, details)
    return InternalError(f"{summary} (gateway error id {error_id}; the details are in the gateway log)")


def translate_error(error: grpc.aio.AioRpcError, model: str, deadline_passed: bool = False) -> CnnserveError:
    """TorchServe's gRPC failures -> cnnserve errors. TorchServe's details go to the log, not to clients.

    Only what is known to be transient is UNAVAILABLE or retryable: the channel failing (TorchServe down or
    restarting), a worker dying with the request, a full job queue. Anything else is INTERNAL.
    ``deadline_passed``: the call's own deadline had passed when it failed. A deadline of microseconds can
    end as CANCELLED with TorchServe's RST_STREAM instead of DEADLINE_EXCEEDED (seen in CI): that is the
    deadline too, not a request TorchServe dropped for its size.
    """
    code, details = error.code(), error.details() or ""
    first = details.strip().splitlines()[0] if details.strip() else ""
    lowered = details.lower()
    of_model = f" for {model}" if model else ""
    if code == grpc.StatusCode.UNAVAILABLE and not _answered_by_torchserve(details):
        log.warning("TorchServe is not reachable: %s", details)
        return UnavailableError("TorchServe is not reachable")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED or (deadline_passed and code == grpc.StatusCode.CANCELLED):
        return DeadlineExceededError("the deadline passed before the model answered")
    if first.startswith("Worker died"):  # "Worker died.": RESOURCE_EXHAUSTED, sometimes INTERNAL
        log.warning("a TorchServe worker%s died with a request: %s %s", of_model, code.name, first)
        return WorkerDiedError(f"the {model or 'model'} worker died during the request; try again")
    if "has no worker to serve inference request" in details:  # observed (INTERNAL) when the queue is full
        log.warning("TorchServe refused a request%s: %s %s", of_model, code.name, first)
        name = model or "the model"
        return QueueFullError(f"TorchServe's job queue for {name} is full (or it has no worker); retry later")
    if "ModelNotFoundException" in details or "ModelVersionNotFoundException" in details:
        log.info("TorchServe does not serve %s: %s", model or "a model", first)
        return NotFoundError(f"model {model!r} (or that version) is not served")
    if code in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
        return _internal("TorchServe refused the gateway's token (check its key file)", model, code, details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidInputError(first or "the model rejected the request")
    if first.startswith(_HANDLER_FAILED):  # our handler answers its own failures; an older archive may not
        return _internal(
            f"the {model or 'model'} handler failed (its traceback is in TorchServe's model log)",
            model,
            code,
            details,
        )
    if code == grpc.StatusCode.CANCELLED and "RST_STREAM" in details:
        return _internal(
            "TorchServe dropped the request (it does that to requests over its max_request_size)",
            model,
            code,
            details,
        )
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in lowered:  # grpc's own check
        log.warning("a TorchServe request or reply%s is over the message size limit: %s", of_model, details)
        return OverloadedError("the request or its reply is over the gateway's message size limit")
    if "out of resources" in lowered:  # TorchServe's 507: the worker ran out of memory
        log.error("TorchServe%s is out of resources: %s %s", of_model, code.name, details)
        return OverloadedError(f"the {model or 'model'} worker ran out of memory")
    return _internal(f"TorchServe failed the request{of_model}", model, code, details)
