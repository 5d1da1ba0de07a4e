"""The gateway core: validation, micro-batching, routing, retries and model health, without gRPC.

Every public coroutine takes a domain call (:mod:`cnnserve.gateway.types`) and the caller's remaining time
(``timeout``, seconds, None for no deadline), and returns a domain result or raises a
:class:`cnnserve.errors.CnnserveError`. The transports (the gRPC servicers here, anything else later) only
convert.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cnnserve.errors import (
    CnnserveError,
    DeadlineExceededError,
    ErrorKind,
    FieldViolation,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
    WorkerDiedError,
    error_from_kind,
)
from cnnserve.gateway.backend import Backend
from cnnserve.gateway.batching import MicroBatcher
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
    Timing,
)
from cnnserve.layer_table import check_dims
from cnnserve.serving.protocol import RawInput, describe_inputs

__all__ = ["CoreSettings", "Gateway"]

log = logging.getLogger(__name__)

MAX_TOP_K = 1000
_UNKNOWN_MODEL_REFRESH_S = 1.0
# A retried Classify waits this long (jittered, within the caller's deadline): TorchServe has then noticed the
# dead worker and hands the job to a live one, or a queue has drained a little.
_RETRY_BACKOFF_S = 0.05
# Health re-checks asked for by failing calls or a dropped connection: at most this often.
_MIN_TRIGGERED_REFRESH_S = 0.25


@dataclass(frozen=True)
class CoreSettings:
    max_inputs: int = 64  # per Classify / FineTuneStep request
    max_batch: int = 32  # inputs per micro-batch sent to TorchServe
    max_in_flight: int = 2  # micro-batches per model at TorchServe at once
    stream_parallelism: int = 8  # ClassifyStream requests in flight per stream
    # Longest a Classify waits for one TorchServe answer before it retries (once); None: the caller's
    # deadline. TorchServe can hold a request without answering (seen for ~60 s after a worker was killed
    # under load), and a held micro-batch holds one of max_in_flight slots: a bound keeps the model flowing.
    try_timeout: float | None = 10.0


@dataclass(frozen=True)
class _BatchKey:
    model: str
    version: str
    revision: int | None


@dataclass(frozen=True)
class _Single:
    """One single-input Classify waiting for a micro-batch."""

    model_input: ModelInput
    top_k: int
    min_revision: int | None
    timeout: float | None


def _raise_for_body(body: dict[str, Any]) -> None:
    error = body.get("error")
    if error is None:
        return
    raise _error_from_body(error)


def _error_from_body(error: dict[str, Any]) -> CnnserveError:
    try:
        kind = ErrorKind[error.get("code", "INTERNAL")]
    except KeyError:
        kind = ErrorKind.INTERNAL
    violations = tuple(
        FieldViolation(v.get("field", ""), v.get("description", ""))
        for v in error.get("field_violations", [])
    )
    return error_from_kind(kind, str(error.get("message", "error")), violations)


def _validate_inputs(inputs: Sequence[ModelInput], max_inputs: int, field: str = "inputs") -> None:
    if not inputs:
        raise InvalidInputError.for_field(field, "at least one input is required")
    if len(inputs) > max_inputs:
        raise InvalidInputError.for_field(field, f"{len(inputs)} inputs; at most {max_inputs} per request")
    for index, item in enumerate(inputs):
        where = f"{field}[{index}]"
        if (item.image is None) == (item.tensor is None):
            raise InvalidInputError.for_field(where, "set exactly one of image or tensor")
        if item.image is not None and not item.image:
            raise InvalidInputError.for_field(f"{where}.image", "empty image bytes")
        if item.tensor is not None:
            shape, data = item.tensor.shape, item.tensor.data
            if not shape or any(d <= 0 for d in shape):
                raise InvalidInputError.for_field(
                    f"{where}.tensor.shape", f"{list(shape)} is not a valid shape"
                )
            expected = math.prod(shape) * 4
            if len(data) != expected:
                raise InvalidInputError.for_field(
                    f"{where}.tensor.data",
                    f"{len(data)} bytes do not match shape {list(shape)}: expected {expected} float32 bytes",
                )
            if not np.isfinite(np.frombuffer(data, dtype="<f4")).all():
                raise InvalidInputError.for_field(f"{where}.tensor.data", "contains NaN or Inf values")


def _describe(inputs: Sequence[ModelInput]) -> tuple[list[dict[str, Any]], list[bytes]]:
    """Envelope descriptors and payloads for ``inputs``."""
    raw = [
        RawInput(item.tensor.data, item.tensor.shape)
        if item.tensor is not None
        else RawInput(item.image or b"")
        for item in inputs
    ]
    return describe_inputs(raw), [item.data for item in raw]


def _scores(prediction: dict[str, Any], top_k: int) -> tuple[ClassScore, ...]:
    return tuple(
        ClassScore(str(t["label"]), int(t["index"]), float(t["probability"]))
        for t in prediction["top_k"][:top_k]
    )


def _revision_info(data: dict[str, Any]) -> RevisionInfo:
    return RevisionInfo(
        revision=int(data["revision"]),
        kind=str(data["kind"]),
        parent=data.get("parent"),
        step=int(data.get("step", 0)),
        sha256=str(data.get("sha256", "")),
        created=float(data.get("created", 0.0)),
        pruned=bool(data.get("pruned", False)),
        request_id=data.get("request_id"),
    )


_SLOT = re.compile(r"^inputs\[\d+\]")


def _as_first_input(error: CnnserveError) -> CnnserveError:
    """The handler names an input by its slot in the micro-batch; its caller sent it as inputs[0]."""
    violations = tuple(
        FieldViolation(_SLOT.sub("inputs[0]", v.field), v.description) for v in error.violations
    )
    return error_from_kind(error.kind, _SLOT.sub("inputs[0]", error.message), violations)


def _check_model_name(model: str) -> None:
    if not model:
        raise InvalidInputError.for_field("model", "is required")


class Gateway:
    """cnnserve's request logic. Start it (health polling) before use; close it after."""

    def __init__(
        self,
        backend: Backend,
        settings: CoreSettings = CoreSettings(),
        on_batch: Callable[[str, int], None] | None = None,
    ) -> None:
        self.backend = backend
        self.settings = settings
        self._batcher: MicroBatcher[_Single, ClassifyResult] = MicroBatcher(
            self._send_batch,
            max_batch=settings.max_batch,
            max_in_flight=settings.max_in_flight,
            on_batch=(lambda key, size: on_batch(key.model, size)) if on_batch else None,  # type: ignore[attr-defined]
        )
        self._models: dict[str, ModelStatus] = {}
        self._backend_up = False
        self._refreshed_at = float("-inf")
        self._refresh_wanted = asyncio.Event()

    # ---- lifecycle and health -------------------------------------------------------------------

    async def start(self) -> None:
        """Learn the served models once; the server keeps refreshing them (``refresh_models``)."""
        await self.refresh_models()

    async def close(self) -> None:
        await self._batcher.close()
        await self.backend.close()

    async def refresh_models(self) -> dict[str, bool]:
        """Re-read models and worker states from the backend; returns {model: serving}."""
        self._refreshed_at = time.monotonic()
        try:
            models = await self.backend.models()
            self._models = {m.name: m for m in models}
            self._backend_up = True
        except CnnserveError as exc:
            if self._backend_up:
                log.warning("TorchServe health check failed: %s", exc.message)
            self._backend_up = False
        return self.health()

    def request_refresh(self) -> None:
        """Ask for a health re-check now (the backend's connection dropped, a call could not reach it, or one
        got through while the backend was thought down); :meth:`wait_for_refresh` returns at once."""
        self._refresh_wanted.set()

    async def wait_for_refresh(self, interval: float) -> None:
        """Wait until the next health check is due: ``interval`` seconds, or sooner when one is requested."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._refresh_wanted.wait(), interval)
            # Requested: a burst of failing calls asks many times, one check answers them all.
            await asyncio.sleep(max(0.0, self._refreshed_at + _MIN_TRIGGERED_REFRESH_S - time.monotonic()))
        self._refresh_wanted.clear()

    def health(self) -> dict[str, bool]:
        """{model: serving}; a model serves when TorchServe has a READY worker for it."""
        if not self._backend_up:
            return {name: False for name in self._models}
        return {name: status.serving for name, status in self._models.items()}

    @property
    def serving(self) -> bool:
        return self._backend_up and any(self.health().values())

    async def _known(self, model: str) -> ModelStatus:
        _check_model_name(model)
        status = self._models.get(model)
        if status is None and time.monotonic() - self._refreshed_at > _UNKNOWN_MODEL_REFRESH_S:
            # Registered since the last poll? (At most once a second: unknown names must not flood it.)
            await self.refresh_models()
            status = self._models.get(model)
        if status is None:
            if not self._backend_up:
                raise UnavailableError("TorchServe is not reachable")
            known = ", ".join(sorted(self._models)) or "none"
            raise NotFoundError(f"unknown model {model!r} (served: {known})")
        return status

    async def _served(self, model: str, version: str) -> ModelStatus:
        """``model`` as TorchServe serves it; NotFoundError for an unknown model or version."""
        status = await self._known(model)
        if version and version not in status.versions:
            raise NotFoundError(
                f"{status.name} has no version {version!r} (versions: {', '.join(status.versions)})"
            )
        return status

    async def _call(
        self,
        model: str,
        version: str,
        op: str,
        meta: dict[str, Any],
        payloads: Sequence[bytes],
        timeout: float | None,
    ) -> dict[str, Any]:
        if timeout is not None and timeout <= 0:
            raise DeadlineExceededError("the deadline passed before the request reached the model")
        try:
            body = await self.backend.call(model, version, op, meta, payloads, timeout)
        except UnavailableError as exc:
            if not isinstance(exc, WorkerDiedError):  # the backend itself is unreachable: re-check health now
                self.request_refresh()
            raise
        if not self._backend_up:  # it answered: health can say SERVING again without waiting for the poll
            self.request_refresh()
        _raise_for_body(body)
        return body

    # ---- Classify -------------------------------------------------------------------------------

    async def classify(self, call: ClassifyCall, timeout: float | None = None) -> ClassifyResult:
        started = time.perf_counter()
        await self._served(call.model, call.version)
        _validate_inputs(call.inputs, self.settings.max_inputs)
        if not 0 <= call.top_k <= MAX_TOP_K:
            raise InvalidInputError.for_field("top_k", f"must be between 0 and {MAX_TOP_K}")
        top_k = call.top_k or 5
        if len(call.inputs) == 1:
            key = _BatchKey(call.model, call.version, call.revision)
            item, min_revision = call.inputs[0], call.min_revision
            result = await self._with_retry(
                lambda left: self._batcher.submit(key, _Single(item, top_k, min_revision, left)), timeout
            )
        else:
            result = await self._with_retry(lambda left: self._classify_direct(call, top_k, left), timeout)
        timing = Timing(
            server_ms=(time.perf_counter() - started) * 1000,
            backend_ms=result.timing.backend_ms,
            batch_inputs=result.timing.batch_inputs,
        )
        return ClassifyResult(result.model, result.version, result.revision, result.predictions, timing)

    async def _with_retry(
        self, attempt: Callable[[float | None], Awaitable[ClassifyResult]], timeout: float | None
    ) -> ClassifyResult:
        """Classify is safe to repeat: one retry, after a short back-off, on a retryable failure (TorchServe
        unreachable, a worker that died with the request, a full queue, no answer within ``try_timeout``) when
        the deadline leaves time for it. ``attempt`` takes the time it may use (None: no limit)."""
        started = time.monotonic()
        bound = self.settings.try_timeout
        cut_short = bound is not None and (timeout is None or bound < timeout)
        try:
            return await attempt(bound if cut_short else timeout)
        except CnnserveError as exc:
            # A deadline that was our bound, not the caller's, says TorchServe held the request: try again.
            held = cut_short and isinstance(exc, DeadlineExceededError)
            if not (exc.retryable or held):
                raise
            delay = _RETRY_BACKOFF_S * random.uniform(0.5, 1.5)
            left = None if timeout is None else timeout - (time.monotonic() - started)
            if left is not None:
                delay = min(delay, left / 4)
                left -= delay
                if left <= 0:
                    raise
            log.info("retrying a classify call once in %.0f ms: %s", delay * 1000, exc.message)
            await asyncio.sleep(delay)
            if bound is not None and (left is None or bound < left):
                left = bound
            return await attempt(left)

    async def _classify_direct(self, call: ClassifyCall, top_k: int, timeout: float | None) -> ClassifyResult:
        descriptors, payloads = _describe(call.inputs)
        meta = {
            "inputs": descriptors,
            "top_k": top_k,
            "revision": call.revision,
            "min_revision": call.min_revision,
        }
        sent = time.perf_counter()
        body = await self._call(call.model, call.version, "classify", meta, payloads, timeout)
        backend_ms = (time.perf_counter() - sent) * 1000
        predictions = tuple(_scores(p, top_k) for p in body["predictions"])
        return ClassifyResult(
            body["model"],
            body["version"],
            int(body["revision"]),
            predictions,
            Timing(0.0, backend_ms, len(payloads)),
        )

    async def _send_batch(
        self, key: Hashable, items: Sequence[_Single]
    ) -> list[ClassifyResult | BaseException]:
        """One backend request for a micro-batch; each caller gets its own slot (or its own error)."""
        assert isinstance(key, _BatchKey)
        descriptors, payloads = _describe([item.model_input for item in items])
        min_revisions = [item.min_revision for item in items if item.min_revision is not None]
        timeouts = [item.timeout for item in items]
        timeout = None if None in timeouts else max(t for t in timeouts if t is not None)
        meta = {
            "inputs": descriptors,
            "top_k": max(item.top_k for item in items),
            "revision": key.revision,
            # every member sees a revision >= its own min_revision (and the live head is never older)
            "min_revision": max(min_revisions) if min_revisions else None,
            "per_input_errors": True,
        }
        sent = time.perf_counter()
        body = await self._call(key.model, key.version, "classify", meta, payloads, timeout)
        timing = Timing(0.0, (time.perf_counter() - sent) * 1000, len(items))
        results: list[ClassifyResult | BaseException] = []
        for item, prediction in zip(items, body["predictions"], strict=True):
            if "error" in prediction:
                error = _as_first_input(_error_from_body(prediction["error"]))
                results.append(error)
            else:
                predictions = (_scores(prediction, item.top_k),)
                results.append(
                    ClassifyResult(body["model"], body["version"], int(body["revision"]), predictions, timing)
                )
        return results

    # ---- the other calls ------------------------------------------------------------------------

    async def layer_shapes(self, call: ShapesCall, timeout: float | None = None) -> dict[str, Any]:
        await self._served(call.model, call.version)
        if call.input_shape:
            check_dims(call.input_shape)  # the handler's own check, before the hop
        meta = {"input_shape": list(call.input_shape) or None}
        return await self._call(call.model, call.version, "shapes", meta, [], timeout)

    async def finetune(self, call: FineTuneCall, timeout: float | None = None) -> FineTuneResult:
        started = time.perf_counter()
        await self._served(call.model, call.version)
        _validate_inputs(call.inputs, self.settings.max_inputs)
        if len(call.labels) != len(call.inputs):
            raise InvalidInputError.for_field(
                "labels", f"{len(call.labels)} labels for {len(call.inputs)} inputs"
            )
        if not (math.isfinite(call.lr) and call.lr > 0):
            raise InvalidInputError.for_field("lr", f"must be a finite number > 0, got {call.lr}")
        if not (math.isfinite(call.momentum) and 0 <= call.momentum < 1):
            raise InvalidInputError.for_field("momentum", f"must be in [0, 1), got {call.momentum}")
        if not (math.isfinite(call.weight_decay) and call.weight_decay >= 0):
            raise InvalidInputError.for_field("weight_decay", f"must be >= 0, got {call.weight_decay}")
        # The lr's upper bound is the worker's (max_lr, where archives are configured), not checked here.
        clip = call.max_grad_norm
        if clip is not None and not (math.isfinite(clip) and clip > 0):
            raise InvalidInputError.for_field(
                "max_grad_norm", f"must be a finite number > 0 (unset: no clipping), got {clip}"
            )
        if len(call.request_id) > 128:
            raise InvalidInputError.for_field("request_id", "at most 128 characters")
        # With an id, a retry after a lost reply cannot apply the step twice: the store replays the result.
        request_id = call.request_id or f"gw-{uuid.uuid4()}"
        descriptors, payloads = _describe(call.inputs)
        meta = {
            "inputs": descriptors,
            "labels": list(call.labels),
            "lr": call.lr,
            "momentum": call.momentum,
            "weight_decay": call.weight_decay,
            "train_layers": call.train_layers,
            "request_id": request_id,
            "expected_revision": call.expected_revision,
            "max_grad_norm": call.max_grad_norm,
        }
        sent = time.perf_counter()
        try:
            body = await self._call(call.model, call.version, "finetune", meta, payloads, timeout)
        except UnavailableError:
            # Not blind: the request id makes the repeat idempotent.
            body = await self._call(call.model, call.version, "finetune", meta, payloads, timeout)
        timing = Timing(
            (time.perf_counter() - started) * 1000, (time.perf_counter() - sent) * 1000, len(payloads)
        )
        return FineTuneResult(
            model=body["model"],
            version=body["version"],
            revision=int(body["revision"]),
            parent=int(body["parent"]),
            step=int(body["step"]),
            loss_before=float(body["loss_before"]),
            loss_after=float(body["loss_after"]),
            batch_accuracy=float(body["batch_accuracy"]),
            grad_norm=float(body["grad_norm"]),
            replayed=bool(body.get("replayed", False)),
            request_id=request_id,
            timing=timing,
            grad_clipped=bool(body.get("grad_clipped", False)),  # absent from an older worker's replay
        )

    async def list_models(self) -> list[ModelStatus]:
        await self.refresh_models()
        if not self._backend_up:
            raise UnavailableError("TorchServe is not reachable")
        return sorted(self._models.values(), key=lambda m: m.name)

    async def get_model(self, model: str, version: str = "", timeout: float | None = None) -> ModelDetails:
        status = await self._served(model, version)
        info = await self._call(model, version, "info", {}, [], timeout)
        return ModelDetails(status, info)

    async def list_revisions(
        self, model: str, version: str = "", timeout: float | None = None
    ) -> RevisionList:
        await self._served(model, version)
        body = await self._call(model, version, "revisions", {}, [], timeout)
        return RevisionList(model, int(body["head"]), tuple(_revision_info(r) for r in body["revisions"]))

    async def rollback(
        self, model: str, to_revision: int, version: str = "", timeout: float | None = None
    ) -> RevisionChange:
        await self._served(model, version)
        body = await self._call(model, version, "rollback", {"to_revision": to_revision}, [], timeout)
        return RevisionChange(model, _revision_info(body), int(body["weights_of"]))

    async def reset(self, model: str, version: str = "", timeout: float | None = None) -> RevisionChange:
        await self._served(model, version)
        body = await self._call(model, version, "reset", {}, [], timeout)
        return RevisionChange(model, _revision_info(body), int(body["weights_of"]))
