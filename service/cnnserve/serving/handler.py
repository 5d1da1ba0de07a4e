"""TorchServe entry point for every cnnserve model (``--handler handler.py``).

Contract: TorchServe calls :meth:`CnnserveHandler.handle` with a batch (a list of request dicts) and expects a
list of the same length back. Each reply is a JSON body; its HTTP status (per request, so one bad request
does not fail its batch) comes from the error kind. All logic lives in :class:`ModelService`.

Nothing raises out of ``handle``: TorchServe would answer a handler exception with 503 "Prediction failed",
which reads as "TorchServe is down" and gets retried. A bug (anything that is not a ``CnnserveError``) is
logged with its traceback under a fresh error id, and every request of the batch is answered 500 INTERNAL
(running out of memory: 429 RESOURCE_EXHAUSTED) with that id, so that the client's message finds the
traceback in TorchServe's model log.

A CUDA error (:func:`cuda_failure`) is not a bug in our code: the batch is answered 503 UNAVAILABLE, which the
gateway retries once. A *sticky* one (an illegal memory access, a device-side assert, ...) leaves the CUDA
context unusable for the rest of the process: the handler answers the batch, refuses every later request
503 without touching the GPU, and ends the worker process ``RESTART_DELAY_S`` later (after TorchServe's
worker loop has sent the replies; ``handle`` cannot exit itself before returning them), so that TorchServe
starts a fresh worker. A request that reaches the worker in that window is answered or, at worst, seen
by TorchServe as "worker died", which the gateway also retries.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from typing import Any

import torch

from cnnserve.contract import error_json
from cnnserve.errors import CnnserveError, ErrorKind, FailedPreconditionError, error_from_kind
from cnnserve.runtime import configure_cuda_numerics
from cnnserve.serving.config import pick_device, service_config
from cnnserve.serving.service import ModelService, Reply

log = logging.getLogger("cnnserve.serving.handler")  # archived as cnnserve_handler.py: keep our name

RESTART_DELAY_S = 1.0  # after a sticky CUDA error: time for TorchServe's worker loop to send the replies
RESTART_EXIT_CODE = 75  # EX_TEMPFAIL: TorchServe restarts a worker whatever its exit status
# CUDA errors after which the process's CUDA context is unusable (every later call fails too).
_STICKY = (
    "illegal memory access",
    "illegal address",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "launch timed out",
    "ecc error",
    "fallen off the bus",
    "hardware stack error",
)
_CUDA = ("cuda error", "cuda failure", "cudnn", "cublas", "cufft", "curand", "cusparse", "cudaerror")


def cuda_failure(exc: BaseException) -> str | None:
    """``"oom"``, ``"sticky"`` or ``"transient"`` when ``exc`` is a CUDA failure (torch's or ONNX Runtime's,
    both of which say so in the message), else None."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return "oom"
    text = f"{type(exc).__name__}: {exc}".lower()
    if "failed to allocate memory" in text:  # ONNX Runtime's arena (BFCArena), which does not say CUDA
        return "oom"
    if not any(marker in text for marker in _CUDA):
        return None
    if "out of memory" in text:
        return "oom"
    return "sticky" if any(marker in text for marker in _STICKY) else "transient"


class CnnserveHandler:
    def __init__(self) -> None:
        self.service: ModelService | None = None
        self.initialized = False
        self.broken: str | None = None  # a sticky CUDA error: the worker answers 503 until it has exited

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        # TorchServe's worker logs a line per request at INFO ("Backend received inference"), which its
        # frontend then parses and logs again: keep the root logger at WARNING, ours at INFO, and TorchServe's
        # metrics (their log lines are how the frontend learns HandlerTime and PredictionTime) at INFO.
        logging.getLogger().setLevel(logging.WARNING)
        for name in ("cnnserve", "ts.metrics"):
            logging.getLogger(name).setLevel(logging.INFO)
        choice = pick_device(
            properties.get("gpu_id"),
            yaml_config.get("deviceType"),
            torch.cuda.is_available(),
            torch.cuda.device_count(),
        )
        try:
            config = service_config(
                yaml_config.get("handler"),
                os.environ,
                choice.device,
                requested_device=choice.requested,
                workers=yaml_config.get("maxWorkers"),  # for the default threads (serving/threads.py)
            )
            if choice.fallback_reason is not None:
                if config.require_device:
                    raise FailedPreconditionError(
                        f"{context.model_name} needs {choice.requested} (require_device is true) but "
                        f"{choice.fallback_reason}; refusing to start on CPU"
                    )
                log.warning("%s serves on CPU: %s", context.model_name, choice.fallback_reason)
            if config.on_cuda:
                torch.cuda.set_device(config.device)  # else every worker also makes a context on GPU 0
                # TF32 off: it rounds conv and matmul inputs to 10 mantissa bits, which moves CUDA logits
                # past the 1e-4 parity tolerance the exports are checked with.
                configure_cuda_numerics(tf32=False)
            torch.set_num_threads(config.threads)
            log.info("%s: %d intra-op thread(s) per worker", context.model_name, config.threads)
            self.service = ModelService(properties["model_dir"], config, name=context.model_name)
        except CnnserveError as exc:
            log.error("cannot start %s: %s", context.model_name, exc.message)
            raise
        self.initialized = True
        log.info(
            "%s ready: %s on %s (%s; asked for %s), revisions in %s",
            context.model_name,
            config.format,
            self.service.device,
            self.service.provider,
            choice.requested,
            config.revisions_dir,
        )

    def handle(self, data: list[dict[str, Any]] | None, context: Any) -> list[bytes]:
        if not data:
            return []
        assert self.service is not None, "initialize() was not called"
        replies = self._restarting(data) if self.broken is not None else self._replies(self.service, data)
        for index, reply in enumerate(replies):
            context.set_response_content_type(index, reply.content_type)
            if reply.status != 200:
                context.set_response_status(reply.status, "error", index)
        return [reply.body for reply in replies]

    def _replies(self, service: ModelService, data: list[dict[str, Any]]) -> list[Reply]:
        """``service``'s replies, or one error reply per request when it raised instead of answering."""
        try:
            replies = service.handle(data)
            if len(replies) != len(data):
                raise RuntimeError(f"{len(data)} requests got {len(replies)} replies")
            return replies
        except CnnserveError as exc:  # meant for one request, but it escaped the batch: all of them get it
            log.warning("%s: a batch of %d failed: %s", service.name, len(data), exc.message)
            return [_error_reply(exc)] * len(data)
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            log.exception("%s: error id %s in a batch of %d requests", service.name, error_id, len(data))
            cuda = cuda_failure(exc)
            if isinstance(exc, MemoryError) or cuda == "oom":
                # Out of memory is load (TorchServe's own 507 for it), not a bug in the code.
                kind, what = ErrorKind.RESOURCE_EXHAUSTED, "out of memory"
            elif cuda is not None:
                kind, what = ErrorKind.UNAVAILABLE, "CUDA error"
                if cuda == "sticky":
                    self._schedule_restart(service.name, f"{type(exc).__name__}: {exc}")
                    what = "CUDA error (the worker restarts)"
            else:
                kind, what = ErrorKind.INTERNAL, "internal error"
            message = (
                f"{what} in the {service.name} worker "
                f"(error id {error_id}; its traceback is in TorchServe's model log)"
            )
            return [_error_reply(error_from_kind(kind, message))] * len(data)

    def _restarting(self, data: list[dict[str, Any]]) -> list[Reply]:
        """503 for every request while the worker waits to exit after a sticky CUDA error."""
        name = self.service.name if self.service is not None else "model"
        message = f"the {name} worker is restarting after a CUDA error"
        return [_error_reply(error_from_kind(ErrorKind.UNAVAILABLE, message))] * len(data)

    def _schedule_restart(self, model: str, why: str) -> None:
        """Mark the worker broken and end its process ``RESTART_DELAY_S`` from now (once)."""
        if self.broken is not None:
            return
        self.broken = why
        log.error(
            "%s: sticky CUDA error (%s): the CUDA context is unusable; this worker exits in %.1f s so that "
            "TorchServe starts a fresh one",
            model,
            why,
            RESTART_DELAY_S,
        )
        timer = threading.Timer(RESTART_DELAY_S, _exit_worker)
        timer.daemon = True
        timer.start()


def _exit_worker() -> None:
    logging.shutdown()
    os._exit(RESTART_EXIT_CODE)


def _error_reply(exc: CnnserveError) -> Reply:
    """``exc``'s reply; it always encodes (what cannot be JSON, a message that is not text, becomes text)."""
    try:
        body = json.dumps(error_json(exc), separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError):
        fallback = error_json(error_from_kind(exc.kind, str(exc.message)))
        body = json.dumps(fallback, separators=(",", ":"), default=str).encode()
    return Reply(exc.kind.http_status, body)
