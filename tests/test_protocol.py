"""The handler's request protocol: raw bytes, JSON and the gateway's envelope parse into typed requests."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from cnnserve.errors import InvalidInputError
from cnnserve.serving.protocol import (
    ClassifyRequest,
    FineTuneRequest,
    InfoRequest,
    RawInput,
    ResetRequest,
    RollbackRequest,
    ShapesRequest,
    describe_inputs,
    parse_request,
)


def test_raw_bytes_are_one_image() -> None:
    request = parse_request({"body": bytearray(b"\x89PNG....")})
    assert request == ClassifyRequest(inputs=(RawInput(b"\x89PNG...."),))


def test_json_body_decoded_by_torchserve_or_not() -> None:
    tensor = {"shape": [1, 2, 2], "data": [0.0, 1.0, 2.0, 3.0]}
    for body in ({"inputs": [tensor], "top_k": 3}, json.dumps({"inputs": [tensor], "top_k": 3}).encode()):
        request = parse_request({"body": body})
        assert isinstance(request, ClassifyRequest) and request.top_k == 3
        assert request.inputs[0].shape == (1, 2, 2)
        assert np.frombuffer(request.inputs[0].data, "<f4").tolist() == [0.0, 1.0, 2.0, 3.0]


def test_bare_tensor_and_base64_forms() -> None:
    data = np.arange(4, dtype="<f4")
    request = parse_request(
        {"body": {"shape": [1, 2, 2], "data_b64": base64.b64encode(data.tobytes()).decode()}}
    )
    assert isinstance(request, ClassifyRequest) and request.inputs[0].data == data.tobytes()
    image = parse_request({"data": {"inputs": [{"image_b64": base64.b64encode(b"img").decode()}]}})
    assert isinstance(image, ClassifyRequest) and image.inputs[0] == RawInput(b"img")


def test_envelope_carries_raw_bytes() -> None:
    inputs = (RawInput(b"png-bytes"), RawInput(np.zeros(4, "<f4").tobytes(), (1, 2, 2)))
    meta = {"inputs": describe_inputs(inputs), "top_k": 2, "min_revision": 3, "per_input_errors": True}
    raw = {
        "op": b"classify",
        "meta": json.dumps(meta).encode(),
        "input.0": b"png-bytes",
        "input.1": inputs[1].data,
    }
    request = parse_request(raw)
    assert request == ClassifyRequest(inputs=inputs, top_k=2, min_revision=3, per_input_errors=True)


def test_other_operations() -> None:
    assert parse_request({"body": {"op": "shapes", "input_shape": [3, 64, 64]}}) == ShapesRequest((3, 64, 64))
    assert parse_request({"body": {"op": "shapes"}}) == ShapesRequest(None)
    assert parse_request({"body": {"op": "info"}}) == InfoRequest()
    assert parse_request({"body": {"op": "rollback", "to_revision": 2}}) == RollbackRequest(2)
    assert parse_request({"op": b"reset"}) == ResetRequest()
    step = parse_request(
        {
            "body": {
                "op": "finetune",
                "inputs": [{"shape": [1], "data": [0.5]}],
                "labels": [3],
                "lr": 0.1,
                "request_id": "abc",
                "expected_revision": 4,
                "train_layers": "classifier",
            }
        }
    )
    assert isinstance(step, FineTuneRequest)
    assert (
        step.labels,
        step.lr,
        step.momentum,
        step.request_id,
        step.expected_revision,
        step.train_layers,
    ) == (
        (3,),
        0.1,
        0.9,
        "abc",
        4,
        "classifier",
    )


FINETUNE = {"op": "finetune", "inputs": [{"shape": [1], "data": [0.5]}], "labels": [1], "lr": 0.1}


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({}, "body"),
        ({"body": b""}, "body"),
        ({"body": b"{not json"}, "body"),
        ({"body": {"op": "explode"}}, "op"),
        ({"body": {"inputs": []}}, "inputs"),
        ({"body": {"inputs": [{"shape": [1, 2], "data": "nope"}]}}, "inputs[0].data"),
        ({"body": {"inputs": [{"shape": [0, 2], "data": []}]}}, "inputs[0].shape"),
        ({"body": {"inputs": [{"image_b64": "%%%"}]}}, "inputs[0].image_b64"),
        ({"body": {"inputs": [{"image_b64": "aGk="}], "top_k": 0}}, "top_k"),
        ({"body": {"inputs": [{"image_b64": "aGk="}], "revision": -1}}, "revision"),
        ({"body": {**FINETUNE, "lr": 0}}, "lr"),
        ({"body": {**FINETUNE, "lr": float("inf")}}, "lr"),
        ({"body": {**FINETUNE, "labels": [1, 2]}}, "labels"),
        ({"body": {**FINETUNE, "labels": ["a"]}}, "labels"),
        ({"body": {**FINETUNE, "momentum": 1.0}}, "momentum"),
        ({"body": {**FINETUNE, "weight_decay": -1}}, "weight_decay"),
        ({"body": {**FINETUNE, "train_layers": "features"}}, "train_layers"),
        ({"body": {**FINETUNE, "request_id": ""}}, "request_id"),
        ({"body": {"op": "rollback"}}, "to_revision"),
        ({"op": b"classify", "meta": b'{"inputs": [{"kind": "image"}]}'}, "input.0"),
        ({"op": b"classify", "meta": b'{"inputs": [{"kind": "video"}]}', "input.0": b"x"}, "inputs[0].kind"),
    ],
)
def test_bad_requests_name_the_field(raw: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_request(raw)
    assert caught.value.violations[0].field == field
