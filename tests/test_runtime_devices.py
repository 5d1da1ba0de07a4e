"""Runtimes on GPU workers, checked on any CPU: providers and their options, overrides on the planned device,
the truthful ``device``/``provider``, ``require_device`` and warm-up.

That a revision's overrides change the logits on the CPU is tests/test_export.py's
``test_runtimes_serve_other_weights_than_exported``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from cnnserve import card
from cnnserve import runtime as rt
from cnnserve.errors import FailedPreconditionError
from cnnserve.runtime import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    NO_CUDA_PROVIDER,
    OnnxRuntime,
    TorchScriptRuntime,
    configure_cuda_numerics,
    load_runtime,
    onnx_providers,
)
from cnnserve_export.export import _export_onnx, _export_torchscript

INPUT_SHAPE = (1, 8, 8)
HAS_CUDA_PROVIDER = CUDA_PROVIDER in ort.get_available_providers()


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU())
        self.classifier = nn.Linear(2 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))  # (N, 3)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tiny-export")
    model = Tiny().eval()
    _export_onnx(model, torch.zeros((2, *INPUT_SHAPE)), out / rt.ONNX_FILE)
    _export_torchscript(model, out / rt.TORCHSCRIPT_FILE)
    return out


@pytest.fixture
def weights() -> dict[str, torch.Tensor]:
    return {k: v + 0.5 for k, v in Tiny().state_dict().items()}


# ---- provider lists and options, with ONNX Runtime's providers monkeypatched ------------------------------


@pytest.mark.parametrize(
    ("available", "device", "expected"),
    [
        ([CUDA_PROVIDER, CPU_PROVIDER], "cuda:0", [CUDA_PROVIDER, CPU_PROVIDER]),
        ([CUDA_PROVIDER, CPU_PROVIDER], "cuda", [CUDA_PROVIDER, CPU_PROVIDER]),
        ([CUDA_PROVIDER, CPU_PROVIDER], "cpu", [CPU_PROVIDER]),
        (["AzureExecutionProvider", CPU_PROVIDER], "cuda:0", [CPU_PROVIDER]),
    ],
)
def test_provider_list(
    monkeypatch: pytest.MonkeyPatch, available: list[str], device: str, expected: list[str]
) -> None:
    monkeypatch.setattr(ort, "get_available_providers", lambda: available)
    assert onnx_providers(device) == expected


class _Recorder:
    """Fakes ``ortvalue_from_numpy`` (recording its device arguments) and ``InferenceSession``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, started: list[str] | None = None) -> None:
        self.values: list[tuple[Any, ...]] = []
        self.sessions: list[dict[str, Any]] = []
        real = ort.OrtValue.ortvalue_from_numpy
        recorder = self

        def from_numpy(array: np.ndarray, *device: Any) -> Any:
            recorder.values.append(device)
            return real(array)  # a real (CPU) value: add_initializer checks its type

        class Session:
            def __init__(self, path: str, **kwargs: Any) -> None:
                recorder.sessions.append({"path": path, **kwargs})
                self._providers = started if started is not None else kwargs["providers"]

            def get_providers(self) -> list[str]:
                return self._providers

            def get_inputs(self) -> list[Any]:
                return [SimpleNamespace(name="input", shape=["batch", *INPUT_SHAPE])]

        monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA_PROVIDER, CPU_PROVIDER])
        monkeypatch.setattr(ort.OrtValue, "ortvalue_from_numpy", staticmethod(from_numpy))
        monkeypatch.setattr(ort, "InferenceSession", Session)


def test_cuda_overrides_are_made_on_the_planned_device(
    monkeypatch: pytest.MonkeyPatch, export_dir: Path, weights: dict[str, torch.Tensor]
) -> None:
    fake = _Recorder(monkeypatch)
    runtime = OnnxRuntime(export_dir / rt.ONNX_FILE, weights, "cuda:1", gpu_mem_limit_bytes=2 << 30)
    assert fake.values == [("cuda", 1)] * len(weights)
    assert len(runtime._override_values) == len(weights)  # the device copies, kept alive
    (session,) = fake.sessions
    assert session["providers"] == [CUDA_PROVIDER, CPU_PROVIDER]
    assert session["provider_options"] == [
        {
            "device_id": "1",
            "gpu_mem_limit": str(2 << 30),
            "arena_extend_strategy": "kSameAsRequested",
            "cudnn_conv_algo_search": "HEURISTIC",
            "use_tf32": "0",
        },
        {},
    ]
    # ORT's "Cannot use user supplied initializer" is a WARNING: not hidden on this path
    assert session["sess_options"].log_severity_level <= 2
    assert (runtime.device, runtime.provider) == ("cuda:1", CUDA_PROVIDER)


def test_cuda_options_without_memory_limit(monkeypatch: pytest.MonkeyPatch, export_dir: Path) -> None:
    fake = _Recorder(monkeypatch)
    runtime = OnnxRuntime(export_dir / rt.ONNX_FILE, device="cuda")
    (session,) = fake.sessions
    assert "gpu_mem_limit" not in session["provider_options"][0]
    assert session["provider_options"][0]["device_id"] == "0"
    assert session["sess_options"].log_severity_level == 3  # no overrides: nothing to hear about
    assert runtime.device == "cuda:0"


def test_cpu_overrides_stay_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, export_dir: Path, weights: dict[str, torch.Tensor]
) -> None:
    fake = _Recorder(monkeypatch)
    runtime = OnnxRuntime(export_dir / rt.ONNX_FILE, weights, "cpu")
    assert fake.values == [()] * len(weights)
    (session,) = fake.sessions
    assert session["providers"] == [CPU_PROVIDER] and session["provider_options"] is None
    assert (runtime.device, runtime.provider) == ("cpu", CPU_PROVIDER)


def test_cuda_provider_that_fails_to_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, export_dir: Path
) -> None:
    _Recorder(monkeypatch, started=[CPU_PROVIDER])  # what ORT does when the CUDA provider cannot start
    with caplog.at_level(logging.WARNING, logger="cnnserve.runtime"):
        runtime = OnnxRuntime(export_dir / rt.ONNX_FILE, device="cuda:0")
    assert (runtime.device, runtime.provider) == ("cpu", CPU_PROVIDER)
    assert "could not start its CUDAExecutionProvider" in caplog.text
    with pytest.raises(FailedPreconditionError, match="could not start"):
        OnnxRuntime(export_dir / rt.ONNX_FILE, device="cuda:0", require_device=True)


# ---- the truth on this machine: cuda:0 asked, CPU used ----------------------------------------------------


@pytest.mark.skipif(HAS_CUDA_PROVIDER, reason="onnxruntime has its CUDA provider here")
def test_onnx_on_cuda_without_the_provider(caplog: pytest.LogCaptureFixture, export_dir: Path) -> None:
    with caplog.at_level(logging.WARNING, logger="cnnserve.runtime"):
        runtime = load_runtime(export_dir, "onnx", device="cuda:0")
    assert (runtime.device, runtime.provider) == ("cpu", CPU_PROVIDER)
    assert [r.levelno for r in caplog.records] == [logging.WARNING]
    assert NO_CUDA_PROVIDER in caplog.text
    with pytest.raises(FailedPreconditionError, match="install onnxruntime-gpu"):
        load_runtime(export_dir, "onnx", device="cuda:0", require_device=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_torchscript_on_cuda_without_cuda(caplog: pytest.LogCaptureFixture, export_dir: Path) -> None:
    with caplog.at_level(logging.WARNING, logger="cnnserve.runtime"):
        runtime = load_runtime(export_dir, "torchscript", device="cuda:0")
    assert (runtime.device, runtime.provider) == ("cpu", "torch")
    assert "CUDA is unavailable" in caplog.text
    assert runtime.run(torch.zeros((2, *INPUT_SHAPE))).shape == (2, 3)
    with pytest.raises(FailedPreconditionError, match="CUDA is unavailable"):
        load_runtime(export_dir, "torchscript", device="cuda:0", require_device=True)


def test_cpu_runtimes_say_so(caplog: pytest.LogCaptureFixture, export_dir: Path) -> None:
    with caplog.at_level(logging.WARNING, logger="cnnserve.runtime"):
        onnx = load_runtime(export_dir, "onnx", require_device=True)
        script = load_runtime(export_dir, "torchscript", require_device=True)
    assert (onnx.device, onnx.provider) == ("cpu", CPU_PROVIDER)
    assert (script.device, script.provider) == ("cpu", "torch")
    assert not caplog.records


def test_torchscript_leaves_torch_threads_to_the_caller(export_dir: Path) -> None:
    before = torch.get_num_threads()
    TorchScriptRuntime(export_dir / rt.TORCHSCRIPT_FILE, threads=before + 1)
    assert torch.get_num_threads() == before


# ---- warm-up ---------------------------------------------------------------------------------------------


@pytest.fixture
def forward_shapes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[int, ...]]]:
    shapes: list[tuple[int, ...]] = []
    for cls in (OnnxRuntime, TorchScriptRuntime):
        real = cls.run

        def run(self: Any, batch: torch.Tensor, real: Any = real) -> np.ndarray:
            shapes.append(tuple(batch.shape))
            return real(self, batch)  # type: ignore[no-any-return]

        monkeypatch.setattr(cls, "run", run)
    yield shapes


def test_warm_up_runs_each_batch_size_once(
    caplog: pytest.LogCaptureFixture, export_dir: Path, forward_shapes: list[tuple[int, ...]]
) -> None:
    with caplog.at_level(logging.INFO, logger="cnnserve.runtime"):
        load_runtime(export_dir, "onnx", warm_up=(1, 64))  # the shape from the ONNX input
    assert forward_shapes == [(1, *INPUT_SHAPE), (64, *INPUT_SHAPE)]
    assert "warmed up at batch sizes [1, 64] in" in caplog.text
    forward_shapes.clear()
    load_runtime(export_dir, "torchscript", warm_up=(3,), input_shape=INPUT_SHAPE)
    assert forward_shapes == [(3, *INPUT_SHAPE)]


def test_no_warm_up_by_default(export_dir: Path, forward_shapes: list[tuple[int, ...]]) -> None:
    load_runtime(export_dir, "onnx")
    load_runtime(export_dir, "torchscript")
    assert forward_shapes == []


def test_torchscript_warm_up_takes_the_shape_from_the_card(
    monkeypatch: pytest.MonkeyPatch, export_dir: Path, forward_shapes: list[tuple[int, ...]]
) -> None:
    with pytest.raises(FailedPreconditionError, match=r"model_card\.json not found"):
        load_runtime(export_dir, "torchscript", warm_up=(1,))  # this export has no card
    monkeypatch.setattr(card, "load_card", lambda directory: SimpleNamespace(input_shape=INPUT_SHAPE))
    load_runtime(export_dir, "torchscript", warm_up=(2,))
    assert forward_shapes == [(2, *INPUT_SHAPE)]


# ---- CUDA numerics ---------------------------------------------------------------------------------------


@pytest.fixture
def cuda_flags() -> Iterator[None]:
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = (
        saved
    )


@pytest.mark.usefixtures("cuda_flags")
def test_configure_cuda_numerics() -> None:
    torch.backends.cudnn.benchmark = True
    configure_cuda_numerics(tf32=False)
    assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    assert not torch.backends.cudnn.benchmark
    configure_cuda_numerics(tf32=True)
    assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    assert not torch.backends.cudnn.benchmark
