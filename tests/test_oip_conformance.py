"""The OIP REST API against the protocol's own OpenAPI document, and against malformed requests.

Every JSON answer is validated against the matching schema of ``tests/data/open_inference_rest.yaml`` (the
public OIP repository's copy, unchanged): successes against ``metadata_server_response``,
``metadata_model_response`` and ``inference_response``, errors against the ``*_error_response`` schemas and,
since those leave ``error`` optional, also for ``{"error": <str>}``. Answers in Triton's binary-tensor
extension carry their JSON header first; outputs sent as binary have a ``binary_data_size`` parameter in place
of ``data`` (the extension's rule), so the header is checked against ``inference_response`` with that one
requirement relaxed, per output that has the parameter.

No request, however malformed, may get a 5xx: a table of them (bodies that are not JSON, wrong types,
missing fields, absurd shapes, data that does not fill its shape, unknown datatypes, binary headers whose
lengths lie, unknown models and versions) and a small derandomized hypothesis fuzz. Bad input is 400,
an unknown model or version 404.
"""

from __future__ import annotations

import base64
import copy
import http.client
import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cnnserve.client import ClassifierClient
from cnnserve.gateway.types import ClassScore, TensorInput
from cnnserve.preprocess import Preprocessing, prepare_images
from cnnserve_export.data import ImageData
from cnnserve_export.export import ExportResult
from tests.gateway_helpers import GatewayThread
from tests.helpers import PROBABILITY_ATOL, assert_probabilities_close, assert_top_k, by_class, png_bytes

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]

SPEC_FILE = Path(__file__).resolve().parent / "data" / "open_inference_rest.yaml"
HEADER_LENGTH = "Inference-Header-Content-Length"
MODEL = "lenet"
INFER = f"/v2/models/{MODEL}/infer"
REVISION = 0  # pinned on both sides: other tests fine-tune the session's LeNet


# ---- the OpenAPI document as JSON Schema ------------------------------------------------------------


def _spec() -> dict[str, Any]:
    spec: dict[str, Any] = yaml.safe_load(SPEC_FILE.read_text())
    assert spec["openapi"].startswith("3.0"), spec["openapi"]
    return spec


SPEC = _spec()


def _binary_components() -> dict[str, Any]:
    """The components with ``response_output.data`` optional: the binary extension's outputs omit it."""
    components = copy.deepcopy(SPEC["components"])
    output = components["schemas"]["response_output"]
    output["required"] = [name for name in output["required"] if name != "data"]
    return components


def validator(name: str, components: dict[str, Any] | None = None) -> jsonschema.Draft4Validator:
    """A validator of one ``components/schemas`` entry; its ``$ref``s resolve within the components.

    OpenAPI 3.0 schema objects are a subset of JSON Schema draft 4 (plus keywords such as ``x-examples``,
    which validators ignore); a draft-4 ``$ref`` ignores its siblings, so the components ride along.
    """
    schema = {"$ref": f"#/components/schemas/{name}", "components": components or SPEC["components"]}
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


SCHEMAS = {name: validator(name) for name in SPEC["components"]["schemas"]}
BINARY_RESPONSE = validator("inference_response", _binary_components())


def assert_valid(schema: str, document: Any) -> None:
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in SCHEMAS[schema].iter_errors(document)
    ]
    assert not errors, f"not a valid {schema}: {errors} in {json.dumps(document)[:500]}"


# ---- talking HTTP -------------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), (
            self.status,
            self.headers,
        )
        return json.loads(self.body)

    def infer_document(self) -> tuple[Any, bytes]:
        """An inference answer's JSON (the header, in the binary extension) and the binary data after it."""
        if HEADER_LENGTH.lower() in self.headers:
            length = int(self.headers[HEADER_LENGTH.lower()])
            return json.loads(self.body[:length]), self.body[length:]
        return self.json(), b""


@dataclass
class Rest:
    host: str
    port: int
    calls: list[tuple[str, str, int]] = field(default_factory=list)

    def call(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Answer:
        connection = http.client.HTTPConnection(self.host, self.port, timeout=120)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            answer = Answer(
                response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
            )
        finally:
            connection.close()
        self.calls.append((method, path, answer.status))
        return answer

    def get(self, path: str) -> Answer:
        return self.call("GET", path)

    def post_json(self, path: str, document: Any, headers: dict[str, str] | None = None) -> Answer:
        return self.call(
            "POST",
            path,
            json.dumps(document).encode(),
            {"Content-Type": "application/json", **(headers or {})},
        )


@pytest.fixture(scope="module")
def rest(gateway: GatewayThread) -> Iterator[Rest]:
    url = urlsplit(gateway.http_url)
    assert url.hostname and url.port, gateway.http_url
    yield Rest(url.hostname, url.port)


def assert_error(answer: Answer, status: int, schema: str = "inference_error_response") -> str:
    """``answer`` is ``status`` with ``{"error": <str>}``, valid against ``schema``; returns the message."""
    assert answer.status == status, (answer.status, answer.body[:300])
    document = answer.json()
    assert_valid(schema, document)
    assert isinstance(document.get("error"), str) and document["error"], document
    assert "Traceback" not in document["error"]
    return str(document["error"])


# ---- inputs and cnnserve.v1's answers to them --------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    batch: Any  # float32 (N, 1, 32, 32), preprocessed
    pngs: tuple[bytes, ...]
    tensors: Any  # Classify's probabilities for ``batch``, (N, classes)
    images: Any  # ... and for ``pngs``
    classes: int


def _rows(predictions: tuple[tuple[ClassScore, ...], ...], classes: int) -> Any:
    return np.array([by_class([(s.index, s.probability) for s in row], classes) for row in predictions])


@pytest.fixture(scope="module")
def inputs(client: ClassifierClient, digits: ImageData, lenet_export: ExportResult) -> Inputs:
    batch = prepare_images(digits.test_images[:3], Preprocessing.from_card(lenet_export.card)).numpy()
    batch = batch.astype(np.float32)  # (3, 1, 32, 32)
    pngs = tuple(png_bytes(image[0].numpy()) for image in digits.test_images[3:5])
    classes = lenet_export.card.num_classes
    tensors = [TensorInput(tuple(item.shape), item.astype("<f4").tobytes()) for item in batch]
    by_tensor = client.classify(MODEL, tensors, top_k=classes, revision=REVISION)
    by_image = client.classify(MODEL, list(pngs), top_k=classes, revision=REVISION)
    return Inputs(
        batch, pngs, _rows(by_tensor.predictions, classes), _rows(by_image.predictions, classes), classes
    )


def fp32_json(batch: Any, nested: bool = False) -> dict[str, Any]:
    data = batch.tolist() if nested else batch.reshape(-1).tolist()
    return {"name": "input", "datatype": "FP32", "shape": list(batch.shape), "data": data}


def bytes_json(pngs: tuple[bytes, ...]) -> dict[str, Any]:
    data = [base64.b64encode(png).decode() for png in pngs]
    return {"name": "image", "datatype": "BYTES", "shape": [len(pngs)], "data": data}


def pinned(**extra: Any) -> dict[str, Any]:
    return {"revision": REVISION, **extra}


def probabilities(document: Any, binary: bytes = b"") -> Any:
    (output,) = document["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32"
    if "data" in output:
        values = np.array(output["data"], dtype=np.float64)
    else:
        assert output["parameters"]["binary_data_size"] == len(binary)
        values = np.frombuffer(binary, dtype="<f4").astype(np.float64)
    return values.reshape(output["shape"])


# ---- health, metadata ---------------------------------------------------------------------------------


def test_health_and_readiness(rest: Rest) -> None:
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        f"/v2/models/{MODEL}/ready",
        f"/v2/models/{MODEL}/versions/1.0/ready",
    ):
        assert rest.get(path).status == 200, path
    assert_error(rest.get("/v2/models/no-such-model/ready"), 404, "metadata_model_error_response")
    assert_error(rest.get(f"/v2/models/{MODEL}/versions/9.9/ready"), 404, "metadata_model_error_response")


def test_server_metadata_matches_the_schema(rest: Rest) -> None:
    for path in ("/v2", "/v2/"):
        answer = rest.get(path)
        assert answer.status == 200
        document = answer.json()
        assert_valid("metadata_server_response", document)
        assert document["name"] == "cnnserve"
        assert {"classification", "binary_tensor_data"} <= set(document["extensions"])


def test_model_metadata_matches_the_schema(rest: Rest, lenet_export: ExportResult) -> None:
    c, h, w = lenet_export.card.input_shape
    for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1.0", "/v2/models/alexnet"):
        answer = rest.get(path)
        assert answer.status == 200, (path, answer.body[:300])
        assert_valid("metadata_model_response", answer.json())
    document = rest.get(f"/v2/models/{MODEL}").json()
    assert document["name"] == MODEL and "1.0" in document["versions"]
    assert {(t["name"], t["datatype"], tuple(t["shape"])) for t in document["inputs"]} == {
        ("input", "FP32", (-1, c, h, w)),
        ("image", "BYTES", (-1,)),
    }
    assert [(t["name"], t["datatype"], t["shape"]) for t in document["outputs"]] == [
        ("probabilities", "FP32", [-1, lenet_export.card.num_classes])
    ]
    for path in (
        "/v2/models/no-such-model",
        f"/v2/models/{MODEL}/versions/9.9",
        "/v2/models/no-such-model/config",
    ):
        assert_error(rest.get(path), 404, "metadata_model_error_response")


def test_model_config_and_repository_index(rest: Rest, lenet_export: ExportResult) -> None:
    config = rest.get(f"/v2/models/{MODEL}/config")
    assert config.status == 200
    document = config.json()
    assert document["name"] == MODEL and document["max_batch_size"] >= 1
    inputs = {entry["name"]: entry for entry in document["input"]}
    assert inputs["input"]["data_type"] == "TYPE_FP32" and inputs["input"]["dims"] == list(
        lenet_export.card.input_shape
    )
    index = rest.call("POST", "/v2/repository/index", b"{}", {"Content-Type": "application/json"})
    assert index.status == 200
    entries = {entry["name"]: entry for entry in index.json()}
    assert {"lenet", "alexnet"} <= set(entries) and entries["lenet"]["state"] == "READY"


# ---- inference: JSON and binary, against the schema and against Classify --------------------------------


def test_json_inference_matches_the_schema_and_classify(rest: Rest, inputs: Inputs) -> None:
    for nested in (False, True):  # tensor data flat in row-major order, or nested as the shape
        answer = rest.post_json(
            INFER, {"id": "req-7", "inputs": [fp32_json(inputs.batch, nested)], "parameters": pinned()}
        )
        assert answer.status == 200, answer.body[:500]
        document = answer.json()
        assert_valid("inference_response", document)
        assert document["model_name"] == MODEL and document["model_version"] == "1.0"
        assert document["id"] == "req-7" and document["parameters"]["revision"] == REVISION
        assert_probabilities_close(probabilities(document), inputs.tensors, PROBABILITY_ATOL)

    answer = rest.post_json(
        f"/v2/models/{MODEL}/versions/1.0/infer",
        {"inputs": [bytes_json(inputs.pngs)], "parameters": pinned()},
    )
    assert answer.status == 200, answer.body[:500]
    document = answer.json()
    assert_valid("inference_response", document)
    assert_probabilities_close(probabilities(document), inputs.images, PROBABILITY_ATOL)


def test_classification_extension_in_json(rest: Rest, inputs: Inputs) -> None:
    request = {
        "inputs": [bytes_json(inputs.pngs)],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
        "parameters": pinned(),
    }
    answer = rest.post_json(INFER, request)
    assert answer.status == 200, answer.body[:500]
    document = answer.json()
    assert_valid("inference_response", document)
    (output,) = document["outputs"]
    assert output["datatype"] == "BYTES" and output["shape"] == [len(inputs.pngs), 3]
    rows = np.array(output["data"], dtype=object).reshape(len(inputs.pngs), 3)
    for row, expected in zip(rows, inputs.images, strict=True):
        scores = [item.split(":") for item in row]
        assert_top_k([(int(index), float(score)) for score, index, _ in scores], expected, PROBABILITY_ATOL)


def binary_request(document: dict[str, Any], *blobs: bytes) -> tuple[bytes, dict[str, str]]:
    header = json.dumps(document).encode()
    headers = {HEADER_LENGTH: str(len(header)), "Content-Type": "application/octet-stream"}
    return header + b"".join(blobs), headers


def binary_bytes(pngs: tuple[bytes, ...]) -> bytes:
    return b"".join(struct.pack("<I", len(png)) + png for png in pngs)


def test_binary_tensor_extension(rest: Rest, inputs: Inputs) -> None:
    raw = inputs.batch.astype("<f4").tobytes()
    tensor = {
        "name": "input",
        "datatype": "FP32",
        "shape": list(inputs.batch.shape),
        "parameters": {"binary_data_size": len(raw)},
    }
    cases = [
        ({"binary_data_output": True}, [], True),  # every output binary
        ({}, [{"name": "probabilities", "parameters": {"binary_data": True}}], True),
        ({}, [{"name": "probabilities", "parameters": {"binary_data": False}}], False),
        ({}, [], False),  # binary input, JSON output: the default without binary_data_output
    ]
    for parameters, outputs, binary in cases:
        body, headers = binary_request(
            {"inputs": [tensor], "outputs": outputs, "parameters": pinned(**parameters)}, raw
        )
        answer = rest.call("POST", INFER, body, headers)
        assert answer.status == 200, answer.body[:500]
        document, data = answer.infer_document()
        assert (HEADER_LENGTH.lower() in answer.headers) is binary
        errors = list(BINARY_RESPONSE.iter_errors(document))
        assert not errors, errors
        for output in document["outputs"]:  # the extension's rule: binary_data_size where data is left out
            assert ("data" in output) is not ("binary_data_size" in output.get("parameters", {})), output
        assert_probabilities_close(probabilities(document, data), inputs.tensors, PROBABILITY_ATOL)

    blob = binary_bytes(inputs.pngs)
    image = {
        "name": "image",
        "datatype": "BYTES",
        "shape": [len(inputs.pngs)],
        "parameters": {"binary_data_size": len(blob)},
    }
    body, headers = binary_request({"inputs": [image], "parameters": pinned(binary_data_output=True)}, blob)
    answer = rest.call("POST", INFER, body, headers)
    assert answer.status == 200, answer.body[:500]
    document, data = answer.infer_document()
    assert not list(BINARY_RESPONSE.iter_errors(document))
    assert_probabilities_close(probabilities(document, data), inputs.images, PROBABILITY_ATOL)


def test_revision_parameters(rest: Rest, inputs: Inputs) -> None:
    request = {"inputs": [bytes_json(inputs.pngs[:1])]}
    for parameters in ({"min_revision": 0}, {"revision": REVISION}, {}):
        answer = rest.post_json(INFER, {**request, "parameters": parameters})
        assert answer.status == 200, (parameters, answer.body[:300])
        document = answer.json()
        assert_valid("inference_response", document)
        revision = document["parameters"]["revision"]
        assert isinstance(revision, int) and not isinstance(revision, bool) and revision >= 0
        if "revision" in parameters:
            assert revision == REVISION
    # Newer than the head: no such revision yet (404); a pinned revision older than min_revision: 400.
    assert_error(rest.post_json(INFER, {**request, "parameters": {"min_revision": 10**9}}), 404)
    both = {"revision": REVISION, "min_revision": 10**9}
    assert "min_revision" in assert_error(rest.post_json(INFER, {**request, "parameters": both}), 400)


# ---- malformed requests: 4xx with {"error": str}, never 5xx ---------------------------------------------

ONES = [1.0] * 1024  # one (1, 32, 32) LeNet input
GOOD_INPUT = {"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": ONES}


def _with(**changes: Any) -> dict[str, Any]:
    """GOOD_INPUT with fields changed (a value of ... removes the field), as a whole request."""
    tensor = {k: v for k, v in {**GOOD_INPUT, **changes}.items() if v is not ...}
    return {"inputs": [tensor]}


def _json(document: Any) -> bytes:
    return json.dumps(document).encode()


def _binary(
    document: dict[str, Any], blob: bytes, header_length: str | None = None
) -> tuple[bytes, dict[str, str]]:
    header = _json(document)
    length = str(len(header)) if header_length is None else header_length
    return header + blob, {HEADER_LENGTH: length, "Content-Type": "application/octet-stream"}


_RAW_ONES = np.ones(1024, dtype="<f4").tobytes()
_BINARY_INPUT = {
    "name": "input",
    "datatype": "FP32",
    "shape": [1, 1, 32, 32],
    "parameters": {"binary_data_size": 4096},
}

# (id, method, path, body, headers, status)
MALFORMED: list[tuple[str, str, str, bytes, dict[str, str], int]] = [
    ("not json", "POST", INFER, b"this is not json", {}, 400),
    ("empty body", "POST", INFER, b"", {}, 400),
    ("not utf-8", "POST", INFER, b"\xff\xfe\x00{", {}, 400),
    ("json array", "POST", INFER, b"[]", {}, 400),
    ("json string", "POST", INFER, b'"inputs"', {}, 400),
    ("json null", "POST", INFER, b"null", {}, 400),
    ("truncated json", "POST", INFER, _json(_with())[:-7], {}, 400),
    (
        "deeply nested data",
        "POST",
        INFER,
        b'{"inputs": [{"name": "input", "datatype": "FP32", "shape": [1], "data": '
        + b"[" * 100_000
        + b"]" * 100_000
        + b"}]}",
        {},
        400,
    ),
    ("deeply nested body", "POST", INFER, b"[" * 100_000 + b"]" * 100_000, {}, 400),
    ("NaN literal", "POST", INFER, _json(_with()).replace(b"1.0]", b"NaN]"), {}, 400),
    ("Infinity literal", "POST", INFER, _json(_with()).replace(b"1.0]", b"Infinity]"), {}, 400),
    ("inputs missing", "POST", INFER, _json({}), {}, 400),
    ("inputs not a list", "POST", INFER, _json({"inputs": {"name": "input"}}), {}, 400),
    ("inputs empty", "POST", INFER, _json({"inputs": []}), {}, 400),
    ("input not an object", "POST", INFER, _json({"inputs": [3]}), {}, 400),
    ("two inputs", "POST", INFER, _json({"inputs": [GOOD_INPUT, GOOD_INPUT]}), {}, 400),
    ("name missing", "POST", INFER, _json(_with(name=...)), {}, 400),
    ("name not a string", "POST", INFER, _json(_with(name=7)), {}, 400),
    ("unknown input name", "POST", INFER, _json(_with(name="pixels")), {}, 400),
    ("datatype missing", "POST", INFER, _json(_with(datatype=...)), {}, 400),
    ("unknown datatype", "POST", INFER, _json(_with(datatype="FP33")), {}, 400),
    ("datatype lowercase", "POST", INFER, _json(_with(datatype="fp32")), {}, 400),
    ("datatype of the other input", "POST", INFER, _json(_with(datatype="BYTES")), {}, 400),
    ("datatype INT64", "POST", INFER, _json(_with(datatype="INT64", data=[1] * 1024)), {}, 400),
    ("shape missing", "POST", INFER, _json(_with(shape=...)), {}, 400),
    ("shape a string", "POST", INFER, _json(_with(shape="1,1,32,32")), {}, 400),
    ("shape of floats", "POST", INFER, _json(_with(shape=[1.0, 1.0, 32.0, 32.0])), {}, 400),
    ("shape of bools", "POST", INFER, _json(_with(shape=[True, True, 32, 32])), {}, 400),
    ("shape negative", "POST", INFER, _json(_with(shape=[-1, 1, 32, 32])), {}, 400),
    ("shape zero", "POST", INFER, _json(_with(shape=[0, 1, 32, 32], data=[])), {}, 400),
    ("shape empty", "POST", INFER, _json(_with(shape=[])), {}, 400),
    ("shape rank 2", "POST", INFER, _json(_with(shape=[32, 32])), {}, 400),
    ("shape rank 5", "POST", INFER, _json(_with(shape=[1, 1, 1, 32, 32])), {}, 400),
    ("shape huge", "POST", INFER, _json(_with(shape=[2**40, 1, 32, 32])), {}, 400),
    ("shape beyond int64", "POST", INFER, _json(_with(shape=[2**70, 2**70, 2**70, 2**70])), {}, 400),
    ("shape of the wrong image size", "POST", INFER, _json(_with(shape=[1, 1, 16, 64])), {}, 400),
    (
        "shape of three channels",
        "POST",
        INFER,
        _json(_with(shape=[1, 3, 32, 32], data=[1.0] * 3072)),
        {},
        400,
    ),
    ("data missing", "POST", INFER, _json(_with(data=...)), {}, 400),
    ("data not a list", "POST", INFER, _json(_with(data=1.0)), {}, 400),
    ("data short of the shape", "POST", INFER, _json(_with(data=ONES[:-1])), {}, 400),
    ("data beyond the shape", "POST", INFER, _json(_with(data=[*ONES, 1.0])), {}, 400),
    ("data of strings", "POST", INFER, _json(_with(data=["1.0"] * 1024)), {}, 400),
    ("data of bools", "POST", INFER, _json(_with(data=[True] * 1024)), {}, 400),
    ("data of nulls", "POST", INFER, _json(_with(data=[None] * 1024)), {}, 400),
    ("data of objects", "POST", INFER, _json(_with(data=[{}] * 1024)), {}, 400),
    ("data too large for float32", "POST", INFER, _json(_with(data=[1e300] * 1024)), {}, 400),
    (
        "BYTES not base64",
        "POST",
        INFER,
        _json({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["not base64!"]}]}),
        {},
        400,
    ),
    (
        "BYTES numbers",
        "POST",
        INFER,
        _json({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [12]}]}),
        {},
        400,
    ),
    (
        "BYTES not an image",
        "POST",
        INFER,
        _json(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "data": [base64.b64encode(b"hello").decode()],
                    }
                ]
            }
        ),
        {},
        400,
    ),
    (
        "BYTES count off the shape",
        "POST",
        INFER,
        _json(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [2],
                        "data": [base64.b64encode(b"x").decode()],
                    }
                ]
            }
        ),
        {},
        400,
    ),
    (
        "BYTES shape rank 3",
        "POST",
        INFER,
        _json({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1, 1], "data": ["eA=="]}]}),
        {},
        400,
    ),
    ("input parameters not an object", "POST", INFER, _json(_with(parameters=[1])), {}, 400),
    ("parameters not an object", "POST", INFER, _json({**_with(), "parameters": "revision=0"}), {}, 400),
    (
        "parameter value an object",
        "POST",
        INFER,
        _json({**_with(), "parameters": {"revision": {"int64_param": 0}}}),
        {},
        400,
    ),
    ("revision a string", "POST", INFER, _json({**_with(), "parameters": {"revision": "0"}}), {}, 400),
    ("revision a float", "POST", INFER, _json({**_with(), "parameters": {"revision": 0.5}}), {}, 400),
    ("revision a bool", "POST", INFER, _json({**_with(), "parameters": {"revision": True}}), {}, 400),
    ("revision negative", "POST", INFER, _json({**_with(), "parameters": {"revision": -1}}), {}, 400),
    ("min_revision negative", "POST", INFER, _json({**_with(), "parameters": {"min_revision": -3}}), {}, 400),
    ("revision unknown", "POST", INFER, _json({**_with(), "parameters": {"revision": 10**9}}), {}, 404),
    ("id not a string", "POST", INFER, _json({**_with(), "id": 42}), {}, 400),
    ("outputs not a list", "POST", INFER, _json({**_with(), "outputs": {"name": "probabilities"}}), {}, 400),
    ("output name missing", "POST", INFER, _json({**_with(), "outputs": [{}]}), {}, 400),
    ("unknown output", "POST", INFER, _json({**_with(), "outputs": [{"name": "logits"}]}), {}, 400),
    (
        "classification zero",
        "POST",
        INFER,
        _json({**_with(), "outputs": [{"name": "probabilities", "parameters": {"classification": 0}}]}),
        {},
        400,
    ),
    (
        "classification beyond the classes",
        "POST",
        INFER,
        _json({**_with(), "outputs": [{"name": "probabilities", "parameters": {"classification": 11}}]}),
        {},
        400,
    ),
    (
        "classification a string",
        "POST",
        INFER,
        _json({**_with(), "outputs": [{"name": "probabilities", "parameters": {"classification": "3"}}]}),
        {},
        400,
    ),
    (
        "binary_data not a bool",
        "POST",
        INFER,
        _json({**_with(), "outputs": [{"name": "probabilities", "parameters": {"binary_data": "yes"}}]}),
        {},
        400,
    ),
    (
        "binary_data_output not a bool",
        "POST",
        INFER,
        _json({**_with(), "parameters": {"binary_data_output": 1}}),
        {},
        400,
    ),
    ("unknown model", "POST", "/v2/models/no-such-model/infer", _json(_with()), {}, 404),
    ("unknown version", "POST", f"/v2/models/{MODEL}/versions/9.9/infer", _json(_with()), {}, 404),
    (
        "header length not a number",
        "POST",
        INFER,
        *_binary({"inputs": [_BINARY_INPUT]}, _RAW_ONES, "forty"),
        400,
    ),
    ("header length negative", "POST", INFER, *_binary({"inputs": [_BINARY_INPUT]}, _RAW_ONES, "-1"), 400),
    (
        "header length beyond the body",
        "POST",
        INFER,
        *_binary({"inputs": [_BINARY_INPUT]}, _RAW_ONES, "999999"),
        400,
    ),
    (
        "header length cutting the JSON",
        "POST",
        INFER,
        *_binary({"inputs": [_BINARY_INPUT]}, _RAW_ONES, "20"),
        400,
    ),
    ("header length zero", "POST", INFER, *_binary({"inputs": [_BINARY_INPUT]}, _RAW_ONES, "0"), 400),
    (
        "binary size beyond the data",
        "POST",
        INFER,
        *_binary({"inputs": [_BINARY_INPUT]}, _RAW_ONES[:-4]),
        400,
    ),
    (
        "binary size short of the data",
        "POST",
        INFER,
        *_binary({"inputs": [_BINARY_INPUT]}, _RAW_ONES + b"\0" * 4),
        400,
    ),
    (
        "binary size off the shape",
        "POST",
        INFER,
        *_binary({"inputs": [{**_BINARY_INPUT, "parameters": {"binary_data_size": 4092}}]}, _RAW_ONES[:-4]),
        400,
    ),
    (
        "binary size not a multiple of 4",
        "POST",
        INFER,
        *_binary({"inputs": [{**_BINARY_INPUT, "parameters": {"binary_data_size": 4095}}]}, _RAW_ONES[:-1]),
        400,
    ),
    (
        "binary size a string",
        "POST",
        INFER,
        *_binary({"inputs": [{**_BINARY_INPUT, "parameters": {"binary_data_size": "4096"}}]}, _RAW_ONES),
        400,
    ),
    (
        "binary size negative",
        "POST",
        INFER,
        *_binary({"inputs": [{**_BINARY_INPUT, "parameters": {"binary_data_size": -4096}}]}, _RAW_ONES),
        400,
    ),
    ("binary size without the header", "POST", INFER, _json({"inputs": [_BINARY_INPUT]}), {}, 400),
    (
        "binary BYTES length that lies",
        "POST",
        INFER,
        *_binary(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 14},
                    }
                ]
            },
            struct.pack("<I", 1000) + b"0123456789",
        ),
        400,
    ),
    (
        "binary BYTES length cut",
        "POST",
        INFER,
        *_binary(
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 2},
                    }
                ]
            },
            b"\x05\x00",
        ),
        400,
    ),
    ("binary data with no binary input", "POST", INFER, *_binary(_with(), b"stray bytes"), 400),
    ("index body not JSON", "POST", "/v2/repository/index", b"{ready", {}, 400),
    ("index ready not a bool", "POST", "/v2/repository/index", _json({"ready": "yes"}), {}, 400),
    ("GET on infer", "GET", INFER, b"", {}, 405),
    ("POST on metadata", "POST", f"/v2/models/{MODEL}", b"{}", {}, 405),
    ("unknown route", "GET", "/v2/models", b"", {}, 404),
    ("unknown route under v2", "GET", "/v2/nothing/here", b"", {}, 404),
    ("unknown model metadata", "GET", "/v2/models/no-such-model", b"", {}, 404),
    ("unknown version metadata", "GET", f"/v2/models/{MODEL}/versions/2.0", b"", {}, 404),
    ("unknown model config", "GET", "/v2/models/no-such-model/config", b"", {}, 404),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [pytest.param(*case[1:], id=case[0]) for case in MALFORMED],
)
def test_malformed_requests_are_4xx_with_an_error(
    rest: Rest, method: str, path: str, body: bytes, headers: dict[str, str], status: int
) -> None:
    if method == "POST" and "Content-Type" not in headers:
        headers = {**headers, "Content-Type": "application/json"}
    answer = rest.call(method, path, body, headers)
    schema = "inference_error_response" if path.endswith("/infer") else "metadata_model_error_response"
    assert_error(answer, status, schema)


def test_a_body_over_the_limit_is_413_not_5xx(rest: Rest) -> None:
    body = b'{"inputs": [' + b" " * (33 * 2**20) + b"]}"  # 33 MiB of whitespace: over the 32 MiB limit
    assert_error(rest.call("POST", INFER, body, {"Content-Type": "application/json"}), 413)


# ---- a small fuzz: never a 5xx, errors always {"error": str} ------------------------------------------

_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=6)
)
_json_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
_tensors = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["input", "image", "x", ""]) | _scalars,
        "datatype": st.sampled_from(["FP32", "BYTES", "INT8", "FP16", "fp32"]) | _scalars,
        "shape": st.lists(st.integers(-2, 2**33) | _scalars, max_size=5) | _json_values,
        "data": st.lists(st.floats(allow_nan=False, width=32) | st.text(max_size=4), max_size=8)
        | _json_values,
        "parameters": st.dictionaries(
            st.sampled_from(["binary_data_size", "revision", "classification"]), _scalars, max_size=2
        )
        | _json_values,
    },
)
_requests = st.fixed_dictionaries(
    {},
    optional={
        "inputs": st.lists(_tensors, max_size=2) | _json_values,
        "outputs": st.lists(
            st.fixed_dictionaries({"name": st.sampled_from(["probabilities", "x"]) | _scalars}), max_size=2
        ),
        "parameters": st.dictionaries(
            st.sampled_from(["revision", "min_revision", "binary_data_output"]), _scalars, max_size=2
        ),
        "id": _scalars,
    },
)


# One field of a valid request replaced by anything; and well-formed FP32 tensors of any small shape, filled
# to match it, so that the worker's own shape checks answer too (through TorchServe and back).
_mutated = st.builds(
    lambda key, value: _with(**{key: value}),
    st.sampled_from(["name", "datatype", "shape", "data", "parameters"]),
    _json_values,
)
_shapes = st.lists(st.integers(1, 18), min_size=3, max_size=3) | st.tuples(
    st.integers(1, 3), st.integers(1, 3), st.integers(1, 40), st.integers(1, 40)
).map(list)
_filled = _shapes.map(lambda shape: _with(shape=shape, data=[0.5] * int(np.prod(shape))))


@settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    document=_requests | _mutated | _filled | _json_values,
    header_length=st.none() | st.integers(-5, 400).map(str),
    trailing=st.binary(max_size=16),
)
def test_fuzzed_requests_never_get_a_5xx(
    rest: Rest, document: Any, header_length: str | None, trailing: bytes
) -> None:
    body = _json(document)
    headers = {"Content-Type": "application/json"}
    if header_length is not None:
        headers[HEADER_LENGTH] = header_length
        body += trailing
    answer = rest.call("POST", INFER, body, headers)
    assert answer.status < 500, (answer.status, answer.body[:300], body[:300])
    if answer.status >= 400:
        assert answer.status in (400, 404), (answer.status, answer.body[:300])
        assert_error(answer, answer.status)
    else:
        document_out, _ = answer.infer_document()
        assert not list(BINARY_RESPONSE.iter_errors(document_out))
