"""The prepared GPU check (cnnserve.gpu_check): its exit without CUDA, its pure helpers, and its sections'
code paths on the CPU (with ``DEVICE`` pointed at the CPU, so they run here and fail only their CUDA checks).
What it measures on a GPU is for a GPU machine: ``make gpu-check``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cnnserve import gpu_check
from cnnserve.gpu_check import Section, format_report, latency_stats, pytest_summary, report_dict, run_section
from cnnserve_export.export import ExportResult

ROOT = Path(__file__).resolve().parent.parent


def test_without_cuda_it_exits_2_quickly_and_says_so(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no device even on a GPU machine
    result = subprocess.run(
        [sys.executable, "-m", "cnnserve.gpu_check", "--out", str(tmp_path), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == gpu_check.NO_CUDA_EXIT == 2, result.stderr
    assert "no CUDA device: nothing to check" in result.stderr
    assert not list(tmp_path.iterdir()), "nothing is written when nothing was checked"


def test_a_failing_section_is_reported_not_raised() -> None:
    def broken() -> dict[str, object]:
        raise RuntimeError("CUDAExecutionProvider is not available")

    section = run_section("finetune", broken)
    assert not section.ok and section.data == {}
    assert section.error is not None and "RuntimeError: CUDAExecutionProvider" in section.error


def test_a_section_can_fail_itself_with_a_reason() -> None:
    section = run_section("versions", lambda: {"ok": False, "why": "no CUDA provider", "torch": "2.14.1"})
    assert not section.ok and section.error == "no CUDA provider"
    assert section.data == {"why": "no CUDA provider", "torch": "2.14.1"}
    assert run_section("x", lambda: {"a": 1}).ok


def test_latency_stats_separate_the_first_call() -> None:
    stats = latency_stats([0.5, 0.002, 0.001, 0.003])
    assert stats == {"first_ms": 500.0, "steady_median_ms": 2.0, "steady_min_ms": 1.0}
    assert latency_stats([0.004])["steady_median_ms"] == 4.0
    with pytest.raises(ValueError, match="no timings"):
        latency_stats([])


@pytest.mark.parametrize(
    ("output", "summary"),
    [
        (
            "..s\n=== 2 passed, 1 skipped, 400 deselected in 3.10s ===\n",
            "2 passed, 1 skipped, 400 deselected in 3.10s",
        ),
        ("F\n==== short test summary info ====\nFAILED a\n== 1 failed in 0.5s ==", "1 failed in 0.5s"),
        ("2 passed in 1.0s\n", "2 passed in 1.0s"),
        ("", "(no output)"),
    ],
)
def test_pytest_summary(output: str, summary: str) -> None:
    assert pytest_summary(output) == summary


def test_report_json_and_text(tmp_path: Path) -> None:
    sections = [
        Section("versions", True, {"torch": "2.14.1", "providers": ["CUDAExecutionProvider"]}, seconds=0.1),
        Section(
            "finetune",
            False,
            {
                "formats": {
                    "onnx": {"max_abs_diff": 3.2e-5, "device": "cuda"},
                    "torchscript": {"error": "boom"},
                }
            },
            "torchscript: boom",
            2.0,
        ),
    ]
    report = report_dict(sections, started=0.0, quick=True)
    assert report["passed"] is False
    path = gpu_check.write_report(report, tmp_path / "out")
    assert json.loads(path.read_text()) == json.loads(json.dumps(report))
    text = format_report(report)
    assert "[ok] versions" in text and "[FAILED] finetune" in text
    assert "! torchscript: boom" in text and "onnx: max_abs_diff=3.2e-05, device=cuda" in text
    assert text.endswith("result: some sections FAILED (see above)")


@pytest.mark.slow
def test_sections_run_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, lenet_export: ExportResult, alexnet_export: ExportResult
) -> None:
    """The sections' code runs end to end with the CPU standing in; on the CPU their CUDA checks fail."""
    monkeypatch.setattr(gpu_check, "DEVICE", "cpu")
    models = gpu_check.Models(Path("."), lenet_export.out, alexnet_export.out)
    finetune = run_section("finetune", lambda: gpu_check.section_finetune(models))
    assert finetune.error and "onnx ran on cpu, not CUDA" in finetune.error
    for fmt in ("onnx", "torchscript"):
        assert finetune.data["formats"][fmt]["max_abs_diff"] <= gpu_check.CUDA_MAX_ABS_DIFF
    assert finetune.data["override_moved_logits"] > 0, "the fine-tuned weights were served"
    latency = run_section("latency", lambda: gpu_check.section_latency(models, quick=True))
    assert latency.ok and set(latency.data["torchscript"]) == {
        "runtime",
        "batch_1",
        "batch_8",
        "batch_32",
        "batch_64",
    }
    tf32 = run_section("tf32", lambda: gpu_check.section_tf32(models))
    assert tf32.ok and tf32.data["tf32_off_max_abs_diff"] == 0.0
