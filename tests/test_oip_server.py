"""The Open Inference Protocol server side, for real: ``inference.GRPCInferenceService`` on the gateway's gRPC
port and the OIP REST API on its HTTP port, in front of the session's real TorchServe.

Raw gRPC calls (method paths and the gateway's own messages) and urllib requests, built by hand from the spec,
so that what goes over the wire is what is tested. Every inference is checked against cnnserve.v1 Classify on
the same inputs, pinned to revision 0 on both sides (other tests fine-tune the session's LeNet).
"""

from __future__ import annotations

import base64
import json
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cnnserve.client import ClassifierClient
from cnnserve.errors import OverloadedError
from cnnserve.gateway.oip.messages import SERVICE_NAME, pb
from cnnserve.gateway.types import ClassScore
from cnnserve.preprocess import Preprocessing, prepare_images
from cnnserve.torchserve import TorchServe
from cnnserve_export.data import ImageData
from cnnserve_export.export import ExportResult
from tests.gateway_helpers import GatewayThread, settings_for
from tests.helpers import PROBABILITY_ATOL, assert_probabilities_close, by_class, make_certificate, png_bytes

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]

MODEL = "lenet"
CLASSES = 10
REVISION = 0  # the trained base: always kept, whatever other tests fine-tuned meanwhile
HEADER_LENGTH = "Inference-Header-Content-Length"

# (request type, response type) of each RPC the gateway serves.
RPCS: dict[str, tuple[Any, Any]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
    "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse),
    "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
}


# ---- helpers ----------------------------------------------------------------------------------------


class Oip:
    """Raw calls to ``/inference.GRPCInferenceService/<Rpc>`` on one channel."""

    def __init__(self, channel: grpc.Channel, token: str | None = None) -> None:
        self.channel = channel
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()

    def __call__(self, rpc: str, request: Any, timeout: float = 60) -> Any:
        request_type, response_type = RPCS[rpc]
        assert isinstance(request, request_type)
        method = self.channel.unary_unary(
            f"/{SERVICE_NAME}/{rpc}",
            request_serializer=request_type.SerializeToString,
            response_deserializer=response_type.FromString,
        )
        return method(request, timeout=timeout, metadata=self.metadata)


@pytest.fixture(scope="module")
def oip(gateway: GatewayThread) -> Iterator[Oip]:
    with grpc.insecure_channel(gateway.target) as channel:
        yield Oip(channel)


def http(
    gateway: GatewayThread | str,
    method: str,
    path: str,
    body: bytes | dict[str, Any] | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one REST call; errors are answers too, not exceptions."""
    base = gateway if isinstance(gateway, str) else gateway.http_url
    assert base is not None
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    request = urllib.request.Request(f"{base}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read()


def error_of(status_body: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, _, body = status_body
    document = json.loads(body)
    assert set(document) == {"error"} and isinstance(document["error"], str), document
    return status, document["error"]


def raw_bytes(elements: list[bytes]) -> bytes:
    """BYTES elements in the raw encoding: a 4-byte little-endian length before each."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def split_raw_bytes(raw: bytes) -> list[bytes]:
    elements, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        elements.append(raw[offset + 4 : offset + 4 + length])
        offset += 4 + length
    return elements


def pairs(scores: tuple[ClassScore, ...]) -> list[tuple[int, float]]:
    return [(s.index, s.probability) for s in scores]


def parameter(message: Any) -> Any:
    return getattr(message, message.WhichOneof("parameter_choice"))


def revision_parameters(**values: int) -> dict[str, Any]:
    return {key: pb.InferParameter(int64_param=value) for key, value in values.items()}


def infer_tensor_request(batch: np.ndarray, **extra: Any) -> Any:
    """A ModelInfer request for FP32 ``batch`` (N, C, H, W), in raw_input_contents, pinned to revision 0."""
    return pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(batch.shape))
        ],
        raw_input_contents=[batch.astype("<f4").tobytes()],
        **{"parameters": revision_parameters(revision=REVISION), **extra},
    )


@pytest.fixture(scope="module")
def batch(lenet_export: ExportResult, digits: ImageData) -> np.ndarray:
    """Four test digits, preprocessed as the model's card says: float32 (4, 1, 32, 32)."""
    prepared = prepare_images(digits.test_images[:4], Preprocessing.from_card(lenet_export.card))
    return prepared.numpy().astype(np.float32)


@pytest.fixture(scope="module")
def pngs(digits: ImageData) -> list[bytes]:
    return [png_bytes(image[0].numpy()) for image in digits.test_images[4:8]]


@pytest.fixture(scope="module")
def expected(client: ClassifierClient, batch: np.ndarray, pngs: list[bytes]) -> dict[str, np.ndarray]:
    """cnnserve.v1 Classify on the same inputs, every class, revision 0: (N, classes) probabilities."""
    from cnnserve.gateway.types import TensorInput

    tensors = [TensorInput(tuple(row.shape), row.astype("<f4").tobytes()) for row in batch]
    by_tensor = client.classify(MODEL, tensors, top_k=CLASSES, revision=REVISION)
    by_image = client.classify(MODEL, pngs, top_k=CLASSES, revision=REVISION)
    return {
        "tensors": np.array([by_class(pairs(p), CLASSES) for p in by_tensor.predictions]),
        "images": np.array([by_class(pairs(p), CLASSES) for p in by_image.predictions]),
        "top3_images": np.array([[s.index for s in p[:3]] for p in by_image.predictions]),
    }


def probabilities(response: Any, index: int = 0) -> np.ndarray:
    output = response.outputs[index]
    assert (output.name, output.datatype) == ("probabilities", "FP32")
    shape = tuple(output.shape)
    return np.frombuffer(response.raw_output_contents[index], dtype="<f4").reshape(shape)


# ---- the interface ----------------------------------------------------------------------------------


def test_field_numbers_are_the_specs() -> None:
    """The proto's numbers are the wire interface: a sample of the OIP's and Triton's, checked one by one."""
    numbers = {
        ("ModelInferRequest", "model_name"): 1,
        ("ModelInferRequest", "model_version"): 2,
        ("ModelInferRequest", "id"): 3,
        ("ModelInferRequest", "parameters"): 4,
        ("ModelInferRequest", "inputs"): 5,
        ("ModelInferRequest", "outputs"): 6,
        ("ModelInferRequest", "raw_input_contents"): 7,
        ("ModelInferResponse", "outputs"): 5,
        ("ModelInferResponse", "raw_output_contents"): 6,
        ("InferTensorContents", "fp32_contents"): 6,
        ("InferTensorContents", "bytes_contents"): 8,
        ("InferParameter", "int64_param"): 2,
        ("InferParameter", "double_param"): 4,
        ("ModelMetadataResponse", "outputs"): 5,
        ("ServerMetadataResponse", "extensions"): 3,
        ("ModelConfigResponse", "config"): 1,
        ("ModelConfig", "max_batch_size"): 4,
        ("ModelConfig", "input"): 5,
        ("ModelConfig", "output"): 6,
        ("ModelConfig", "backend"): 17,
        ("ModelInput", "dims"): 4,
        ("ModelInput", "optional"): 8,
        ("ModelOutput", "dims"): 3,
        ("RepositoryIndexRequest", "ready"): 2,
        ("RepositoryIndexResponse", "models"): 1,
    }
    for (message, name), number in numbers.items():
        assert getattr(pb, message).DESCRIPTOR.fields_by_name[name].number == number, (message, name)
    assert pb.ModelInferRequest.DESCRIPTOR.full_name == "inference.ModelInferRequest"
    assert (pb.TYPE_FP32, pb.TYPE_STRING) == (11, 13)
    assert SERVICE_NAME == "inference.GRPCInferenceService"


def test_the_gateway_and_another_copy_of_the_oip_protos_share_a_process() -> None:
    """tritonclient registers its own ``inference.*`` messages in protobuf's default pool; the gateway's live
    in a pool of their own, so importing both, in either order, works (kserve/kserve#3099)."""
    register = (
        "from google.protobuf import descriptor_pb2, descriptor_pool\n"
        "f = descriptor_pb2.FileDescriptorProto(name='grpc_service.proto', package='inference')\n"
        "f.message_type.add(name='ServerLiveRequest')\n"
        "f.message_type.add(name='ModelInferRequest')\n"
        "descriptor_pool.Default().Add(f)\n"
    )
    gateway = (
        "import cnnserve.gateway.server\n"
        "from cnnserve.gateway.oip.messages import pb\n"
        "pb.ModelInferRequest()\n"
    )
    for script in (register + gateway, gateway + register):
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr


def test_reflection_describes_the_service(gateway: GatewayThread) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="cnnserve.v1.Classifier"),
        ]
        listed, oip_file, classifier_file = list(stub.ServerReflectionInfo(iter(requests), timeout=30))
    names = {s.name for s in listed.list_services_response.service}
    assert {SERVICE_NAME, "cnnserve.v1.Classifier", "grpc.health.v1.Health"} <= names
    from google.protobuf import descriptor_pb2

    described = descriptor_pb2.FileDescriptorProto.FromString(
        oip_file.file_descriptor_response.file_descriptor_proto[0]
    )
    assert described.package == "inference"
    assert {m.name for m in described.service[0].method} == set(RPCS)
    assert classifier_file.file_descriptor_response.file_descriptor_proto  # the Classifier is still described


# ---- gRPC -------------------------------------------------------------------------------------------


def test_grpc_health_metadata_config_and_index(oip: Oip, lenet_export: ExportResult) -> None:
    assert oip("ServerLive", pb.ServerLiveRequest()).live
    assert oip("ServerReady", pb.ServerReadyRequest()).ready
    assert oip("ModelReady", pb.ModelReadyRequest(name=MODEL)).ready
    assert oip("ModelReady", pb.ModelReadyRequest(name=MODEL, version="1.0")).ready
    server = oip("ServerMetadata", pb.ServerMetadataRequest())
    assert server.name == "cnnserve" and server.version
    assert set(server.extensions) == {"classification", "model_configuration", "binary_tensor_data"}
    c, h, w = lenet_export.card.input_shape
    metadata = oip("ModelMetadata", pb.ModelMetadataRequest(name=MODEL))
    assert (metadata.name, list(metadata.versions)) == (MODEL, ["1.0"])
    assert metadata.platform in ("onnxruntime_onnx", "pytorch_libtorch")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("input", "FP32", [-1, c, h, w]),
        ("image", "BYTES", [-1]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == [
        ("probabilities", "FP32", [-1, 10])
    ]
    config = oip("ModelConfig", pb.ModelConfigRequest(name=MODEL)).config
    assert config.name == MODEL and config.max_batch_size == 64  # the gateway's --max-inputs
    assert [(i.name, i.data_type, list(i.dims), i.optional) for i in config.input] == [
        ("input", pb.TYPE_FP32, [c, h, w], True),
        ("image", pb.TYPE_STRING, [1], True),
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("probabilities", pb.TYPE_FP32, [10])
    ]
    index = oip("RepositoryIndex", pb.RepositoryIndexRequest(ready=True))
    assert {(m.name, m.version, m.state) for m in index.models} >= {
        ("lenet", "1.0", "READY"),
        ("alexnet", "1.0", "READY"),
    }


def test_grpc_fp32_raw_and_typed_contents_agree_with_classify(
    oip: Oip, batch: np.ndarray, expected: dict[str, np.ndarray]
) -> None:
    raw = oip("ModelInfer", infer_tensor_request(batch, id="req-1"))
    assert (raw.model_name, raw.model_version, raw.id) == (MODEL, "1.0", "req-1")
    assert parameter(raw.parameters["revision"]) == REVISION
    got = probabilities(raw)
    assert got.shape == (4, CLASSES)
    assert_probabilities_close(got, expected["tensors"], PROBABILITY_ATOL)
    typed = pb.ModelInferRequest(
        model_name=MODEL,
        model_version="1.0",
        inputs=[
            pb.ModelInferRequest.InferInputTensor(
                name="input",
                datatype="FP32",
                shape=list(batch.shape),
                contents=pb.InferTensorContents(fp32_contents=batch.ravel().tolist()),
            )
        ],
        parameters=revision_parameters(revision=REVISION),
    )
    assert_probabilities_close(probabilities(oip("ModelInfer", typed)), expected["tensors"], PROBABILITY_ATOL)
    # [C, H, W]: one input, N = 1.
    one = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[
            pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32", shape=list(batch.shape[1:]))
        ],
        raw_input_contents=[batch[2].astype("<f4").tobytes()],
        parameters=revision_parameters(revision=REVISION),
    )
    assert_probabilities_close(
        probabilities(oip("ModelInfer", one)), expected["tensors"][2:3], PROBABILITY_ATOL
    )


def test_grpc_bytes_images_raw_and_typed_agree_with_classify(
    oip: Oip, pngs: list[bytes], expected: dict[str, np.ndarray]
) -> None:
    tensor = pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[len(pngs)])
    raw = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[tensor],
        raw_input_contents=[raw_bytes(pngs)],
        parameters=revision_parameters(revision=REVISION),
    )
    assert_probabilities_close(probabilities(oip("ModelInfer", raw)), expected["images"], PROBABILITY_ATOL)
    typed_tensor = pb.ModelInferRequest.InferInputTensor(
        name="image",
        datatype="BYTES",
        shape=[len(pngs), 1],
        contents=pb.InferTensorContents(bytes_contents=pngs),
    )
    typed = pb.ModelInferRequest(
        model_name=MODEL, inputs=[typed_tensor], parameters=revision_parameters(revision=REVISION)
    )
    assert_probabilities_close(probabilities(oip("ModelInfer", typed)), expected["images"], PROBABILITY_ATOL)


def check_classification(rows: list[bytes], expected: dict[str, np.ndarray], k: int) -> None:
    """``"probability:index:label"`` rows, most probable first, against Classify's probabilities."""
    parsed = [row.decode().split(":") for row in rows]
    table = np.array([[float(p), int(i), int(label)] for p, i, label in parsed]).reshape(4, k, 3)
    indices = table[..., 1].astype(int)
    assert (table[..., 2].astype(int) == indices).all()  # LeNet's labels are its digits
    np.testing.assert_array_equal(indices[:, 0], expected["top3_images"][:, 0])
    listed = np.take_along_axis(expected["images"], indices, axis=1)
    # "%f" prints 6 decimals: the printed value is within 5e-7 of one within PROBABILITY_ATOL of Classify's.
    np.testing.assert_allclose(table[..., 0], listed, rtol=0, atol=PROBABILITY_ATOL + 5e-7)
    assert (np.diff(table[..., 0], axis=1) <= 0).all()  # most probable first


def test_grpc_classification_extension(oip: Oip, pngs: list[bytes], expected: dict[str, np.ndarray]) -> None:
    request = pb.ModelInferRequest(
        model_name=MODEL,
        inputs=[pb.ModelInferRequest.InferInputTensor(name="image", datatype="BYTES", shape=[len(pngs)])],
        raw_input_contents=[raw_bytes(pngs)],
        outputs=[
            pb.ModelInferRequest.InferRequestedOutputTensor(
                name="probabilities", parameters={"classification": pb.InferParameter(int64_param=3)}
            )
        ],
        parameters=revision_parameters(revision=REVISION),
    )
    response = oip("ModelInfer", request)
    output = response.outputs[0]
    assert (output.name, output.datatype, list(output.shape)) == ("probabilities", "BYTES", [4, 3])
    check_classification(split_raw_bytes(response.raw_output_contents[0]), expected, 3)


def test_grpc_revisions_pin_and_read_your_writes(
    oip: Oip, client: ClassifierClient, digits: ImageData, batch: np.ndarray
) -> None:
    with pytest.raises(grpc.RpcError) as unknown:
        oip("ModelInfer", infer_tensor_request(batch, parameters=revision_parameters(revision=999_999)))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
    images = [png_bytes(image[0].numpy()) for image in digits.test_images[300:308]]
    step = client.finetune_step(MODEL, images, digits.test_targets[300:308].tolist(), lr=0.01)
    after = oip(
        "ModelInfer", infer_tensor_request(batch, parameters=revision_parameters(min_revision=step.revision))
    )
    assert parameter(after.parameters["revision"]) >= step.revision
    with pytest.raises(grpc.RpcError) as bad:
        oip(
            "ModelInfer",
            infer_tensor_request(batch, parameters={"revision": pb.InferParameter(string_param="0")}),
        )
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "revision" in (bad.value.details() or "")


@pytest.mark.parametrize(
    ("change", "code", "words"),
    [
        ({"model_name": "nosuch"}, grpc.StatusCode.NOT_FOUND, "nosuch"),
        ({"model_version": "9.9"}, grpc.StatusCode.NOT_FOUND, "9.9"),
        ({"shape": [4, 1, 32]}, grpc.StatusCode.INVALID_ARGUMENT, "input"),
        ({"shape": [4, 1, 32, -32]}, grpc.StatusCode.INVALID_ARGUMENT, "input.shape"),
        ({"shape": [2**40, 2**40, 1, 1]}, grpc.StatusCode.INVALID_ARGUMENT, "input.shape"),
        ({"shape": [4, 3, 32, 32], "data": 3}, grpc.StatusCode.INVALID_ARGUMENT, ""),  # the network's check
        ({"datatype": "INT64"}, grpc.StatusCode.INVALID_ARGUMENT, "INT64"),
        ({"name": "pixels"}, grpc.StatusCode.INVALID_ARGUMENT, "pixels"),
        ({"raw": 2}, grpc.StatusCode.INVALID_ARGUMENT, "raw_input_contents"),
        ({"output": "logits"}, grpc.StatusCode.INVALID_ARGUMENT, "logits"),
        ({"classification": 11}, grpc.StatusCode.INVALID_ARGUMENT, "classification"),
        ({"nan": True}, grpc.StatusCode.INVALID_ARGUMENT, "NaN"),
    ],
)
def test_grpc_errors(
    oip: Oip, batch: np.ndarray, change: dict[str, Any], code: grpc.StatusCode, words: str
) -> None:
    data = batch.copy()
    if change.get("nan"):
        data[0, 0, 0, 0] = np.nan
    if "data" in change:
        data = np.zeros((4, change["data"], 32, 32), dtype=np.float32)
    shape = change.get("shape", list(data.shape))
    tensor = pb.ModelInferRequest.InferInputTensor(
        name=change.get("name", "input"), datatype=change.get("datatype", "FP32"), shape=shape
    )
    outputs = []
    if "output" in change or "classification" in change:
        parameters = {}
        if "classification" in change:
            parameters["classification"] = pb.InferParameter(int64_param=change["classification"])
        outputs.append(
            pb.ModelInferRequest.InferRequestedOutputTensor(
                name=change.get("output", "probabilities"), parameters=parameters
            )
        )
    request = pb.ModelInferRequest(
        model_name=change.get("model_name", MODEL),
        model_version=change.get("model_version", ""),
        inputs=[tensor],
        outputs=outputs,
        raw_input_contents=[data.astype("<f4").tobytes()] * change.get("raw", 1),
    )
    with pytest.raises(grpc.RpcError) as caught:
        oip("ModelInfer", request)
    assert caught.value.code() == code, caught.value.details()
    assert words in (caught.value.details() or "")


def test_grpc_unknown_rpcs_are_unimplemented_and_bad_bytes_invalid(gateway: GatewayThread) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        for rpc in ("ModelStreamInfer", "ModelStatistics", "RepositoryModelLoad"):
            method = channel.unary_unary(f"/{SERVICE_NAME}/{rpc}")
            with pytest.raises(grpc.RpcError) as caught:
                method(b"", timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        infer = channel.unary_unary(f"/{SERVICE_NAME}/ModelInfer")
        with pytest.raises(grpc.RpcError) as garbage:
            infer(b"\xff\xff\xff", timeout=30)
        assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid inference.ModelInferRequest message" in (garbage.value.details() or "")
        missing = Oip(channel)
        with pytest.raises(grpc.RpcError) as unknown:
            missing("ModelMetadata", pb.ModelMetadataRequest(name="nosuch"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as unknown_ready:
            missing("ModelReady", pb.ModelReadyRequest(name="nosuch"))
        assert unknown_ready.value.code() == grpc.StatusCode.NOT_FOUND


# ---- REST -------------------------------------------------------------------------------------------


def test_http_health_metadata_config_and_index(gateway: GatewayThread, lenet_export: ExportResult) -> None:
    assert http(gateway, "GET", "/v2/health/live")[0] == 200
    assert http(gateway, "GET", "/v2/health/ready")[0] == 200
    assert http(gateway, "GET", f"/v2/models/{MODEL}/ready")[0] == 200
    assert http(gateway, "GET", f"/v2/models/{MODEL}/versions/1.0/ready")[0] == 200
    for path in ("/v2", "/v2/"):
        status, headers, body = http(gateway, "GET", path)
        assert status == 200 and headers["Content-Type"].startswith("application/json")
        assert json.loads(body) == {
            "name": "cnnserve",
            "version": json.loads(body)["version"],
            "extensions": ["classification", "model_configuration", "binary_tensor_data"],
        }
    c, h, w = lenet_export.card.input_shape
    for path in (f"/v2/models/{MODEL}", f"/v2/models/{MODEL}/versions/1.0"):
        status, _, body = http(gateway, "GET", path)
        metadata = json.loads(body)
        assert status == 200 and metadata["name"] == MODEL and metadata["versions"] == ["1.0"]
        assert metadata["inputs"] == [
            {"name": "input", "datatype": "FP32", "shape": [-1, c, h, w]},
            {"name": "image", "datatype": "BYTES", "shape": [-1]},
        ]
        assert metadata["outputs"] == [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]
    status, _, body = http(gateway, "GET", f"/v2/models/{MODEL}/config")
    config = json.loads(body)
    assert status == 200 and config["name"] == MODEL and config["max_batch_size"] == 64
    assert [(i["name"], i["data_type"], i["dims"]) for i in config["input"]] == [
        ("input", "TYPE_FP32", [c, h, w]),
        ("image", "TYPE_STRING", [1]),
    ]
    assert config["output"] == [{"name": "probabilities", "data_type": "TYPE_FP32", "dims": [10]}]
    status, _, body = http(gateway, "POST", "/v2/repository/index", {"ready": True})
    assert status == 200
    assert {(m["name"], m["version"], m["state"]) for m in json.loads(body)} >= {("lenet", "1.0", "READY")}


def test_http_json_tensors_agree_with_classify(
    gateway: GatewayThread, batch: np.ndarray, pngs: list[bytes], expected: dict[str, np.ndarray]
) -> None:
    request = {
        "id": "json-1",
        "parameters": {"revision": REVISION},
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(batch.shape), "data": batch.tolist()}],
    }
    status, headers, body = http(gateway, "POST", f"/v2/models/{MODEL}/infer", request)
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    answer = json.loads(body)
    assert (answer["model_name"], answer["model_version"], answer["id"]) == (MODEL, "1.0", "json-1")
    assert answer["parameters"] == {"revision": REVISION}
    (output,) = answer["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == ("probabilities", "FP32", [4, CLASSES])
    got = np.array(output["data"]).reshape(4, CLASSES)
    assert_probabilities_close(got, expected["tensors"], PROBABILITY_ATOL)
    # BYTES in JSON are base64 strings; the versioned path.
    images = {
        "parameters": {"revision": REVISION},
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(pngs)],
                "data": [base64.b64encode(p).decode() for p in pngs],
            }
        ],
        "outputs": [{"name": "probabilities", "parameters": {"classification": 3}}],
    }
    status, _, body = http(gateway, "POST", f"/v2/models/{MODEL}/versions/1.0/infer", images)
    assert status == 200
    (output,) = json.loads(body)["outputs"]
    assert (output["datatype"], output["shape"]) == ("BYTES", [4, 3])
    check_classification([row.encode() for row in output["data"]], expected, 3)


def binary_request(header: dict[str, Any], *tensors: bytes) -> tuple[bytes, dict[str, str]]:
    """Triton's binary-tensor extension: the JSON header, then the tensors' bytes, its length in a header."""
    document = json.dumps(header).encode()
    return document + b"".join(tensors), {
        HEADER_LENGTH: str(len(document)),
        "Content-Type": "application/octet-stream",
    }


def binary_response(headers: dict[str, str], body: bytes) -> tuple[dict[str, Any], bytes]:
    length = int(headers[HEADER_LENGTH])
    return json.loads(body[:length]), body[length:]


def test_http_binary_extension_round_trip(
    gateway: GatewayThread, batch: np.ndarray, pngs: list[bytes], expected: dict[str, np.ndarray]
) -> None:
    raw = batch.astype("<f4").tobytes()
    header = {
        "parameters": {"revision": REVISION, "binary_data_output": True},
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(batch.shape),
                "parameters": {"binary_data_size": len(raw)},
            }
        ],
    }
    body, headers = binary_request(header, raw)
    status, answer_headers, answer = http(gateway, "POST", f"/v2/models/{MODEL}/infer", body, headers)
    assert status == 200 and answer_headers["Content-Type"] == "application/octet-stream"
    document, data = binary_response(answer_headers, answer)
    (output,) = document["outputs"]
    assert output["parameters"] == {"binary_data_size": 4 * CLASSES * 4} and "data" not in output
    got = np.frombuffer(data, dtype="<f4").reshape(output["shape"])
    assert_probabilities_close(got, expected["tensors"], PROBABILITY_ATOL)
    # BYTES in binary, one output binary and JSON the rest: per-output binary_data wins over the default.
    images = raw_bytes(pngs)
    header = {
        "parameters": {"revision": REVISION},
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [4],
                "parameters": {"binary_data_size": len(images)},
            }
        ],
        "outputs": [
            {"name": "probabilities", "parameters": {"binary_data": True}},
            {"name": "probabilities", "parameters": {"classification": 2, "binary_data": True}},
            {"name": "probabilities", "parameters": {"binary_data": False}},
        ],
    }
    body, headers = binary_request(header, images)
    status, answer_headers, answer = http(gateway, "POST", f"/v2/models/{MODEL}/infer", body, headers)
    assert status == 200
    document, data = binary_response(answer_headers, answer)
    fp32, classes, as_json = document["outputs"]
    size = fp32["parameters"]["binary_data_size"]
    assert size == 4 * CLASSES * 4 and len(data) == size + classes["parameters"]["binary_data_size"]
    assert_probabilities_close(
        np.frombuffer(data[:size], dtype="<f4").reshape(4, CLASSES), expected["images"]
    )
    check_classification(split_raw_bytes(data[size:]), expected, 2)
    assert_probabilities_close(np.array(as_json["data"]).reshape(4, CLASSES), expected["images"])


@pytest.mark.parametrize(
    ("path", "body", "headers", "status", "words"),
    [
        ("/v2/models/nosuch/infer", None, {}, 404, "nosuch"),
        (f"/v2/models/{MODEL}/versions/9.9/infer", None, {}, 404, "9.9"),
        (f"/v2/models/{MODEL}/infer", b"{not json", {}, 400, "JSON"),
        (f"/v2/models/{MODEL}/infer", b"\xff\xfe", {}, 400, "JSON"),
        (f"/v2/models/{MODEL}/infer", b"[" * 100_000 + b"]" * 100_000, {}, 400, ""),
        (f"/v2/models/{MODEL}/infer", b"[1, 2]", {}, 400, "body"),
        (f"/v2/models/{MODEL}/infer", {"inputs": "x"}, {}, 400, "inputs"),
        (f"/v2/models/{MODEL}/infer", {"inputs": [{"name": "input"}]}, {}, 400, "datatype"),
        (
            f"/v2/models/{MODEL}/infer",
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": "4"}]},
            {},
            400,
            "shape",
        ),
        (
            f"/v2/models/{MODEL}/infer",
            {
                "inputs": [
                    {"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": ["a"] * 1024}
                ]
            },
            {},
            400,
            "numbers",
        ),
        (
            f"/v2/models/{MODEL}/infer",
            {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [1.0]}]},
            {},
            400,
            "1 values",
        ),
        (
            f"/v2/models/{MODEL}/infer",
            {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]},
            {},
            400,
            "base64",
        ),
        (
            f"/v2/models/{MODEL}/infer",
            {
                "inputs": [
                    {
                        "name": "image",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 9},
                    }
                ]
            },
            {HEADER_LENGTH: "-1"},
            400,
            HEADER_LENGTH,
        ),
        ("/v2/nothing/here", None, {}, 404, "no route"),
    ],
)
def test_http_errors(
    gateway: GatewayThread, path: str, body: Any, headers: dict[str, str], status: int, words: str
) -> None:
    if body is None:
        body = {
            "inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": [0.0] * 1024}]
        }
    got, message = error_of(http(gateway, "POST", path, body, headers))
    assert got == status, message
    assert words in message


def test_the_timeout_parameter_is_a_deadline(gateway: GatewayThread, oip: Oip, batch: np.ndarray) -> None:
    request = {
        "parameters": {"timeout": 1},  # Triton's, microseconds: no model answers that fast
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": batch[0].ravel().tolist()}
        ],
    }
    status, message = error_of(http(gateway, "POST", f"/v2/models/{MODEL}/infer", request))
    assert status == 504, message
    with pytest.raises(grpc.RpcError) as caught:
        oip("ModelInfer", infer_tensor_request(batch[:1], parameters=revision_parameters(timeout=1)))
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


def test_http_bad_shape_and_wrong_method(gateway: GatewayThread) -> None:
    wrong = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072}]}
    status, message = error_of(http(gateway, "POST", f"/v2/models/{MODEL}/infer", wrong))
    assert status == 400, message  # the network's own shape check, as cnnserve.v1 answers it
    status, message = error_of(http(gateway, "GET", f"/v2/models/{MODEL}/infer"))
    assert status == 405
    status, message = error_of(http(gateway, "GET", "/v2/models/nosuch"))
    assert status == 404 and "nosuch" in message
    status, message = error_of(http(gateway, "GET", "/v2/models/nosuch/ready"))
    assert status == 404


def test_both_transports_are_counted_apart(gateway: GatewayThread, oip: Oip, batch: np.ndarray) -> None:
    registry = gateway.running.metrics.registry

    def count(method: str, code: str) -> float:
        return (
            registry.get_sample_value("cnnserve_gateway_rpcs_total", {"method": method, "code": code}) or 0.0
        )

    before = {
        key: count(*key)
        for key in [
            ("oip.grpc/ModelInfer", "OK"),
            ("oip.http/ModelInfer", "OK"),
            ("oip.http/ModelInfer", "NOT_FOUND"),
        ]
    }
    oip("ModelInfer", infer_tensor_request(batch[:1]))
    request = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": batch[0].ravel().tolist()}
        ]
    }
    assert http(gateway, "POST", f"/v2/models/{MODEL}/infer", request)[0] == 200
    assert http(gateway, "POST", "/v2/models/nosuch/infer", request)[0] == 404
    after = {key: count(*key) for key in before}
    assert all(after[key] == before[key] + 1 for key in before), (before, after)


def test_token_guards_both_transports_but_not_health(torchserve: TorchServe, batch: np.ndarray) -> None:
    guarded = GatewayThread(
        settings_for(
            torchserve, token="s3cret", metrics_listen="off", http_listen="127.0.0.1:0", max_message_mb=1
        )
    )
    url = guarded.http_url
    try:
        with grpc.insecure_channel(guarded.target) as channel:
            for token in (None, "wrong"):
                with pytest.raises(grpc.RpcError) as caught:
                    Oip(channel, token)("ModelInfer", infer_tensor_request(batch[:1]))
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert Oip(channel, "s3cret")("ModelInfer", infer_tensor_request(batch[:1])).model_name == MODEL
        request = {
            "inputs": [
                {
                    "name": "input",
                    "datatype": "FP32",
                    "shape": [1, 1, 32, 32],
                    "data": batch[0].ravel().tolist(),
                }
            ]
        }
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, answer_headers, _ = http(url or "", "POST", f"/v2/models/{MODEL}/infer", request, headers)
            assert status == 401 and answer_headers["WWW-Authenticate"] == "Bearer"
        ok = http(url or "", "POST", f"/v2/models/{MODEL}/infer", request, {"Authorization": "Bearer s3cret"})
        assert ok[0] == 200
        assert http(url or "", "GET", "/v2/health/live")[0] == 200  # probes need no token
        huge = http(
            url or "", "POST", f"/v2/models/{MODEL}/infer", b"0" * 2**21, {"Authorization": "Bearer s3cret"}
        )
        assert error_of(huge)[0] == 413  # over --max-message-mb, as on the gRPC side
    finally:
        guarded.stop()
    with pytest.raises(urllib.error.URLError):  # the REST listener stops with the gateway
        urllib.request.urlopen(f"{url}/v2/health/live", timeout=10)


def test_rest_serves_tls_with_the_grpc_sides_pair(torchserve: TorchServe, tmp_path: Any) -> None:
    import ssl

    cert, key = make_certificate(tmp_path)
    secure = GatewayThread(
        settings_for(
            torchserve, tls_cert=str(cert), tls_key=str(key), metrics_listen="off", http_listen="127.0.0.1:0"
        )
    )
    try:
        url = secure.http_url
        assert url is not None and url.startswith("https://")
        context = ssl.create_default_context(cafile=str(cert))
        with urllib.request.urlopen(f"{url}/v2/models/{MODEL}", timeout=30, context=context) as response:
            assert json.loads(response.read())["name"] == MODEL
        with pytest.raises(
            OSError
        ):  # plain HTTP to the TLS port is refused (URLError or a dropped connection)
            urllib.request.urlopen(url.replace("https://", "http://") + "/v2/health/live", timeout=10).read()
    finally:
        secure.stop()


def test_one_concurrency_limit_sheds_every_transport_but_not_health(
    torchserve: TorchServe, batch: np.ndarray
) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from tests.gateway_helpers import hold_backend
    from tests.helpers import wait_until

    tight = GatewayThread(
        settings_for(torchserve, max_concurrent_rpcs=1, metrics_listen="off", http_listen="127.0.0.1:0")
    )
    url = tight.http_url or ""
    request = {
        "parameters": {"revision": REVISION},
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [1, 1, 32, 32], "data": batch[0].ravel().tolist()}
        ],
    }
    try:
        held = hold_backend(tight)
        with grpc.insecure_channel(tight.target) as channel, ThreadPoolExecutor(1) as pool:
            call = Oip(channel)
            admitted = pool.submit(call, "ModelInfer", infer_tensor_request(batch[:1]))
            wait_until(lambda: held.waiting == 1, 60, "one OIP call held at the backend")
            status, message = error_of(http(url, "POST", f"/v2/models/{MODEL}/infer", request))
            assert status == 429, message
            with pytest.raises(grpc.RpcError) as caught:
                call("ModelInfer", infer_tensor_request(batch[:1]))
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            with ClassifierClient(tight.target) as v1, pytest.raises(OverloadedError):
                v1.list_models()
            assert http(url, "GET", "/v2/health/ready")[0] == 200  # probes are never shed
            assert call("ServerLive", pb.ServerLiveRequest()).live
            tight.loop.call_soon_threadsafe(held.release)
            assert admitted.result(timeout=60).model_name == MODEL
        shed = tight.running.metrics.shed
        assert shed.labels("oip.http/ModelInfer")._value.get() == 1
        assert shed.labels("oip.grpc/ModelInfer")._value.get() == 1
    finally:
        tight.stop()
