"""int8 exports: static QDQ quantization on real digits, the precision gate, re-quantized revisions."""

from __future__ import annotations

import json
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from cnnserve.card import load_card
from cnnserve.errors import FailedPreconditionError
from cnnserve.preprocess import Preprocessing, prepare_images
from cnnserve.runtime import (
    INT8_ONNX_FILE,
    QUANTIZATION_FILE,
    OnnxRuntime,
    load_quantization_map,
    load_runtime,
    precision_info,
    requantize_int8,
)
from cnnserve_export.archive import build_archive
from cnnserve_export.config import default_settings
from cnnserve_export.data import ImageData
from cnnserve_export.export import ExportResult, ParityError, load_trained_model
from cnnserve_export.quantize import (
    CALIBRATION_FILE,
    DEFAULT_MAX_ACCURACY_DROP,
    DEFAULT_MIN_AGREEMENT,
    add_precisions,
    calibration_indices,
)
from tests.helpers import cnnserve

pytestmark = pytest.mark.slow


def held_out(export_dir: Path, digits: ImageData, count: int = 64) -> torch.Tensor:
    return prepare_images(digits.test_images[:count], Preprocessing.from_card(load_card(export_dir)))


def shifted_weights(export_dir: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """The base weights moved by 5 % of each tensor's mean magnitude: a stand-in for a fine-tuned revision."""
    _, model = load_trained_model(export_dir)
    noise = torch.Generator().manual_seed(seed)
    return {
        k: v + 0.05 * v.abs().mean() * torch.randn(v.shape, generator=noise)
        for k, v in model.state_dict().items()
    }


def test_int8_export_passes_the_gate_with_both_accuracies(lenet_int8_export: Path, digits: ImageData) -> None:
    report = json.loads((lenet_int8_export / "parity.json").read_text())["precisions"]
    assert report["passed"] and report["held_out"] == {"dataset": "digits", "split": "test", "samples": 450}
    assert report["gate"] == {
        "max_accuracy_drop_points": DEFAULT_MAX_ACCURACY_DROP,
        "min_agreement": DEFAULT_MIN_AGREEMENT,
    }
    eager = report["eager_accuracy"]
    assert eager > 0.9  # the session's LeNet is a real digit classifier
    for precision in ("fp32", "int8"):
        row = report["precisions"][precision]
        assert row["passed"]
        assert (eager - row["accuracy"]) * 100 <= DEFAULT_MAX_ACCURACY_DROP
        assert row["top1_agreement"] >= DEFAULT_MIN_AGREEMENT
        assert row["clear_samples"] + row["near_ties"] == 450
    assert report["precisions"]["fp32"]["max_abs_diff"] <= 1e-4
    calibration = report["precisions"]["int8"]["calibration"]
    assert calibration["count"] == 128 and calibration["split"] == "train" and calibration["per_channel"]
    indices = np.load(lenet_int8_export / CALIBRATION_FILE)
    assert (
        len(set(indices.tolist())) == 128 and indices.min() >= 0 and indices.max() < len(digits.train_images)
    )
    assert np.array_equal(indices, calibration_indices(len(digits.train_images), 128, calibration["seed"]))
    assert load_card(lenet_int8_export).precisions == report


def test_the_int8_graph_is_qdq_with_int8_weights_and_a_float_logits_layer(lenet_int8_export: Path) -> None:
    proto = onnx.load(str(lenet_int8_export / INT8_ONNX_FILE))
    ops = {node.op_type for node in proto.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    initializers = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    mapping = load_quantization_map(lenet_int8_export)
    assert set(mapping["weights"]) == {
        "features.0.weight",
        "features.3.weight",
        "classifier.0.weight",
        "classifier.2.weight",
    }
    for entry in mapping["weights"].values():
        assert initializers[entry["quantized"]].dtype == np.int8
        assert initializers[entry["scale"]].ndim == 1 and entry["axis"] == 0  # per output channel
    for entry in mapping["biases"].values():
        assert initializers[entry["quantized"]].dtype == np.int32 and entry["input_scale"] > 0
    # the logits layer stays float32: its output is not squeezed into 256 levels
    assert mapping["float"] == ["classifier.4.bias", "classifier.4.weight"]
    assert initializers["classifier.4.weight"].dtype == np.float32


def test_requantizing_the_base_weights_reproduces_the_quantizer(lenet_int8_export: Path) -> None:
    _, model = load_trained_model(lenet_int8_export)
    proto = onnx.load(str(lenet_int8_export / INT8_ONNX_FILE))
    initializers = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    overrides = requantize_int8(model.state_dict(), load_quantization_map(lenet_int8_export))
    assert len(overrides) == 4 * 2 + 4 * 2 + 2  # 4 weights and 4 biases (values, scales) + 2 float tensors
    for name, array in overrides.items():
        assert array.dtype == initializers[name].dtype, name
        np.testing.assert_array_equal(array, initializers[name], err_msg=name)


def test_a_revision_is_served_with_its_own_weights_requantized(
    lenet_int8_export: Path, digits: ImageData
) -> None:
    """The override path equals a graph with the re-quantized weights baked in, and is not the base int8."""
    inputs = held_out(lenet_int8_export, digits)
    weights = shifted_weights(lenet_int8_export)
    served = load_runtime(lenet_int8_export, "onnx", weights, precision="int8")
    assert isinstance(served, OnnxRuntime) and served.precision == "int8"
    got = served.run(inputs)

    proto = onnx.load(str(lenet_int8_export / INT8_ONNX_FILE))
    overrides = requantize_int8(weights, load_quantization_map(lenet_int8_export))
    for init in proto.graph.initializer:
        if init.name in overrides:
            init.CopyFrom(numpy_helper.from_array(overrides[init.name], init.name))
    baked_path = lenet_int8_export.parent / "baked.int8.onnx"
    onnx.save(proto, str(baked_path))
    baked = OnnxRuntime(baked_path, precision="int8").run(inputs)
    np.testing.assert_allclose(got, baked, rtol=0, atol=1e-5)

    base = load_runtime(lenet_int8_export, "onnx", precision="int8").run(inputs)
    assert np.abs(got - base).max() > 0.05  # the base's int8 weights were not served under the new weights
    # and it is the quantized version of the fp32 revision: top-1 agrees where fp32's margin is clear
    fp32 = load_runtime(lenet_int8_export, "onnx", weights, precision="fp32").run(inputs)
    ranked = np.sort(fp32, axis=1)
    clear = ranked[:, -1] - ranked[:, -2] > 0.5
    assert clear.sum() > 50
    assert (got.argmax(1) == fp32.argmax(1))[clear].all()


def test_a_bad_calibration_is_refused_and_cannot_be_archived(
    tmp_path: Path, lenet_export: ExportResult, digits: ImageData
) -> None:
    """Calibrating on black images gives activation ranges that real digits overflow: the gate refuses it."""
    out = tmp_path / "export"
    shutil.copytree(lenet_export.out, out)
    black = torch.zeros((32, *digits.train_images.shape[1:]), dtype=torch.uint8)
    with pytest.raises(ParityError, match=r"precision refused \(int8: test accuracy .* points below"):
        add_precisions(out, ("fp32", "int8"), digits, calibration_images=black)
    report = json.loads((out / "parity.json").read_text())["precisions"]
    assert not report["passed"] and not report["precisions"]["int8"]["passed"]
    assert report["precisions"]["fp32"]["passed"]
    assert not (out / INT8_ONNX_FILE).exists()
    settings = replace(default_settings("lenet"), precision="int8")
    with pytest.raises(FailedPreconditionError, match="refused by the precision gate"):
        build_archive(out, tmp_path / "store", settings)


def test_the_gate_thresholds_are_the_users(
    tmp_path: Path, lenet_export: ExportResult, digits: ImageData
) -> None:
    from cnnserve_export.quantize import PrecisionGate

    out = tmp_path / "export"
    shutil.copytree(lenet_export.out, out)
    # A drop of -100 points asks int8 to be 100 points *more* accurate than fp32: refused whatever it scores.
    with pytest.raises(ParityError, match="int8: test accuracy"):
        add_precisions(out, ("int8",), digits, calibration_size=64, gate=PrecisionGate(-100.0, 1.0))


def test_an_int8_archive_serves_int8_and_reports_it(tmp_path: Path, lenet_int8_export: Path) -> None:
    settings = replace(default_settings("lenet"), precision="int8")
    mar = build_archive(lenet_int8_export, tmp_path / "store", settings)
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(unpacked)
    assert (unpacked / INT8_ONNX_FILE).exists() and (unpacked / QUANTIZATION_FILE).exists()
    assert not (unpacked / "model.onnx").exists()  # only the served graph travels
    config = (unpacked / "MAR-INF" / "MANIFEST.json").read_text()
    assert INT8_ONNX_FILE in config
    runtime = load_runtime(unpacked, "onnx")  # the archive's own precision
    assert isinstance(runtime, OnnxRuntime) and runtime.precision == "int8"
    info = precision_info(unpacked)
    report = load_card(lenet_int8_export).precisions
    assert info["precision"] == "int8"
    assert info["fp32_accuracy"] == report["eager_accuracy"]
    assert info["accuracy"] == report["precisions"]["int8"]["accuracy"]
    assert info["calibration"]["count"] == 128 and info["held_out"]["split"] == "test"
    assert precision_info(lenet_int8_export)["precision"] == "fp32"  # the export itself serves fp32
    with pytest.raises(FailedPreconditionError, match="ONNX Runtime only"):
        load_runtime(unpacked, "torchscript", precision="int8")


def test_an_export_without_int8_cannot_be_archived_as_int8(
    tmp_path: Path, lenet_export: ExportResult
) -> None:
    settings = replace(default_settings("lenet"), precision="int8")
    with pytest.raises(FailedPreconditionError, match="--precision fp32,int8"):
        build_archive(lenet_export.out, tmp_path / "store", settings)


def test_export_cli_with_int8(tmp_path: Path, lenet_export: ExportResult) -> None:
    """``cnnserve export --precision fp32,int8`` end to end, from the checkpoint files of an export."""
    out = tmp_path / "export"
    result = cnnserve(
        "export",
        str(lenet_export.out),
        "--out",
        str(out),
        "--formats",
        "onnx",
        "--precision",
        "fp32,int8",
        "--calibration-size",
        "64",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["precisions"]
    assert report["passed"] and set(report["precisions"]) == {"fp32", "int8"}
    assert report["precisions"]["int8"]["calibration"]["count"] == 64
    assert (out / INT8_ONNX_FILE).exists() and (out / CALIBRATION_FILE).exists()
    refused = cnnserve(
        "export", str(lenet_export.out), "--out", str(tmp_path / "refused"), "--formats", "onnx",
        "--precision", "int8", "--calibration-size", "64", "--max-accuracy-drop", "-100",
    )  # fmt: skip
    assert refused.returncode != 0 and "precision refused" in refused.stderr
