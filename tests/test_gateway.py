"""The gateway, for real: grpc.aio on a free port, in front of the session's real TorchServe."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from cnnserve.client import ClassifierClient
from cnnserve.errors import (
    ConflictError,
    DeadlineExceededError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    UnauthenticatedError,
    UnavailableError,
)
from cnnserve.gateway.types import ClassifyCall, ClassifyResult, ClassScore, ModelInput, TensorInput
from cnnserve.preprocess import Preprocessing, prepare_images
from cnnserve.torchserve import TorchServe
from cnnserve.v1 import classifier_pb2 as pb
from cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from cnnserve_export.data import ImageData
from cnnserve_export.export import ExportResult
from tests.gateway_helpers import GatewayThread, hold_backend, settings_for
from tests.helpers import (
    RUNTIME_PROBABILITY_ATOL,
    assert_probabilities_close,
    assert_top_k,
    by_class,
    cnnserve,
    make_certificate,
    png_bytes,
    wait_until,
)

pytestmark = [pytest.mark.torchserve, pytest.mark.slow]


def digit_pngs(digits: ImageData, start: int, count: int) -> list[bytes]:
    return [png_bytes(image[0].numpy()) for image in digits.test_images[start : start + count]]


def tensor(array: np.ndarray) -> TensorInput:
    return TensorInput(tuple(array.shape), array.astype("<f4").tobytes())


def model_tensors(export: ExportResult, digits: ImageData, start: int, count: int) -> torch.Tensor:
    return prepare_images(digits.test_images[start : start + count], Preprocessing.from_card(export.card))


def pairs(scores: Sequence[ClassScore]) -> list[tuple[int, float]]:
    return [(s.index, s.probability) for s in scores]


def in_flight_rpcs(gateway: GatewayThread) -> float:
    value = gateway.running.metrics.registry.get_sample_value("cnnserve_gateway_in_flight_rpcs")
    return value or 0.0


# ---- happy paths ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["lenet", "alexnet"])
def test_classify_images_and_tensors(
    model: str, client: ClassifierClient, digits: ImageData, request: pytest.FixtureRequest
) -> None:
    export: ExportResult = request.getfixturevalue(f"{model}_export")
    inputs = model_tensors(export, digits, 0, 3)
    with torch.no_grad():
        from tests.test_torchserve import eager

        expected = torch.softmax(eager(export)(inputs), 1).numpy()  # (3, 10)
    result = client.classify(
        model, [*digit_pngs(digits, 0, 2), tensor(inputs[2].numpy())], top_k=3, revision=0
    )
    assert (result.model, result.version, result.revision) == (model, "1.0", 0)
    assert all(len(scores) == 3 for scores in result.predictions) and len(result.predictions) == 3
    # A barely trained AlexNet has near ties: probabilities by class, top-1 only where it is clear.
    for scores, row in zip(result.predictions, expected, strict=True):
        assert_top_k(pairs(scores), row, RUNTIME_PROBABILITY_ATOL)
    assert result.timing.server_ms > 0 and result.timing.backend_ms > 0
    single = client.classify(model, digit_pngs(digits, 0, 1), revision=0)
    assert len(single.predictions[0]) == 5
    assert_top_k(pairs(single.predictions[0]), expected[0], RUNTIME_PROBABILITY_ATOL)


def test_classify_stream_answers_in_order(client: ClassifierClient, digits: ImageData) -> None:
    pngs = digit_pngs(digits, 0, 20)
    calls = [ClassifyCall("lenet", (ModelInput(image=png),), top_k=10, revision=0) for png in pngs]
    streamed = list(client.classify_stream(calls))
    singles = [client.classify("lenet", [png], top_k=10, revision=0) for png in pngs]
    # Stream requests may share micro-batches, whose kernels differ from batch 1's in the last bits.
    assert len(streamed) == len(singles)
    assert_probabilities_close(
        [by_class(pairs(r.predictions[0]), 10) for r in streamed],
        [by_class(pairs(r.predictions[0]), 10) for r in singles],
    )


@pytest.mark.parametrize(
    ("model", "shape", "params"), [("lenet", (), 61_706), ("alexnet", (3, 224, 224), 57_044_810)]
)
def test_get_layer_shapes(model: str, shape: tuple[int, ...], params: int, client: ClassifierClient) -> None:
    table = client.layer_shapes(model, shape).table
    assert table.total_parameters == params
    assert list(table.layers[0].output_shape) == ([6, 28, 28] if model == "lenet" else [64, 55, 55])
    with pytest.raises(InvalidInputError) as caught:
        client.layer_shapes(model, (3, 32, 32) if model == "alexnet" else (1, 8, 8))
    assert ("features.12" if model == "alexnet" else "features.3") in caught.value.message
    assert caught.value.violations[0].field == "input_shape"


def test_finetune_step_and_revisions(client: ClassifierClient, digits: ImageData) -> None:
    images, labels = digit_pngs(digits, 200, 16), digits.test_targets[200:216].tolist()
    step = client.finetune_step("lenet", images, labels, lr=0.05)
    assert step.revision == step.parent + 1 and not step.replayed and step.request_id
    # One SGD step need not lower the loss (test_service checks both losses against eager PyTorch); what
    # holds anywhere: finite cross-entropies, a gradient, and new weights recorded as a child of the parent.
    assert 0 <= step.loss_before < math.inf and 0 <= step.loss_after < math.inf
    assert 0 < step.grad_norm < math.inf
    after = client.classify("lenet", images[:1], min_revision=step.revision)
    assert after.revision >= step.revision
    listing = client.list_revisions("lenet")
    assert listing.head >= step.revision and listing.revisions[0].kind == "base"
    revisions = {r.revision: r for r in listing.revisions}
    made = revisions[step.revision]
    assert (made.kind, made.parent, made.request_id) == ("step", step.parent, step.request_id)
    assert made.sha256 != revisions[step.parent].sha256  # the step changed the served weights
    rolled = client.rollback("lenet", step.parent)
    assert rolled.revision.kind == "rollback" and rolled.weights_of == step.parent
    reset = client.reset("lenet")
    assert reset.revision.kind == "reset" and reset.weights_of == 0
    assert client.classify("lenet", images[:1]).revision == reset.revision.revision


def test_alexnet_finetunes_its_classifier(client: ClassifierClient, digits: ImageData) -> None:
    step = client.finetune_step(
        "alexnet",
        digit_pngs(digits, 0, 4),
        digits.test_targets[:4].tolist(),
        lr=0.01,
        train_layers="classifier",
    )
    assert step.model == "alexnet" and step.revision >= 1 and step.grad_norm > 0


def test_list_and_get_models(client: ClassifierClient) -> None:
    models = {m.name: m for m in client.list_models()}
    assert set(models) == {"lenet", "alexnet"}
    assert models["lenet"].ready_workers == 2 and models["lenet"].serving
    details = client.get_model("lenet")
    model = details.info
    assert list(model.input_shape) == [1, 32, 32] and list(model.labels) == [str(i) for i in range(10)]
    assert (
        model.parity["passed"]
        and model.parity["samples"] >= 64
        and set(model.parity["formats"]) == {"onnx", "torchscript"}
    )
    assert model.format == "onnx" and model.device == "cpu" and model.fine_tuning
    assert list(model.formats) == ["onnx"]  # an archive carries the format it serves
    assert list(details.status.versions) == ["1.0"]
    assert len(model.base_sha256) == 64 and model.retention > 0


# ---- micro-batching -----------------------------------------------------------------------------------


def test_micro_batched_answers_equal_unbatched_and_each_caller_gets_its_own(
    torchserve: TorchServe, digits: ImageData
) -> None:
    pngs = digit_pngs(digits, 300, 48)
    batching = GatewayThread(settings_for(torchserve, metrics_listen="off"))
    try:
        with ClassifierClient(batching.target, timeout=60) as batch_client:
            unbatched = batch_client.classify(
                "lenet", pngs, revision=0, top_k=10
            )  # one request, no coalescing
            # Hold classify calls at the backend until all 48 callers are in: the in-flight limit is full, so
            # the rest must queue and leave in micro-batches (nothing left to the scheduler's timing).
            held = hold_backend(batching)

            def one(index: int) -> ClassifyResult:
                return batch_client.classify("lenet", [pngs[index]], revision=0, top_k=10)

            with ThreadPoolExecutor(48) as pool:
                replies = pool.map(one, range(48))
                wait_until(
                    lambda: (
                        in_flight_rpcs(batching) == 48
                        and held.waiting == batching.running.settings.max_in_flight
                    ),
                    60,
                    "48 Classify calls in the gateway with the in-flight limit full",
                )
                batching.loop.call_soon_threadsafe(held.release)
                results = list(replies)
        # Each caller gets its own input's answer; batched and unbatched kernels differ in the last bits.
        assert_probabilities_close(
            [by_class(pairs(r.predictions[0]), 10) for r in results],
            [by_class(pairs(scores), 10) for scores in unbatched.predictions],
        )
        sizes = [r.timing.batch_inputs for r in results]
        assert min(sizes) >= 1 and max(sizes) > 1
        assert batching.running.gateway._batcher.stats.largest == max(sizes)
    finally:
        batching.stop()


# ---- errors -----------------------------------------------------------------------------------------------


def bad_request_fields(error: grpc.RpcError) -> list[str]:
    status = rpc_status.from_call(error)
    assert status is not None
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        fields += [v.field for v in bad.field_violations]
    return fields


def raw_stub(gateway: GatewayThread) -> pb_grpc.ClassifierStub:
    return pb_grpc.ClassifierStub(grpc.insecure_channel(gateway.target))


@pytest.mark.parametrize(
    ("inputs", "field"),
    [
        ([pb.Input(image=b"not an image at all")], "inputs[0].image"),
        ([pb.Input(tensor=pb.Tensor(shape=[1, 32, 32], data=b"\x00" * 12))], "inputs[0].tensor.data"),
        (
            [pb.Input(tensor=pb.Tensor(shape=[1, 32, 32], data=np.full(1024, np.nan, "<f4").tobytes()))],
            "inputs[0].tensor.data",
        ),
        (
            [pb.Input(tensor=pb.Tensor(shape=[1, 31, 32], data=np.zeros(992, "<f4").tobytes()))],
            "inputs[0].shape",
        ),
        ([pb.Input(image=b"x")] * 65, "inputs"),
        ([pb.Input()], "inputs[0]"),
    ],
)
def test_bad_input_is_invalid_argument_with_field_violations(
    gateway: GatewayThread, inputs: list[pb.Input], field: str
) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        raw_stub(gateway).Classify(pb.ClassifyRequest(model="lenet", inputs=inputs), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in bad_request_fields(caught.value)


def test_message_over_the_size_limit(torchserve: TorchServe) -> None:
    small = GatewayThread(settings_for(torchserve, max_message_mb=1, metrics_listen="off"))
    try:
        with pytest.raises(grpc.RpcError) as caught:
            raw_stub(small).Classify(
                pb.ClassifyRequest(model="lenet", inputs=[pb.Input(image=b"\x00" * (2 * 2**20))]), timeout=30
            )
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        small.stop()


def test_unknown_model_version_and_revision(client: ClassifierClient, digits: ImageData) -> None:
    with pytest.raises(NotFoundError, match="unknown model 'resnet'"):
        client.classify("resnet", digit_pngs(digits, 0, 1))
    with pytest.raises(NotFoundError, match=r"no version '9\.9'"):
        client.classify("lenet", digit_pngs(digits, 0, 1), version="9.9")
    with pytest.raises(NotFoundError, match="revision 100000"):
        client.classify("lenet", digit_pngs(digits, 0, 1), revision=100_000)


def test_expired_deadline(client: ClassifierClient, digits: ImageData) -> None:
    with pytest.raises(DeadlineExceededError):
        client.classify("alexnet", digit_pngs(digits, 0, 8), timeout=0.001)


def test_stale_expected_revision_is_aborted_and_request_ids_apply_once(
    client: ClassifierClient, digits: ImageData
) -> None:
    images, labels = digit_pngs(digits, 400, 8), digits.test_targets[400:408].tolist()
    head = client.list_revisions("lenet").head
    with pytest.raises(ConflictError, match="not the expected"):
        client.finetune_step("lenet", images, labels, lr=0.01, expected_revision=head + 50)
    first = client.finetune_step(
        "lenet", images, labels, lr=0.01, request_id="test-once", expected_revision=head
    )
    again = client.finetune_step("lenet", images, labels, lr=0.01, request_id="test-once")
    assert again.replayed and again.revision == first.revision == head + 1
    # The replay is the stored first result, not a recomputation: equal exactly.
    assert (again.loss_before, again.loss_after, again.grad_norm) == (
        first.loss_before,
        first.loss_after,
        first.grad_norm,
    )
    assert client.list_revisions("lenet").head == head + 1


def test_bad_finetune_requests(client: ClassifierClient, digits: ImageData) -> None:
    images = digit_pngs(digits, 0, 2)
    with pytest.raises(InvalidInputError, match="labels"):
        client.finetune_step("lenet", images, [1], lr=0.1)
    with pytest.raises(InvalidInputError, match="lr"):
        client.finetune_step("lenet", images, [1, 2], lr=-1.0)
    with pytest.raises(InvalidInputError, match="outside"):
        client.finetune_step("lenet", images, [1, 12], lr=0.1)


def test_load_is_shed_not_queued(torchserve: TorchServe, digits: ImageData) -> None:
    tight = GatewayThread(settings_for(torchserve, max_concurrent_rpcs=2, metrics_listen="off"))
    images = digit_pngs(digits, 0, 4)
    try:
        # Two calls held at the backend fill the limit: a third is refused at once, not queued behind them.
        held = hold_backend(tight)
        with ClassifierClient(tight.target) as burst_client, ThreadPoolExecutor(2) as pool:
            admitted = [pool.submit(burst_client.classify, "lenet", images, revision=0) for _ in range(2)]
            wait_until(lambda: held.waiting == 2, 60, "two calls held at the backend")
            started = time.monotonic()
            with pytest.raises(OverloadedError):
                burst_client.classify("lenet", images, revision=0)
            assert time.monotonic() - started < 10  # refused, not parked until the held ones finish
            tight.loop.call_soon_threadsafe(held.release)
            assert all(len(call.result(timeout=60).predictions) == 4 for call in admitted)
            assert len(burst_client.classify("lenet", images, revision=0).predictions) == 4  # a slot is free
        assert tight.running.metrics.shed.labels("Classify")._value.get() == 1
    finally:
        tight.stop()


def test_backend_down_is_unavailable(tmp_path: Path, digits: ImageData) -> None:
    from cnnserve.processes import free_ports

    ports = free_ports(2)
    from cnnserve.gateway.settings import GatewaySettings

    settings = GatewaySettings(
        listen="127.0.0.1:0",
        metrics_listen="off",
        http_listen="off",
        torchserve=f"127.0.0.1:{ports[0]}",
        torchserve_management=f"127.0.0.1:{ports[1]}",
        torchserve_key_file="",
    )
    lonely = GatewayThread(settings)
    try:
        with ClassifierClient(lonely.target) as lonely_client:
            with pytest.raises(UnavailableError):
                lonely_client.classify("lenet", digit_pngs(digits, 0, 1))
            assert lonely_client.health() == "NOT_SERVING"
    finally:
        lonely.stop()


# ---- health, reflection, auth, TLS, metrics -----------------------------------------------------------


def test_health_overall_and_per_model(gateway: GatewayThread) -> None:
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(gateway.target))
    for service in (
        "",
        "cnnserve.v1.Classifier",
        "cnnserve.v1.Classifier/lenet",
        "cnnserve.v1.Classifier/alexnet",
    ):
        reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as caught:
        stub.Check(health_pb2.HealthCheckRequest(service="cnnserve.v1.Classifier/resnet"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_the_service(gateway: GatewayThread) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(grpc.insecure_channel(gateway.target))
    replies = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
    )
    names = {s.name for reply in replies for s in reply.list_services_response.service}
    assert {"cnnserve.v1.Classifier", "grpc.health.v1.Health"} <= names


def test_health_flips_to_not_serving_on_shutdown(torchserve: TorchServe, digits: ImageData) -> None:
    doomed = GatewayThread(settings_for(torchserve, metrics_listen="off", grace_period=3.0))
    stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(doomed.target))
    assert (
        stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status
        == health_pb2.HealthCheckResponse.SERVING
    )
    statuses = []
    watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=20)
    held = hold_backend(doomed)
    with ClassifierClient(doomed.target) as slow_client, ThreadPoolExecutor(2) as pool:
        in_flight = pool.submit(slow_client.classify, "lenet", digit_pngs(digits, 0, 4), revision=0)
        wait_until(lambda: held.waiting == 1, 30, "the call to be in flight at the backend")
        stopper = pool.submit(doomed.stop, 3.0)
        for update in watch:
            statuses.append(update.status)
            if update.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
        doomed.loop.call_soon_threadsafe(held.release)  # still in flight when health flipped; now let it end
        assert len(in_flight.result(timeout=30).predictions) == 4  # finished inside the grace period
        stopper.result(timeout=30)
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING


def test_bearer_token(torchserve: TorchServe, digits: ImageData) -> None:
    guarded = GatewayThread(settings_for(torchserve, token="s3cret", metrics_listen="off"))
    try:
        with ClassifierClient(guarded.target) as anonymous, pytest.raises(UnauthenticatedError):
            anonymous.classify("lenet", digit_pngs(digits, 0, 1))
        with ClassifierClient(guarded.target, token="wrong") as wrong, pytest.raises(UnauthenticatedError):
            wrong.list_models()
        with ClassifierClient(guarded.target, token="s3cret") as authorized:
            assert authorized.classify("lenet", digit_pngs(digits, 0, 1)).model == "lenet"
        with ClassifierClient(guarded.target) as prober:  # health checks need no token
            assert prober.health() == "SERVING"
    finally:
        guarded.stop()


def test_tls(torchserve: TorchServe, tmp_path: Path, digits: ImageData) -> None:
    cert, key = make_certificate(tmp_path)
    secure = GatewayThread(
        settings_for(torchserve, tls_cert=str(cert), tls_key=str(key), metrics_listen="off")
    )
    try:
        with ClassifierClient(secure.target, tls_ca=str(cert)) as tls_client:
            assert tls_client.classify("lenet", digit_pngs(digits, 0, 1)).model == "lenet"
        with ClassifierClient(secure.target, timeout=3) as plain, pytest.raises(UnavailableError):
            plain.list_models()
    finally:
        secure.stop()


def test_prometheus_metrics(gateway: GatewayThread, client: ClassifierClient, digits: ImageData) -> None:
    client.classify("lenet", digit_pngs(digits, 0, 1))
    with pytest.raises(NotFoundError):
        client.classify("resnet", digit_pngs(digits, 0, 1))
    client.get_model("lenet")
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{gateway.running.metrics_port}/metrics", timeout=5)
        .read()
        .decode()
    )
    assert 'cnnserve_gateway_rpcs_total{code="OK",method="Classify"}' in text
    assert 'cnnserve_gateway_rpcs_total{code="NOT_FOUND",method="Classify"}' in text
    assert "cnnserve_gateway_rpc_latency_seconds_bucket" in text
    assert 'cnnserve_gateway_batch_inputs_count{model="lenet"}' in text
    assert 'cnnserve_gateway_model_serving{model="alexnet"} 1.0' in text
    # This machine has no GPU and the session's archives ask for none: the worker's real device is reported.
    assert (
        'cnnserve_gateway_model_device{device="cpu",model="lenet",provider="CPUExecutionProvider",'
        'requested_device="cpu"} 1.0' in text
    )
    assert "cnnserve_gateway_shed_total" in text or "cnnserve_gateway_shed" in text


def test_health_probe_exit_status(gateway: GatewayThread) -> None:
    """The container healthcheck: 0 and SERVING from a live gateway; 1 and the reason otherwise."""
    from cnnserve.processes import free_ports

    def probe(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "cnnserve.gateway.probe", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=60)

    serving = probe("--target", gateway.target, "--service", "cnnserve.v1.Classifier/lenet")
    assert serving.returncode == 0 and serving.stdout.strip() == "SERVING", serving.stderr
    unknown = probe("--target", gateway.target, "--service", "cnnserve.v1.Classifier/resnet")
    assert unknown.returncode == 1 and unknown.stderr.startswith("unhealthy: NOT_FOUND")
    (port,) = free_ports(1)
    down = probe("--target", f"127.0.0.1:{port}", "--timeout", "1")
    assert down.returncode == 1 and down.stderr.startswith("unhealthy: ")


# ---- the CLI against the live stack --------------------------------------------------------------------


def test_cli_against_the_live_gateway(gateway: GatewayThread, tmp_path: Path, digits: ImageData) -> None:
    image = tmp_path / "digit.png"
    image.write_bytes(digit_pngs(digits, 0, 1)[0])
    target = ["--target", gateway.target]
    classified = cnnserve("classify", str(image), "--model", "lenet", "--top-k", "2", "--json", *target)
    assert classified.returncode == 0, classified.stderr
    assert json.loads(classified.stdout)["results"][0]["top_k"][0]["label"] in [str(i) for i in range(10)]
    shapes = cnnserve("shapes", "--model", "alexnet", "--input", "3,224,224", "--remote", "--json", *target)
    assert shapes.returncode == 0 and json.loads(shapes.stdout)["layers"][0]["output_shape"] == [64, 55, 55]
    tuned = cnnserve(
        "finetune",
        "--model",
        "lenet",
        "--dataset",
        "digits",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--json",
        *target,
    )
    assert tuned.returncode == 0, tuned.stderr
    rows = [json.loads(line) for line in tuned.stdout.splitlines() if line.startswith('{"step"')]
    assert [r["step"] for r in rows] == [1, 2] and rows[1]["revision"] == rows[0]["revision"] + 1
    listed = cnnserve("revisions", "--model", "lenet", "--json", *target)
    assert json.loads(listed.stdout)["head"] == rows[1]["revision"]
    reset = cnnserve("revisions", "--model", "lenet", "--reset", *target)
    assert reset.returncode == 0 and "reset" in reset.stdout
    models = cnnserve("models", "--json", *target)
    assert {m["name"] for m in json.loads(models.stdout)} == {"lenet", "alexnet"}
    missing = cnnserve("classify", str(image), "--model", "resnet", *target)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr and "unknown model" in missing.stderr


def test_the_readme_python_example_runs_as_written(gateway: GatewayThread, tmp_path: Path) -> None:
    """The README's "gRPC from Python" block, verbatim but for the target, after its own digit.png command."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    make_digit = readme.split('A digit image to try: `.venv/bin/python -c "', 1)[1].split('"`', 1)[0]
    example = readme.split("### gRPC from Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    assert '"127.0.0.1:50051"' in example
    example = example.replace('"127.0.0.1:50051"', repr(gateway.target))
    for code in (make_digit, example):
        ran = subprocess.run(
            [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120
        )
        assert ran.returncode == 0, ran.stderr
    assert "is above this model's bound of 10" in ran.stdout  # the refused lr=100 step, printed
