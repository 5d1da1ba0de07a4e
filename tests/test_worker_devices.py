"""The worker's device (issue 16), on a machine without a GPU: what it picks, what it says, CUDA failures.

A GPU archive served here must say ``cpu`` / ``CPUExecutionProvider`` and log why; ``require_device`` makes
the worker refuse instead; a CUDA error answering a batch is 503 (retried by the gateway) and a sticky one
ends the worker so that TorchServe starts a fresh one.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cnnserve.errors import FailedPreconditionError
from cnnserve.serving import handler as handler_module
from cnnserve.serving.config import pick_device, service_config
from cnnserve.serving.handler import CnnserveHandler, cuda_failure
from cnnserve.serving.service import ModelService, ServiceConfig
from cnnserve.torchserve import TorchServe, TorchServeSettings, render_config
from cnnserve_export.export import ExportResult
from tests.helpers import wait_until
from tests.torchserve_helpers import post

# ---- picking the device ---------------------------------------------------------------------------------


def test_a_cpu_archive_runs_on_cpu_without_a_word() -> None:
    choice = pick_device(None, "cpu", cuda_available=False, device_count=0)
    assert (choice.device, choice.requested, choice.fallback_reason) == ("cpu", "cpu", None)


def test_a_usable_gpu_is_used() -> None:
    choice = pick_device(1, "gpu", cuda_available=True, device_count=2)
    assert (choice.device, choice.requested, choice.fallback_reason) == ("cuda:1", "cuda:1", None)


@pytest.mark.parametrize(
    ("gpu_id", "cuda_available", "count", "requested", "why"),
    [
        (None, False, 0, "cuda", "no gpu_id"),
        (0, False, 0, "cuda:0", "torch.cuda.is_available() is false"),
        (2, True, 2, "cuda:2", "torch.cuda.device_count() is 2"),
    ],
    ids=["no-gpu-id", "cuda-unavailable", "gpu-id-out-of-range"],
)
def test_an_unusable_gpu_falls_back_to_cpu_saying_why(
    gpu_id: int | None, cuda_available: bool, count: int, requested: str, why: str
) -> None:
    choice = pick_device(gpu_id, "gpu", cuda_available=cuda_available, device_count=count)
    assert choice.device == "cpu" and choice.requested == requested
    assert choice.fallback_reason is not None and why in choice.fallback_reason


def test_device_settings_are_read_from_the_archive_and_the_environment() -> None:
    config = service_config({"require_device": True, "gpu_mem_limit_mb": 512}, {}, "cpu", "cuda:0")
    assert config.require_device and config.gpu_mem_limit_mb == 512 and config.requested_device == "cuda:0"
    config = service_config({"require_device": True}, {"CNNSERVE_REQUIRE_DEVICE": "false"}, "cpu")
    assert not config.require_device and config.requested_device == "cpu"
    with pytest.raises(FailedPreconditionError, match="CNNSERVE_REQUIRE_DEVICE='maybe' is not true or false"):
        service_config(None, {"CNNSERVE_REQUIRE_DEVICE": "maybe"}, "cpu")
    defaults = ServiceConfig()
    assert defaults.gpu_mem_limit_mb is None and not defaults.require_device
    assert defaults.cache_size == 4 and replace(defaults, device="cuda:0").cache_size == 2


def test_number_of_gpu_is_torchserves_to_detect_unless_set() -> None:
    settings = TorchServeSettings(Path("store"), Path("state"), Path("revisions"))
    assert "number_of_gpu" not in render_config(settings)
    assert "number_of_gpu=0\n" in render_config(replace(settings, number_of_gpu=0))


# ---- the handler's initialize with a fake TorchServe context ----------------------------------------------


@dataclass
class _Context:
    model_dir: str
    gpu_id: int | None
    device_type: str = "gpu"
    handler_yaml: dict[str, Any] = field(default_factory=dict)
    model_name: str = "lenet"
    statuses: dict[int, int] = field(default_factory=dict)

    @property
    def system_properties(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "gpu_id": self.gpu_id}

    @property
    def model_yaml_config(self) -> dict[str, Any]:
        return {"deviceType": self.device_type, "handler": {"format": "onnx", **self.handler_yaml}}

    def set_response_content_type(self, index: int, content_type: str) -> None:
        assert content_type == "application/json"

    def set_response_status(self, code: int, phrase: str, index: int) -> None:
        self.statuses[index] = code


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine's truth, whatever machine the test runs on."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


@pytest.fixture
def quiet_logging() -> Iterator[None]:
    """initialize() sets the root logger to WARNING, as a worker should; put it back after."""
    loggers = [logging.getLogger(name) for name in ("", "cnnserve", "ts.metrics")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels, strict=True):
        logger.setLevel(level)


@pytest.mark.usefixtures("no_cuda", "quiet_logging")
def test_a_gpu_worker_without_cuda_serves_on_cpu_and_warns(
    lenet_export: ExportResult, caplog: pytest.LogCaptureFixture
) -> None:
    handler = CnnserveHandler()
    with caplog.at_level(logging.INFO, logger="cnnserve"):
        handler.initialize(_Context(str(lenet_export.out), gpu_id=0))
    warned = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warned and "torch.cuda.is_available() is false" in warned[0].getMessage()
    assert handler.service is not None
    info = handler.service.info()
    assert (info.device, info.provider, info.requested_device) == (
        "cpu",
        "CPUExecutionProvider",
        "cuda:0",
    )


@pytest.mark.usefixtures("no_cuda", "quiet_logging")
def test_require_device_refuses_to_start_on_cpu(
    lenet_export: ExportResult, caplog: pytest.LogCaptureFixture
) -> None:
    context = _Context(str(lenet_export.out), gpu_id=None, handler_yaml={"require_device": True})
    with caplog.at_level(logging.INFO, logger="cnnserve"), pytest.raises(FailedPreconditionError) as raised:
        CnnserveHandler().initialize(context)
    assert "require_device is true" in raised.value.message and "no gpu_id" in raised.value.message
    assert any(r.levelno == logging.ERROR and "cannot start lenet" in r.getMessage() for r in caplog.records)


# ---- CUDA errors while answering a batch ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (RuntimeError("CUDA error: an illegal memory access was encountered"), "sticky"),
        (RuntimeError("CUDA error: device-side assert triggered"), "sticky"),
        (RuntimeError("[ONNXRuntimeError] : 1 : FAIL : CUDA failure 700: illegal memory access"), "sticky"),
        (RuntimeError("CUDA error: out of memory"), "oom"),
        (RuntimeError("BFCArena::AllocateRawInternal Failed to allocate memory for requested buffer"), "oom"),
        (RuntimeError("cuDNN error: CUDNN_STATUS_NOT_SUPPORTED"), "transient"),
        (ValueError("a bug"), None),
    ],
)
def test_cuda_failures_are_told_apart(exc: BaseException, expected: str | None) -> None:
    assert cuda_failure(exc) == expected


class _FailingRuntime:
    format = "onnx"
    device = "cuda:0"
    provider = "CUDAExecutionProvider"

    def __init__(self, message: str) -> None:
        self.message = message

    def run(self, batch: torch.Tensor) -> np.ndarray:
        raise RuntimeError(self.message)


def _classify(handler: CnnserveHandler, count: int) -> tuple[_Context, list[dict[str, Any]]]:
    tensor = {"shape": [1, 32, 32], "data": [0.0] * 1024}
    body = json.dumps({"inputs": [tensor]}).encode()
    context = _Context("", gpu_id=None)
    bodies = handler.handle([{"body": body}] * count, context)
    return context, [json.loads(b)["error"] for b in bodies]


def _failing_handler(lenet_export: ExportResult, message: str) -> CnnserveHandler:
    service = ModelService(lenet_export.out, ServiceConfig())
    service._runtimes[service.base.sha256] = _FailingRuntime(message)
    handler = CnnserveHandler()
    handler.service = service
    return handler


def test_a_sticky_cuda_error_is_unavailable_and_restarts_the_worker(
    lenet_export: ExportResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    exited = threading.Event()
    codes: list[int] = []

    def fake_exit(code: int) -> None:
        codes.append(code)
        exited.set()

    monkeypatch.setattr(handler_module, "RESTART_DELAY_S", 0.05)
    monkeypatch.setattr(os, "_exit", fake_exit)
    handler = _failing_handler(lenet_export, "CUDA error: an illegal memory access was encountered")
    context, errors = _classify(handler, 2)
    assert context.statuses == {0: 503, 1: 503} and {e["code"] for e in errors} == {"UNAVAILABLE"}
    assert "CUDA error (the worker restarts)" in errors[0]["message"] and handler.broken is not None
    # Until the process ends, nothing touches the GPU again: every request is answered 503.
    context, errors = _classify(handler, 1)
    assert context.statuses == {0: 503} and "restarting after a CUDA error" in errors[0]["message"]
    wait_until(exited.is_set, 10, "the worker to exit")
    assert codes == [handler_module.RESTART_EXIT_CODE]


def test_a_transient_cuda_error_is_unavailable_and_the_worker_stays(lenet_export: ExportResult) -> None:
    handler = _failing_handler(lenet_export, "cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")
    context, errors = _classify(handler, 1)
    assert context.statuses == {0: 503} and errors[0]["code"] == "UNAVAILABLE" and handler.broken is None


def test_cuda_out_of_memory_stays_resource_exhausted(lenet_export: ExportResult) -> None:
    handler = _failing_handler(lenet_export, "CUDA error: out of memory")
    context, errors = _classify(handler, 1)
    assert context.statuses == {0: 429} and errors[0]["code"] == "RESOURCE_EXHAUSTED"
    assert handler.broken is None


# ---- the real stack: a GPU archive on this CPU-only machine -----------------------------------------------


@pytest.mark.torchserve
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU fallback; this machine has CUDA")
def test_a_gpu_archive_on_a_cpu_machine_says_cpu(lenet_export: ExportResult, tmp_path: Path) -> None:
    from cnnserve_export.archive import build_archive
    from cnnserve_export.config import default_settings

    store = tmp_path / "store"
    store.mkdir()
    build_archive(lenet_export.out, store, replace(default_settings("lenet"), device="gpu"))
    settings = TorchServeSettings.with_ports(store, tmp_path / "torchserve", tmp_path / "revisions")
    server = TorchServe(settings)
    server.start()
    try:
        server.wait_ready(("lenet",), timeout=180)
        status, body = post(server, "lenet", {"shape": [1, 32, 32], "data": [0.0] * 1024})
        assert status == 200, body
        assert (body["device"], body["provider"]) == ("cpu", "CPUExecutionProvider")
        status, info = post(server, "lenet", {"op": "info"})
        assert status == 200 and info["requested_device"] == "cuda" and info["device"] == "cpu"
        model_log = server.logs_dir / "model_log.log"
        wait_until(lambda: "serves on CPU" in model_log.read_text(), 10, "the fallback warning")
        # TorchServe copies the worker's output into model_log.log at INFO, whatever the record's level
        # (the level itself is checked above, with a fake context).
        warning = next(line for line in model_log.read_text().splitlines() if "serves on CPU" in line)
        assert "lenet serves on CPU" in warning and "no gpu_id" in warning
    finally:
        server.stop()


def test_get_model_carries_the_device_really_used() -> None:
    from cnnserve.contract import ModelInfo
    from cnnserve.gateway.converters import ModelConverter
    from cnnserve.gateway.types import ModelDetails, ModelStatus

    info = ModelInfo.from_json(
        {
            "model": "lenet",
            "version": "1.0",
            "device": "cpu",
            "provider": "CPUExecutionProvider",
            "requested_device": "cuda:0",
        }
    )
    details = ModelDetails(ModelStatus("lenet", "1.0", ("1.0",), 1, 1), info)
    message = ModelConverter.from_types(details)
    assert (message.device, message.provider, message.requested_device) == (
        "cpu",
        "CPUExecutionProvider",
        "cuda:0",
    )
    assert ModelConverter.to_types(message).info.device == "cpu"  # and back, as the client reads it
