"""Worker settings: the archive's ``model-config.yaml`` ``handler:`` section, then environment overrides.

Read once, in the handler's ``initialize`` (the worker's ``main``), never at import.

========================== ================================ ===============================================
model-config.yaml key      environment variable             meaning
========================== ================================ ===============================================
``format``                 ``CNNSERVE_FORMAT``              runtime for classify: the archive's format (onnx
                                                            or torchscript, ``cnnserve archive --format``)
``threads``                ``CNNSERVE_WORKER_THREADS``      intra-op threads per worker (default: the CPU
                                                            quota's cores // workers, see ``threads.py``)
``max_threads``            (none)                           the default's cap for this model (archives:
                                                            LeNet 1, AlexNet none)
(none)                     ``CNNSERVE_WORKERS_ON_MACHINE``  workers sharing the machine's cores, for the
                                                            default (unset: this model's ``maxWorkers``)
``max_inputs``             ``CNNSERVE_MAX_INPUTS``          inputs per classify request (default 64)
``max_finetune_batch``     ``CNNSERVE_MAX_FINETUNE_BATCH``  inputs per fine-tune step (default 256)
``retention``              ``CNNSERVE_REVISION_RETENTION``  revisions kept besides the base (default 10)
``runtime_cache``          ``CNNSERVE_RUNTIME_CACHE``       loaded revisions kept per worker (default 4)
``gpu_runtime_cache``      ``CNNSERVE_GPU_RUNTIME_CACHE``   on CUDA, at most this many of them (default 2:
                                                            each ONNX Runtime CUDA session keeps its own
                                                            memory arena, which never shrinks)
``gpu_mem_limit_mb``       ``CNNSERVE_GPU_MEM_LIMIT_MB``    on CUDA, the memory one runtime may take (ORT's
                                                            ``gpu_mem_limit``; default: no limit)
``require_device``         ``CNNSERVE_REQUIRE_DEVICE``      true: a worker whose GPU cannot be used refuses
                                                            to start instead of serving on CPU (default
                                                            false: it serves on CPU and logs a WARNING why)
``max_lr``                 ``CNNSERVE_MAX_LR``              largest lr a fine-tune step may ask for (default
                                                            10.0, ``DEFAULT_MAX_LR``); above: INVALID_ARGUMENT
(none)                     ``CNNSERVE_REVISIONS_DIR``       the revision store; unset: fine-tuning disabled
========================== ================================ ===============================================

The device is TorchServe's to choose (:func:`pick_device`): ``cuda:<gpu_id>`` when it assigned the worker a
GPU, CUDA works and the id is below ``torch.cuda.device_count()``, else ``cpu`` -- with a WARNING naming why
when the archive asked for a GPU (``deviceType: gpu``) or TorchServe gave a ``gpu_id``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from cnnserve.errors import FailedPreconditionError
from cnnserve.runtime import FORMATS
from cnnserve.serving.service import ServiceConfig
from cnnserve.serving.threads import available_cores, default_threads

__all__ = ["service_config", "worker_threads", "pick_device", "DeviceChoice"]

_ENV_NAMES = {
    "format": "CNNSERVE_FORMAT",
    "threads": "CNNSERVE_WORKER_THREADS",
    "max_inputs": "CNNSERVE_MAX_INPUTS",
    "max_finetune_batch": "CNNSERVE_MAX_FINETUNE_BATCH",
    "max_forward_batch": "CNNSERVE_MAX_FORWARD_BATCH",
    "retention": "CNNSERVE_REVISION_RETENTION",
    "runtime_cache": "CNNSERVE_RUNTIME_CACHE",
    "gpu_runtime_cache": "CNNSERVE_GPU_RUNTIME_CACHE",
    "gpu_mem_limit_mb": "CNNSERVE_GPU_MEM_LIMIT_MB",
    "require_device": "CNNSERVE_REQUIRE_DEVICE",
    "max_lr": "CNNSERVE_MAX_LR",
    "revisions_dir": "CNNSERVE_REVISIONS_DIR",
}
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True)
class DeviceChoice:
    device: str  # what the worker will use: cpu | cuda:N
    requested: str  # what it was asked for: cpu | cuda (deviceType gpu, no gpu_id) | cuda:N
    fallback_reason: str | None = None  # why a GPU asked for is not used (None: it is, or none was asked)


def pick_device(
    gpu_id: int | str | None, device_type: str | None, cuda_available: bool, device_count: int
) -> DeviceChoice:
    """The worker's device from TorchServe's ``gpu_id`` and the archive's ``deviceType``.

    ``cuda_available`` and ``device_count`` are ``torch.cuda.is_available()`` and ``device_count()``.
    """
    wants_gpu = str(device_type or "").lower() == "gpu"
    if gpu_id is None or gpu_id == "":
        if not wants_gpu:
            return DeviceChoice("cpu", "cpu")
        return DeviceChoice(
            "cpu",
            "cuda",
            "the archive asks for a GPU (deviceType: gpu) but TorchServe gave this worker no gpu_id "
            "(TorchServe found no GPU: number_of_gpu=0 in config.properties, or no nvidia-smi)",
        )
    index = int(gpu_id)
    requested = f"cuda:{index}"
    if not cuda_available:
        return DeviceChoice(
            "cpu",
            requested,
            f"TorchServe gave this worker gpu_id {index} but torch.cuda.is_available() is false (a CPU-only "
            "torch, no usable NVIDIA driver, or CUDA_VISIBLE_DEVICES hides the GPUs)",
        )
    if not 0 <= index < device_count:
        return DeviceChoice(
            "cpu",
            requested,
            f"TorchServe gave this worker gpu_id {index} but torch.cuda.device_count() is {device_count} "
            "(number_of_gpu in config.properties is more than this process can see)",
        )
    return DeviceChoice(requested, requested)


def _count(
    handler_yaml: Mapping[str, Any] | None, key: str, environ: Mapping[str, str], env: str
) -> int | None:
    """An integer >= 1 from ``environ[env]``, else ``handler_yaml[key]`` (None when neither is set)."""
    raw: Any = environ.get(env) if env else None
    source = env
    if raw is None and handler_yaml is not None and key in handler_yaml:
        raw, source = handler_yaml[key], f"model-config.yaml handler.{key}"
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except (TypeError, ValueError):
        raise FailedPreconditionError(f"{source}={raw!r} is not an integer") from None
    if value < 1:
        raise FailedPreconditionError(f"{source}={raw!r} must be at least 1")
    return value


def worker_threads(
    handler_yaml: Mapping[str, Any] | None,
    environ: Mapping[str, str],
    workers: int | None,
    cores: int | None = None,
) -> int:
    """The default intra-op threads (``threads.py``'s rule) when neither the env nor the yaml sets them.

    ``workers``: this model's ``maxWorkers`` (``CNNSERVE_WORKERS_ON_MACHINE`` replaces it); ``cores``: the
    CPU quota's cores (None: read from this process's cgroups and affinity).
    """
    machine = _count(None, "", environ, "CNNSERVE_WORKERS_ON_MACHINE")
    cap = _count(handler_yaml, "max_threads", {}, "")
    count = machine or (int(workers) if workers else 1)
    return default_threads(available_cores() if cores is None else cores, count, cap)


def service_config(
    handler_yaml: Mapping[str, Any] | None,
    environ: Mapping[str, str],
    device: str,
    requested_device: str | None = None,
    *,
    workers: int | None = None,
    cores: int | None = None,
) -> ServiceConfig:
    """Build the worker's settings; raises :class:`FailedPreconditionError` naming a bad value.

    ``workers`` and ``cores`` feed the default thread count (:func:`worker_threads`).
    """
    values: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(ServiceConfig)}
    for name, env_name in _ENV_NAMES.items():
        raw = environ.get(env_name)
        source = env_name
        if raw is None and handler_yaml is not None and name in handler_yaml:
            raw, source = handler_yaml[name], f"model-config.yaml handler.{name}"
        if raw is None or raw == "":
            continue
        if "bool" in str(types[name]):
            text = str(raw).strip().lower()
            if text not in _TRUE + _FALSE:
                raise FailedPreconditionError(f"{source}={raw!r} is not true or false")
            values[name] = text in _TRUE
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
    if "threads" not in values:
        values["threads"] = worker_threads(handler_yaml, environ, workers, cores)
    if values.get("format", "onnx") not in FORMATS:
        raise FailedPreconditionError(f"format {values['format']!r} is not one of {', '.join(FORMATS)}")
    return ServiceConfig(device=device, requested_device=requested_device or device, **values)
