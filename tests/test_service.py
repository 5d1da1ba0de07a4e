"""ModelService in-process: the worker logic TorchServe's handler delegates to, without TorchServe."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cnnserve.card import load_card
from cnnserve.preprocess import Preprocessing, prepare_images
from cnnserve.serving.finetune import StepSettings, sgd_step
from cnnserve.serving.service import ModelService, ServiceConfig
from cnnserve.weights import load_into, load_weights
from cnnserve_export.data import ImageData
from cnnserve_export.export import ExportResult
from tests.helpers import (
    RUNTIME_PROBABILITY_ATOL,
    assert_probabilities_close,
    assert_top_k,
    by_class,
    png_bytes,
)


def request(**body: Any) -> dict[str, Any]:
    return {"body": json.dumps(body).encode()}


def tensor_input(array: np.ndarray) -> dict[str, Any]:
    return {"shape": list(array.shape), "data": array.astype("<f4").ravel().tolist()}


def reply_json(service: ModelService, raw: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    (reply,) = service.handle([raw])
    return reply.status, json.loads(reply.body)


@pytest.fixture
def service(lenet_export: ExportResult, tmp_path: Path) -> ModelService:
    return ModelService(lenet_export.out, ServiceConfig(revisions_dir=str(tmp_path / "revisions")))


def eager_logits(
    export_dir: Path, weights: dict[str, torch.Tensor] | None, inputs: torch.Tensor
) -> np.ndarray:
    card = load_card(export_dir)
    state = weights if weights is not None else load_weights(export_dir / card.weights_file)
    model = load_into(card.build_model(), state).eval()
    with torch.no_grad():
        return model(inputs).numpy()  # type: ignore[no-any-return]


def loss_close_to(expected: float) -> Any:
    """The service's loss and this test's are one eager computation, maybe on other thread counts."""
    return pytest.approx(expected, rel=1e-4, abs=1e-5)


def eval_loss(
    export_dir: Path, weights: dict[str, torch.Tensor] | None, inputs: torch.Tensor, labels: torch.Tensor
) -> float:
    """Mean eval-mode cross-entropy of the batch, as a fine-tune reply reports it."""
    logits = torch.from_numpy(eager_logits(export_dir, weights, inputs))
    return float(torch.nn.functional.cross_entropy(logits, labels))


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def digit_batch(digits: ImageData, count: int, export_dir: Path) -> tuple[list[bytes], torch.Tensor]:
    """``count`` real test digits as PNG bytes and as the model input they become."""
    images = digits.test_images[:count]
    pngs = [png_bytes(image[0].numpy()) for image in images]
    return pngs, prepare_images(images, Preprocessing.from_card(load_card(export_dir)))


def pairs(prediction: dict[str, Any]) -> list[tuple[int, float]]:
    return [(t["index"], t["probability"]) for t in prediction["top_k"]]


def test_classify_png_tensor_and_mixed_match_the_eager_model(
    service: ModelService, digits: ImageData, lenet_export: ExportResult
) -> None:
    pngs, inputs = digit_batch(digits, 6, lenet_export.out)
    expected = softmax(eager_logits(lenet_export.out, None, inputs))  # (6, 10)
    raw_replies = service.handle([{"body": png} for png in pngs[:3]])
    for reply, row in zip(raw_replies, expected[:3], strict=True):
        (prediction,) = json.loads(reply.body)["predictions"]
        assert len(prediction["top_k"]) == 5
        assert_top_k(pairs(prediction), row, RUNTIME_PROBABILITY_ATOL)
    mixed = request(
        inputs=[
            {"image_b64": base64.b64encode(pngs[3]).decode()},
            tensor_input(inputs[4].numpy()),
            tensor_input(inputs[5].numpy()[None]),
        ],
        top_k=3,
    )
    status, body = reply_json(service, mixed)
    assert status == 200 and body["revision"] == 0 and body["model"] == "lenet"
    assert all(len(p["top_k"]) == 3 for p in body["predictions"])
    for prediction, row in zip(body["predictions"], expected[3:], strict=True):
        assert_top_k(pairs(prediction), row, RUNTIME_PROBABILITY_ATOL)
    top = body["predictions"][1]["top_k"][0]
    assert top["label"] == str(top["index"])


def test_a_bad_request_does_not_fail_its_batch(
    service: ModelService, digits: ImageData, lenet_export: ExportResult
) -> None:
    pngs, _ = digit_batch(digits, 1, lenet_export.out)
    replies = service.handle(
        [{"body": b"not an image"}, {"body": pngs[0]}, request(inputs=[{"shape": [1, 3], "data": [1, 2, 3]}])]
    )
    assert [r.status for r in replies] == [400, 200, 400]
    assert json.loads(replies[0].body)["error"]["code"] == "INVALID_ARGUMENT"
    assert "does not match the model's input shape" in json.loads(replies[2].body)["error"]["message"]


def test_per_input_errors_keep_the_good_inputs(
    service: ModelService, digits: ImageData, lenet_export: ExportResult
) -> None:
    pngs, _ = digit_batch(digits, 1, lenet_export.out)
    nan = np.full((1, 32, 32), np.nan, dtype="<f4")
    raw = {
        "op": b"classify",
        "meta": json.dumps(
            {
                "inputs": [{"kind": "image"}, {"kind": "tensor", "shape": [1, 32, 32]}],
                "per_input_errors": True,
            }
        ).encode(),
        "input.0": pngs[0],
        "input.1": nan.tobytes(),
    }
    status, body = reply_json(service, raw)
    assert status == 200
    assert "top_k" in body["predictions"][0]
    assert body["predictions"][1]["error"]["field_violations"][0]["field"] == "inputs[1].data"


def test_shapes_equal_the_plain_function(service: ModelService) -> None:
    from cnnserve.models import LeNet
    from cnnserve.shapes import layer_shapes

    status, body = reply_json(service, request(op="shapes"))
    assert status == 200
    expected = json.loads(json.dumps(layer_shapes(LeNet(), (1, 32, 32)).to_dict()))
    assert {k: v for k, v in body.items() if k not in ("model", "version")} == expected
    status, body = reply_json(service, request(op="shapes", input_shape=[1, 8, 8]))
    assert status == 400 and "features.3" in body["error"]["message"]


def finetune_body(inputs: torch.Tensor, labels: list[int], **extra: Any) -> dict[str, Any]:
    return request(
        op="finetune", inputs=[tensor_input(x.numpy()) for x in inputs], labels=labels, lr=0.05, **extra
    )


def test_finetune_reaches_every_worker_and_history_is_kept(
    lenet_export: ExportResult, digits: ImageData, tmp_path: Path
) -> None:
    config = ServiceConfig(revisions_dir=str(tmp_path / "revisions"))
    worker_a, worker_b = ModelService(lenet_export.out, config), ModelService(lenet_export.out, config)
    _, inputs = digit_batch(digits, 16, lenet_export.out)
    labels = digits.test_targets[:16].tolist()
    status, step = reply_json(worker_a, finetune_body(inputs, labels))
    assert status == 200 and step["revision"] == 1 and step["step"] == 1 and step["parent"] == 0
    new_weights = worker_a.store.load(worker_a.store.get(1))  # type: ignore[union-attr]
    base_weights = load_weights(lenet_export.out / lenet_export.card.weights_file)
    assert any(not torch.equal(new_weights[name], base_weights[name]) for name in base_weights)
    # One step need not lower the loss; what is guaranteed is that the reply reports the batch's eval-mode
    # cross-entropy under the parent's weights and under the weights it stored.
    target = torch.tensor(labels)
    assert step["loss_before"] == loss_close_to(eval_loss(lenet_export.out, None, inputs, target))
    assert step["loss_after"] == loss_close_to(eval_loss(lenet_export.out, new_weights, inputs, target))
    expected = softmax(eager_logits(lenet_export.out, new_weights, inputs[:2]))
    for worker in (worker_a, worker_b):
        status, body = reply_json(
            worker, request(inputs=[tensor_input(x.numpy()) for x in inputs[:2]], top_k=10)
        )
        assert body["revision"] == 1
        got = np.array(
            [
                [t["probability"] for t in sorted(p["top_k"], key=lambda t: t["index"])]
                for p in body["predictions"]
            ]
        )
        assert_probabilities_close(got, expected, RUNTIME_PROBABILITY_ATOL)
    # a pin to the base, read-your-writes, rollback and reset
    status, pinned = reply_json(
        worker_b, request(inputs=[tensor_input(inputs[0].numpy())], revision=0, top_k=10)
    )
    assert pinned["revision"] == 0
    status, _ = reply_json(worker_b, request(inputs=[tensor_input(inputs[0].numpy())], min_revision=2))
    assert status == 404
    status, rolled = reply_json(worker_b, request(op="rollback", to_revision=0))
    assert status == 200 and rolled["revision"] == 2 and rolled["kind"] == "rollback"
    status, again = reply_json(worker_a, request(inputs=[tensor_input(inputs[0].numpy())], top_k=10))
    assert again["revision"] == 2
    assert_probabilities_close(
        [by_class(pairs(p), 10) for p in again["predictions"]],
        [by_class(pairs(p), 10) for p in pinned["predictions"]],
    )
    status, listing = reply_json(worker_a, request(op="revisions"))
    assert [r["kind"] for r in listing["revisions"]] == ["base", "step", "rollback"] and listing["head"] == 2
    status, reset = reply_json(worker_a, request(op="reset"))
    assert reset["revision"] == 3 and reset["step"] == 0


def test_momentum_continues_across_workers(
    lenet_export: ExportResult, digits: ImageData, tmp_path: Path
) -> None:
    """Two steps on two different workers equal two steps of one optimizer in one process."""
    config = ServiceConfig(revisions_dir=str(tmp_path / "revisions"))
    worker_a, worker_b = ModelService(lenet_export.out, config), ModelService(lenet_export.out, config)
    _, inputs = digit_batch(digits, 8, lenet_export.out)
    labels = digits.test_targets[:8].tolist()
    reply_json(worker_a, finetune_body(inputs, labels))
    status, second = reply_json(worker_b, finetune_body(inputs, labels))
    assert status == 200 and second["revision"] == 2 and second["step"] == 2

    card = load_card(lenet_export.out)
    reference = load_into(card.build_model(), load_weights(lenet_export.out / card.weights_file))
    buffers: dict[str, torch.Tensor] = {}
    for _ in range(2):
        _, buffers = sgd_step(reference, inputs, torch.tensor(labels), StepSettings(lr=0.05), buffers)
    served = worker_b.store.load(worker_b.store.get(2))  # type: ignore[union-attr]
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(served[name], tensor, rtol=1e-5, atol=1e-6)


def test_request_id_and_expected_revision(
    service: ModelService, digits: ImageData, lenet_export: ExportResult
) -> None:
    _, inputs = digit_batch(digits, 4, lenet_export.out)
    body = finetune_body(inputs, [0, 1, 2, 3], request_id="job-1")
    _, first = reply_json(service, body)
    _, repeat = reply_json(service, body)
    assert repeat["revision"] == first["revision"] == 1 and repeat["replayed"] is True
    assert repeat["loss_after"] == first["loss_after"]
    assert service.store is not None and service.store.head()[0] == 1
    status, stale = reply_json(service, finetune_body(inputs, [0, 1, 2, 3], expected_revision=0))
    assert status == 409 and stale["error"]["code"] == "ABORTED"
    status, fresh = reply_json(service, finetune_body(inputs, [0, 1, 2, 3], expected_revision=1))
    assert status == 200 and fresh["revision"] == 2


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"labels": [0, 1, 2, 10]}, 400, "labels"),
        ({"labels": [0, 1, 2, -1]}, 400, "labels"),
        ({"lr": -0.1}, 400, "lr"),
        ({"nan": True}, 400, "inputs[0].data"),
        ({"too_many": True}, 400, "inputs"),
    ],
)
def test_bad_finetune_requests_write_nothing(
    lenet_export: ExportResult,
    digits: ImageData,
    tmp_path: Path,
    change: dict[str, Any],
    status: int,
    field: str,
) -> None:
    service = ModelService(
        lenet_export.out, ServiceConfig(revisions_dir=str(tmp_path / "rev"), max_finetune_batch=4)
    )
    assert service.store is not None
    before = sorted((p.name, p.read_bytes()) for p in service.store.directory.iterdir())
    _, inputs = digit_batch(digits, 5 if change.get("too_many") else 4, lenet_export.out)
    if change.get("nan"):
        inputs[0, 0, 0, 0] = float("nan")
    labels = change.get("labels", list(range(len(inputs))))
    body = json.loads(finetune_body(inputs, labels)["body"])
    if "lr" in change:
        body["lr"] = change["lr"]
    got_status, reply = reply_json(service, {"body": json.dumps(body).encode()})
    assert got_status == status and reply["error"]["field_violations"][0]["field"] == field
    assert sorted((p.name, p.read_bytes()) for p in service.store.directory.iterdir()) == before


def test_without_a_store_the_base_is_served_and_finetune_is_refused(
    lenet_export: ExportResult, digits: ImageData
) -> None:
    service = ModelService(lenet_export.out, ServiceConfig(revisions_dir=None))
    _, inputs = digit_batch(digits, 2, lenet_export.out)
    status, body = reply_json(service, finetune_body(inputs, [0, 1]))
    assert status == 412 and "CNNSERVE_REVISIONS_DIR" in body["error"]["message"]
    status, info = reply_json(service, request(op="info"))
    assert status == 200 and info["fine_tuning"] is False and info["revision"] == 0
    assert info["parity"]["passed"] and info["input_shape"] == [1, 32, 32]


def test_torchscript_runtime_serves_the_same_answers(
    lenet_export: ExportResult, digits: ImageData, tmp_path: Path
) -> None:
    pngs, _ = digit_batch(digits, 4, lenet_export.out)
    onnx_service = ModelService(lenet_export.out, ServiceConfig(format="onnx"))
    script_service = ModelService(lenet_export.out, ServiceConfig(format="torchscript"))
    for png in pngs:
        query = request(inputs=[{"image_b64": base64.b64encode(png).decode()}], top_k=10)
        _, a = reply_json(onnx_service, query)
        _, b = reply_json(script_service, query)
        # By class index, not by rank: the order of near-zero tail classes is the kernels' to choose.
        # Each runtime is within RUNTIME_PROBABILITY_ATOL of eager PyTorch, so within twice that of the other.
        assert_probabilities_close(
            by_class(pairs(a["predictions"][0]), 10),
            by_class(pairs(b["predictions"][0]), 10),
            2 * RUNTIME_PROBABILITY_ATOL,
        )


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_service_on_cuda(lenet_export: ExportResult, digits: ImageData, tmp_path: Path) -> None:
    service = ModelService(
        lenet_export.out, ServiceConfig(device="cuda:0", format="torchscript", revisions_dir=str(tmp_path))
    )
    _, inputs = digit_batch(digits, 8, lenet_export.out)
    status, body = reply_json(service, finetune_body(inputs, list(range(8))))
    assert status == 200 and body["revision"] == 1
    status, body = reply_json(service, request(inputs=[tensor_input(inputs[0].numpy())]))
    assert status == 200 and body["device"] == "cuda:0" and body["revision"] == 1
