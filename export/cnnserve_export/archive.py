"""Build a TorchServe model archive (``model_store/<name>.mar``) from an export directory.

The archive is self-contained: the serialized model in the served format and precision (``--precision
int8``: the int8 graph, its ``quantization.json`` and calibration indices), the model card, the trained
weights (the fine-tune base), the parity report, ``model-config.yaml``, the handler, and the part of
the ``cnnserve`` package the handler imports. TorchServe puts the extracted archive first on the worker's
``PYTHONPATH``, so a worker runs exactly the handler code the archive was built with; it needs only the
third-party packages (torch, onnxruntime, safetensors, Pillow, numpy) installed.

Archives are built from source by this command only: TorchServe executes the Python inside a .mar, so never
serve one you did not build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import cnnserve
from cnnserve.card import load_card, save_card
from cnnserve.errors import FailedPreconditionError, InvalidInputError
from cnnserve.runtime import EXPORT_FILES, FORMATS, INT8_ONNX_FILE, PRECISIONS, QUANTIZATION_FILE
from cnnserve_export.config import ArchiveSettings, default_settings
from cnnserve_export.quantize import CALIBRATION_FILE

__all__ = ["ArchiveSettings", "build_archive", "default_settings", "WORKER_PACKAGE_PARTS", "HANDLER_MODULE"]

# What of the cnnserve package a worker imports (no CLI, no gateway, no gRPC).
WORKER_PACKAGE_PARTS = (
    "__init__.py",
    "py.typed",
    "errors.py",
    "contract",
    "card.py",
    "weights.py",
    "preprocess.py",
    "runtime.py",
    "shapes.py",
    "layer_table.py",
    "architectures.py",
    "models",
    "serving",
)
HANDLER_MODULE = "cnnserve_handler"
PARITY_FILE = "parity.json"


def _model_config(settings: ArchiveSettings) -> str:
    lines = [
        f"minWorkers: {settings.min_workers}",
        f"maxWorkers: {settings.max_workers}",
        f"batchSize: {settings.batch_size}",
        f"maxBatchDelay: {settings.max_batch_delay_ms}",
        f"responseTimeout: {settings.response_timeout_s}",
        f"deviceType: {settings.device}",
        "handler:",
        f"  format: {settings.format}",
        f"  max_inputs: {settings.max_inputs}",
        f"  max_finetune_batch: {settings.max_finetune_batch}",
        f"  retention: {settings.retention}",
        f"  runtime_cache: {settings.runtime_cache}",
    ]
    # Absent: the worker derives its threads from the CPU quota (serving/threads.py).
    if settings.threads is not None:
        lines.append(f"  threads: {settings.threads}")
    if settings.max_threads is not None:
        lines.append(f"  max_threads: {settings.max_threads}")
    return "\n".join(lines) + "\n"


def _validate(settings: ArchiveSettings) -> None:
    if settings.format not in FORMATS:
        raise InvalidInputError.for_field("format", f"{settings.format!r} is not one of {', '.join(FORMATS)}")
    if settings.device not in ("cpu", "gpu"):
        raise InvalidInputError.for_field("device", f"{settings.device!r}: expected cpu or gpu")
    if not 1 <= settings.min_workers <= settings.max_workers:
        raise InvalidInputError.for_field("workers", "need 1 <= min_workers <= max_workers")
    for name in ("batch_size", "response_timeout_s", "max_inputs", "retention", "runtime_cache"):
        if getattr(settings, name) < 1:
            raise InvalidInputError.for_field(name, "must be at least 1")
    for name in ("threads", "max_threads"):
        if getattr(settings, name) is not None and getattr(settings, name) < 1:
            raise InvalidInputError.for_field(name, "must be at least 1 (or unset: from the CPU quota)")
    if settings.precision not in PRECISIONS:
        raise InvalidInputError.for_field(
            "precision", f"{settings.precision!r} is not one of {', '.join(PRECISIONS)}"
        )
    if settings.precision == "int8" and settings.format != "onnx":
        raise InvalidInputError.for_field("precision", "int8 is served by ONNX Runtime: use --format onnx")
    if settings.max_batch_delay_ms < 0:
        raise InvalidInputError.for_field("max_batch_delay_ms", "must be >= 0")


def _require_int8(export_dir: Path, report: dict[str, Any]) -> None:
    """An int8 archive needs the export's int8 graph, its map, and a precision report that passed the gate."""
    row = report.get("precisions", {}).get("int8")
    if row is None:
        raise FailedPreconditionError(
            f"{export_dir} has no int8 precision: run `cnnserve export --precision fp32,int8`"
        )
    if not row.get("passed"):
        raise FailedPreconditionError(f"{export_dir}'s int8 graph was refused by the precision gate")
    for file in (INT8_ONNX_FILE, QUANTIZATION_FILE):
        if not (export_dir / file).exists():
            raise FailedPreconditionError(f"{export_dir / file} not found: re-export with --precision int8")


def build_archive(export_dir: str | Path, model_store: str | Path, settings: ArchiveSettings) -> Path:
    """Write ``<model_store>/<name>.mar`` (replacing an older one) and return its path."""
    _validate(settings)
    export_dir = Path(export_dir)
    card = load_card(export_dir)
    if settings.format not in card.exports:
        raise FailedPreconditionError(
            f"{export_dir} has no {settings.format} export (it has: {', '.join(card.exports) or 'none'}); "
            f"run `cnnserve export --formats {settings.format}`"
        )
    served_file = EXPORT_FILES[settings.format]
    precision_files: tuple[str, ...] = ()
    if settings.precision == "int8":
        _require_int8(export_dir, card.precisions)
        served_file, precision_files = INT8_ONNX_FILE, (QUANTIZATION_FILE, CALIBRATION_FILE)
    name = settings.name or card.name
    model_store = Path(model_store)
    model_store.mkdir(parents=True, exist_ok=True)
    package_dir = Path(cnnserve.__file__).parent

    with tempfile.TemporaryDirectory(prefix="cnnserve-archive-") as tmp:
        stage = Path(tmp) / "extra"
        (stage / "cnnserve").mkdir(parents=True)
        for part in WORKER_PACKAGE_PARTS:
            source = package_dir / part
            if source.is_dir():
                shutil.copytree(
                    source, stage / "cnnserve" / part, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(source, stage / "cnnserve" / part)
        for file in (card.weights_file, PARITY_FILE, *precision_files):
            if (export_dir / file).exists():
                shutil.copy2(export_dir / file, stage / file)
        # Only the served format and precision travel (the weights are in it and in the safetensors fine-tune
        # base already; AlexNet's other format would add 228 MB). The archived card says what it holds; an
        # int8 archive serves revisions by re-quantizing their fp32 weights (quantization.json).
        card.exports = {settings.format: served_file}
        card.precision = settings.precision
        save_card(card, stage)
        config_file = Path(tmp) / "model-config.yaml"
        config_file.write_text(_model_config(settings))
        handler_file = Path(tmp) / f"{HANDLER_MODULE}.py"
        shutil.copy2(package_dir / "serving" / "handler.py", handler_file)
        command = [
            sys.executable,
            "-m",
            "model_archiver.model_packaging",
            "--model-name", name,
            "--version", card.version,
            "--serialized-file", str(export_dir / served_file),
            "--handler", str(handler_file),
            "--extra-files", str(stage),
            "--config-file", str(config_file),
            "--export-path", str(model_store),
            "--force",
        ]  # fmt: skip
        # The archiver stages files in $TMPDIR/<model name> and deletes that first: two archives of one
        # model built at once (parallel tests, a bench beside a test run) would delete each other's.
        private = {**os.environ, "TMPDIR": tmp}
        result = subprocess.run(command, capture_output=True, text=True, check=False, env=private)
        if result.returncode != 0:
            raise FailedPreconditionError(f"torch-model-archiver failed: {result.stderr.strip()[-500:]}")
    return model_store / f"{name}.mar"
