"""Reduced-precision graphs of an export, and the precision gate (``cnnserve export --precision fp32,int8``).

int8 is ONNX Runtime's static quantization in QDQ format (``quantize_static``): weights symmetric int8 (per
channel by default), activations uint8 with ranges calibrated (MinMax) on real training images, the bias in
int32 at ``input scale x weight scale``. The logits layer stays float32: its output would otherwise be
quantized to 256 levels, which turns close logits into ties; it is a small share of the work (AlexNet's is
4096 x classes). The calibration images are a seeded sample of the training split, saved as indices
(``calibration_indices.npy``) with the export.

Every precision (fp32 too) is then measured on the whole held-out (test) split against the eager fp32
model: test accuracy, and top-1 agreement by the export parity gate's own :func:`compare_logits`, with a
near-tie tolerance per precision (:data:`NEAR_TIE_TOLERANCE`, :data:`NEAR_TIE_RELATIVE`). A precision is
refused (:class:`~cnnserve_export.export.ParityError`) when its accuracy is more than
``max_accuracy_drop`` points below eager fp32's or its agreement is below ``min_agreement``; the refused
graph is deleted, so no archive can serve it. The report goes into ``parity.json`` (``precisions``) and
the model card (``precisions``).

``quantization.json`` maps every ``state_dict`` key to its initializers in the int8 graph (and each bias to
its layer's input activation scale), so that a worker can re-quantize a fine-tuned revision's fp32 weights
(:func:`cnnserve.runtime.requantize_int8`); the export checks that doing so with the base weights gives the
quantizer's initializers bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cnnserve.card import ModelCard, load_card, save_card
from cnnserve.errors import FailedPreconditionError, InvalidInputError
from cnnserve.preprocess import Preprocessing, prepare_images
from cnnserve.runtime import (
    INT8_ONNX_FILE,
    ONNX_FILE,
    PRECISIONS,
    QUANTIZATION_FILE,
    EagerRuntime,
    Runtime,
    load_runtime,
    requantize_int8,
)
from cnnserve_export.config import DEFAULT_CALIBRATION_SIZE, DEFAULT_MAX_ACCURACY_DROP, DEFAULT_MIN_AGREEMENT
from cnnserve_export.data import ImageData, load_dataset

__all__ = [
    "PRECISIONS",
    "DEFAULT_CALIBRATION_SIZE",
    "DEFAULT_MAX_ACCURACY_DROP",
    "DEFAULT_MIN_AGREEMENT",
    "NEAR_TIE_TOLERANCE",
    "NEAR_TIE_RELATIVE",
    "CALIBRATION_FILE",
    "PrecisionGate",
    "calibration_indices",
    "quantize_int8",
    "quantization_map",
    "precision_report",
    "precision_failures",
    "add_precisions",
]

log = logging.getLogger(__name__)

# The logit tolerance behind the near-tie rule (eager top-1 margin <= 2 x tolerance: counted apart, not
# compared). fp32: the export parity gate's 1e-4. int8's error scales with the logits, so its tolerance is
# relative: 1 % of the median per-sample logit range (max - min over classes) of eager fp32 on the held-out
# split. Measured, the p99 of the per-sample largest |int8 - eager| logit difference was 0.87 % of that range
# on LeNet (digits) and 0.17 % on AlexNet (docs/precision.md).
NEAR_TIE_TOLERANCE = {"fp32": 1e-4}
NEAR_TIE_RELATIVE = {"int8": 0.01}
CALIBRATION_FILE = "calibration_indices.npy"
CALIBRATION_BATCH = 32
REPORT_SCHEMA = 1


class PrecisionGate:
    """The gate's thresholds (defaults: ``DEFAULT_MAX_ACCURACY_DROP`` points, ``DEFAULT_MIN_AGREEMENT``)."""

    def __init__(
        self,
        max_accuracy_drop: float = DEFAULT_MAX_ACCURACY_DROP,
        min_agreement: float = DEFAULT_MIN_AGREEMENT,
    ) -> None:
        if math.isnan(max_accuracy_drop):
            raise InvalidInputError.for_field("max_accuracy_drop", "must be a number")
        if not 0.0 <= min_agreement <= 1.0:
            raise InvalidInputError.for_field("min_agreement", f"{min_agreement} is not in [0, 1]")
        self.max_accuracy_drop = max_accuracy_drop
        self.min_agreement = min_agreement

    def to_dict(self) -> dict[str, float]:
        return {"max_accuracy_drop_points": self.max_accuracy_drop, "min_agreement": self.min_agreement}


def calibration_indices(train_count: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct training-split indices, seeded, ascending: the calibration set."""
    if not 1 <= size <= train_count:
        raise InvalidInputError.for_field(
            "calibration_size", f"{size}: the training split has {train_count} images"
        )
    generator = torch.Generator().manual_seed(seed)
    return np.sort(torch.randperm(train_count, generator=generator)[:size].numpy()).astype(np.int64)


def _batches(images: torch.Tensor, input_name: str) -> Any:
    """ORT's ``CalibrationDataReader`` over ``images`` ``(N, C, H, W)``, ``CALIBRATION_BATCH`` at a time."""
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches: Iterator[np.ndarray] = iter(
                [
                    images[i : i + CALIBRATION_BATCH].numpy().astype(np.float32)
                    for i in range(0, len(images), CALIBRATION_BATCH)
                ]
            )

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    return Reader()


class _DropPreprocessAdvice(logging.Filter):
    """``quantize_static`` advises ``quant_pre_process`` on the root logger at every call. We skip it on
    purpose: its graph optimizations rename initializers, and revisions are served by initializer name."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-processing" not in record.getMessage()


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    root = logging.getLogger()
    advice = _DropPreprocessAdvice()
    root.addFilter(advice)
    try:
        yield
    finally:
        root.removeFilter(advice)


def _producers(graph: Any) -> dict[str, Any]:
    return {output: node for node in graph.node for output in node.output}


def quantization_map(proto: Any, state_keys: Sequence[str]) -> dict[str, Any]:
    """Where each ``state_dict`` key lives in a QDQ graph ``proto`` (the ``quantization.json`` schema).

    For each Conv/Gemm/MatMul whose weight comes through a DequantizeLinear of ``<key>_quantized``: the
    weight's int8 and scale initializers and channel axis (None: per tensor); its bias's int32 and scale
    initializers and the layer's input activation scale. Keys that are still float initializers (the logits
    layer) are listed under ``float``.
    """
    from onnx import numpy_helper

    initializers = {init.name: init for init in proto.graph.initializer}
    producers = _producers(proto.graph)
    weights: dict[str, Any] = {}
    biases: dict[str, Any] = {}
    suffix = "_quantized"
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        weight_dq = producers.get(node.input[1])
        if weight_dq is None or weight_dq.op_type != "DequantizeLinear":
            continue
        weight_key = weight_dq.input[0].removesuffix(suffix)
        scale = initializers[weight_dq.input[1]]
        axis_attr = [a.i for a in weight_dq.attribute if a.name == "axis"]
        per_channel = len(scale.dims) > 0
        weights[weight_key] = {
            "quantized": weight_dq.input[0],
            "scale": weight_dq.input[1],
            "axis": (axis_attr[0] if axis_attr else 1) if per_channel else None,
        }
        if len(node.input) > 2 and node.input[2]:
            bias_dq = producers[node.input[2]]
            input_dq = producers[node.input[0]]
            input_scale = numpy_helper.to_array(initializers[input_dq.input[1]])
            biases[bias_dq.input[0].removesuffix(suffix)] = {
                "quantized": bias_dq.input[0],
                "scale": bias_dq.input[1],
                "weight": weight_key,
                "input_scale": float(input_scale.reshape(())),
            }
    floats = sorted(k for k in state_keys if k in initializers and k not in weights and k not in biases)
    return {"schema": 1, "weights": weights, "biases": biases, "float": floats}


def _logits_layer(proto: Any) -> str:
    """The name of the node that produces the graph's output (the last Gemm)."""
    output = proto.graph.output[0].name
    producers = _producers(proto.graph)
    node = producers[output]
    if not node.name:
        raise FailedPreconditionError(f"the ONNX node producing {output} has no name; cannot exclude it")
    return str(node.name)


def quantize_int8(
    export_dir: Path, model: nn.Module, calibration: torch.Tensor, per_channel: bool = True
) -> dict[str, Any]:
    """Write ``model.int8.onnx`` and ``quantization.json`` next to ``model.onnx``; returns the map.

    ``calibration``: preprocessed float images ``(N, C, H, W)``. Raises :class:`FailedPreconditionError`
    when re-quantizing the base weights does not reproduce the quantizer's initializers exactly.
    """
    import onnx
    from onnx import numpy_helper
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    source, target = export_dir / ONNX_FILE, export_dir / INT8_ONNX_FILE
    if not source.exists():
        raise FailedPreconditionError(f"{source} not found: int8 is built from the ONNX export (add onnx)")
    fp32 = onnx.load(str(source))
    with _quiet_quantizer():
        quantize_static(
            str(source),
            str(target),
            _batches(calibration, fp32.graph.input[0].name),
            quant_format=QuantFormat.QDQ,
            per_channel=per_channel,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=[_logits_layer(fp32)],
        )
    proto = onnx.load(str(target))
    state = {k: v.detach() for k, v in model.state_dict().items()}
    mapping = quantization_map(proto, list(state))
    mapping["per_channel"] = per_channel
    # The worker's re-quantization must be the quantizer's, or a revision would be served differently from
    # how the same weights would have been exported: check it on the base weights, bit for bit.
    initializers = {init.name: numpy_helper.to_array(init) for init in proto.graph.initializer}
    for name, array in requantize_int8(state, mapping).items():
        expected = initializers[name]
        same = array.dtype == expected.dtype and array.shape == expected.shape
        if not (same and np.array_equal(array, expected)):
            raise FailedPreconditionError(
                f"re-quantizing the base weights does not reproduce the int8 graph's {name}; "
                "the installed onnxruntime quantizes differently from cnnserve.runtime.requantize_int8"
            )
    (export_dir / QUANTIZATION_FILE).write_text(json.dumps(mapping, indent=2) + "\n")
    return mapping


def _logits(runtime: Runtime, inputs: torch.Tensor, batch_size: int = 32) -> np.ndarray:
    return np.concatenate(
        [runtime.run(inputs[i : i + batch_size]) for i in range(0, len(inputs), batch_size)]
    )


def precision_report(
    model: nn.Module,
    export_dir: Path,
    precisions: Sequence[str],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    threads: int = 2,
) -> dict[str, Any]:
    """Per precision: test accuracy and top-1 agreement with eager fp32 on the held-out ``inputs``."""
    from cnnserve_export.export import compare_logits

    eager = _logits(EagerRuntime(model), inputs)
    labels = targets.numpy()
    rows: dict[str, Any] = {}
    logit_range = float(np.median(eager.max(axis=1) - eager.min(axis=1)))
    for precision in precisions:
        tolerance = NEAR_TIE_TOLERANCE.get(precision, NEAR_TIE_RELATIVE.get(precision, 0.0) * logit_range)
        runtime = load_runtime(export_dir, "onnx", threads=threads, precision=precision)
        start = time.perf_counter()
        got = _logits(runtime, inputs)
        seconds = time.perf_counter() - start
        row = compare_logits(eager, got, tolerance)
        row.update(
            accuracy=float((got.argmax(1) == labels).mean()),
            near_tie_tolerance=tolerance,
            file=INT8_ONNX_FILE if precision == "int8" else ONNX_FILE,
            seconds=round(seconds, 3),
        )
        rows[precision] = row
    return {"eager_accuracy": float((eager.argmax(1) == labels).mean()), "precisions": rows}


def precision_failures(report: dict[str, Any], gate: PrecisionGate) -> list[str]:
    """Why each refused precision is refused (empty when all pass)."""
    failures = []
    eager = report["eager_accuracy"]
    for precision, row in report["precisions"].items():
        drop = (eager - row["accuracy"]) * 100
        reasons = []
        if drop > gate.max_accuracy_drop:
            reasons.append(
                f"test accuracy {row['accuracy']:.2%} is {drop:.2f} points below eager fp32's {eager:.2%} "
                f"(at most {gate.max_accuracy_drop:g})"
            )
        if row["top1_agreement"] < gate.min_agreement:
            reasons.append(
                f"top-1 agreement with eager fp32 {row['top1_agreement']:.2%} < {gate.min_agreement:.0%} "
                f"({row['top1_disagreements']} of {row['clear_samples']} clear samples differ, "
                f"{row['near_ties']} near ties not compared)"
            )
        if reasons:
            failures.append(f"{precision}: {'; '.join(reasons)}")
    return failures


def add_precisions(
    export_dir: str | Path,
    precisions: Sequence[str],
    data: ImageData | None = None,
    *,
    model: nn.Module | None = None,
    calibration_size: int = DEFAULT_CALIBRATION_SIZE,
    per_channel: bool = True,
    gate: PrecisionGate | None = None,
    calibration_images: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Build the reduced-precision graphs of an export directory, measure every precision, apply the gate.

    Updates ``parity.json`` and the model card with the report (``precisions``) and returns it; raises
    :class:`~cnnserve_export.export.ParityError` naming each refused precision (whose graph is deleted).
    ``calibration_images`` (uint8 ``(N, C, H, W)``, instead of the seeded training sample) exists for tests
    that need a deliberately bad calibration.
    """
    from cnnserve_export.export import PARITY_FILE, ParityError, load_trained_model

    export_dir = Path(export_dir)
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise InvalidInputError.for_field(
            "precision", f"{unknown or 'none'}: choose from {', '.join(PRECISIONS)}"
        )
    gate = gate or PrecisionGate()
    card: ModelCard = load_card(export_dir)
    if model is None:
        card, model = load_trained_model(export_dir)
    if data is None:
        data = load_dataset(card.dataset["name"], seed=int(card.dataset.get("seed", 0)))
    pre = Preprocessing.from_card(card)

    report: dict[str, Any] = {"schema": REPORT_SCHEMA, "gate": gate.to_dict()}
    if "int8" in precisions:
        seed = int(card.dataset.get("seed", 0))
        if calibration_images is None:
            indices = calibration_indices(len(data.train_images), calibration_size, seed)
            np.save(export_dir / CALIBRATION_FILE, indices)
            calibration_images = data.train_images[torch.from_numpy(indices)]
            calibration = {
                "dataset": data.name,
                "split": "train",
                "count": len(indices),
                "seed": seed,
                "indices_file": CALIBRATION_FILE,
            }
        else:
            calibration = {"dataset": "(given images)", "split": None, "count": len(calibration_images)}
        calibration.update(method="minmax", per_channel=per_channel)
        quantize_int8(export_dir, model, prepare_images(calibration_images, pre), per_channel=per_channel)
    inputs = prepare_images(data.test_images, pre)
    measured = precision_report(model, export_dir, precisions, inputs, data.test_targets)
    report.update(measured)
    report["held_out"] = {"dataset": data.name, "split": "test", "samples": len(inputs)}
    if "int8" in precisions:
        report["precisions"]["int8"]["calibration"] = calibration
    failures = precision_failures(report, gate)
    for precision, row in report["precisions"].items():
        row["passed"] = not any(f.startswith(f"{precision}:") for f in failures)
    report["passed"] = not failures
    if "int8" in precisions and not report["precisions"]["int8"]["passed"]:
        (export_dir / INT8_ONNX_FILE).unlink(missing_ok=True)  # refused: nothing can archive it

    parity_path = export_dir / PARITY_FILE
    parity = json.loads(parity_path.read_text()) if parity_path.exists() else dict(card.parity)
    parity["precisions"] = report
    parity_path.write_text(json.dumps(parity, indent=2) + "\n")
    card.parity = parity
    card.precisions = report
    save_card(card, export_dir)
    if failures:
        raise ParityError(f"precision refused ({'; '.join(failures)}); report in {parity_path}")
    return report
