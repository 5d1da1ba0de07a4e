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
from cnnserve_export.export import ExportResult, ParityError, export_checkpoint, load_trained_model
from cnnserve_export.train import TrainResult


@pytest.mark.parametrize("name", ["lenet_export", "alexnet_export"])
def test_export_parity(name: str, request: pytest.FixtureRequest) -> None:
    result: ExportResult = request.getfixturevalue(name)
    report = json.loads((result.out / "parity.json").read_text())
    assert report["passed"] and report["samples"] >= 64 and report["dataset"] == "digits"
    for fmt in ("torchscript", "onnx"):
        assert report["formats"][fmt]["max_abs_diff"] <= 1e-4
        assert report["formats"][fmt]["top1_agreement"] == 1.0
    card = load_card(result.out)
    assert card.exports == {"torchscript": "model.pt", "onnx": "model.onnx"}
    assert card.parity["passed"]


def test_exports_load_with_any_batch_size(lenet_export: ExportResult) -> None:
    model = torch.jit.load(str(lenet_export.out / "model.pt"))
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
    shifted = {k: v + 0.01 * torch.randn_like(v) for k, v in model.state_dict().items()}
    model.load_state_dict(shifted)
    x = torch.randn(8, 1, 32, 32)
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
