"""TorchServe entry point for every cnnserve model (``--handler handler.py``).

Contract: TorchServe calls :meth:`CnnserveHandler.handle` with a batch (a list of request dicts) and expects a
list of the same length back. Each reply is a JSON body; its HTTP status (per request, so one bad request
does not fail its batch) comes from the error kind. All logic lives in :class:`ModelService`.

Nothing raises out of ``handle``: TorchServe would answer a handler exception with 503 "Prediction failed",
which reads as "TorchServe is down" and gets retried. A bug (anything that is not a ``CnnserveError``) is
logged with its traceback under a fresh error id, and every request of the batch is answered 500 INTERNAL
(running out of memory: 429 RESOURCE_EXHAUSTED) with that id, so that the client's message finds the
traceback in TorchServe's model log.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from typing import Any

import torch

from cnnserve.errors import CnnserveError, ErrorKind
from cnnserve.serving.config import pick_device, service_config
from cnnserve.serving.service import ModelService, Reply, error_body

log = logging.getLogger("cnnserve.serving.handler")  # archived as cnnserve_handler.py: keep our name


class CnnserveHandler:
    def __init__(self) -> None:
        self.service: ModelService | None = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        yaml_config = getattr(context, "model_yaml_config", None) or {}
        # TorchServe's worker logs a line per request at INFO ("Backend received inference"), which its
        # frontend then parses and logs again: keep the root logger at WARNING, ours at INFO, and TorchServe's
        # metrics (their log lines are how the frontend learns HandlerTime and PredictionTime) at INFO.
        logging.getLogger().setLevel(logging.WARNING)
        for name in ("cnnserve", "ts.metrics"):
            logging.getLogger(name).setLevel(logging.INFO)
        device = pick_device(properties.get("gpu_id"), torch.cuda.is_available())
        config = service_config(yaml_config.get("handler"), os.environ, device)
        torch.set_num_threads(config.threads)
        try:
            self.service = ModelService(properties["model_dir"], config, name=context.model_name)
        except CnnserveError as exc:
            log.error("cannot start %s: %s", context.model_name, exc.message)
            raise
        self.initialized = True
        log.info(
            "%s ready: %s on %s, revisions in %s",
            context.model_name,
            config.format,
            device,
            config.revisions_dir,
        )

    def handle(self, data: list[dict[str, Any]] | None, context: Any) -> list[bytes]:
        if not data:
            return []
        assert self.service is not None, "initialize() was not called"
        replies = self._replies(self.service, data)
        for index, reply in enumerate(replies):
            context.set_response_content_type(index, "application/json")
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
            kind, message, body = exc.kind, exc.message, error_body(exc)
        except Exception as exc:
            error_id = uuid.uuid4().hex[:12]
            log.exception("%s: error id %s in a batch of %d requests", service.name, error_id, len(data))
            # Out of memory is load (TorchServe's own 507 for it), not a bug in the code.
            out_of_memory = isinstance(exc, (MemoryError, torch.cuda.OutOfMemoryError))
            kind = ErrorKind.RESOURCE_EXHAUSTED if out_of_memory else ErrorKind.INTERNAL
            what = "out of memory" if out_of_memory else "internal error"
            message = (
                f"{what} in the {service.name} worker "
                f"(error id {error_id}; its traceback is in TorchServe's model log)"
            )
            body = {"error": {"code": kind.code_name, "message": message, "field_violations": []}}
        return [Reply(kind.http_status, _encode_error(body, kind, message))] * len(data)


def _encode_error(body: dict[str, Any], kind: ErrorKind, message: str) -> bytes:
    """An error body that always encodes: what cannot be JSON (a message that is not text) becomes text."""
    try:
        return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError):
        fallback = {"error": {"code": kind.code_name, "message": str(message), "field_violations": []}}
        return json.dumps(fallback, separators=(",", ":"), default=str).encode()
