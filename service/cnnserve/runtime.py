"""Inference runtimes: one forward pass over a batch, from an exported model and a set of weights.

Two formats are served: ONNX (through ONNX Runtime) and TorchScript. Either can run with weights other than
the ones it was exported with, which is how fine-tuned revisions are served without re-exporting:

- ONNX: the exporter names every initializer after its ``state_dict`` key (``features.0.weight``), so a new
  session can override them all with :meth:`onnxruntime.SessionOptions.add_initializer`.
- TorchScript: ``load_state_dict`` on the loaded module.

Both take a float32 ``(N, C, H, W)`` batch and return float32 logits ``(N, num_classes)`` as numpy.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from torch import nn

from cnnserve.errors import FailedPreconditionError, InvalidInputError

__all__ = [
    "FORMATS",
    "Runtime",
    "OnnxRuntime",
    "TorchScriptRuntime",
    "EagerRuntime",
    "onnx_providers",
    "load_runtime",
]

FORMATS = ("onnx", "torchscript")
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"
EXPORT_FILES = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}


class Runtime(Protocol):
    format: str
    device: str

    def run(self, batch: torch.Tensor) -> np.ndarray:
        """float32 ``(N, C, H, W)`` -> float32 logits ``(N, num_classes)``."""
        ...


def onnx_providers(device: str) -> list[str]:
    """CUDA first when the device is a GPU and ONNX Runtime has the CUDA provider, else CPU."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device.startswith("cuda") and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxRuntime:
    format = "onnx"

    def __init__(
        self,
        path: str | Path,
        weights: Mapping[str, torch.Tensor] | None = None,
        device: str = "cpu",
        threads: int = 1,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # ORT_ENABLE_ALL adds layout transforms that pre-pack conv weights from the file and silently ignore
        # add_initializer overrides (measured: LeNet's conv weights were not replaced). EXTENDED keeps the
        # fusions and honours overrides; every revision, the base included, runs at the same level so their
        # logits are computed the same way.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        # The session reads overridden initializers from these arrays for its whole life: keep them alive.
        self._override_values: list[object] = []
        if weights is not None:
            for name, tensor in weights.items():
                # A private copy: ONNX Runtime reads this memory for the session's whole life, and the
                # caller's tensors may be live parameters that the next fine-tune step changes in place.
                array = np.array(tensor.detach().cpu().numpy(), dtype=np.float32, order="C", copy=True)
                value = ort.OrtValue.ortvalue_from_numpy(array)
                self._override_values += [array, value]
                options.add_initializer(name, value)
        provider_options = None
        providers = onnx_providers(device)
        if providers[0] == "CUDAExecutionProvider":
            index = int(device.split(":")[1]) if ":" in device else 0
            provider_options = [{"device_id": index}, {}]
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=providers, provider_options=provider_options
        )
        self.device = "cuda" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
        self._input_name = self.session.get_inputs()[0].name

    def run(self, batch: torch.Tensor) -> np.ndarray:
        array = batch.detach().cpu().numpy().astype(np.float32, copy=False)
        (logits,) = self.session.run(None, {self._input_name: array})
        return np.asarray(logits, dtype=np.float32)


class TorchScriptRuntime:
    format = "torchscript"

    def __init__(
        self,
        path: str | Path,
        weights: Mapping[str, torch.Tensor] | None = None,
        device: str = "cpu",
        threads: int = 1,
    ) -> None:
        torch.set_num_threads(threads)
        self._device = torch.device(device)
        self.device = str(self._device)
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but it is TorchServe's native format; we choose it knowingly.
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(str(path), map_location=self._device)  # type: ignore[no-untyped-call]
        if weights is not None:
            self.module.load_state_dict(dict(weights), strict=True)
        self.module.eval()

    def run(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            logits = self.module(batch.to(self._device))
        return logits.float().cpu().numpy()  # type: ignore[no-any-return]


class EagerRuntime:
    """The plain ``nn.Module``: the reference the exported formats are checked against."""

    format = "eager"

    def __init__(self, model: nn.Module, device: str = "cpu") -> None:
        self._device = torch.device(device)
        self.device = str(self._device)
        self.model = model.to(self._device).eval()

    def run(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model(batch.to(self._device))
        return logits.float().cpu().numpy()  # type: ignore[no-any-return]


def load_runtime(
    export_dir: str | Path,
    fmt: str,
    weights: Mapping[str, torch.Tensor] | None = None,
    device: str = "cpu",
    threads: int = 1,
) -> Runtime:
    """The runtime for ``fmt`` from an export directory, optionally with other weights than the exported."""
    if fmt not in EXPORT_FILES:
        raise InvalidInputError.for_field("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    path = Path(export_dir) / EXPORT_FILES[fmt]
    if not path.exists():
        raise FailedPreconditionError(f"{path} not found: export the model with --formats {fmt}")
    if fmt == "onnx":
        return OnnxRuntime(path, weights, device, threads)
    return TorchScriptRuntime(path, weights, device, threads)
