"""A real TorchServe 0.12 with our handler: classify, shapes, fine-tuning across workers, bad input.

The session's TorchServe runs LeNet with two workers and AlexNet with one, on free loopback ports with
token authorization on. Fine-tune state accumulates across tests, so each test reads the head first.
"""

from __future__ import annotations

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cnnserve.card import load_card
from cnnserve.preprocess import Preprocessing, prepare_images
from cnnserve.serving.revisions import RevisionStore
from cnnserve.shapes import layer_shapes
from cnnserve.torchserve import TorchServe
from cnnserve.weights import load_into, load_weights
from cnnserve_export.data import ImageData
from cnnserve_export.export import ExportResult
from tests.helpers import (
    RUNTIME_PROBABILITY_ATOL,
    assert_probabilities_close,
    assert_top_k,
    png_bytes,
    wait_until,
)
from tests.torchserve_helpers import post

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]


def tensor_input(array: np.ndarray) -> dict[str, Any]:
    return {"shape": list(array.shape), "data": array.astype("<f4").ravel().tolist()}


def model_inputs(
    export: ExportResult, digits: ImageData, start: int, count: int
) -> tuple[list[bytes], torch.Tensor]:
    images = digits.test_images[start : start + count]
    return [png_bytes(i[0].numpy()) for i in images], prepare_images(
        images, Preprocessing.from_card(export.card)
    )


def eager(export: ExportResult, weights: dict[str, torch.Tensor] | None = None) -> torch.nn.Module:
    card = load_card(export.out)
    state = weights if weights is not None else load_weights(export.out / card.weights_file)
    return load_into(card.build_model(), state).eval()


def probabilities(body: dict[str, Any]) -> np.ndarray:
    """Full probability rows from replies asked with top_k = num_classes, in class order."""
    return np.array(
        [
            [t["probability"] for t in sorted(p["top_k"], key=lambda t: t["index"])]
            for p in body["predictions"]
        ]
    )


def pairs(prediction: dict[str, Any]) -> list[tuple[int, float]]:
    return [(t["index"], t["probability"]) for t in prediction["top_k"]]


def store_of(torchserve: TorchServe, export: ExportResult) -> RevisionStore:
    card = export.card
    return RevisionStore(
        torchserve.settings.revisions_dir,
        card.name,
        card.version,
        card.weights_sha256,
        export.out / card.weights_file,
    )


def head(torchserve: TorchServe, model: str) -> int:
    status, body = post(torchserve, model, {"op": "revisions"})
    assert status == 200
    return int(body["head"])


@pytest.mark.parametrize("name", ["lenet", "alexnet"])
def test_classify_png_tensor_and_mixed(
    name: str, torchserve: TorchServe, digits: ImageData, request: pytest.FixtureRequest
) -> None:
    export: ExportResult = request.getfixturevalue(f"{name}_export")
    pngs, inputs = model_inputs(export, digits, 0, 4)
    base = load_card(export.out)
    pinned = {"revision": 0}  # the trained weights, whatever fine-tuning other tests did
    with torch.no_grad():
        expected = torch.softmax(eager(export)(inputs), 1).numpy()  # (4, 10)
    # curl -T style: raw PNG bytes, no JSON at all (served with the head revision)
    status, body = post(torchserve, name, pngs[0])
    assert status == 200 and body["model"] == name and body["version"] == base.version
    assert len(body["predictions"][0]["top_k"]) == 5
    mixed = {
        "inputs": [
            {"image_b64": base64.b64encode(pngs[1]).decode()},
            tensor_input(inputs[2].numpy()),
            {"image_b64": base64.b64encode(pngs[3]).decode()},
        ],
        "top_k": 2,
        **pinned,
    }
    status, body = post(torchserve, name, mixed)
    assert status == 200 and body["revision"] == 0
    # A barely trained AlexNet has near ties: compare probabilities by class, top-1 only where it is clear.
    assert len(body["predictions"]) == 3
    for prediction, row in zip(body["predictions"], expected[1:], strict=True):
        assert len(prediction["top_k"]) == 2
        assert_top_k(pairs(prediction), row, RUNTIME_PROBABILITY_ATOL)
    status, body = post(torchserve, name, {**tensor_input(inputs[0].numpy()), **pinned})
    assert status == 200
    assert_top_k(pairs(body["predictions"][0]), expected[0], RUNTIME_PROBABILITY_ATOL)


def test_shapes_through_torchserve_equal_the_plain_function(torchserve: TorchServe) -> None:
    from cnnserve.models import build_model

    for name, classes, shape in (("lenet", 10, [1, 32, 32]), ("alexnet", 10, [3, 224, 224])):
        status, body = post(torchserve, name, {"op": "shapes", "input_shape": shape})
        assert status == 200
        expected = json.loads(
            json.dumps(layer_shapes(build_model(name, num_classes=classes), shape).to_dict())
        )
        assert {k: v for k, v in body.items() if k not in ("model", "version")} == expected
    status, body = post(torchserve, "alexnet", {"op": "shapes", "input_shape": [3, 32, 32]})
    assert status == 400 and "features.12" in body["error"]["message"]


def finetune(torchserve: TorchServe, inputs: torch.Tensor, labels: list[int], **extra: Any) -> dict[str, Any]:
    body = {
        "op": "finetune",
        "inputs": [tensor_input(x.numpy()) for x in inputs],
        "labels": labels,
        "lr": 0.05,
        **extra,
    }
    status, reply = post(torchserve, "lenet", body)
    assert status == 200, reply
    return reply


def test_every_worker_serves_the_new_revision(
    torchserve: TorchServe, lenet_export: ExportResult, digits: ImageData
) -> None:
    _, inputs = model_inputs(lenet_export, digits, 0, 32)
    labels = digits.test_targets[:32].tolist()
    start = head(torchserve, "lenet")
    for _ in range(3):
        reply = finetune(torchserve, inputs, labels)
    assert reply["revision"] == start + 3
    store = store_of(torchserve, lenet_export)
    weights = store.load(store.get(reply["revision"]))
    with torch.no_grad():
        expected = torch.softmax(eager(lenet_export, weights)(inputs[:2]), 1).numpy()
    query = {"inputs": [tensor_input(x.numpy()) for x in inputs[:2]], "top_k": 10}
    workers: set[str] = set()

    def both_answered() -> bool:
        # TorchServe picks the worker: send rounds of concurrent calls until both have answered.
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda _: post(torchserve, "lenet", query), range(16)))
        for status, body in replies:
            assert status == 200 and body["revision"] == reply["revision"]
            assert_probabilities_close(probabilities(body), expected, RUNTIME_PROBABILITY_ATOL)
            workers.add(body["worker"])
        return len(workers) == 2

    wait_until(both_answered, 120, "both TorchServe workers to answer", interval=0)


def test_classify_during_steps_is_never_torn(
    torchserve: TorchServe, lenet_export: ExportResult, digits: ImageData
) -> None:
    """Every reply's probabilities are those of the revision it names (never a mix), while steps land."""
    _, inputs = model_inputs(lenet_export, digits, 40, 16)
    labels = digits.test_targets[40:56].tolist()
    query = {"inputs": [tensor_input(inputs[0].numpy())], "top_k": 10}
    seen: list[tuple[int, np.ndarray]] = []
    stop = threading.Event()

    def classify_until_stopped() -> None:
        while not stop.is_set():
            status, body = post(torchserve, "lenet", query)
            assert status == 200
            seen.append((body["revision"], probabilities(body)[0]))

    def seen_revision(revision: int) -> bool:
        for reader in readers:
            if reader.done():
                reader.result()  # a reader that failed fails the test now, not at the deadline
        return any(number == revision for number, _ in list(seen))

    start = head(torchserve, "lenet")
    with ThreadPoolExecutor(4) as pool:
        readers = [pool.submit(classify_until_stopped) for _ in range(4)]
        try:
            # Readers are seen at the start, at each step's revision and at the last: never sleep and hope.
            wait_until(lambda: seen_revision(start), 60, f"a reader to see revision {start}")
            steps: list[int] = []
            for _ in range(4):
                steps.append(finetune(torchserve, inputs, labels, lr=0.2)["revision"])
                wait_until(lambda: seen_revision(steps[-1]), 60, f"a reader to see revision {steps[-1]}")
        finally:
            stop.set()
        for reader in readers:
            reader.result()
    store = store_of(torchserve, lenet_export)
    revisions = {revision for revision, _ in seen}
    assert {start, *steps} <= revisions and max(revisions) == steps[-1]
    expected = {}
    for revision in revisions:
        with torch.no_grad():
            model = eager(lenet_export, store.load(store.get(revision)))
            expected[revision] = torch.softmax(model(inputs[:1]), 1).numpy()[0]
    for revision, got in seen:
        assert_probabilities_close(got, expected[revision], RUNTIME_PROBABILITY_ATOL)


def test_min_revision_is_honoured(
    torchserve: TorchServe, lenet_export: ExportResult, digits: ImageData
) -> None:
    _, inputs = model_inputs(lenet_export, digits, 60, 8)
    labels = digits.test_targets[60:68].tolist()
    for _ in range(3):
        revision = finetune(torchserve, inputs, labels)["revision"]
        query = {**tensor_input(inputs[0].numpy()), "min_revision": revision}
        with ThreadPoolExecutor(4) as pool:
            replies = list(pool.map(lambda _, q=query: post(torchserve, "lenet", q), range(12)))
        assert all(status == 200 and body["revision"] >= revision for status, body in replies)
    status, body = post(
        torchserve, "lenet", {**tensor_input(inputs[0].numpy()), "min_revision": revision + 100}
    )
    assert status == 404 and body["error"]["code"] == "NOT_FOUND"


def test_rollback_and_reset(torchserve: TorchServe, lenet_export: ExportResult, digits: ImageData) -> None:
    _, inputs = model_inputs(lenet_export, digits, 80, 8)
    query = {**tensor_input(inputs[0].numpy()), "top_k": 10}
    first = finetune(torchserve, inputs, digits.test_targets[80:88].tolist(), lr=0.3)["revision"]
    status, at_first = post(torchserve, "lenet", query)
    assert status == 200 and at_first["revision"] == first
    finetune(torchserve, inputs, digits.test_targets[80:88].tolist(), lr=0.3)
    status, rolled = post(torchserve, "lenet", {"op": "rollback", "to_revision": first})
    assert status == 200 and rolled["kind"] == "rollback" and rolled["weights_of"] == first
    status, body = post(torchserve, "lenet", query)
    assert body["revision"] == rolled["revision"]
    assert_probabilities_close(probabilities(body), probabilities(at_first))
    status, reset = post(torchserve, "lenet", {"op": "reset"})
    assert status == 200 and reset["kind"] == "reset" and reset["step"] == 0
    status, body = post(torchserve, "lenet", query)
    status, base = post(torchserve, "lenet", {**query, "revision": 0})
    assert body["revision"] == reset["revision"]
    assert_probabilities_close(probabilities(body), probabilities(base))


def nan_tensor() -> dict[str, Any]:
    return {"shape": [1, 32, 32], "data": [float("nan")] * 1024}


BAD_INPUTS: list[tuple[str, bytes | dict[str, Any], str]] = [
    ("not an image", b"this is not an image", "inputs[0].image"),
    ("truncated image", png_bytes(np.zeros((28, 28)))[:50], "inputs[0].image"),
    ("empty body", b"", "body"),
    ("tensor size", {"shape": [1, 32, 32], "data": [0.0] * 10}, "inputs[0].data"),
    (
        "NaN",
        {
            "inputs": [
                {
                    "shape": [1, 32, 32],
                    "data_b64": base64.b64encode(np.full(1024, np.nan, "<f4").tobytes()).decode(),
                }
            ]
        },
        "inputs[0].data",
    ),
    (
        "label range",
        {
            "op": "finetune",
            "inputs": [{"shape": [1, 32, 32], "data": [0.0] * 1024}],
            "labels": [10],
            "lr": 0.1,
        },
        "labels",
    ),
    (
        "lr",
        {"op": "finetune", "inputs": [{"shape": [1, 32, 32], "data": [0.0] * 1024}], "labels": [1], "lr": -1},
        "lr",
    ),
    ("too many", {"inputs": [{"shape": [1, 32, 32], "data": [0.0] * 1024}] * 65}, "inputs"),
]


@pytest.mark.parametrize(("case", "data", "field"), BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_a_4xx_and_the_worker_survives(
    case: str, data: bytes | dict[str, Any], field: str, torchserve: TorchServe, lenet_export: ExportResult
) -> None:
    store = store_of(torchserve, lenet_export)
    manifest_before = (store.directory / "manifest.json").read_bytes()
    status, body = post(torchserve, "lenet", data)
    assert 400 <= status < 500, (status, body)
    assert body["error"]["field_violations"][0]["field"].startswith(field)
    assert (store.directory / "manifest.json").read_bytes() == manifest_before
    assert torchserve.model_status("lenet") == ["READY", "READY"]
    status, _ = post(torchserve, "lenet", {**tensor_input(np.zeros((1, 32, 32))), "revision": 0})
    assert status == 200


def test_token_is_required(torchserve: TorchServe) -> None:
    import urllib.error
    import urllib.request

    settings = torchserve.settings
    request = urllib.request.Request(
        f"{settings.url(settings.inference_port)}/predictions/lenet", data=b"x", method="POST"
    )
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=10)
    assert caught.value.code in (400, 401, 403)
    config = (settings.state_dir / "config.properties").read_text()
    assert "enable_model_api=false" in config and "127.0.0.1" in config


def test_revisions_survive_a_restart(
    tmp_path: Path, model_store: Path, lenet_export: ExportResult, digits: ImageData
) -> None:
    from cnnserve.torchserve import TorchServeSettings

    settings = TorchServeSettings.with_ports(
        model_store, tmp_path / "torchserve", tmp_path / "revisions", models=("lenet",)
    )
    _, inputs = model_inputs(lenet_export, digits, 100, 8)
    query = {**tensor_input(inputs[0].numpy()), "top_k": 10}
    server = TorchServe(settings)
    server.start()
    try:
        server.wait_ready(("lenet",), timeout=120)
        step = finetune(server, inputs, digits.test_targets[100:108].tolist())
        _, before = post(server, "lenet", query)
    finally:
        server.stop()
    server = TorchServe(settings)
    server.start()
    try:
        server.wait_ready(("lenet",), timeout=120)
        _, after = post(server, "lenet", query)
        assert after["revision"] == step["revision"] == 1
        assert_probabilities_close(probabilities(after), probabilities(before))
        second = finetune(server, inputs, digits.test_targets[100:108].tolist())
        assert second["revision"] == 2 and second["step"] == 2
    finally:
        server.stop()
