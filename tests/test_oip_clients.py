"""The Open Inference Protocol, proven with clients nobody here wrote, against the real stack.

tritonclient 2.73 (gRPC and HTTP, default options: binary tensor data on) runs in a subprocess from ``.venv-
tritonclient`` (:mod:`tests.oip_clients.venv`; it needs protobuf < 7), given the targets and the inputs in
files; it prints what it saw as JSON, and every figure is checked here against cnnserve.v1 Classify on the
same inputs, pinned to revision 0 on both sides (other tests fine-tune the session's LeNet). ``buf curl``
calls ``inference.GRPCInferenceService/ModelMetadata`` through server reflection, and the README's
tritonclient snippet runs as written but for its targets.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnserve.client import ClassifierClient
from cnnserve.gateway.types import ClassScore, TensorInput
from cnnserve.preprocess import Preprocessing, prepare_images
from cnnserve_export.data import ImageData
from cnnserve_export.export import ExportResult
from tests.gateway_helpers import GatewayThread
from tests.helpers import PROBABILITY_ATOL, assert_probabilities_close, assert_top_k, by_class, png_bytes

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CHECKS = ROOT / "tests" / "oip_clients" / "tritonclient_checks.py"
REQUIRED = os.environ.get("CNNSERVE_REQUIRE_DATASETS") == "1"  # CI: a missing client fails, never skips
MODEL = "lenet"
REVISION = 0  # the trained base: always kept, whatever other tests fine-tuned meanwhile
IMAGES = 4  # per batch


@pytest.fixture(scope="session")
def triton_python() -> Path:
    """``.venv-tritonclient/bin/python``, building the venv when it is missing (needs PyPI once)."""
    from tests.oip_clients.venv import VenvError, ensure_venv

    try:
        return ensure_venv()
    except VenvError as exc:
        message = f"tritonclient's venv (.venv-tritonclient) could not be built; is PyPI reachable? {exc}"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)


def run_python(python: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``python args`` with an environment free of this process's Python settings (its .venv, PYTHONPATH)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    return subprocess.run([str(python), *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


def host_port(url: str) -> str:
    """tritonclient's form of a URL: ``http://127.0.0.1:8000`` -> ``127.0.0.1:8000``."""
    return re.sub(r"^[a-z]+://", "", url).rstrip("/")


def targets(gateway: GatewayThread) -> dict[str, str]:
    return {"grpc": gateway.target, "http": host_port(gateway.http_url)}


@dataclass(frozen=True)
class Inputs:
    fp32: Path  # .npy float32 (N, 1, 32, 32): the preprocessed batch
    pngs: tuple[Path, ...]  # N encoded images
    tensor_batch: Any  # the same float32 (N, 1, 32, 32) array
    png_bytes: tuple[bytes, ...]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, digits: ImageData, lenet_export: ExportResult) -> Inputs:
    folder = tmp_path_factory.mktemp("oip-inputs")
    batch = prepare_images(
        digits.test_images[IMAGES : 2 * IMAGES], Preprocessing.from_card(lenet_export.card)
    )
    tensor_batch = batch.numpy().astype(np.float32)  # (N, 1, 32, 32)
    np.save(folder / "batch.npy", tensor_batch)
    encoded = tuple(png_bytes(image[0].numpy()) for image in digits.test_images[:IMAGES])
    pngs = []
    for index, data in enumerate(encoded):
        path = folder / f"digit-{index}.png"
        path.write_bytes(data)
        pngs.append(path)
    return Inputs(folder / "batch.npy", tuple(pngs), tensor_batch, encoded)


def pairs(scores: tuple[ClassScore, ...]) -> list[tuple[int, float]]:
    return [(s.index, s.probability) for s in scores]


@dataclass(frozen=True)
class Reference:
    """cnnserve.v1 Classify on the same inputs, every class, revision 0: (N, classes) probabilities."""

    tensors: Any
    images: Any
    classes: int


@pytest.fixture(scope="module")
def reference(client: ClassifierClient, inputs: Inputs, lenet_export: ExportResult) -> Reference:
    classes = lenet_export.card.num_classes
    batch = inputs.tensor_batch
    tensors = [TensorInput(tuple(item.shape), item.astype("<f4").tobytes()) for item in batch]
    by_tensor = client.classify(MODEL, tensors, top_k=classes, revision=REVISION)
    by_image = client.classify(MODEL, list(inputs.png_bytes), top_k=classes, revision=REVISION)
    assert by_tensor.revision == by_image.revision == REVISION
    return Reference(
        np.array([by_class(pairs(p), classes) for p in by_tensor.predictions]),
        np.array([by_class(pairs(p), classes) for p in by_image.predictions]),
        classes,
    )


@pytest.fixture(scope="module", params=["grpc", "http"])
def seen(request: pytest.FixtureRequest, triton_python: Path, gateway: GatewayThread, inputs: Inputs) -> Any:
    """What tritonclient saw over one protocol: the JSON tritonclient_checks.py printed."""
    protocol = request.param
    args = ["--protocol", protocol, "--url", targets(gateway)[protocol], "--model", MODEL]
    args += ["--fp32", str(inputs.fp32), "--revision", str(REVISION)]
    for path in inputs.pngs:
        args += ["--png", str(path)]
    ran = run_python(triton_python, str(CHECKS), *args)
    assert ran.returncode == 0, f"tritonclient over {protocol} failed:\n{ran.stderr[-4000:]}"
    return {"protocol": protocol, **json.loads(ran.stdout)}


def ints(values: Any) -> list[int]:
    """Shapes as ints: gRPC's JSON writes int64 as strings."""
    return [int(v) for v in values]


# ---- health, metadata, configuration ---------------------------------------------------------------


def test_health_and_readiness(seen: Any) -> None:
    assert seen["live"] is True and seen["ready"] is True and seen["model_ready"] is True
    # Unknown: not ready, or tritonclient's own exception for NOT_FOUND (its gRPC is_model_ready raises).
    unknown = seen["unknown_model_ready"]
    if "error" in unknown:
        assert unknown["error"]["type"] == "InferenceServerException"
        assert unknown["error"]["status"] in ("StatusCode.NOT_FOUND", "404"), unknown
    else:
        assert unknown["value"] is False


def test_server_and_model_metadata(seen: Any, lenet_export: ExportResult) -> None:
    server = seen["server_metadata"]
    assert server["name"] == "cnnserve" and server["version"]
    assert {"classification", "binary_tensor_data"} <= set(server["extensions"])

    metadata = seen["metadata"]
    assert metadata["name"] == MODEL and "1.0" in metadata["versions"] and metadata["platform"]
    c, h, w = lenet_export.card.input_shape
    inputs = {t["name"]: (t["datatype"], ints(t["shape"])) for t in metadata["inputs"]}
    assert inputs == {"input": ("FP32", [-1, c, h, w]), "image": ("BYTES", [-1])}
    outputs = {t["name"]: (t["datatype"], ints(t["shape"])) for t in metadata["outputs"]}
    assert outputs == {"probabilities": ("FP32", [-1, lenet_export.card.num_classes])}


def test_model_config_and_repository_index(seen: Any, lenet_export: ExportResult) -> None:
    config = seen["config"]
    assert config["name"] == MODEL and int(config["max_batch_size"]) >= IMAGES
    by_name = {entry["name"]: entry for entry in config["input"]}
    assert by_name["input"]["data_type"] == "TYPE_FP32"
    assert ints(by_name["input"]["dims"]) == list(lenet_export.card.input_shape)
    (output,) = config["output"]
    assert output["name"] == "probabilities" and output["data_type"] == "TYPE_FP32"
    assert ints(output["dims"]) == [lenet_export.card.num_classes]

    index = {entry["name"]: entry for entry in seen["repository_index"]}
    assert {"lenet", "alexnet"} <= set(index)
    assert index["lenet"].get("state") == "READY", index["lenet"]


# ---- inference against cnnserve.v1 Classify ----------------------------------------------------------


def test_fp32_batch_agrees_with_classify(seen: Any, reference: Reference) -> None:
    fp32 = seen["fp32"]
    assert fp32["dtype"] == "float32" and fp32["shape"] == [IMAGES, reference.classes]
    got = np.array(fp32["probabilities"])
    assert_probabilities_close(got, reference.tensors, PROBABILITY_ATOL)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)
    assert fp32["response"]["model_name"] == MODEL and fp32["response"]["model_version"] == "1.0"
    assert fp32["parameters"]["revision"] == REVISION
    (output,) = fp32["response"]["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32"
    assert ints(output["shape"]) == [IMAGES, reference.classes]
    # No outputs named: the server answers every output, the same one.
    assert_probabilities_close(seen["fp32_all_outputs"], reference.tensors, PROBABILITY_ATOL)


def test_bytes_images_agree_with_classify(seen: Any, reference: Reference) -> None:
    images = seen["bytes"]
    assert images["dtype"] == "float32" and images["shape"] == [IMAGES, reference.classes]
    assert_probabilities_close(images["probabilities"], reference.images, PROBABILITY_ATOL)
    assert images["parameters"]["revision"] == REVISION


def test_classification_extension_gives_the_top_three(seen: Any, reference: Reference) -> None:
    classification = seen["classification"]
    assert classification["shape"] == [IMAGES, 3]
    for row, expected in zip(classification["rows"], reference.images, strict=True):
        assert len(row) == 3
        # "%f" scores carry 6 decimals: within the tolerance of the probabilities they print.
        assert_top_k([(entry["index"], entry["score"]) for entry in row], expected, PROBABILITY_ATOL)
        assert [entry["label"] for entry in row] == [str(entry["index"]) for entry in row]  # digits' labels


def test_errors_are_clean_client_exceptions(seen: Any) -> None:
    grpc = seen["protocol"] == "grpc"
    errors = seen["errors"]
    for case in ("unknown_model", "unknown_model_metadata"):
        assert errors.get(case), f"{case}: tritonclient raised nothing"
        assert errors[case]["type"] == "InferenceServerException"
        assert errors[case]["status"] == ("StatusCode.NOT_FOUND" if grpc else "404"), errors[case]
        assert "no-such-model" in errors[case]["message"] and "Traceback" not in errors[case]["message"]
    bad = errors.get("bad_shape")
    assert bad, "a three-channel batch for a one-channel model was answered"
    assert bad["status"] == ("StatusCode.INVALID_ARGUMENT" if grpc else "400"), bad
    assert bad["message"] and "Traceback" not in bad["message"]


# ---- the README's snippet -----------------------------------------------------------------------------


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Open Inference Protocol", 1)[1].split("\n### ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_tritonclient_snippet_runs_as_written(
    triton_python: Path,
    gateway: GatewayThread,
    client: ClassifierClient,
    lenet_export: ExportResult,
    tmp_path: Path,
) -> None:
    """The README's tritonclient block, verbatim but for its two targets, after its own digit.png command."""
    readme = (ROOT / "README.md").read_text()
    make_digit = readme.split('A digit image to try: `.venv/bin/python -c "', 1)[1].split('"`', 1)[0]
    made = subprocess.run(
        [sys.executable, "-c", make_digit], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert made.returncode == 0, made.stderr
    snippet = readme_snippet()
    for default in ('"127.0.0.1:50051"', '"127.0.0.1:8000"'):
        assert default in snippet, f"the snippet no longer dials {default}"
    found = targets(gateway)
    snippet = snippet.replace('"127.0.0.1:50051"', repr(found["grpc"]))
    snippet = snippet.replace('"127.0.0.1:8000"', repr(found["http"]))
    ran = run_python(triton_python, "-c", snippet, cwd=tmp_path)
    assert ran.returncode == 0, ran.stderr[-4000:]

    expected = client.classify(MODEL, [(tmp_path / "digit.png").read_bytes()], top_k=1, revision=REVISION)
    top1 = expected.predictions[0][0].index
    printed = re.findall(r"^(grpc|http) top-1: \[(\d+)\]$", ran.stdout, re.MULTILINE)
    assert [protocol for protocol, _ in printed] == ["grpc", "http"], ran.stdout
    assert all(int(index) == top1 for _, index in printed), (printed, top1)
    classes = lenet_export.card.num_classes
    assert re.search(rf"^\(2, {classes}\) revision \d+$", ran.stdout, re.MULTILINE), ran.stdout


# ---- buf curl through server reflection --------------------------------------------------------------


def buf_command() -> list[str] | None:
    """How to run ``buf`` here without downloading anything: on PATH, in node_modules, or npx's cache."""
    if found := shutil.which("buf"):
        return [found]
    local = ROOT / "node_modules" / ".bin" / "buf"
    if local.exists():
        return [str(local)]
    npx = shutil.which("npx")
    if npx is None:
        return None
    command = [npx, "--offline", "--yes", "@bufbuild/buf"]
    try:
        probe = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return None
    return command if probe.returncode == 0 else None


def test_buf_curl_model_metadata_through_reflection(
    gateway: GatewayThread, lenet_export: ExportResult
) -> None:
    buf = buf_command()
    if buf is None:
        missing = "buf is not installed (npm install @bufbuild/buf; the README's buf curl section)"
        if REQUIRED:  # CI installs it (.ci/install-system-packages): there, missing is a failure
            pytest.fail(missing)
        pytest.skip(missing)
    base = [*buf, "curl", "--protocol", "grpc", "--http2-prior-knowledge"]
    url = f"http://{gateway.target}"
    listed = subprocess.run([*base, "--list-methods", url], capture_output=True, text=True, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "inference.GRPCInferenceService/ModelMetadata" in listed.stdout.split()

    called = subprocess.run(
        [*base, "-d", json.dumps({"name": MODEL}), f"{url}/inference.GRPCInferenceService/ModelMetadata"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert called.returncode == 0, called.stderr
    metadata = json.loads(called.stdout)
    c, h, w = lenet_export.card.input_shape
    assert metadata["name"] == MODEL and "1.0" in metadata["versions"]
    assert {(t["name"], t["datatype"], tuple(ints(t["shape"]))) for t in metadata["inputs"]} == {
        ("input", "FP32", (-1, c, h, w)),
        ("image", "BYTES", (-1,)),
    }

    missing = subprocess.run(
        [
            *base,
            "-d",
            json.dumps({"name": "no-such-model"}),
            f"{url}/inference.GRPCInferenceService/ModelMetadata",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0 and "not_found" in (missing.stdout + missing.stderr).lower()


# ---- the benchmark's OIP load target -----------------------------------------------------------------


@pytest.mark.parametrize("per_call", [1, IMAGES])
def test_the_bench_oip_target_sends_what_tritonclient_would(
    gateway: GatewayThread, inputs: Inputs, lenet_export: ExportResult, per_call: int
) -> None:
    """``cnnserve.bench.oip``'s pre-serialized ModelInfer requests: well-formed, and answered without errors
    by the live gateway for images and for tensors (a short load point, two callers)."""
    import asyncio

    from cnnserve.bench.loadgen import LoadSpec, run_point
    from cnnserve.bench.oip import infer_requests
    from cnnserve.gateway.oip.messages import pb

    batch = inputs.tensor_batch
    for spec in (
        LoadSpec("oip-grpc", gateway.target, MODEL, inputs.png_bytes, 2, 0.3, 0.0, 1, per_call),
        LoadSpec(
            "oip-grpc",
            gateway.target,
            MODEL,
            tuple(item.astype("<f4").tobytes() for item in batch),
            2,
            0.3,
            0.0,
            1,
            per_call,
            tensor_shape=tuple(batch.shape[1:]),
        ),
    ):
        request = pb.ModelInferRequest.FromString(infer_requests(spec)[0])
        (tensor,) = request.inputs
        assert request.model_name == MODEL and [o.name for o in request.outputs] == ["probabilities"]
        if spec.tensor_shape:
            assert (tensor.name, tensor.datatype) == ("input", "FP32")
            assert list(tensor.shape) == [per_call, *lenet_export.card.input_shape]
            assert len(request.raw_input_contents[0]) == 4 * per_call * int(np.prod(spec.tensor_shape))
        else:
            assert (tensor.name, tensor.datatype, list(tensor.shape)) == ("image", "BYTES", [per_call])
            assert len(request.raw_input_contents[0]) == sum(4 + len(p) for p in inputs.png_bytes[:per_call])
        result = asyncio.run(run_point(spec))
        (rep,) = result.reps
        assert rep.errors == 0, rep.first_error
        assert rep.calls > 0 and rep.images == rep.calls * per_call
        assert result.request_bytes == request.ByteSize()
