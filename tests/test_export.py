"""Exports reproduce the eager model: TorchScript and ONNX, checked on real test images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from cnnserve.card import load_card
from cnnserve.runtime import OnnxRuntime, TorchScriptRuntime, load_runtime
from cnnserve_export.data import ImageData
from cnnserve_export.export import (
    ExportResult,
    ParityError,
    compare_logits,
    export_checkpoint,
    load_trained_model,
    parity_failures,
)
from cnnserve_export.train import TrainResult


@pytest.mark.parametrize("name", ["lenet_export", "alexnet_export"])
def test_export_parity(name: str, request: pytest.FixtureRequest) -> None:
    result: ExportResult = request.getfixturevalue(name)
    report = json.loads((result.out / "parity.json").read_text())
    assert report["passed"] and report["samples"] >= 64 and report["dataset"] == "digits"
    for fmt in ("torchscript", "onnx"):
        row = report["formats"][fmt]
        assert row["max_abs_diff"] <= 1e-4
        # top-1 over the samples whose eager margin is clear; near ties are counted, not compared
        assert row["top1_agreement"] == 1.0 and row["top1_disagreements"] == 0
        assert row["clear_samples"] + row["near_ties"] == report["samples"]
    card = load_card(result.out)
    assert card.exports == {"torchscript": "model.pt", "onnx": "model.onnx"}
    assert card.parity["passed"]


def test_exports_load_with_any_batch_size(lenet_export: ExportResult) -> None:
    model = torch.jit.load(str(lenet_export.out / "model.pt"))  # type: ignore[no-untyped-call]
    onnx_runtime = load_runtime(lenet_export.out, "onnx")
    for batch in (1, 5, 64):
        x = torch.randn(batch, 1, 32, 32)
        assert model(x).shape == (batch, 10)
        assert onnx_runtime.run(x).shape == (batch, 10)


def test_onnx_file_is_single_and_checker_clean(lenet_export: ExportResult) -> None:
    path = lenet_export.out / "model.onnx"
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert not list(lenet_export.out.glob("*.data"))
    opset = {o.domain: o.version for o in onnx.load(str(path)).opset_import}[""]
    assert opset >= 17


def test_runtimes_serve_other_weights_than_exported(lenet_export: ExportResult) -> None:
    """Fine-tuned revisions reuse the exported graph with new weights; both formats must honour them."""
    _, model = load_trained_model(lenet_export.out)
    noise = torch.Generator().manual_seed(0)
    shifted = {k: v + 0.01 * torch.randn(v.shape, generator=noise) for k, v in model.state_dict().items()}
    model.load_state_dict(shifted)
    x = torch.randn(8, 1, 32, 32, generator=noise)
    with torch.no_grad():
        expected = model(x).numpy()
    for runtime in (
        OnnxRuntime(lenet_export.out / "model.onnx", shifted),
        TorchScriptRuntime(lenet_export.out / "model.pt", shifted),
    ):
        assert np.abs(runtime.run(x) - expected).max() < 1e-4, runtime.format


def test_parity_failure_exits_non_zero(
    tmp_path: Path, lenet_checkpoint: TrainResult, digits: ImageData
) -> None:
    # A threshold no float computation meets makes the check fail the way a real mismatch would.
    with pytest.raises(ParityError, match="parity failed"):
        export_checkpoint(lenet_checkpoint.out, tmp_path, formats=["onnx"], max_abs_diff=-1.0, data=digits)
    assert not json.loads((tmp_path / "parity.json").read_text())["passed"]


# ---- the parity gate's core: near ties are reported, real disagreements fail ------------------------------

CLEAR = [[4.0, 0.0, -1.0], [0.0, 3.0, 1.0], [-2.0, 0.0, 2.5]]  # top-1 margins 4, 2, 2.5: clear


def test_a_near_tie_passes_the_gate_and_is_reported() -> None:
    expected = np.array([[1.0, 1.00005, 0.0], *CLEAR], dtype=np.float32)  # sample 0: margin 5e-5 <= 2e-4
    got = expected.copy()
    got[0, :2] = [1.00005, 1.0]  # the other kernel ranks the tie the other way, each logit within 5e-5
    row = compare_logits(expected, got, max_abs_diff=1e-4)
    assert row["max_abs_diff"] == pytest.approx(5e-5, rel=1e-2)
    assert (row["near_ties"], row["clear_samples"], row["top1_disagreements"]) == (1, 3, 0)
    assert row["top1_agreement"] == 1.0
    assert parity_failures({"formats": {"onnx": row}}, max_abs_diff=1e-4) == []


def test_a_real_top1_disagreement_fails_the_gate() -> None:
    expected = np.array([[1.0, 1.00005, 0.0], *CLEAR], dtype=np.float32)
    got = expected.copy()
    got[1] = [0.0, 4.0, -1.0]  # a clear sample, answered with another class
    row = compare_logits(expected, got, max_abs_diff=1e-4)
    assert (row["near_ties"], row["clear_samples"], row["top1_disagreements"]) == (1, 3, 1)
    assert row["top1_agreement"] == pytest.approx(2 / 3)
    (failure,) = parity_failures({"formats": {"onnx": row}}, max_abs_diff=1e-4)
    assert failure.startswith("onnx:") and "1 of 3 clear samples differ" in failure


def test_the_near_tie_margin_is_twice_the_tolerance() -> None:
    """Two logits that each stay within the tolerance, moving towards each other, close a gap of twice it."""
    expected = np.array([[1.0, 1.00019, 0.0], [1.0, 1.00021, 0.0], *CLEAR])  # margins 1.9e-4, 2.1e-4
    got = expected.copy()
    got[0, :2] = [1.0001, 1.00009]  # each within 1e-4, and the tie ranked the other way: allowed
    got[1, :2] = [1.00009, 1.00012]  # each within 1e-4: a clear top-1 cannot flip
    row = compare_logits(expected, got, max_abs_diff=1e-4)
    assert row["max_abs_diff"] <= 1e-4
    assert (row["near_ties"], row["clear_samples"], row["top1_disagreements"]) == (1, 4, 0)


def test_compare_logits_wants_matching_logits() -> None:
    with pytest.raises(ValueError, match="two equal"):
        compare_logits(np.zeros((4, 10)), np.zeros((4, 9)))


def test_a_model_with_tied_classes_exports_and_reports_its_near_ties(
    tmp_path: Path, lenet_checkpoint: TrainResult, digits: ImageData
) -> None:
    """End to end: classes 0 and 1 tie on every image (within 1e-6); the gate must not fail on them."""
    import shutil

    from cnnserve.card import save_card
    from cnnserve.weights import load_weights, save_weights

    tied = tmp_path / "tied"
    shutil.copytree(lenet_checkpoint.out, tied)
    card = load_card(tied)
    weights = load_weights(tied / card.weights_file)
    last_weight, last_bias = weights["classifier.4.weight"], weights["classifier.4.bias"]
    noise = torch.Generator().manual_seed(0)
    last_weight[1] = last_weight[0] + 1e-8 * torch.randn(last_weight.shape[1], generator=noise)
    last_bias[:2] = 100.0  # classes 0 and 1 on top of every image, a hair apart
    card.weights_sha256 = save_weights(weights, tied / card.weights_file)
    save_card(card, tied)

    result = export_checkpoint(tied, tmp_path / "export", data=digits)
    report = json.loads((result.out / "parity.json").read_text())
    assert report["passed"] and result.card.parity["passed"]
    for row in report["formats"].values():
        assert (row["near_ties"], row["clear_samples"], row["top1_agreement"]) == (64, 0, 1.0)


def test_export_refuses_tampered_weights(tmp_path: Path, lenet_checkpoint: TrainResult) -> None:
    import shutil

    from cnnserve.errors import FailedPreconditionError

    copy = tmp_path / "ckpt"
    shutil.copytree(lenet_checkpoint.out, copy)
    with open(copy / "weights.safetensors", "r+b") as stream:
        stream.seek(-4, 2)
        stream.write(b"\x00\x00\x80\x7f")
    with pytest.raises(FailedPreconditionError, match="sha256"):
        export_checkpoint(copy, tmp_path / "out")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA: the record holds a CUDA row")
def test_without_cuda_the_parity_record_says_so(lenet_export: ExportResult) -> None:
    for parity in (lenet_export.parity, json.loads((lenet_export.out / "parity.json").read_text())):
        assert parity["cuda"] is None
        assert "no CUDA device" in parity["cuda_reason"]
        assert parity["passed"]
    assert load_card(lenet_export.out).parity["cuda"] is None


def test_cuda_parity_lists_runtimes_that_cannot_run_on_cuda(
    monkeypatch: pytest.MonkeyPatch, lenet_export: ExportResult, digits: ImageData
) -> None:
    """A runtime that falls back to the CPU (ONNX Runtime without CUDA provider) is listed, not compared."""
    from cnnserve.preprocess import Preprocessing, prepare_images
    from cnnserve_export import export

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _index=0: "stand-in")
    monkeypatch.setattr(export, "CUDA_DEVICE", "cpu")  # every runtime then "falls back" to the CPU
    card, model = export.load_trained_model(lenet_export.out)
    inputs = prepare_images(digits.test_images[:64], Preprocessing.from_card(card))
    report, reason = export.cuda_parity(model, lenet_export.out, ["onnx", "torchscript"], inputs)
    assert reason is None and report is not None
    assert report["not_on_cuda"] == ["onnx", "torchscript"] and report["formats"] == {}
    assert report["tf32"] is False and report["max_abs_diff_limit"] == export.CUDA_MAX_ABS_DIFF == 1e-4


def test_precisions_need_the_onnx_export(tmp_path: Path, lenet_checkpoint: TrainResult) -> None:
    """int8 (and the precision report) is built from and measured on the ONNX graph: refused up front."""
    from cnnserve.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="add onnx"):
        export_checkpoint(
            lenet_checkpoint.out, tmp_path / "out", formats=("torchscript",), precisions=("int8",)
        )
    assert not (tmp_path / "out").exists()  # nothing was written


def test_a_plain_export_has_no_precision_report(lenet_export: ExportResult) -> None:
    """Without ``precisions`` an export is what it was: fp32 graphs, no int8 files, fp32 served."""
    from cnnserve.runtime import INT8_ONNX_FILE, precision_info

    assert "precisions" not in lenet_export.parity and load_card(lenet_export.out).precisions == {}
    assert not (lenet_export.out / INT8_ONNX_FILE).exists()
    info = precision_info(lenet_export.out)
    assert info["precision"] == "fp32" and info["calibration"] is None
