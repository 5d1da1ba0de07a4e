"""TorchServe entry point for every cnnserve model (``--handler handler.py``).

Contract: TorchServe calls :meth:`CnnserveHandler.handle` with a batch (a list of request dicts) and expects a
list of the same length back. Each reply is a JSON body; its HTTP status (per request, so one bad request
does not fail its batch) comes from the error kind. All logic lives in :class:`ModelService`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from cnnserve.errors import CnnserveError
from cnnserve.serving.config import pick_device, service_config
from cnnserve.serving.service import ModelService

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
        replies = self.service.handle(data)
        for index, reply in enumerate(replies):
            context.set_response_content_type(index, "application/json")
            if reply.status != 200:
                context.set_response_status(reply.status, "error", index)
        return [reply.body for reply in replies]
