"""The prepared GPU check: what cnnserve does on a CUDA machine, measured in one run of a few minutes.

    python -m cnnserve.gpu_check [--out DIR] [--quick]        # or: make gpu-check

Needs one NVIDIA GPU, this repository and its venv; no network. It trains its own tiny LeNet and AlexNet on
the bundled digits (CPU, as tests/conftest.py does), exports them, and then, each section on its own so that
one failure (a missing CUDA provider, say) does not hide the others:

- ``versions``: torch, CUDA, cuDNN, ONNX Runtime and its providers, the GPU's name and memory;
- ``finetune``: one :func:`cnnserve.serving.finetune.sgd_step` on CUDA, the new weights served through
  :func:`cnnserve.runtime.load_runtime` on ``cuda:0`` (ONNX Runtime's CUDA provider and TorchScript), their
  logits against eager PyTorch on the CPU with the same weights (max abs diff, top-1 agreement), and proof
  that the override took (the logits moved away from the exported weights');
- ``latency``: first-call and steady (median) latency per batch size 1, 8, 32, 64 and format;
- ``memory``: ``torch.cuda.max_memory_allocated`` (and ``nvidia-smi`` when present) after loading 4
  revisions and after one AlexNet step;
- ``tf32``: CPU-vs-CUDA max logit difference with TF32 on and off;
- ``pytest``: the CUDA test subset (``pytest -m gpu``) in a subprocess, and its summary line.

It prints a readable report and writes ``gpu-check.json`` into ``--out`` (default ``var/gpu-check``). Exit
codes: 0 every section passed, 1 some section failed, 2 no CUDA device (nothing to check).

This module imports :mod:`cnnserve_export` (training, export) lazily: it is a check of the whole repository,
run from its venv, not part of the serving package's import graph.
"""

from __future__ import annotations

import argparse
import inspect
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "NO_CUDA_EXIT",
    "Section",
    "run_section",
    "format_report",
    "report_dict",
    "write_report",
    "pytest_summary",
    "latency_stats",
    "main",
]

NO_CUDA_EXIT = 2
FAILED_EXIT = 1
BATCH_SIZES = (1, 8, 32, 64)
REVISIONS = 4
DEVICE = "cuda:0"
# CUDA runtimes against eager CPU with TF32 off: the export gate's float32 tolerance (cnnserve_export.export).
CUDA_MAX_ABS_DIFF = 1e-4
REPO_ROOT = Path(__file__).resolve().parents[2]
PYTEST_TIMEOUT_S = 300


@dataclass
class Section:
    """One part of the check: its measurements, or why it could not take them."""

    name: str
    ok: bool
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0


def run_section(name: str, body: Callable[[], dict[str, Any]]) -> Section:
    """Run ``body``; any exception becomes a failed section (with the traceback's last lines), never a crash.

    ``body`` may report a failure of its own by returning ``{"ok": False, ...}``.
    """
    start = time.perf_counter()
    try:
        data = body()
    except Exception as error:
        tail = "".join(traceback.format_exception(error)[-3:]).strip()
        return Section(
            name, False, {}, f"{type(error).__name__}: {error}\n{tail}", time.perf_counter() - start
        )
    ok = bool(data.pop("ok", True))
    return Section(
        name, ok, data, None if ok else str(data.get("why", "check failed")), time.perf_counter() - start
    )


def latency_stats(seconds: Sequence[float]) -> dict[str, float]:
    """First call and the steady state (median and best of the rest), in milliseconds."""
    if not seconds:
        raise ValueError("no timings")
    rest = seconds[1:] or seconds
    return {
        "first_ms": round(seconds[0] * 1e3, 3),
        "steady_median_ms": round(statistics.median(rest) * 1e3, 3),
        "steady_min_ms": round(min(rest) * 1e3, 3),
    }


_SUMMARY = re.compile(r"^=+ (.+) =+$")


def pytest_summary(output: str) -> str:
    """pytest's final line (``3 passed, 1 skipped in 4.2s``), else the last non-empty line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        match = _SUMMARY.match(line)
        if match and re.search(r"\b(passed|failed|skipped|error|errors|deselected|no tests ran)\b", line):
            return match.group(1)
    for line in reversed(lines):
        if re.search(r"\b(passed|failed|skipped|deselected|no tests ran)\b", line):
            return line
    return lines[-1] if lines else "(no output)"


def report_dict(sections: Sequence[Section], started: float, quick: bool) -> dict[str, Any]:
    """The JSON form: every section's data and error, and the overall result."""
    return {
        "check": "cnnserve.gpu_check",
        "started_unix": round(started, 3),
        "seconds": round(time.time() - started, 1),
        "quick": quick,
        "host": platform.node(),
        "passed": all(section.ok for section in sections),
        "sections": {section.name: asdict(section) for section in sections},
    }


def write_report(report: Mapping[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gpu-check.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False, default=str) + "\n")
    return path


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1e-2 or abs(value) >= 1e4 else f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_format_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    return str(value)


def format_report(report: Mapping[str, Any]) -> str:
    """The readable report: one block per section, nested values one per line."""
    lines = [f"cnnserve GPU check ({'quick' if report.get('quick') else 'full'}), {report.get('seconds')} s"]
    for name, section in report["sections"].items():
        status = "ok" if section["ok"] else "FAILED"
        lines.append(f"\n[{status}] {name} ({section['seconds']:.1f} s)")
        if section.get("error"):
            lines += [f"    ! {line}" for line in str(section["error"]).splitlines()]
        for key, value in section["data"].items():
            if isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
                lines.append(f"    {key}:")
                lines += [f"      {k}: {_format_value(v)}" for k, v in value.items()]
            else:
                lines.append(f"    {key}: {_format_value(value)}")
    verdict = "every section passed" if report["passed"] else "some sections FAILED (see above)"
    lines.append(f"\nresult: {verdict}")
    return "\n".join(lines)


# ---- the sections (CUDA only) -----------------------------------------------------------------------------


@dataclass
class Models:
    """The check's own trained and exported models."""

    work: Path
    lenet: Path  # export directory
    alexnet: Path
    parity: dict[str, Any] = field(default_factory=dict)


def _runtime_kwargs() -> dict[str, Any]:
    """``require_device=True`` where runtime.load_runtime has it (issue 16): a silent CPU fallback fails."""
    from cnnserve.runtime import load_runtime

    return {"require_device": True} if "require_device" in inspect.signature(load_runtime).parameters else {}


def _describe(runtime: Any) -> dict[str, Any]:
    provider = getattr(runtime, "provider", None)
    if provider is None and hasattr(runtime, "session"):
        provider = runtime.session.get_providers()[0]
    return {"device": getattr(runtime, "device", None), "provider": provider}


def _set_tf32(enabled: bool) -> str:
    """TF32 for matmul and cuDNN; runtime.configure_cuda_numerics when it exists. Returns which was used."""
    import torch

    from cnnserve import runtime

    configure = getattr(runtime, "configure_cuda_numerics", None)
    if configure is not None:
        configure(tf32=enabled)
        return "cnnserve.runtime.configure_cuda_numerics"
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled
    return "torch.backends flags (configure_cuda_numerics not in cnnserve.runtime)"


def section_versions() -> dict[str, Any]:
    import torch

    properties = torch.cuda.get_device_properties(0)
    data: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),  # type: ignore[no-untyped-call]
        "gpu": properties.name,
        "gpu_memory_gib": round(properties.total_memory / 2**30, 2),
        "capability": f"{properties.major}.{properties.minor}",
        "device_count": torch.cuda.device_count(),
    }
    try:
        import onnxruntime as ort

        data["onnxruntime"] = ort.__version__
        data["onnxruntime_device"] = ort.get_device()
        data["providers"] = ort.get_available_providers()
    except ImportError as error:
        data["onnxruntime"] = f"not importable: {error}"
        data["providers"] = []
    if "CUDAExecutionProvider" not in data["providers"]:
        data["ok"] = False
        data["why"] = (
            "ONNX Runtime has no CUDAExecutionProvider: install onnxruntime-gpu instead of onnxruntime"
        )
    return data


def build_models(work: Path, quick: bool) -> Models:
    """LeNet (a few epochs) and AlexNet (a few steps) on the bundled digits, trained on CPU and exported."""
    from cnnserve_export.config import small_config
    from cnnserve_export.data import load_dataset
    from cnnserve_export.export import export_checkpoint
    from cnnserve_export.train import train

    digits = load_dataset("digits")
    configs = {
        "lenet": small_config("lenet", str(work / "lenet-ckpt"), lenet_epochs=3 if quick else 12),
        "alexnet": small_config("alexnet", str(work / "alexnet-ckpt")),
    }
    exports: dict[str, Path] = {}
    parity: dict[str, Any] = {}
    for name, config in configs.items():
        trained = train(config, data=digits, log=lambda _: None)
        result = export_checkpoint(trained.out, work / f"{name}-export", data=digits)
        exports[name] = result.out
        parity[name] = {"passed": result.parity.get("passed"), "cuda": result.parity.get("cuda")}
    return Models(work, exports["lenet"], exports["alexnet"], parity)


def _digit_batch(export_dir: Path, count: int) -> tuple[Any, Any]:
    from cnnserve.card import load_card
    from cnnserve.preprocess import Preprocessing, prepare_images
    from cnnserve_export.data import load_dataset

    card = load_card(export_dir)
    data = load_dataset("digits")
    inputs = prepare_images(data.test_images[:count], Preprocessing.from_card(card))
    return inputs, data.test_targets[:count]


def section_finetune(models: Models) -> dict[str, Any]:
    import numpy as np

    from cnnserve.runtime import EagerRuntime, load_runtime
    from cnnserve.serving.finetune import StepSettings, sgd_step
    from cnnserve_export.export import compare_logits, load_trained_model

    _set_tf32(False)
    _, model = load_trained_model(models.lenet)
    model = model.to(DEVICE)
    inputs, labels = _digit_batch(models.lenet, 64)
    step, _ = sgd_step(model, inputs.to(DEVICE), labels.to(DEVICE), StepSettings(lr=0.05), {})
    weights = {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}
    reference = EagerRuntime(model.cpu()).run(inputs)  # eager CPU with the fine-tuned weights
    base = load_runtime(models.lenet, "torchscript").run(inputs)  # the exported weights, CPU
    data: dict[str, Any] = {
        "step": asdict(step),
        "weights_on": str(next(iter(weights.values())).device),
        "limit": CUDA_MAX_ABS_DIFF,
        "override_moved_logits": float(np.abs(reference - base).max()),
        "formats": {},
    }
    failures = []
    for fmt in ("onnx", "torchscript"):
        try:
            runtime = load_runtime(models.lenet, fmt, weights, device=DEVICE, **_runtime_kwargs())
            row = {**_describe(runtime), **compare_logits(reference, runtime.run(inputs), CUDA_MAX_ABS_DIFF)}
        except Exception as error:
            row = {"error": f"{type(error).__name__}: {error}"}
        data["formats"][fmt] = row
        if "error" in row:
            failures.append(f"{fmt}: {row['error']}")
        elif not str(row["device"]).startswith("cuda"):
            failures.append(f"{fmt} ran on {row['device']}, not CUDA")
        elif row["max_abs_diff"] > CUDA_MAX_ABS_DIFF or row["top1_disagreements"]:
            failures.append(f"{fmt}: max abs diff {row['max_abs_diff']:.2e} > {CUDA_MAX_ABS_DIFF:g}")
    if data["override_moved_logits"] == 0.0:
        failures.append("the fine-tuned weights give the exported logits: the step changed nothing")
    if failures:
        data.update(ok=False, why="; ".join(failures))
    return data


def section_latency(models: Models, quick: bool) -> dict[str, Any]:
    import torch

    from cnnserve.runtime import load_runtime

    repeats = 5 if quick else 30
    inputs, _ = _digit_batch(models.lenet, max(BATCH_SIZES))
    data: dict[str, Any] = {"model": "lenet", "repeats": repeats}
    failures = []
    for fmt in ("onnx", "torchscript"):
        try:
            runtime = load_runtime(models.lenet, fmt, device=DEVICE, **_runtime_kwargs())
        except Exception as error:
            failures.append(f"{fmt}: {type(error).__name__}: {error}")
            continue
        rows: dict[str, Any] = {"runtime": _describe(runtime)}
        for size in BATCH_SIZES:
            batch = inputs[:size]
            timings = []
            for _ in range(repeats + 1):
                start = time.perf_counter()
                runtime.run(batch)  # returns numpy: the device work is done when it returns
                if DEVICE.startswith("cuda"):
                    torch.cuda.synchronize()
                timings.append(time.perf_counter() - start)
            rows[f"batch_{size}"] = latency_stats(timings)
        data[fmt] = rows
    if failures:
        data.update(ok=False, why="; ".join(failures))
    return data


def _nvidia_smi() -> str | None:
    binary = shutil.which("nvidia-smi")
    if binary is None:
        return None
    result = subprocess.run(
        [binary, "--query-gpu=memory.used,memory.total", "--format=csv,noheader"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    return result.stdout.strip() or result.stderr.strip()


def section_memory(models: Models) -> dict[str, Any]:
    import torch

    from cnnserve.runtime import load_runtime
    from cnnserve.serving.finetune import StepSettings, sgd_step
    from cnnserve_export.export import load_trained_model

    mib = 2**20
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    _, model = load_trained_model(models.alexnet)
    runtimes = []
    for revision in range(REVISIONS):
        weights = {k: v + 1e-3 * revision for k, v in model.state_dict().items()}
        runtimes.append(load_runtime(models.alexnet, "torchscript", weights, device=DEVICE))
    data: dict[str, Any] = {
        "model": "alexnet",
        "revisions": REVISIONS,
        "after_revisions_max_allocated_mib": round(torch.cuda.max_memory_allocated() / mib, 1),
        "after_revisions_nvidia_smi": _nvidia_smi() or "nvidia-smi not found",
    }
    torch.cuda.reset_peak_memory_stats()
    model = model.to(DEVICE)
    inputs, labels = _digit_batch(models.alexnet, 32)
    sgd_step(model, inputs.to(DEVICE), labels.to(DEVICE), StepSettings(lr=0.01), {})
    torch.cuda.synchronize()
    data["after_alexnet_step_max_allocated_mib"] = round(torch.cuda.max_memory_allocated() / mib, 1)
    data["after_alexnet_step_nvidia_smi"] = _nvidia_smi() or "nvidia-smi not found"
    del runtimes, model
    torch.cuda.empty_cache()
    return data


def section_tf32(models: Models) -> dict[str, Any]:
    import numpy as np

    from cnnserve.runtime import EagerRuntime
    from cnnserve_export.export import load_trained_model

    data: dict[str, Any] = {"model": "alexnet"}
    inputs, _ = _digit_batch(models.alexnet, 64)
    _, model = load_trained_model(models.alexnet)
    cpu = EagerRuntime(model).run(inputs)
    for enabled in (True, False):
        data["set_with"] = _set_tf32(enabled)
        cuda = EagerRuntime(model, device=DEVICE).run(inputs)
        model = model.cpu()
        data[f"tf32_{'on' if enabled else 'off'}_max_abs_diff"] = float(np.abs(cuda - cpu).max())
    _set_tf32(False)
    if data["tf32_off_max_abs_diff"] > CUDA_MAX_ABS_DIFF:
        data.update(ok=False, why=f"TF32 off still differs from CPU by more than {CUDA_MAX_ABS_DIFF:g}")
    return data


def section_pytest(quick: bool) -> dict[str, Any]:
    if not (REPO_ROOT / "tests").is_dir():
        return {"ok": False, "why": f"no tests/ under {REPO_ROOT}: run from a checkout of the repository"}
    command = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
    start = time.perf_counter()
    try:
        result = subprocess.run(
            command,
            check=False,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=PYTEST_TIMEOUT_S // (2 if quick else 1),
        )
    except subprocess.TimeoutExpired:
        return {
            "ok": False,
            "why": f"pytest -m gpu ran past {PYTEST_TIMEOUT_S} s",
            "command": " ".join(command),
        }
    output = result.stdout + result.stderr
    data: dict[str, Any] = {
        "command": " ".join(command),
        "returncode": result.returncode,
        "summary": pytest_summary(output),
        "seconds": round(time.perf_counter() - start, 1),
    }
    if result.returncode != 0:
        data.update(ok=False, why=f"pytest -m gpu exited {result.returncode}: {data['summary']}")
        data["tail"] = output.strip().splitlines()[-20:]
    return data


def run_check(out: Path, quick: bool) -> tuple[dict[str, Any], list[Section]]:
    """Every section on the CUDA machine; the models are built once and shared."""
    started = time.time()
    sections = [run_section("versions", section_versions)]
    with tempfile.TemporaryDirectory(prefix="cnnserve-gpu-check-") as work:
        built: list[Models] = []

        def build() -> dict[str, Any]:
            built.append(build_models(Path(work), quick))
            return {"exports": ["lenet", "alexnet"], "export_parity": built[0].parity}

        sections.append(run_section("models", build))
        if built:
            models = built[0]
            sections.append(run_section("finetune", lambda: section_finetune(models)))
            sections.append(run_section("latency", lambda: section_latency(models, quick)))
            sections.append(run_section("memory", lambda: section_memory(models)))
            sections.append(run_section("tf32", lambda: section_tf32(models)))
    sections.append(run_section("pytest", lambda: section_pytest(quick)))
    return report_dict(sections, started, quick), sections


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cnnserve.gpu_check", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("var/gpu-check"), help="where gpu-check.json goes")
    parser.add_argument("--quick", action="store_true", help="fewer epochs and repeats (about 2 minutes)")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check", file=sys.stderr)
        return NO_CUDA_EXIT
    report, _ = run_check(args.out, args.quick)
    print(format_report(report))
    path = write_report(report, args.out)
    print(f"report: {path}")
    return 0 if report["passed"] else FAILED_EXIT


if __name__ == "__main__":
    sys.exit(main())
