"""Export a trained checkpoint to TorchScript and ONNX, and prove the exports match the eager model.

The parity report compares eager PyTorch, TorchScript and ONNX Runtime logits on real test images of the
dataset the model was trained on: the largest absolute difference and the top-1 agreement. An export whose
difference is above ``max_abs_diff`` fails (:class:`ParityError`), and so does one whose top-1 differs from
the eager model's on a sample where that top-1 is clear. A sample whose eager top-1 margin (best logit minus
the runner-up) is at most twice ``max_abs_diff`` is a near tie: logits that each stay within the tolerance
may rank it either way (and do, between CPUs and kernels), so it is counted in ``near_ties`` and its top-1 is
not compared; ``top1_agreement`` is over the clear samples.

When CUDA is available at export time, the exports are also run on ``cuda:0`` and compared with the same
eager CPU logits, recorded under ``parity["cuda"]``: with TF32 off (float32 kernels, set for the comparison
and restored after) the tolerance is ``CUDA_MAX_ABS_DIFF``, the CPU gate's 1e-4, and the same near-tie rule
applies; a CUDA format beyond it fails the export like a CPU one. A format whose runtime cannot run on CUDA
(ONNX Runtime without its CUDA provider: ``onnxruntime`` instead of ``onnxruntime-gpu``) is listed in
``not_on_cuda`` instead of compared. Without CUDA, ``parity["cuda"]`` is null and ``parity["cuda_reason"]``
says why.

An export directory holds ``model.pt``, ``model.onnx``, ``weights.safetensors`` (the trained weights, which
the fine-tune endpoint starts from), ``parity.json`` and the model card updated with both. With
``precisions`` (``cnnserve export --precision fp32,int8``) it also holds the int8 graph, its
``quantization.json`` and calibration indices, and the precision report (``parity.json`` ``precisions``):
see :mod:`cnnserve_export.quantize`.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from cnnserve.card import ModelCard, load_card, save_card
from cnnserve.errors import CnnserveError, InvalidInputError
from cnnserve.preprocess import Preprocessing, prepare_images
from cnnserve.runtime import EXPORT_FILES, FORMATS, EagerRuntime, Runtime, load_runtime
from cnnserve.weights import load_into, load_weights
from cnnserve_export.data import ImageData, load_dataset

if TYPE_CHECKING:
    from cnnserve_export.quantize import PrecisionGate

__all__ = [
    "ExportResult",
    "ParityError",
    "export_checkpoint",
    "load_trained_model",
    "check_parity",
    "compare_logits",
    "parity_failures",
    "cuda_parity",
    "CUDA_MAX_ABS_DIFF",
]

PARITY_FILE = "parity.json"
ONNX_OPSET = 18
MAX_ABS_DIFF = 1e-4
# CUDA runtimes against eager CPU, TF32 off: float32 kernels on both sides, so the CPU gate's tolerance.
CUDA_MAX_ABS_DIFF = 1e-4
CUDA_DEVICE = "cuda:0"


class ParityError(CnnserveError):
    """An exported model does not reproduce the eager model's logits."""


@dataclass(frozen=True)
class ExportResult:
    out: Path
    card: ModelCard
    parity: dict[str, Any]


def load_trained_model(checkpoint_dir: str | Path) -> tuple[ModelCard, nn.Module]:
    """The card and the eager model (eval mode, weights checked against the card's sha256)."""
    card = load_card(checkpoint_dir)
    state = load_weights(Path(checkpoint_dir) / card.weights_file, card.weights_sha256)
    model = load_into(card.build_model(), state).eval()
    return card, model


def _export_torchscript(model: nn.Module, path: Path) -> None:
    with warnings.catch_warnings():
        # TorchScript is deprecated upstream but it is TorchServe's native format; we choose it knowingly.
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.script(model)
    scripted.save(str(path))  # type: ignore[no-untyped-call]


def _export_onnx(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    import onnx

    batch = torch.export.Dim("batch", min=1, max=4096)
    # The exporter narrates every stage on stdout; keep our own output clean.
    with contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["input"],
            output_names=["logits"],
            dynamic_shapes={"x": {0: batch}},
            opset_version=ONNX_OPSET,
            external_data=False,
            dynamo=True,
        )
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    # Fine-tuned revisions are served by overriding initializers by state_dict name: insist that works.
    initializers = {init.name: tuple(init.dims) for init in proto.graph.initializer}
    for name, tensor in model.state_dict().items():
        if initializers.get(name) != tuple(tensor.shape):
            raise ParityError(
                f"ONNX export has no initializer {name} of shape {tuple(tensor.shape)}; "
                "fine-tuned revisions could not be served from this file"
            )


def _parity_images(card: ModelCard, data: ImageData | None, count: int) -> torch.Tensor:
    if data is None:
        data = load_dataset(card.dataset["name"], seed=int(card.dataset.get("seed", 0)))
    images = data.test_images[:count]
    if len(images) < count:
        raise InvalidInputError.for_field(
            "parity_samples", f"asked for {count} test images; {data.name} has {len(images)}"
        )
    return prepare_images(images, Preprocessing.from_card(card))


def compare_logits(
    expected: np.ndarray, got: np.ndarray, max_abs_diff: float = MAX_ABS_DIFF
) -> dict[str, Any]:
    """One candidate's parity row: its logits ``got`` against the reference's ``expected``, both (N, classes).

    ``near_ties`` counts the samples whose reference top-1 margin is at most ``2 * max_abs_diff`` (two logits
    that each move by the tolerance, towards each other, can swap); ``top1_agreement`` is over the other,
    clear samples (1.0 when there are none) and ``top1_disagreements`` counts the clear ones that differ.
    """
    if expected.shape != got.shape or expected.ndim != 2 or expected.shape[1] < 2:
        raise ValueError(f"logits of shape {expected.shape} and {got.shape}: expected two equal (N, classes)")
    best_two = np.sort(expected, axis=1)[:, -2:]  # (N, 2): runner-up, best
    clear = best_two[:, 1] - best_two[:, 0] > 2 * max_abs_diff
    agree = got.argmax(1) == expected.argmax(1)
    return {
        "max_abs_diff": float(np.abs(got - expected).max()),
        "top1_agreement": float(agree[clear].mean()) if clear.any() else 1.0,
        "top1_disagreements": int((clear & ~agree).sum()),
        "clear_samples": int(clear.sum()),
        "near_ties": int((~clear).sum()),
    }


def parity_failures(report: dict[str, Any], max_abs_diff: float) -> list[str]:
    """Why each failing format fails (empty when the report passes)."""
    return [
        f"{fmt}: max abs diff {row['max_abs_diff']:.2e}, top-1 agreement {row['top1_agreement']:.2%} "
        f"({row['top1_disagreements']} of {row['clear_samples']} clear samples differ; "
        f"{row['near_ties']} near ties not compared)"
        for fmt, row in report["formats"].items()
        if row["max_abs_diff"] > max_abs_diff or row["top1_disagreements"] > 0
    ]


def check_parity(
    reference: Runtime,
    candidates: Sequence[Runtime],
    inputs: torch.Tensor,
    batch_size: int = 32,
    max_abs_diff: float = MAX_ABS_DIFF,
) -> dict[str, Any]:
    """Each candidate's :func:`compare_logits` row against the reference, run in batches of ``batch_size``."""

    def logits(runtime: Runtime) -> np.ndarray:
        return np.concatenate(
            [runtime.run(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
        )

    expected = logits(reference)
    report: dict[str, Any] = {
        "samples": len(inputs),
        "reference": reference.format,
        "max_abs_diff_limit": max_abs_diff,
        "near_tie_margin": 2 * max_abs_diff,
        "formats": {},
    }
    for runtime in candidates:
        report["formats"][runtime.format] = compare_logits(expected, logits(runtime), max_abs_diff)
    return report


def cuda_parity(
    model: nn.Module,
    export_dir: Path,
    formats: Sequence[str],
    inputs: torch.Tensor,
    max_abs_diff: float = CUDA_MAX_ABS_DIFF,
) -> tuple[dict[str, Any] | None, str | None]:
    """The exports on CUDA against eager CPU, TF32 off: ``(report, None)``; ``(None, reason)`` without CUDA.

    The report is :func:`check_parity`'s, plus the device and ``not_on_cuda`` (formats that fell back to CPU).
    """
    if not torch.cuda.is_available():
        return None, "no CUDA device at export time (torch.cuda.is_available() is False)"
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        runtimes = [load_runtime(export_dir, fmt, device=CUDA_DEVICE) for fmt in formats]
        on_cuda = [r for r in runtimes if str(getattr(r, "device", "")).startswith("cuda")]
        report = check_parity(EagerRuntime(model), on_cuda, inputs, max_abs_diff=max_abs_diff)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
    report.update(
        device=CUDA_DEVICE,
        gpu=torch.cuda.get_device_name(0),
        tf32=False,
        not_on_cuda=[r.format for r in runtimes if r not in on_cuda],
    )
    return report, None


def _cuda_failures(report: dict[str, Any] | None) -> list[str]:
    if report is None:
        return []
    limit = report["max_abs_diff_limit"]
    return [
        f"{fmt} on CUDA: max abs diff {row['max_abs_diff']:.2e} (limit {limit:g}), "
        f"{row['top1_disagreements']} of {row['clear_samples']} clear samples differ"
        for fmt, row in report["formats"].items()
        if row["max_abs_diff"] > limit or row["top1_disagreements"] > 0
    ]


def export_checkpoint(
    checkpoint_dir: str | Path,
    out: str | Path,
    formats: Sequence[str] = FORMATS,
    parity_samples: int = 64,
    max_abs_diff: float = MAX_ABS_DIFF,
    data: ImageData | None = None,
    precisions: Sequence[str] = (),
    calibration_size: int | None = None,
    per_channel: bool = True,
    gate: PrecisionGate | None = None,
) -> ExportResult:
    """Export ``checkpoint_dir`` to ``out`` in ``formats`` and check parity (raises :class:`ParityError`).

    ``precisions`` (fp32, int8; ONNX only): measure each on the held-out split and refuse one the ``gate``
    rejects (:func:`cnnserve_export.quantize.add_precisions`); empty: no precision report.
    """
    from cnnserve_export.quantize import DEFAULT_CALIBRATION_SIZE, add_precisions

    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise InvalidInputError.for_field("formats", f"{unknown or 'none'}: choose from {', '.join(FORMATS)}")
    if precisions and "onnx" not in formats:
        raise InvalidInputError.for_field("precision", "precisions are measured on the ONNX export: add onnx")
    if parity_samples < 64:
        raise InvalidInputError.for_field("parity_samples", "at least 64 images are compared")
    card, model = load_trained_model(checkpoint_dir)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if Path(checkpoint_dir).resolve() != out.resolve():
        shutil.copy2(Path(checkpoint_dir) / card.weights_file, out / card.weights_file)

    example = torch.zeros((2, *card.input_shape))
    for fmt in formats:
        path = out / EXPORT_FILES[fmt]
        if fmt == "torchscript":
            _export_torchscript(model, path)
        else:
            _export_onnx(model, example, path)

    inputs = _parity_images(card, data, parity_samples)
    runtimes = [load_runtime(out, fmt, threads=2) for fmt in formats]
    report = check_parity(EagerRuntime(model), runtimes, inputs, max_abs_diff=max_abs_diff)
    report.update({"dataset": card.dataset.get("name"), "split": "test"})
    report["cuda"], reason = cuda_parity(model, out, formats, inputs)
    if reason is not None:
        report["cuda_reason"] = reason
    failures = parity_failures(report, max_abs_diff) + _cuda_failures(report["cuda"])
    report["passed"] = not failures
    (out / PARITY_FILE).write_text(json.dumps(report, indent=2) + "\n")
    card.exports = {fmt: EXPORT_FILES[fmt] for fmt in formats}
    card.parity = report
    save_card(card, out)
    if failures:
        raise ParityError(f"export parity failed ({'; '.join(failures)}); report in {out / PARITY_FILE}")
    if precisions:
        report["precisions"] = add_precisions(
            out,
            precisions,
            data,
            model=model,
            calibration_size=calibration_size or DEFAULT_CALIBRATION_SIZE,
            per_channel=per_channel,
            gate=gate,
        )
        card = load_card(out)
    return ExportResult(out=out, card=card, parity=report)
