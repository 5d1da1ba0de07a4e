"""Inference runtimes: one forward pass over a batch, from an exported model and a set of weights.

Two formats are served: ONNX (through ONNX Runtime) and TorchScript. Either can run with weights other than
the ones it was exported with, which is how fine-tuned revisions are served without re-exporting:

- ONNX: the exporter names every initializer after its ``state_dict`` key (``features.0.weight``), so a new
  session can override them all with :meth:`onnxruntime.SessionOptions.add_initializer`.
- TorchScript: ``load_state_dict`` on the loaded module.

Both take a float32 ``(N, C, H, W)`` batch and return float32 logits ``(N, num_classes)`` as numpy.

Every runtime says where it really runs: ``device`` (``"cuda:0"``, ``"cpu"``) and ``provider``
(``"CUDAExecutionProvider"``, ``"CPUExecutionProvider"``, ``"torch"``). A CUDA device that cannot be used is a
logged WARNING and a CPU runtime, or :class:`FailedPreconditionError` with ``require_device=True``.

Precision (``docs/precision.md``): an export or archive may also hold an int8 graph (``model.int8.onnx``,
static QDQ quantization by ``cnnserve export --precision int8``) and its ``quantization.json``, which says
where each ``state_dict`` tensor lives in that graph. ONNX Runtime serves it with any fp32 weights: a
revision's weights are re-quantized here (:func:`requantize_int8`: weight scales recomputed from the new
weights, activation scales kept from calibration, bias scales following both) and passed as initializer
overrides, exactly as fp32 revisions are. :func:`precision_info` is what a worker reports about it.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Union

import numpy as np
import torch
from torch import nn

from cnnserve.errors import FailedPreconditionError, InvalidInputError

if TYPE_CHECKING:
    from cnnserve.card import ModelCard

__all__ = [
    "FORMATS",
    "Runtime",
    "OnnxRuntime",
    "TorchScriptRuntime",
    "EagerRuntime",
    "configure_cuda_numerics",
    "onnx_providers",
    "onnx_cuda_options",
    "warm_up_runtime",
    "load_runtime",
    "PRECISIONS",
    "INT8_ONNX_FILE",
    "QUANTIZATION_FILE",
    "requantize_int8",
    "load_quantization_map",
    "served_precision",
    "precision_info",
    "card_precision_info",
]

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"
EXPORT_FILES = {"onnx": ONNX_FILE, "torchscript": TORCHSCRIPT_FILE}
CUDA_PROVIDER = "CUDAExecutionProvider"
CPU_PROVIDER = "CPUExecutionProvider"
NO_CUDA_PROVIDER = f"onnxruntime has no {CUDA_PROVIDER}: install onnxruntime-gpu"
PRECISIONS = ("fp32", "int8")
INT8_ONNX_FILE = "model.int8.onnx"
QUANTIZATION_FILE = "quantization.json"  # state_dict key -> its initializers in the int8 graph
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1

# An initializer override: a torch tensor (fp32 weights) or a numpy array of its own dtype (int8 weights,
# int32 biases, float32 scales). ``Union``: this module runs in Python 3.9 workers, where ``|`` in an alias
# is evaluated.
Override = Union[torch.Tensor, np.ndarray]


class Runtime(Protocol):
    format: str
    device: str  # where it really runs: "cuda:0" or "cpu", whatever was asked for
    provider: str  # "CUDAExecutionProvider", "CPUExecutionProvider" (ONNX Runtime) or "torch"

    def run(self, batch: torch.Tensor) -> np.ndarray:
        """float32 ``(N, C, H, W)`` -> float32 logits ``(N, num_classes)``."""
        ...


def configure_cuda_numerics(tf32: bool = False) -> None:
    """Set torch's process-wide CUDA math once per worker, before building TorchScript runtimes.

    - TF32 (``tf32=False`` recommended): TF32 rounds conv/matmul inputs to a 10-bit mantissa, ~1e-3 relative
      error, which breaks the 1e-4 logit parity the exports are gated on. torch enables it for cuDNN
      convolutions by default (``torch.backends.cudnn.allow_tf32``), so it is switched off explicitly.
    - ``torch.backends.cudnn.benchmark`` stays off: it autotunes every new input shape, and the micro-batcher
      sends every batch size 1..64, so each first call of a size pays a search (latency spikes for the whole
      worker life) and may pick another algorithm in another worker (logits differ in the last bits).

    Never called at import: these are the worker's choice. ONNX Runtime sessions set their own
    (``use_tf32=0``, see :func:`onnx_cuda_options`).
    """
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = False


def _cuda_index(device: str) -> int:
    return int(device.split(":", 1)[1]) if ":" in device else 0


def _torch_cuda_problem(device: str) -> str | None:
    """Why torch cannot run on the CUDA ``device``, or None when it can."""
    if not torch.cuda.is_available():
        return f"{device} asked for, but CUDA is unavailable (torch.cuda.is_available() is False)"
    count = torch.cuda.device_count()
    if _cuda_index(device) >= count:
        return f"{device} asked for, but there are only {count} CUDA devices"
    return None


def _fall_back(reason: str, require_device: bool) -> None:
    if require_device:
        raise FailedPreconditionError(reason)
    log.warning("%s; running on the CPU instead", reason)


def onnx_providers(device: str) -> list[str]:
    """CUDA first when the device is a GPU and ONNX Runtime has the CUDA provider, else CPU."""
    import onnxruntime as ort

    if device.startswith("cuda") and CUDA_PROVIDER in ort.get_available_providers():
        return [CUDA_PROVIDER, CPU_PROVIDER]
    return [CPU_PROVIDER]


def onnx_cuda_options(device_id: int, gpu_mem_limit_bytes: int | None = None) -> dict[str, str]:
    """The CUDA execution provider's options for one session.

    - ``cudnn_conv_algo_search=HEURISTIC``: cuDNN's heuristics pick an algorithm per shape, running none.
      EXHAUSTIVE (ORT's default) benchmarks every algorithm at each new input shape, and the micro-batcher
      makes up to 64 shapes per session (each revision has its own): a search on the first call of each batch
      size, scratch memory outside ``gpu_mem_limit``, and picks that can differ between workers. DEFAULT
      (always IMPLICIT_PRECOMP_GEMM) is stable too but leaves the faster algorithms unused.
    - ``arena_extend_strategy=kSameAsRequested``: the arena grows by what is asked, not to the next power of
      two, so several workers (and revisions) per GPU stay within their share.
    - ``gpu_mem_limit``: the arena's cap, when given (ORT default: no cap). Override weights are not in it.
    - ``use_tf32=0``: ORT's CUDA provider uses TF32 by default; full float32 keeps the 1e-4 logit parity.
    """
    options = {
        "device_id": str(device_id),
        "arena_extend_strategy": "kSameAsRequested",
        "cudnn_conv_algo_search": "HEURISTIC",
        "use_tf32": "0",
    }
    if gpu_mem_limit_bytes is not None:
        options["gpu_mem_limit"] = str(gpu_mem_limit_bytes)
    return options


class OnnxRuntime:
    """One ONNX Runtime session; ``weights`` override initializers by name (see :data:`Override`)."""

    format = "onnx"

    def __init__(
        self,
        path: str | Path,
        weights: Mapping[str, Override] | None = None,
        device: str = "cpu",
        threads: int = 1,
        *,
        require_device: bool = False,
        gpu_mem_limit_bytes: int | None = None,
        precision: str = "fp32",
    ) -> None:
        import onnxruntime as ort

        self.precision = precision

        providers = onnx_providers(device)
        cuda = providers[0] == CUDA_PROVIDER
        if device.startswith("cuda") and not cuda:
            _fall_back(NO_CUDA_PROVIDER, require_device)
        index = _cuda_index(device) if cuda else 0

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        # ERROR and above, except for overrides on CUDA: ORT uses an override only if it lives on the device
        # it planned for that initializer, else it loads the file's weights and says so only at WARNING
        # ("Cannot use user supplied initializer ..."). The overrides are made on the GPU for the CUDA-planned
        # weights; a node placed on the CPU would still be served base weights, and that warning in the
        # worker's log is the evidence. No probe run: proving the overrides took needs a second (CPU) session
        # per revision as the reference.
        options.log_severity_level = 2 if cuda and weights is not None else 3
        # ORT_ENABLE_ALL adds layout transforms that pre-pack conv weights from the file and silently ignore
        # add_initializer overrides (measured: LeNet's conv weights were not replaced). EXTENDED keeps the
        # fusions and honours overrides; every revision, the base included, runs at the same level so their
        # logits are computed the same way.
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        # The session reads overridden initializers from these values for its whole life: keep them alive.
        self._override_values: list[object] = []
        if weights is not None:
            for name, tensor in weights.items():
                # A private copy: ONNX Runtime reads this memory for the session's whole life, and the
                # caller's tensors may be live parameters that the next fine-tune step changes in place.
                # numpy arrays keep their dtype (re-quantized int8/int32 initializers), tensors are fp32.
                if isinstance(tensor, np.ndarray):
                    array = np.array(tensor, order="C", copy=True)
                else:
                    array = np.array(tensor.detach().cpu().numpy(), dtype=np.float32, order="C", copy=True)
                if cuda:
                    # On the GPU, where the CUDA provider plans conv/gemm weights (a copy ORT owns).
                    value = ort.OrtValue.ortvalue_from_numpy(array, "cuda", index)
                    self._override_values.append(value)
                else:
                    value = ort.OrtValue.ortvalue_from_numpy(array)  # wraps ``array``'s memory
                    self._override_values += [array, value]
                options.add_initializer(name, value)
        provider_options: list[dict[str, str]] | None = None
        if cuda:
            provider_options = [onnx_cuda_options(index, gpu_mem_limit_bytes), {}]
        self.session = ort.InferenceSession(
            str(path), sess_options=options, providers=providers, provider_options=provider_options
        )
        # The truth is what the session got: ORT falls back to the CPU when the CUDA provider fails to start.
        self.provider: str = self.session.get_providers()[0]
        if cuda and self.provider != CUDA_PROVIDER:
            _fall_back(
                f"onnxruntime could not start its {CUDA_PROVIDER} on {device} "
                "(no such GPU, or CUDA/cuDNN libraries missing: see onnxruntime's log)",
                require_device,
            )
        self.device = f"cuda:{index}" if self.provider == CUDA_PROVIDER else "cpu"
        first = self.session.get_inputs()[0]
        self._input_name: str = first.name
        dims = list(first.shape)[1:]
        # (C, H, W) when the file fixes them (the batch dimension is symbolic), for warm-up
        self.input_shape: tuple[int, ...] | None = (
            tuple(dims) if all(isinstance(d, int) for d in dims) else None
        )

    def run(self, batch: torch.Tensor) -> np.ndarray:
        array = batch.detach().cpu().numpy().astype(np.float32, copy=False)
        (logits,) = self.session.run(None, {self._input_name: array})
        return np.asarray(logits, dtype=np.float32)


class TorchScriptRuntime:
    """TorchScript on ``device`` (fp32 only); torch's intra-op thread count is process-wide: the caller
    sets it once.

    ``threads`` is accepted for a signature like :class:`OnnxRuntime`'s and not applied here (the worker's
    ``initialize`` calls ``torch.set_num_threads``). CUDA numerics: :func:`configure_cuda_numerics`.
    """

    format = "torchscript"
    provider = "torch"
    precision = "fp32"

    def __init__(
        self,
        path: str | Path,
        weights: Mapping[str, torch.Tensor] | None = None,
        device: str = "cpu",
        threads: int = 1,
        *,
        require_device: bool = False,
    ) -> None:
        if device.startswith("cuda"):
            problem = _torch_cuda_problem(device)
            if problem is not None:
                _fall_back(problem, require_device)
                device = "cpu"
            else:
                device = f"cuda:{_cuda_index(device)}"
        self._device = torch.device(device)
        self.device = str(self._device)
        with warnings.catch_warnings():
            # TorchScript is deprecated upstream but it is TorchServe's native format; we choose it knowingly.
            warnings.simplefilter("ignore", FutureWarning)
            self.module = torch.jit.load(str(path), map_location=self._device)  # type: ignore[no-untyped-call]
        if weights is not None:
            # copied into the module's parameters, which map_location put on the device
            self.module.load_state_dict(dict(weights), strict=True)
        self.module.eval()

    def run(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            logits = self.module(batch.to(self._device))
        return logits.float().cpu().numpy()  # type: ignore[no-any-return]


class EagerRuntime:
    """The plain ``nn.Module``: the reference the exported formats are checked against."""

    format = "eager"
    provider = "torch"
    precision = "fp32"

    def __init__(self, model: nn.Module, device: str = "cpu") -> None:
        self._device = torch.device(device)
        self.device = str(self._device)
        self.model = model.to(self._device).eval()

    def run(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            logits = self.model(batch.to(self._device))
        return logits.float().cpu().numpy()  # type: ignore[no-any-return]


def warm_up_runtime(runtime: Runtime, batch_sizes: Sequence[int], input_shape: Sequence[int]) -> float:
    """One forward pass of zeros ``(n, *input_shape)`` per batch size; returns the seconds it took.

    On CUDA the first calls create the context, load cuDNN and pick convolution algorithms per shape: paid
    here rather than by the first requests.
    """
    start = time.perf_counter()
    for size in batch_sizes:
        runtime.run(torch.zeros((size, *input_shape), dtype=torch.float32))
    return time.perf_counter() - start


def _quantize_weight(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of one weight, as ``onnxruntime.quantization`` does it (bit for bit).

    Per channel along ``axis`` (``None``: one scale for the tensor): the range is widened to hold 0, made
    symmetric (``absmax``), and mapped onto [-127, 127]: ``scale = 2 * absmax / 254``, computed in float64 and
    stored as float32; an all-zero channel gets scale 1. Values are ``round(w / scale)`` (half to even) in
    float32, clipped to int8. Returns ``(int8 weights, float32 scales)``: scales ``(channels,)`` or ``()``.
    """
    weight = np.asarray(weight, dtype=np.float32)
    if axis is None:
        flat = weight.reshape(1, -1)
    else:
        flat = np.moveaxis(weight, axis, 0).reshape(weight.shape[axis], -1)  # (channels, rest)
    rmin = np.minimum(flat.min(axis=1), np.float32(0))
    rmax = np.maximum(flat.max(axis=1), np.float32(0))
    absmax = np.maximum(np.abs(rmin), np.abs(rmax))
    scale64 = (absmax.astype(np.float64) * 2.0) / 254.0
    scale = np.where(scale64 < np.finfo(np.float32).tiny, 1.0, scale64).astype(np.float32)
    if axis is None:
        divisor: np.ndarray = scale.reshape(())
        scale_out = scale.reshape(())
    else:
        shape = [1] * weight.ndim
        shape[axis] = -1
        divisor = scale.reshape(shape)
        scale_out = scale
    quantized = np.clip(np.round(weight / divisor), -128, 127).astype(np.int8)
    return quantized, scale_out


def requantize_int8(
    weights: Mapping[str, torch.Tensor], quantization: Mapping[str, Any]
) -> dict[str, np.ndarray]:
    """The int8 graph's initializer overrides for fp32 ``weights`` (a ``state_dict``), by initializer name.

    ``quantization`` is the export's ``quantization.json``: for each quantized weight its int8 and scale
    initializers and channel axis; for each bias its int32 and scale initializers, its layer's weight and that
    layer's input activation scale (fixed at calibration: activations keep their calibrated ranges); the
    tensors left in float32 (the logits layer) by their own names. Bias scale = input scale x weight scale,
    the bias ``round(b / scale)`` in int32, as ``onnxruntime.quantization`` computes them. Every key of
    ``weights`` must be covered: a revision is never served partly with the base's quantized weights.
    """
    arrays = {name: tensor.detach().cpu().numpy().astype(np.float32) for name, tensor in weights.items()}
    out: dict[str, np.ndarray] = {}
    weight_scales: dict[str, np.ndarray] = {}
    covered: set[str] = set()
    for name, entry in quantization["weights"].items():
        quantized, scale = _quantize_weight(arrays[name], entry["axis"])
        out[entry["quantized"]], out[entry["scale"]] = quantized, scale
        weight_scales[name] = scale
        covered.add(name)
    for name, entry in quantization["biases"].items():
        bias_scale = (np.float32(entry["input_scale"]) * weight_scales[entry["weight"]]).astype(np.float32)
        values = np.round(arrays[name].astype(np.float64) / bias_scale.astype(np.float64))
        out[entry["quantized"]] = np.clip(values, INT32_MIN, INT32_MAX).astype(np.int32)
        out[entry["scale"]] = bias_scale.reshape(-1)
        covered.add(name)
    for name in quantization["float"]:
        out[name] = arrays[name]
        covered.add(name)
    missing = sorted(set(arrays) - covered)
    if missing:
        raise FailedPreconditionError(
            f"the int8 graph's quantization.json does not cover {', '.join(missing)}: re-export the model"
        )
    return out


def load_quantization_map(export_dir: str | Path) -> dict[str, Any]:
    path = Path(export_dir) / QUANTIZATION_FILE
    try:
        return json.loads(path.read_text())  # type: ignore[no-any-return]
    except FileNotFoundError:
        raise FailedPreconditionError(
            f"{path} not found: export the model with --precision int8 (and archive with --precision int8)"
        ) from None


def served_precision(export_dir: str | Path) -> str:
    """The precision a directory serves by default: its model card's ``precision`` (fp32 without a card)."""
    from cnnserve.card import CARD_FILE, load_card

    if not (Path(export_dir) / CARD_FILE).exists():
        return "fp32"
    return load_card(export_dir).precision


def precision_info(directory: str | Path) -> dict[str, Any]:
    """What a worker serving ``directory`` (an archive or an export) says about its precision.

    ``precision``: fp32 | int8; ``calibration``: the int8 calibration set (dataset, split, count, seed, the
    file holding its indices) or None for fp32; ``fp32_accuracy`` and ``accuracy``: test accuracy on the
    held-out split of eager fp32 and of the served precision; ``top1_agreement`` with eager fp32 on that
    split's clear samples and ``near_ties``; ``held_out``: the split's dataset, name and size. The figures
    are None for an export made without ``--precision``.
    """
    from cnnserve.card import load_card

    return card_precision_info(load_card(directory))


def card_precision_info(card: ModelCard) -> dict[str, Any]:
    """:func:`precision_info` of a card already loaded (a worker has its own: no second read per call)."""
    report = card.precisions or {}
    row = report.get("precisions", {}).get(card.precision, {})
    return {
        "precision": card.precision,
        "calibration": row.get("calibration"),
        "fp32_accuracy": report.get("eager_accuracy"),
        "accuracy": row.get("accuracy"),
        "top1_agreement": row.get("top1_agreement"),
        "near_ties": row.get("near_ties"),
        "held_out": report.get("held_out"),
    }


def load_runtime(
    export_dir: str | Path,
    fmt: str,
    weights: Mapping[str, torch.Tensor] | None = None,
    device: str = "cpu",
    threads: int = 1,
    *,
    require_device: bool = False,
    gpu_mem_limit_bytes: int | None = None,
    warm_up: Sequence[int] = (),
    input_shape: Sequence[int] | None = None,
    precision: str | None = None,
) -> Runtime:
    """The runtime for ``fmt`` from an export directory, optionally with other weights than the exported.

    ``require_device``: raise :class:`FailedPreconditionError` instead of falling back to the CPU.
    ``gpu_mem_limit_bytes``: ONNX Runtime's CUDA arena cap (TorchScript: unused). ``warm_up``: batch
    sizes to run once each right away, on zeros of ``input_shape`` ``(C, H, W)``; when not given, the ONNX
    file's input, else the export's model card. ``precision``: fp32 | int8, default the directory's own
    (:func:`served_precision`: an int8 archive serves int8); int8 is ONNX only, and fp32 ``weights`` are
    re-quantized (:func:`requantize_int8`).
    """
    if fmt not in EXPORT_FILES:
        raise InvalidInputError.for_field("format", f"{fmt!r} is not one of {', '.join(FORMATS)}")
    if precision is None:
        precision = served_precision(export_dir)
    if precision not in PRECISIONS:
        raise InvalidInputError.for_field("precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    if precision == "int8" and fmt != "onnx":
        raise FailedPreconditionError(f"int8 is served by ONNX Runtime only, not {fmt}: use --format onnx")
    path = Path(export_dir) / (INT8_ONNX_FILE if precision == "int8" else EXPORT_FILES[fmt])
    if not path.exists():
        flag = "--precision int8" if precision == "int8" else f"--formats {fmt}"
        raise FailedPreconditionError(f"{path} not found: export the model with {flag}")
    runtime: OnnxRuntime | TorchScriptRuntime
    if fmt == "onnx":
        overrides: Mapping[str, Override] | None = weights
        if precision == "int8" and weights is not None:
            overrides = requantize_int8(weights, load_quantization_map(export_dir))
        runtime = OnnxRuntime(
            path,
            overrides,
            device,
            threads,
            require_device=require_device,
            gpu_mem_limit_bytes=gpu_mem_limit_bytes,
            precision=precision,
        )
    else:
        runtime = TorchScriptRuntime(path, weights, device, threads, require_device=require_device)
    if warm_up:
        shape = input_shape
        if shape is None and isinstance(runtime, OnnxRuntime):
            shape = runtime.input_shape
        if shape is None:  # a TorchScript file does not say: the export's model card does
            from cnnserve.card import load_card

            shape = load_card(export_dir).input_shape
        seconds = warm_up_runtime(runtime, warm_up, shape)
        log.info(
            "%s %s on %s (%s) warmed up at batch sizes %s in %.3f s",
            fmt,
            precision,
            runtime.device,
            runtime.provider,
            list(warm_up),
            seconds,
        )
    return runtime
