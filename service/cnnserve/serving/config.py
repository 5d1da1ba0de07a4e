"""Worker settings: the archive's ``model-config.yaml`` ``handler:`` section, then environment overrides.

Read once, in the handler's ``initialize`` (the worker's ``main``), never at import.

========================== ================================ ===============================================
model-config.yaml key      environment variable             meaning
========================== ================================ ===============================================
``format``                 ``CNNSERVE_FORMAT``              runtime for classify: the archive's format (onnx
                                                            or torchscript, ``cnnserve archive --format``)
``threads``                ``CNNSERVE_WORKER_THREADS``      intra-op threads per worker (default 1)
``max_inputs``             ``CNNSERVE_MAX_INPUTS``          inputs per classify request (default 64)
``max_finetune_batch``     ``CNNSERVE_MAX_FINETUNE_BATCH``  inputs per fine-tune step (default 256)
``retention``              ``CNNSERVE_REVISION_RETENTION``  revisions kept besides the base (default 10)
``runtime_cache``          ``CNNSERVE_RUNTIME_CACHE``       loaded revisions kept per worker (default 4)
``max_lr``                 ``CNNSERVE_MAX_LR``              largest lr a fine-tune step may ask for (default
                                                            10.0, ``DEFAULT_MAX_LR``); above: INVALID_ARGUMENT
(none)                     ``CNNSERVE_REVISIONS_DIR``       the revision store; unset: fine-tuning disabled
========================== ================================ ===============================================

The device is TorchServe's to choose: ``cuda:<gpu_id>`` when it assigned the worker a GPU and CUDA works,
else ``cpu``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import fields
from typing import Any

from cnnserve.errors import FailedPreconditionError
from cnnserve.runtime import FORMATS
from cnnserve.serving.service import ServiceConfig

__all__ = ["service_config", "ENV_PREFIX"]

ENV_PREFIX = "CNNSERVE_"
_ENV_NAMES = {
    "format": "CNNSERVE_FORMAT",
    "threads": "CNNSERVE_WORKER_THREADS",
    "max_inputs": "CNNSERVE_MAX_INPUTS",
    "max_finetune_batch": "CNNSERVE_MAX_FINETUNE_BATCH",
    "max_forward_batch": "CNNSERVE_MAX_FORWARD_BATCH",
    "retention": "CNNSERVE_REVISION_RETENTION",
    "runtime_cache": "CNNSERVE_RUNTIME_CACHE",
    "max_lr": "CNNSERVE_MAX_LR",
    "revisions_dir": "CNNSERVE_REVISIONS_DIR",
}


def pick_device(gpu_id: int | None, cuda_available: bool) -> str:
    return f"cuda:{gpu_id}" if gpu_id is not None and cuda_available else "cpu"


def service_config(
    handler_yaml: Mapping[str, Any] | None, environ: Mapping[str, str], device: str
) -> ServiceConfig:
    """Build the worker's settings; raises :class:`FailedPreconditionError` naming a bad value."""
    values: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(ServiceConfig)}
    for name, env_name in _ENV_NAMES.items():
        raw = environ.get(env_name)
        source = env_name
        if raw is None and handler_yaml is not None and name in handler_yaml:
            raw, source = handler_yaml[name], f"model-config.yaml handler.{name}"
        if raw is None or raw == "":
            continue
        if "int" in str(types[name]):
            try:
                value: Any = int(raw)
            except (TypeError, ValueError):
                raise FailedPreconditionError(f"{source}={raw!r} is not an integer") from None
            if value < 1:
                raise FailedPreconditionError(f"{source}={raw!r} must be at least 1")
        elif str(types[name]) == "float":
            try:
                value = float(raw)
            except (TypeError, ValueError):
                raise FailedPreconditionError(f"{source}={raw!r} is not a number") from None
            if not (math.isfinite(value) and value > 0):
                raise FailedPreconditionError(f"{source}={raw!r} must be a finite number > 0")
        else:
            value = str(raw)
        values[name] = value
    if values.get("format", "onnx") not in FORMATS:
        raise FailedPreconditionError(f"format {values['format']!r} is not one of {', '.join(FORMATS)}")
    return ServiceConfig(device=device, **values)
