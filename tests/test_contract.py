"""The gateway-worker contract: raw bytes, JSON and the gateway's envelope parse into typed requests, and
each request's reply reads back as its own type."""

from __future__ import annotations

import asyncio
import base64
import json
from dataclasses import replace
from typing import Any

import grpc
import numpy as np
import pytest

from cnnserve.contract import (
    PACKED_MAGIC,
    PACKED_VERSION,
    ClassifyReply,
    ClassifyRequest,
    ClassScore,
    FineTuneReply,
    FineTuneRequest,
    InfoRequest,
    Operation,
    Prediction,
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
    is_packed,
    legacy_envelope,
    parse_request,
    read_reply,
)
from cnnserve.errors import (
    CnnserveError,
    ConflictError,
    FailedPreconditionError,
    InternalError,
    InvalidInputError,
)
from cnnserve.gateway.backend import TorchServeBackend
from cnnserve.serving.service import ModelService, ServiceConfig
from cnnserve.torchserve_api import inference_pb2, inference_pb2_grpc
from cnnserve_export.data import ImageData
from cnnserve_export.export import ExportResult
from tests.helpers import png_bytes


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


def test_an_older_gateways_envelope_still_parses() -> None:
    """``input.<i>`` per input, as gateways before the packed envelope send it (and JSON replies)."""
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
        "input.0": bytearray(b"png-bytes"),  # TorchServe hands the worker bytearrays
        "input.1": bytearray(inputs[1].data),
    }
    request = parse_request(raw)
    assert request == ClassifyRequest(inputs=inputs, top_k=2, min_revision=3, per_input_errors=True)
    assert request.reply == "json"  # an older gateway reads JSON only: it never asks for packed
    assert parse_request(legacy_envelope(request)) == request


def _mixed_inputs(count: int) -> tuple[RawInput, ...]:
    """``count`` inputs, alternately an encoded image and a tensor, each of its own length."""
    rng = np.random.default_rng(count)
    return tuple(
        RawInput(bytes(rng.integers(0, 256, 8 + i, dtype=np.uint8)))
        if i % 2 == 0
        else RawInput(rng.standard_normal((1, 2, i), dtype=np.float32).astype("<f4").tobytes(), (1, 2, i))
        for i in range(count)
    )


@pytest.mark.parametrize("count", [1, 2, 64])
def test_the_packed_envelope_is_one_blob_and_parses_into_views_of_it(count: int) -> None:
    sent = ClassifyRequest(_mixed_inputs(count), top_k=3, revision=2, per_input_errors=True)
    encoded = envelope(sent)
    assert set(encoded) == {"op", "meta", "inputs"}  # one entry for every input, not one each
    assert encoded["inputs"] == b"".join(i.data for i in sent.inputs)
    meta = json.loads(encoded["meta"])
    assert meta["reply"] == "packed"
    assert [d["bytes"] for d in meta["inputs"]] == [len(i.data) for i in sent.inputs]
    blob = bytearray(encoded["inputs"])  # what TorchServe hands the worker
    received = parse_request({**encoded, "inputs": blob})
    assert received == replace(sent, reply="packed")
    assert isinstance(received, ClassifyRequest)
    for item in received.inputs:  # views into the one blob, not copies
        assert isinstance(item.data, memoryview) and item.data.obj is blob and item.data.readonly


def test_the_packed_envelope_of_other_operations() -> None:
    step = FineTuneRequest(_mixed_inputs(3), (1, 2, 3), 0.05, request_id="r-1")
    assert parse_request(envelope(step)) == step
    for request in (ShapesRequest((1, 8, 8)), InfoRequest(), RollbackRequest(2)):  # no inputs: no blob
        encoded = envelope(request)
        assert "inputs" not in encoded
        assert parse_request(encoded) == request


def _packed(meta_inputs: object, blob: object, **raw: object) -> dict[str, object]:
    meta = {"inputs": meta_inputs, "top_k": 1}
    return {"op": b"classify", "meta": json.dumps(meta).encode(), "inputs": blob, **raw}


IMAGE = {"kind": "image", "bytes": 3}


@pytest.mark.parametrize(
    ("raw", "field", "says"),
    [
        (_packed([IMAGE], b"abcd"), "inputs", "describe 3 bytes but the inputs blob has 4"),
        (_packed([IMAGE, IMAGE], b"abcd"), "inputs[1].bytes", "need 6 bytes but the inputs blob has 4"),
        (_packed([{"kind": "image"}], b"abc"), "inputs[0].bytes", "length in bytes"),
        (_packed([{"kind": "image", "bytes": -1}], b""), "inputs[0].bytes", "length in bytes"),
        (_packed([{"kind": "image", "bytes": True}], b"a"), "inputs[0].bytes", "length in bytes"),
        (_packed([{"kind": "image", "bytes": "3"}], b"abc"), "inputs[0].bytes", "length in bytes"),
        (_packed([{"kind": "video", "bytes": 3}], b"abc"), "inputs[0].kind", "'image' or 'tensor'"),
        (_packed(["abc"], b"abc"), "inputs[0].kind", "'image' or 'tensor'"),
        (
            _packed([{"kind": "tensor", "bytes": 4, "shape": [0]}], b"abcd"),
            "inputs[0].shape",
            "not a valid shape",
        ),
        (_packed({"kind": "image"}, b"abc"), "meta.inputs", "a list"),
        (_packed([IMAGE], b"abc", **{"input.0": b"abc"}), "inputs", "not both"),
        (_packed([IMAGE], 3), "inputs", "expected bytes"),
        (_packed([], b""), "inputs", "at least one input"),  # a packed classify of 0 inputs
    ],
)
def test_packed_envelope_descriptors_that_lie_are_refused(
    raw: dict[str, object], field: str, says: str
) -> None:
    with pytest.raises(InvalidInputError, match=says) as caught:
        parse_request(raw)
    assert caught.value.violations[0].field == field


def test_a_tensor_whose_length_does_not_match_its_shape_fails_at_its_decoding() -> None:
    """Framing is the envelope's check; a framed tensor's own length against its shape is the tensor's
    (``check_tensor`` when decoded), so with per_input_errors it fails its own slot only."""
    raw = _packed([{"kind": "tensor", "shape": [1, 2, 2], "bytes": 12}], np.zeros(3, "<f4").tobytes())
    request = parse_request(raw)
    assert isinstance(request, ClassifyRequest)
    item = request.inputs[0]
    assert item.shape is not None
    with pytest.raises(InvalidInputError, match="12 bytes do not match shape") as caught:
        check_tensor(item.data, item.shape, "inputs[0]")
    assert caught.value.violations[0].field == "inputs[0].data"


@pytest.mark.parametrize(("reply", "field"), [({"reply": "xml"}, "reply"), ({"reply": 3}, "reply")])
def test_an_unknown_reply_format_is_refused(reply: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_request({"body": {"inputs": [{"image_b64": "aGk="}], **reply}})
    assert caught.value.violations[0].field == field
    assert parse_request({"body": {"inputs": [{"image_b64": "aGk="}], "reply": None}}) == ClassifyRequest(
        (RawInput(b"hi"),)
    )


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


# ---- the packed classify reply -----------------------------------------------------------------------


def _scores(rng: np.random.Generator, k: int) -> tuple[ClassScore, ...]:
    """``k`` distinct classes of 10 with float32 probabilities, best first (what a worker answers)."""
    indices = rng.permutation(10)[:k]
    probabilities = np.sort(rng.random(k, dtype=np.float32))[::-1]
    return tuple(
        ClassScore(f"class {i}", int(i), float(p)) for i, p in zip(indices, probabilities, strict=True)
    )


def _classify_reply(predictions: tuple[Prediction, ...]) -> ClassifyReply:
    return ClassifyReply(
        "lenet",
        "1.0",
        7,
        predictions,
        format="onnx",
        device="cpu",
        provider="CPUExecutionProvider",
        worker=4321,
        timing=WorkerTiming(1.25, 2.5, 3),
    )


def _same_reply(got: ClassifyReply, expected: ClassifyReply) -> None:
    """Equal, with errors compared by what they say (kind, message, violations), not by identity."""
    assert replace(got, predictions=()) == replace(expected, predictions=())
    assert len(got.predictions) == len(expected.predictions)
    for read, sent in zip(got.predictions, expected.predictions, strict=True):
        if isinstance(sent, CnnserveError):
            assert isinstance(read, type(sent))
            assert (read.kind, read.message, read.violations) == (sent.kind, sent.message, sent.violations)
        else:
            assert read == sent  # float32 probabilities travel exactly


@pytest.mark.parametrize("count", [0, 1, 64])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_packed_classify_replies_read_back_exactly(count: int, k: int) -> None:
    rng = np.random.default_rng(count * 100 + k)
    reply = _classify_reply(tuple(_scores(rng, k) for _ in range(count)))
    data = reply.to_packed()
    assert data.startswith(PACKED_MAGIC + bytes([PACKED_VERSION])) and is_packed(data)
    request = ClassifyRequest((RawInput(b"x"),) * max(count, 1), top_k=k)
    read = read_reply(request, data)
    _same_reply(read, reply)
    assert all(type(s) is ClassScore for p in read.predictions for s in p)  # type: ignore[union-attr]
    # The JSON reply of the same answer reads back the same, and the packed one is smaller once it has inputs.
    json_body = encode_json(reply.to_json())
    _same_reply(read_reply(request, json_body), reply)
    if count == 64:
        assert len(data) < len(json_body) / 2


def test_a_packed_reply_carries_per_input_errors_in_their_slots() -> None:
    rng = np.random.default_rng(3)
    bad_image = InvalidInputError.for_field("inputs[1].image", "not an image Pillow can decode")
    unstable = FailedPreconditionError("revision 7 of lenet produced non-finite scores for inputs[3]")
    predictions = (_scores(rng, 3), bad_image, _scores(rng, 3), unstable, _scores(rng, 3))
    reply = _classify_reply(predictions)
    _same_reply(
        read_reply(ClassifyRequest((RawInput(b"x"),) * 5, per_input_errors=True), reply.to_packed()), reply
    )
    every_input_failed = _classify_reply((bad_image, unstable))
    read = ClassifyReply.from_packed(every_input_failed.to_packed())
    _same_reply(read, every_input_failed)


def _with_header(data: bytes, **changes: object) -> bytes:
    """``data`` (a packed reply) with its JSON header's fields changed; the arrays as they were."""
    length = int.from_bytes(data[5:9], "little")
    header = {**json.loads(data[9 : 9 + length]), **changes}
    encoded = json.dumps(header).encode()
    return data[:5] + len(encoded).to_bytes(4, "little") + encoded + data[9 + length :]


def _corruptions() -> list[tuple[str, bytes]]:
    rng = np.random.default_rng(5)
    good = _classify_reply((_scores(rng, 2), InvalidInputError("bad"), _scores(rng, 2))).to_packed()
    length = int.from_bytes(good[5:9], "little")
    header = json.loads(good[9 : 9 + length])
    unnamed = {k: v for k, v in header["labels"].items() if k != next(iter(header["labels"]))}
    return [
        ("truncated", good[:-1]),
        ("one byte more", good + b"\0"),
        ("only the prefix", good[:7]),
        ("a newer version", good[:4] + bytes([PACKED_VERSION + 1]) + good[5:]),
        ("header length past the end", good[:5] + (len(good)).to_bytes(4, "little") + good[9:]),
        ("header not JSON", good[:9] + b"\xff" * length + good[9 + length :]),
        ("header a list", good[:5] + (2).to_bytes(4, "little") + b"[]" + good[9 + length :]),
        ("rows a lie", _with_header(good, rows=4)),
        ("k negative", _with_header(good, k=-2)),
        ("rows a bool", _with_header(good, rows=True)),
        ("no model", good[:9] + good[9 : 9 + length].replace(b'"model"', b'"mdoel"') + good[9 + length :]),
        ("an index it does not name", _with_header(good, labels=unnamed)),
        ("labels a list", _with_header(good, labels=[[1, "one"]])),
        ("a negative label index", _with_header(good, labels={**header["labels"], "-1": "x"})),
        ("errors not a list", _with_header(good, errors={"1": {"code": "INTERNAL"}})),
        ("an error slot outside the inputs", _with_header(good, errors=[[3, {"code": "INTERNAL"}]])),
        ("an error that is no pair", _with_header(good, errors=[[1]])),
        ("an error's violations not objects", _with_header(good, errors=[[1, {"field_violations": [3]}]])),
    ]


@pytest.mark.parametrize(("what", "data"), _corruptions(), ids=[what for what, _ in _corruptions()])
def test_a_corrupted_packed_reply_is_internal_not_a_crash(what: str, data: bytes) -> None:
    request = ClassifyRequest((RawInput(b"x"),) * 3, per_input_errors=True)
    with pytest.raises(InternalError, match="unreadable classify reply"):
        read_reply(request, data)


def test_only_classify_reads_a_packed_reply() -> None:
    data = _classify_reply(()).to_packed()
    with pytest.raises(InternalError, match="unreadable info reply"):
        read_reply(InfoRequest(), data)
    assert not is_packed(encode_json({"model": "lenet"})) and not is_packed("text")


# ---- both sides: a real worker answers the packed envelope packed, everything else in JSON ----------------


@pytest.fixture
def worker(lenet_export: ExportResult) -> ModelService:
    return ModelService(lenet_export.out, ServiceConfig())


def _digits(digits: ImageData, count: int) -> list[bytes]:
    return [png_bytes(image[0].numpy()) for image in digits.test_images[:count]]


@pytest.mark.parametrize("count", [1, 64])
def test_a_worker_answers_the_gateways_envelope_packed_and_an_older_one_in_json(
    worker: ModelService, digits: ImageData, count: int
) -> None:
    pngs = _digits(digits, count)
    request = ClassifyRequest(tuple(RawInput(png) for png in pngs), top_k=3)
    (packed,) = worker.handle([envelope(request)])
    (legacy,) = worker.handle([legacy_envelope(request)])
    as_json = {"inputs": [{"image_b64": base64.b64encode(p).decode()} for p in pngs], "top_k": 3}
    (direct,) = worker.handle([{"body": json.dumps(as_json).encode()}])
    assert (packed.status, packed.content_type) == (200, "application/octet-stream")
    assert is_packed(packed.body)
    for reply in (legacy, direct):  # clients that did not ask for packed get JSON, as before
        assert (reply.status, reply.content_type) == (200, "application/json")
        assert len(json.loads(reply.body)["predictions"]) == count
    from_packed, from_json = read_reply(request, packed.body), read_reply(request, legacy.body)
    assert from_packed.predictions == from_json.predictions  # the same float32 probabilities, same order
    assert all(not isinstance(p, CnnserveError) and len(p) == 3 for p in from_packed.predictions)
    assert len(packed.body) < len(legacy.body)


def test_a_worker_packs_slot_errors_and_top_k_above_the_classes(
    worker: ModelService, digits: ImageData
) -> None:
    png = _digits(digits, 1)[0]
    tensor = np.zeros((1, *worker.card.input_shape), "<f4").tobytes()
    inputs = (RawInput(png), RawInput(b"not an image"), RawInput(tensor, (1, *worker.card.input_shape)))
    request = ClassifyRequest(inputs, top_k=50, per_input_errors=True)  # LeNet has 10 classes
    (packed,) = worker.handle([envelope(request)])
    (legacy,) = worker.handle([legacy_envelope(request)])
    from_packed, from_json = read_reply(request, packed.body), read_reply(request, legacy.body)
    for reply in (from_packed, from_json):
        first, bad, last = reply.predictions
        assert isinstance(bad, InvalidInputError) and bad.violations[0].field == "inputs[1].image"
        for scores in (first, last):
            assert not isinstance(scores, CnnserveError)
            assert sorted(s.index for s in scores) == list(range(10))  # k = min(top_k, classes)
            assert [s.label for s in scores] == [worker.card.labels[s.index] for s in scores]
            assert sum(s.probability for s in scores) == pytest.approx(1.0, abs=1e-5)
    assert from_packed.predictions[0] == from_json.predictions[0]
    assert from_packed.predictions[2] == from_json.predictions[2]
    # Without per_input_errors the bad input fails the request, in JSON, whatever the reply asked.
    (failed,) = worker.handle([envelope(replace(request, per_input_errors=False))])
    assert (failed.status, failed.content_type) == (400, "application/json")
    with pytest.raises(InvalidInputError, match=r"inputs\[1\]\.image"):
        read_reply(request, failed.body)


def _reference_top_k(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """What the worker answered per input before the batched top-k (one row, in Python)."""
    shifted = np.exp(logits - logits.max())
    probabilities = shifted / shifted.sum()
    order = np.argsort(-probabilities, kind="stable")[: min(k, len(probabilities))]
    return [(int(i), float(probabilities[i])) for i in order]


def test_the_batched_top_k_keeps_the_per_input_order_and_probabilities() -> None:
    rng = np.random.default_rng(11)
    logits = rng.standard_normal((64, 10)).astype(np.float32) * 4  # (N, classes)
    logits[3] = 1.5  # a row of ties: stable order, class 0 first
    logits[5, [2, 7]] = logits[5].max() + 1  # a tie for the best
    for k in (1, 5, 10, 20):
        indices, probabilities = ModelService._top_k(logits, k)  # (N, min(k, 10))
        assert indices.shape == probabilities.shape == (64, min(k, 10))
        assert probabilities.dtype == np.float32
        for row in range(64):
            expected = _reference_top_k(logits[row], k)
            assert indices[row].tolist() == [i for i, _ in expected]
            np.testing.assert_allclose(probabilities[row], [p for _, p in expected], rtol=1e-6, atol=0)
    assert ModelService._top_k(logits, 10)[0][3].tolist() == list(range(10))
    assert ModelService._top_k(logits, 2)[0][5].tolist() == [2, 7]


# ---- a new gateway and an archive older than the packed envelope ------------------------------------------


class _OlderWorker(inference_pb2_grpc.InferenceAPIsServiceServicer):  # type: ignore[misc]
    """TorchServe with an archive built before the packed envelope: input.<i> only, JSON replies."""

    def __init__(self) -> None:
        self.inputs_seen: list[set[str]] = []

    async def Predictions(self, request: Any, context: Any) -> Any:  # noqa: N802 (the proto's name)
        self.inputs_seen.append(set(request.input))
        meta = json.loads(request.input["meta"])
        if meta["top_k"] > 5:
            error = InvalidInputError.for_field("top_k", "this model answers at most 5")
            return inference_pb2.PredictionResponse(prediction=encode_json(error_json(error)))
        missing = [i for i in range(len(meta["inputs"])) if f"input.{i}" not in request.input]
        if missing:  # what cnnserve's parse_request answered before the packed envelope
            error = InvalidInputError.for_field(
                f"input.{missing[0]}", "described in meta.inputs but not sent"
            )
            return inference_pb2.PredictionResponse(prediction=encode_json(error_json(error)))
        reply = _classify_reply(tuple((ClassScore("3", 3, 0.5),) for _ in meta["inputs"]))
        return inference_pb2.PredictionResponse(prediction=encode_json(reply.to_json()))


def test_the_gateway_backend_falls_back_to_the_legacy_envelope_for_an_older_worker() -> None:
    async def scenario() -> None:
        server = grpc.aio.server()
        older = _OlderWorker()
        inference_pb2_grpc.add_InferenceAPIsServiceServicer_to_server(older, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        backend = TorchServeBackend(f"127.0.0.1:{port}", f"127.0.0.1:{port}")
        try:
            request = ClassifyRequest((RawInput(b"a"), RawInput(b"b")), top_k=1)
            for _ in range(2):
                reply = await backend.call("lenet", "", request, timeout=30)
                assert reply.predictions == ((ClassScore("3", 3, 0.5),),) * 2
            # The packed envelope once, then the legacy one: the second call does not try packed again.
            legacy = {"op", "meta", "input.0", "input.1"}
            assert older.inputs_seen == [{"op", "meta", "inputs"}, legacy, legacy]
            with pytest.raises(InvalidInputError, match="at most 5"):  # other refusals are not retried
                await backend.call("alexnet", "", replace(request, top_k=9), timeout=30)
            assert len(older.inputs_seen) == 4 and "inputs" in older.inputs_seen[-1]
        finally:
            await backend.close()
            await server.stop(None)

    asyncio.run(scenario())
