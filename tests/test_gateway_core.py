"""The gateway core with an in-process backend (the real ModelService, no TorchServe): unit tests."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cnnserve.errors import DeadlineExceededError, InvalidInputError, NotFoundError, UnavailableError
from cnnserve.gateway.core import CoreSettings, Gateway
from cnnserve.gateway.inprocess import InProcessBackend
from cnnserve.gateway.types import ClassifyCall, FineTuneCall, ModelInput, ShapesCall, TensorInput
from cnnserve.serving.service import ModelService, ServiceConfig
from cnnserve_export.data import ImageData
from cnnserve_export.export import ExportResult
from tests.helpers import png_bytes


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


def test_classify_batched_equals_direct(backend: InProcessBackend, digits: ImageData) -> None:
    async def scenario() -> None:
        gateway = await started(backend, max_batch=8)
        inputs = images(digits, 12)
        direct = await gateway.classify(ClassifyCall("lenet", tuple(inputs), top_k=3))
        singles = await asyncio.gather(
            *(gateway.classify(ClassifyCall("lenet", (item,), top_k=3)) for item in inputs)
        )
        assert [s.predictions[0] for s in singles] == list(direct.predictions)
        assert max(s.timing.batch_inputs for s in singles) > 1
        assert backend.calls < 1 + len(inputs)  # coalesced into fewer backend calls than callers

    run(scenario())


def test_a_bad_input_in_a_batch_fails_only_its_caller(backend: InProcessBackend, digits: ImageData) -> None:
    async def scenario() -> None:
        gateway = await started(backend)
        good = images(digits, 3)
        calls = [ClassifyCall("lenet", (item,)) for item in good] + [
            ClassifyCall("lenet", (ModelInput(image=b"junk"),))
        ]
        results = await asyncio.gather(*(gateway.classify(c) for c in calls), return_exceptions=True)
        assert all(not isinstance(r, BaseException) for r in results[:3])
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

    async def call(
        self,
        model: str,
        version: str,
        op: str,
        meta: dict[str, Any],
        payloads: Sequence[bytes],
        timeout: float | None,
    ) -> dict[str, Any]:
        self.seen.append(json.loads(json.dumps(meta)))
        if self.failures > 0:
            self.failures -= 1
            raise UnavailableError("worker died")
        return await super().call(model, version, op, meta, payloads, timeout)


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
    """The handler's table -> GetLayerShapesResponse -> the client's LayerTable: nothing lost."""
    from cnnserve.gateway import converters
    from cnnserve.models import build_model
    from cnnserve.shapes import layer_shapes

    table = layer_shapes(build_model("alexnet", num_classes=10), (3, 224, 224))
    response = converters.shapes_response(table.to_dict() | {"model": "alexnet", "version": "1.0"})
    assert converters.layer_table(response) == table
