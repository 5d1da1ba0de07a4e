"""The gateway-worker contract: raw bytes, JSON and the gateway's envelope parse into typed requests, and
each request's reply reads back as its own type."""

from __future__ import annotations

import base64
import json
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from cnnserve.contract import (
    ClassifyReply,
    ClassifyRequest,
    ClassScore,
    FineTuneReply,
    FineTuneRequest,
    InfoRequest,
    Operation,
    RawInput,
    ResetRequest,
    RevisionChangeReply,
    RevisionInfo,
    RevisionsReply,
    RevisionsRequest,
    RollbackRequest,
    ShapesRequest,
    WorkerTiming,
    check_tensor,
    encode_json,
    envelope,
    error_json,
    parse_request,
    read_reply,
)
from cnnserve.errors import ConflictError, InternalError, InvalidInputError


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
    meta = {
        "inputs": [{"kind": "image"}, {"kind": "tensor", "shape": [1, 2, 2]}],
        "top_k": 2,
        "min_revision": 3,
        "per_input_errors": True,
    }
    raw = {
        "op": b"classify",
        "meta": json.dumps(meta).encode(),
        "input.0": b"png-bytes",
        "input.1": inputs[1].data,
    }
    request = parse_request(raw)
    assert request == ClassifyRequest(inputs=inputs, top_k=2, min_revision=3, per_input_errors=True)
    assert parse_request(envelope(request)) == request  # what the gateway sends is what the worker reads


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


# ---- replies: what the worker writes, the gateway reads back as the request's own type -------------------


def _revision(number: int, kind: str = "step") -> RevisionInfo:
    return RevisionInfo(number, kind, number - 1, number, "ab" * 32, 1.5, False, f"id-{number}")


REPLIES = [
    (
        ClassifyRequest((RawInput(b"x"), RawInput(b"y")), per_input_errors=True),
        ClassifyReply(
            "lenet",
            "1.0",
            3,
            (
                (ClassScore("7", 7, 0.75), ClassScore("1", 1, 0.25)),
                InvalidInputError.for_field("inputs[1]", "bad"),
            ),
            format="onnx",
            device="cpu",
            provider="CPUExecutionProvider",
            worker=1234,
            timing=WorkerTiming(1.25, 2.5, 2),
        ),
    ),
    (
        FineTuneRequest((RawInput(b"x"),), (1,), 0.01),
        FineTuneReply("lenet", "1.0", 4, 3, 4, 2.0, 1.5, 0.5, 7.0, 1, "all", 0.01, True, 2.5, False),
    ),
    (
        RevisionsRequest(),
        RevisionsReply("lenet", 2, (_revision(0, "base"), _revision(1), _revision(2)), True),
    ),
    (RollbackRequest(1), RevisionChangeReply("lenet", "1.0", _revision(3, "rollback"), 1)),
    (ResetRequest(), RevisionChangeReply("lenet", "1.0", _revision(4, "reset"), 0)),
]


@pytest.mark.parametrize(("request_", "reply"), REPLIES, ids=lambda r: type(r).__name__)
def test_each_reply_reads_back_as_its_own_type(request_: Operation[Any], reply: Any) -> None:
    read = read_reply(request_, encode_json(reply.to_json()))
    if isinstance(reply, ClassifyReply):  # errors compare by what they say, not by identity
        scores, error = read.predictions
        assert scores == reply.predictions[0]
        assert isinstance(error, InvalidInputError) and error.violations[0].field == "inputs[1]"
        assert replace(read, predictions=()) == replace(reply, predictions=())
    else:
        assert read == reply


def test_an_error_reply_raises_the_error_it_names_and_garbage_is_internal() -> None:
    body = encode_json(error_json(ConflictError("lenet is at revision 3, not the expected 2")))
    with pytest.raises(ConflictError, match="not the expected 2"):
        read_reply(InfoRequest(), body)
    for garbage in (b"not json", b"[1, 2]", b'{"model": "lenet"}'):
        with pytest.raises(InternalError, match="unreadable info reply"):
            read_reply(InfoRequest(), garbage)


def test_requests_check_themselves_wherever_they_are_built() -> None:
    """The gateway builds the same types before the hop that the worker parses on arrival: one check."""
    one = (RawInput(b"x"),)
    for bad, field in [
        (lambda: ClassifyRequest(()), "inputs"),
        (lambda: ClassifyRequest(one, top_k=1001), "top_k"),
        (lambda: ClassifyRequest(one, min_revision=-1), "min_revision"),
        (lambda: FineTuneRequest(one, (1, 2), 0.1), "labels"),
        (lambda: FineTuneRequest(one, (1,), float("nan")), "lr"),
        (lambda: FineTuneRequest(one, (1,), 0.1, max_grad_norm=-1.0), "max_grad_norm"),
        (lambda: FineTuneRequest(one, (1,), 0.1, request_id="x" * 129), "request_id"),
    ]:
        with pytest.raises(InvalidInputError) as caught:
            bad()
        assert caught.value.violations[0].field == field


def test_tensor_checks_name_the_field_they_are_given() -> None:
    data = np.zeros(4, "<f4").tobytes()
    assert check_tensor(data, [1, 2, 2], "inputs[0].tensor") == (1, 2, 2)
    with pytest.raises(InvalidInputError) as caught:
        check_tensor(data[:-4], [1, 2, 2], "inputs[0].tensor")
    assert caught.value.violations[0].field == "inputs[0].tensor.data"
    with pytest.raises(InvalidInputError, match="NaN"):
        check_tensor(np.full(4, np.nan, "<f4").tobytes(), [4], "inputs[0]")
