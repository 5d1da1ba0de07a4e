"""An int8 archive behind a real TorchServe and gateway: real digits, and fine-tuned revisions re-quantized.

A TorchServe of its own (LeNet int8, two workers, its own revision store), so that steps here do not move
the session's fp32 models.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cnnserve.card import load_card
from cnnserve.client import ClassifierClient
from cnnserve.preprocess import Preprocessing, prepare_images
from cnnserve.runtime import load_runtime, precision_info
from cnnserve.serving.revisions import RevisionStore
from cnnserve.torchserve import TorchServe, TorchServeSettings
from cnnserve_export.archive import build_archive
from cnnserve_export.config import default_settings
from cnnserve_export.data import ImageData
from tests.gateway_helpers import GatewayThread, settings_for
from tests.helpers import png_bytes, wait_until
from tests.torchserve_helpers import post

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]

# The same int8 graph and weights in the worker and here: integer kernels, so only the float epilogue
# (dequantize, the float logits layer, softmax) may differ in the last bits.
INT8_PROBABILITY_ATOL = 1e-4


@pytest.fixture(scope="module")
def int8_torchserve(
    tmp_path_factory: pytest.TempPathFactory, lenet_int8_export: Path
) -> Iterator[TorchServe]:
    store = tmp_path_factory.mktemp("int8-store")
    settings = replace(default_settings("lenet"), precision="int8", min_workers=2, max_workers=2)
    build_archive(lenet_int8_export, store, settings)
    state = tmp_path_factory.mktemp("int8-torchserve")
    server = TorchServe(TorchServeSettings.with_ports(store, state / "torchserve", state / "revisions"))
    server.start()
    try:
        server.wait_ready(("lenet",), timeout=300)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def int8_client(int8_torchserve: TorchServe) -> Iterator[ClassifierClient]:
    gateway = GatewayThread(settings_for(int8_torchserve))
    try:
        with ClassifierClient(gateway.target, timeout=60) as client:
            yield client
    finally:
        gateway.stop()


def softmax(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), 1).numpy()


def by_class(scores: Any, num_classes: int) -> np.ndarray:
    row = np.zeros(num_classes)
    for score in scores:
        row[score.index] = score.probability
    return row


def tensor_input(array: np.ndarray) -> dict[str, Any]:
    return {"shape": list(array.shape), "data": array.astype("<f4").ravel().tolist()}


def test_int8_archive_classifies_real_digits_through_the_gateway(
    int8_client: ClassifierClient, lenet_int8_export: Path, digits: ImageData
) -> None:
    images, labels = digits.test_images[:64], digits.test_targets[:64].numpy()
    result = int8_client.classify("lenet", [png_bytes(i[0].numpy()) for i in images], top_k=10)
    got = np.stack([by_class(p, 10) for p in result.predictions])
    assert (got.argmax(1) == labels).mean() >= 0.9  # a real digit classifier, served in int8

    inputs = prepare_images(images, Preprocessing.from_card(load_card(lenet_int8_export)))
    int8 = softmax(load_runtime(lenet_int8_export, "onnx", precision="int8").run(inputs))
    fp32 = softmax(load_runtime(lenet_int8_export, "onnx", precision="fp32").run(inputs))
    np.testing.assert_allclose(got, int8, rtol=0, atol=INT8_PROBABILITY_ATOL)
    assert np.abs(got - fp32).max() > 10 * INT8_PROBABILITY_ATOL  # it is the int8 graph, not fp32


def test_get_model_reports_the_precision_its_calibration_and_both_accuracies(
    int8_client: ClassifierClient, lenet_int8_export: Path
) -> None:
    info = int8_client.get_model("lenet").info
    measured = load_card(lenet_int8_export).precisions  # what the export measured and saved
    int8 = measured["precisions"]["int8"]
    report = info.precision_report
    assert info.precision == "int8"  # the archive's graph, though its export serves fp32 itself
    assert precision_info(lenet_int8_export)["precision"] == "fp32"
    assert report["fp32_accuracy"] == pytest.approx(measured["eager_accuracy"])
    assert report["accuracy"] == pytest.approx(int8["accuracy"])
    assert (
        report["top1_agreement"] == pytest.approx(int8["top1_agreement"]) and report["top1_agreement"] >= 0.99
    )
    calibration = report["calibration"]
    assert calibration is not None and calibration["count"] == int8["calibration"]["count"] > 0
    assert calibration["split"] == "train" and calibration["method"] == "minmax"
    assert report["held_out"]["samples"] == measured["held_out"]["samples"] > 0


def test_a_step_on_int8_changes_outputs_consistently_across_workers(
    int8_torchserve: TorchServe, int8_client: ClassifierClient, lenet_int8_export: Path, digits: ImageData
) -> None:
    card = load_card(lenet_int8_export)
    inputs = prepare_images(digits.test_images[:32], Preprocessing.from_card(card))
    # Labels one class off: a step that really moves this confident model's outputs (probabilities near 1
    # barely move when it is taught what it already knows).
    labels = [(int(label) + 1) % 10 for label in digits.test_targets[:32]]
    query = {"inputs": [tensor_input(x.numpy()) for x in inputs[:4]], "top_k": 10}
    status, before = post(int8_torchserve, "lenet", query)
    assert status == 200

    step = int8_client.finetune_step(
        "lenet", [png_bytes(i[0].numpy()) for i in digits.test_images[:32]], labels, lr=0.1
    )
    revision = step.revision
    assert revision == before["revision"] + 1
    store = RevisionStore(
        int8_torchserve.settings.revisions_dir,
        card.name,
        card.version,
        card.weights_sha256,
        lenet_int8_export / card.weights_file,
    )
    weights = store.load(store.get(revision))  # the fp32 revision the store holds
    expected = softmax(load_runtime(lenet_int8_export, "onnx", weights, precision="int8").run(inputs[:4]))
    base = softmax(load_runtime(lenet_int8_export, "onnx", precision="int8").run(inputs[:4]))
    assert np.abs(expected - base).max() > 1e-2  # the step moved this model's int8 outputs
    workers: set[int] = set()

    def both_answered() -> bool:
        # TorchServe picks the worker: rounds of concurrent calls until both have answered the new revision.
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: post(int8_torchserve, "lenet", query), range(16)))
        for code, body in replies:
            assert code == 200 and body["revision"] == revision
            got = np.stack([by_index(p["top_k"]) for p in body["predictions"]])
            np.testing.assert_allclose(got, expected, rtol=0, atol=INT8_PROBABILITY_ATOL)
            workers.add(body["worker"])
        return len(workers) == 2

    wait_until(both_answered, 120, "both int8 workers to answer with the new revision", interval=0)
    # read-your-writes through the gateway, served re-quantized
    result = int8_client.classify(
        "lenet", [png_bytes(i[0].numpy()) for i in digits.test_images[:4]], top_k=10, min_revision=revision
    )
    assert result.revision >= revision
    got = np.stack([by_class(p, 10) for p in result.predictions])
    np.testing.assert_allclose(got, expected, rtol=0, atol=INT8_PROBABILITY_ATOL)


def by_index(top_k: list[dict[str, Any]]) -> np.ndarray:
    row = np.zeros(len(top_k))
    for score in top_k:
        row[score["index"]] = score["probability"]
    return row
