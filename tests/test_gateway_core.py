"""The gateway core with an in-process backend (the real ModelService, no TorchServe): unit tests."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cnnserve.errors import DeadlineExceededError, InvalidInputError, NotFoundError, UnavailableError
from cnnserve.gateway.backend import Reply, Request
from cnnserve.gateway.core import CoreSettings, Gateway
from cnnserve.gateway.inprocess import InProcessBackend
from cnnserve.gateway.types import ClassifyCall, FineTuneCall, ModelInput, ShapesCall, TensorInput
from cnnserve.serving.service import ModelService, ServiceConfig
from cnnserve_export.data import ImageData
from cnnserve_export.export import ExportResult
from tests.gateway_helpers import HeldBackend
from tests.helpers import assert_probabilities_close, by_class, png_bytes, wait_until_async


@pytest.fixture
def backend(lenet_export: ExportResult, tmp_path: Path) -> InProcessBackend:
    service = ModelService(lenet_export.out, ServiceConfig(revisions_dir=str(tmp_path / "revisions")))
    return InProcessBackend({"lenet": service})


def images(digits: ImageData, count: int) -> list[ModelInput]:
    return [ModelInput(image=png_bytes(image[0].numpy())) for image in digits.test_images[:count]]


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


async def started(backend: Any, **settings: Any) -> Gateway:
    gateway = Gateway(backend, CoreSettings(**settings))
    await gateway.start()
    return gateway


def scores(result: Any) -> list[list[tuple[int, float]]]:
    return [[(s.index, s.probability) for s in prediction] for prediction in result.predictions]


def test_classify_batched_equals_direct(backend: InProcessBackend, digits: ImageData) -> None:
    async def scenario() -> None:
        gateway = await started(backend, max_batch=8)
        inputs = images(digits, 12)
        direct = await gateway.classify(ClassifyCall("lenet", tuple(inputs), top_k=10))
        # Hold the first calls at the backend: the in-flight limit is then full, so the others must queue
        # and leave together when the held ones return.
        held = HeldBackend(backend)
        gateway.backend = held
        singles = [
            asyncio.ensure_future(gateway.classify(ClassifyCall("lenet", (item,), top_k=10)))
            for item in inputs
        ]
        await wait_until_async(
            lambda: held.waiting == gateway.settings.max_in_flight, 10, "the in-flight limit to fill"
        )
        held.release()
        answers = await asyncio.gather(*singles)
        # Each caller gets its own input's answer; the two batch sizes' kernels differ only in the last bits.
        for single, expected in zip(answers, scores(direct), strict=True):
            assert_probabilities_close(by_class(scores(single)[0], 10), by_class(expected, 10))
        assert max(s.timing.batch_inputs for s in answers) == 8  # max_batch: the queued ones rode together
        assert held.arrived < len(inputs)  # coalesced into fewer backend calls than callers

    run(scenario())


def test_a_bad_input_in_a_batch_fails_only_its_caller(backend: InProcessBackend, digits: ImageData) -> None:
    async def scenario() -> None:
        held = HeldBackend(backend)
        gateway = await started(held, max_in_flight=1)
        good = images(digits, 4)
        leader = asyncio.ensure_future(gateway.classify(ClassifyCall("lenet", (good[0],))))
        await wait_until_async(lambda: held.waiting == 1, 10, "the first call to reach the backend")
        # The backend is busy with the leader: these four queue and leave as one batch.
        calls = [ClassifyCall("lenet", (item,)) for item in good[1:]] + [
            ClassifyCall("lenet", (ModelInput(image=b"junk"),))
        ]
        batch = [asyncio.ensure_future(gateway.classify(c)) for c in calls]
        # Not a timed wait: the loop first runs each task created above, up to where it queues.
        await asyncio.sleep(0)
        held.release()
        assert not isinstance(await leader, BaseException)
        results = await asyncio.gather(*batch, return_exceptions=True)
        assert all(not isinstance(r, BaseException) and r.timing.batch_inputs == 4 for r in results[:3])
        error = results[3]
        assert isinstance(error, InvalidInputError) and error.violations[0].field == "inputs[0].image"

    run(scenario())


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (ClassifyCall("", (ModelInput(image=b"x"),)), "model"),
        (ClassifyCall("lenet", ()), "inputs"),
        (ClassifyCall("lenet", (ModelInput(),)), "inputs[0]"),
        (ClassifyCall("lenet", (ModelInput(image=b""),)), "inputs[0].image"),
        (ClassifyCall("lenet", (ModelInput(tensor=TensorInput((0, 2), b"")),)), "inputs[0].tensor.shape"),
        (
            ClassifyCall("lenet", (ModelInput(tensor=TensorInput((1, 2), b"\x00" * 4)),)),
            "inputs[0].tensor.data",
        ),
        (ClassifyCall("lenet", (ModelInput(image=b"x"),), top_k=5000), "top_k"),
    ],
)
def test_validation_names_the_field(backend: InProcessBackend, call: ClassifyCall, field: str) -> None:
    async def scenario() -> None:
        gateway = await started(backend)
        with pytest.raises(InvalidInputError) as caught:
            await gateway.classify(call)
        assert caught.value.violations[0].field == field
        assert backend.calls == 0  # refused before reaching the model

    run(scenario())


class FlakyBackend(InProcessBackend):
    """Fails the first ``failures`` calls as if TorchServe had dropped them."""

    def __init__(self, inner: InProcessBackend, failures: int) -> None:
        super().__init__(inner.services)
        self.failures = failures
        self.seen: list[dict[str, Any]] = []

    async def call(self, model: str, version: str, request: Request[Reply], timeout: float | None) -> Reply:
        self.seen.append(json.loads(json.dumps(request.meta())))
        if self.failures > 0:
            self.failures -= 1
            raise UnavailableError("worker died")
        return await super().call(model, version, request, timeout)


def test_classify_is_retried_once(backend: InProcessBackend, digits: ImageData) -> None:
    async def scenario() -> None:
        flaky = FlakyBackend(backend, failures=1)
        gateway = await started(flaky)
        assert (await gateway.classify(ClassifyCall("lenet", tuple(images(digits, 2))))).revision == 0
        twice = FlakyBackend(backend, failures=2)
        gateway = await started(twice)
        with pytest.raises(UnavailableError):
            await gateway.classify(ClassifyCall("lenet", tuple(images(digits, 2))))

    run(scenario())


def test_finetune_retry_reuses_its_request_id_so_it_applies_once(
    backend: InProcessBackend, digits: ImageData
) -> None:
    async def scenario() -> None:
        flaky = FlakyBackend(backend, failures=1)
        gateway = await started(flaky)
        result = await gateway.finetune(
            FineTuneCall("lenet", tuple(images(digits, 4)), (0, 1, 2, 3), lr=0.01)
        )
        assert (
            len(flaky.seen) == 2
            and flaky.seen[0]["request_id"] == flaky.seen[1]["request_id"] == result.request_id
        )
        assert result.revision == 1
        listing = await gateway.list_revisions("lenet")
        assert listing.head == 1

    run(scenario())


def test_deadline_already_passed(backend: InProcessBackend, digits: ImageData) -> None:
    async def scenario() -> None:
        gateway = await started(backend)
        with pytest.raises(DeadlineExceededError):
            await gateway.layer_shapes(ShapesCall("lenet"), timeout=0.0)

    run(scenario())


def test_unknown_model_and_health(backend: InProcessBackend) -> None:
    async def scenario() -> None:
        gateway = await started(backend)
        assert gateway.health() == {"lenet": True} and gateway.serving
        with pytest.raises(NotFoundError, match="served: lenet"):
            await gateway.layer_shapes(ShapesCall("alexnet"))
        backend.available = False
        assert await gateway.refresh_models() == {"lenet": False}
        assert not gateway.serving

    run(scenario())


def test_the_gateway_does_not_import_torch() -> None:
    code = (
        "import sys; import cnnserve.gateway.server, cnnserve.client, cnnserve.cli; "
        "from cnnserve.cli import build_parser; build_parser(); "
        "bad = [m for m in ('torch', 'onnxruntime', 'PIL') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_layer_table_survives_the_wire() -> None:
    """The handler's table -> its JSON reply -> the gateway -> GetLayerShapesResponse -> the client's table:
    nothing lost on either hop."""
    from cnnserve.contract import ShapesReply, ShapesRequest, encode_json, read_reply
    from cnnserve.gateway.converters import ShapesResponseConverter
    from cnnserve.models import build_model
    from cnnserve.shapes import layer_shapes

    table = layer_shapes(build_model("alexnet", num_classes=10), (3, 224, 224))
    sent = ShapesReply("alexnet", "1.0", table)
    received = read_reply(ShapesRequest(), encode_json(sent.to_json()))
    assert received == sent
    assert ShapesResponseConverter.to_types(ShapesResponseConverter.from_types(received)) == sent
