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
import random
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

from cnnserve.contract import (
    DEFAULT_TOP_K,
    ClassifyRequest,
    FineTuneRequest,
    InfoRequest,
    Prediction,
    RawInput,
    ResetRequest,
    RevisionChangeReply,
    RevisionsReply,
    RevisionsRequest,
    RollbackRequest,
    ShapesReply,
    ShapesRequest,
    check_image,
    check_tensor,
)
from cnnserve.errors import (
    CnnserveError,
    DeadlineExceededError,
    FieldViolation,
    InvalidInputError,
    NotFoundError,
    UnavailableError,
    WorkerDiedError,
    error_from_kind,
)
from cnnserve.gateway.backend import Backend, Reply, Request
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
    ShapesCall,
    Timing,
)
from cnnserve.layer_table import check_dims

__all__ = ["CoreSettings", "Gateway"]

log = logging.getLogger(__name__)

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
    # Longest a Classify waits for one TorchServe answer before it retries (once); None: the caller's
    # deadline. TorchServe can hold a request without answering (seen for ~60 s after a worker was killed
    # under load), and a held micro-batch holds one of max_in_flight slots: a bound keeps the model flowing.
    try_timeout: float | None = 10.0


@dataclass(frozen=True)
class _BatchKey:
    model: str
    version: str
    revision: int | None


class _Single(NamedTuple):
    """One single-input Classify waiting for a micro-batch (a NamedTuple: one is built per call)."""

    raw: RawInput
    top_k: int
    min_revision: int | None
    timeout: float | None


def _raw_inputs(inputs: Sequence[ModelInput], max_inputs: int) -> tuple[RawInput, ...]:
    """The call's inputs as the contract carries them, checked before the hop (fields as the proto names
    them: ``inputs[i].image``, ``inputs[i].tensor.data``)."""
    if len(inputs) > max_inputs:
        raise InvalidInputError.for_field("inputs", f"{len(inputs)} inputs; at most {max_inputs} per request")
    raw = []
    for index, item in enumerate(inputs):
        where = f"inputs[{index}]"
        if (item.image is None) == (item.tensor is None):
            raise InvalidInputError.for_field(where, "set exactly one of image or tensor")
        if item.tensor is not None:
            shape = check_tensor(item.tensor.data, item.tensor.shape, f"{where}.tensor")
            raw.append(RawInput(item.tensor.data, shape))
        else:
            check_image(item.image or b"", f"{where}.image")
            raw.append(RawInput(item.image or b""))
    return tuple(raw)


def _scores(prediction: Prediction, top_k: int) -> tuple[ClassScore, ...]:
    if isinstance(prediction, CnnserveError):  # only a per_input_errors request answers one in a slot
        raise prediction
    return prediction[:top_k]


_SLOT = re.compile(r"^inputs\[\d+\]")


def _as_first_input(error: CnnserveError) -> CnnserveError:
    """The handler names an input by its slot in the micro-batch; its caller sent it as inputs[0]."""
    violations = tuple(
        FieldViolation(_SLOT.sub("inputs[0]", v.field), v.description) for v in error.violations
    )
    return error_from_kind(error.kind, _SLOT.sub("inputs[0]", error.message), violations)


# FineTuneRequest fields the gateway fills itself; every other one comes from the FineTuneCall of that name.
_OWN_FIELDS = ("inputs", "request_id")


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
        status = self._models.get(model)
        if status is not None and (not version or version in status.versions):
            return status  # the common case, without a second coroutine
        status = await self._known(model)
        if version and version not in status.versions:
            raise NotFoundError(
                f"{status.name} has no version {version!r} (versions: {', '.join(status.versions)})"
            )
        return status

    async def _call(self, model: str, version: str, request: Request[Reply], timeout: float | None) -> Reply:
        if timeout is not None and timeout <= 0:
            raise DeadlineExceededError("the deadline passed before the request reached the model")
        try:
            reply = await self.backend.call(model, version, request, timeout)
        except UnavailableError as exc:
            if not isinstance(exc, WorkerDiedError):  # the backend itself is unreachable: re-check health now
                self.request_refresh()
            raise
        except CnnserveError:  # the worker answered with an error: the backend is up
            self._saw_backend()
            raise
        self._saw_backend()
        return reply

    def _saw_backend(self) -> None:
        if not self._backend_up:  # it answered: health can say SERVING again without waiting for the poll
            self.request_refresh()

    # ---- Classify -------------------------------------------------------------------------------

    async def classify(self, call: ClassifyCall, timeout: float | None = None) -> ClassifyResult:
        started = time.perf_counter()
        await self._served(call.model, call.version)
        # Built (and so checked) here, before the hop, whether it leaves alone or in a micro-batch.
        request = ClassifyRequest(
            _raw_inputs(call.inputs, self.settings.max_inputs),
            top_k=call.top_k or DEFAULT_TOP_K,
            revision=call.revision,
            min_revision=call.min_revision,
        )
        if len(request.inputs) == 1:
            key = _BatchKey(call.model, call.version, call.revision)
            single = (request.inputs[0], request.top_k, request.min_revision)
            result = await self._with_retry(
                lambda left: self._batcher.submit(key, _Single(*single, left)), timeout
            )
        else:
            result = await self._with_retry(
                lambda left: self._classify_direct(call.model, call.version, request, left), timeout
            )
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

    async def _classify_direct(
        self, model: str, version: str, request: ClassifyRequest, timeout: float | None
    ) -> ClassifyResult:
        sent = time.perf_counter()
        reply = await self._call(model, version, request, timeout)
        backend_ms = (time.perf_counter() - sent) * 1000
        return ClassifyResult(
            reply.model,
            reply.version,
            reply.revision,
            tuple(_scores(p, request.top_k) for p in reply.predictions),
            Timing(0.0, backend_ms, len(request.inputs)),
        )

    async def _send_batch(
        self, key: Hashable, items: Sequence[_Single]
    ) -> list[ClassifyResult | BaseException]:
        """One backend request for a micro-batch; each caller gets its own slot (or its own error)."""
        assert isinstance(key, _BatchKey)
        min_revisions = [item.min_revision for item in items if item.min_revision is not None]
        timeouts = [item.timeout for item in items]
        timeout = None if None in timeouts else max(t for t in timeouts if t is not None)
        request = ClassifyRequest(
            tuple(item.raw for item in items),
            top_k=max(item.top_k for item in items),
            revision=key.revision,
            # every member sees a revision >= its own min_revision (and the live head is never older)
            min_revision=max(min_revisions) if min_revisions else None,
            per_input_errors=True,
        )
        sent = time.perf_counter()
        reply = await self._call(key.model, key.version, request, timeout)
        timing = Timing(0.0, (time.perf_counter() - sent) * 1000, len(items))
        results: list[ClassifyResult | BaseException] = []
        for item, prediction in zip(items, reply.predictions, strict=True):
            if isinstance(prediction, CnnserveError):
                results.append(_as_first_input(prediction))
            else:
                scores = (prediction[: item.top_k],)
                results.append(ClassifyResult(reply.model, reply.version, reply.revision, scores, timing))
        return results

    # ---- the other calls ------------------------------------------------------------------------

    async def layer_shapes(self, call: ShapesCall, timeout: float | None = None) -> ShapesReply:
        await self._served(call.model, call.version)
        if call.input_shape:
            check_dims(call.input_shape)  # the handler's own check, before the hop
        request = ShapesRequest(tuple(call.input_shape) or None)
        return await self._call(call.model, call.version, request, timeout)

    async def finetune(self, call: FineTuneCall, timeout: float | None = None) -> FineTuneResult:
        started = time.perf_counter()
        await self._served(call.model, call.version)
        # With an id, a retry after a lost reply cannot apply the step twice: the store replays the result.
        request_id = call.request_id or f"gw-{uuid.uuid4()}"
        # The call carries the contract's fields under the same names: built (and checked) before the hop.
        same = {f.name: getattr(call, f.name) for f in fields(FineTuneRequest) if f.name not in _OWN_FIELDS}
        request = FineTuneRequest(
            inputs=_raw_inputs(call.inputs, self.settings.max_inputs), request_id=request_id, **same
        )
        sent = time.perf_counter()
        try:
            reply = await self._call(call.model, call.version, request, timeout)
        except UnavailableError:
            # Not blind: the request id makes the repeat idempotent.
            reply = await self._call(call.model, call.version, request, timeout)
        timing = Timing(
            (time.perf_counter() - started) * 1000, (time.perf_counter() - sent) * 1000, len(request.inputs)
        )
        answered = {f.name: getattr(reply, f.name) for f in fields(reply)}
        return FineTuneResult(**answered, request_id=request_id, timing=timing)

    async def list_models(self) -> list[ModelStatus]:
        await self.refresh_models()
        if not self._backend_up:
            raise UnavailableError("TorchServe is not reachable")
        return sorted(self._models.values(), key=lambda m: m.name)

    async def get_model(self, model: str, version: str = "", timeout: float | None = None) -> ModelDetails:
        status = await self._served(model, version)
        return ModelDetails(status, await self._call(model, version, InfoRequest(), timeout))

    async def list_revisions(
        self, model: str, version: str = "", timeout: float | None = None
    ) -> RevisionsReply:
        await self._served(model, version)
        return await self._call(model, version, RevisionsRequest(), timeout)

    async def rollback(
        self, model: str, to_revision: int, version: str = "", timeout: float | None = None
    ) -> RevisionChangeReply:
        await self._served(model, version)
        return await self._call(model, version, RollbackRequest(to_revision), timeout)

    async def reset(self, model: str, version: str = "", timeout: float | None = None) -> RevisionChangeReply:
        await self._served(model, version)
        return await self._call(model, version, ResetRequest(), timeout)
