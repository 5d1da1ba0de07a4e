"""A fine-tune step that diverges is refused, never published (issue 10, part B).

Unit tests of ``sgd_step`` and the revision store, the worker (``ModelService``) in-process, the gateway core
with an in-process backend, and the real stack: TorchServe + gateway, including a restart on the same store.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from cnnserve.card import load_card
from cnnserve.client import ClassifierClient
from cnnserve.contract import FineTuneRequest, parse_request
from cnnserve.errors import FailedPreconditionError, InvalidInputError
from cnnserve.gateway.converters import FineTuneRequestConverter, FineTuneResponseConverter
from cnnserve.gateway.core import CoreSettings, Gateway
from cnnserve.gateway.inprocess import InProcessBackend
from cnnserve.gateway.types import FineTuneCall, FineTuneResult, ModelInput
from cnnserve.models.lenet import LeNet
from cnnserve.preprocess import Preprocessing, prepare_images
from cnnserve.serving.config import service_config
from cnnserve.serving.finetune import DEFAULT_MAX_LR, DivergedStepError, StepSettings, sgd_step
from cnnserve.serving.revisions import RevisionStore
from cnnserve.serving.service import ModelService, ServiceConfig
from cnnserve.torchserve import TorchServe, TorchServeSettings
from cnnserve.weights import load_into, load_weights, save_weights
from cnnserve_export.data import ImageData
from cnnserve_export.export import ExportResult
from tests.gateway_helpers import GatewayThread, settings_for
from tests.helpers import png_bytes

# The 1e9 took its model to NaN; ours it sometimes leaves at a finite loss of 1e33 (measured). At 1e12
# the weights reach ~1e11 and the logits overflow float32 in any LeNet: the loss after is NaN.
DIVERGING_LR = 1e12
HIGH_BOUND = "1e15"  # max_lr for the tests that must get a diverging lr past the bound


# ---- helpers ----------------------------------------------------------------------------------------


def small_lenet(seed: int = 0) -> tuple[LeNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    return LeNet(), torch.randn(8, 1, 32, 32), torch.randint(0, 10, (8,))


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(state[name], value), f"{name} changed"


def files(directory: Path) -> dict[str, bytes]:
    """Every file of a store directory but the lock, with its bytes."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "lock"}


def store_directory(revisions_dir: Path) -> Path:
    (directory,) = (revisions_dir / "lenet").iterdir()
    return directory


def plant_old_diverged_revision(directory: Path, export_dir: Path, request_id: str) -> int:
    """What an older cnnserve left behind after publishing a diverged step: weights with NaN, and NaN in
    ``manifest.json`` (it wrote the manifest with ``json.dumps``' default ``allow_nan=True``)."""
    card = load_card(export_dir)
    weights = load_weights(export_dir / card.weights_file)
    weights["classifier.4.weight"] = torch.full_like(weights["classifier.4.weight"], float("nan"))
    manifest = json.loads((directory / "manifest.json").read_text())
    head = next(e for e in manifest["revisions"] if e["revision"] == manifest["head"])
    number = int(max(e["revision"] for e in manifest["revisions"])) + 1
    name = f"rev-{number:06d}.safetensors"
    sha256 = save_weights(weights, directory / name)
    result = {"model": "lenet", "loss_before": 2.0, "loss_after": float("nan"), "grad_norm": float("inf")}
    manifest["revisions"].append(
        {
            "revision": number,
            "kind": "step",
            "sha256": sha256,
            "file": name,
            "parent": head["revision"],
            "step": head["step"] + 1,
            "created": time.time(),
            "request_id": request_id,
            "result": {**result, "revision": number},
            "pruned": False,
        }
    )
    manifest["head"] = number
    for file_name, text in (("manifest.json", json.dumps(manifest)), ("HEAD", f"{number} {sha256}\n")):
        tmp = directory / f".{file_name}.planted"
        tmp.write_text(text)
        os.replace(tmp, directory / file_name)  # a running worker reads HEAD on every batch
    assert "NaN" in (directory / "manifest.json").read_text()
    return number


def reply(service: ModelService, **body: Any) -> tuple[int, dict[str, Any]]:
    (answer,) = service.handle([{"body": json.dumps(body).encode()}])
    return answer.status, json.loads(answer.body)


def tensors(export: ExportResult, digits: ImageData, start: int, count: int) -> list[dict[str, Any]]:
    batch = prepare_images(digits.test_images[start : start + count], Preprocessing.from_card(export.card))
    return [{"shape": list(x.shape), "data": x.numpy().astype("<f4").ravel().tolist()} for x in batch]


def digit_pngs(digits: ImageData, start: int, count: int) -> list[bytes]:
    return [png_bytes(image[0].numpy()) for image in digits.test_images[start : start + count]]


# ---- sgd_step ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_a_huge_lr_is_refused_and_leaves_the_weights_unchanged(momentum: float) -> None:
    model, inputs, labels = small_lenet()
    sgd_step(model, inputs, labels, StepSettings(lr=0.05, momentum=momentum), {})  # not at its init
    _, buffers = sgd_step(model, inputs, labels, StepSettings(lr=0.05, momentum=momentum), {})
    before, given = snapshot(model), {k: v.clone() for k, v in buffers.items()}
    with pytest.raises(DivergedStepError) as caught:
        sgd_step(model, inputs, labels, StepSettings(lr=DIVERGING_LR, momentum=momentum), buffers)
    reason = r"^(loss after the step is (nan|inf)|parameter \S+ has non-finite values after the update)$"
    assert re.match(reason, caught.value.reason), caught.value.reason
    assert_same_weights(model, before)
    assert buffers.keys() == given.keys() and all(torch.equal(buffers[k], given[k]) for k in given)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())


def test_a_non_finite_gradient_never_reaches_the_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    model, inputs, labels = small_lenet()
    before = snapshot(model)
    dict(model.named_parameters())["features.0.weight"].register_hook(lambda grad: grad * float("inf"))

    def no_update(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("optimizer.step() ran on a non-finite gradient")

    monkeypatch.setattr(torch.optim.SGD, "step", no_update)
    with pytest.raises(DivergedStepError, match=r"^gradient norm is (nan|inf)$"):
        sgd_step(model, inputs, labels, StepSettings(lr=0.01), {})
    assert_same_weights(model, before)


def test_an_update_that_overflows_names_the_parameter_and_is_undone() -> None:
    model, inputs, labels = small_lenet()
    before = snapshot(model)
    for parameter in model.parameters():  # a finite gradient, large enough that lr x grad overflows float32
        parameter.register_hook(lambda grad: torch.full_like(grad, 1e30))
    with pytest.raises(DivergedStepError) as caught:
        sgd_step(model, inputs, labels, StepSettings(lr=1e9, momentum=0.0), {})
    assert caught.value.reason == "parameter features.0.weight has non-finite values after the update"
    assert_same_weights(model, before)


def test_max_grad_norm_clips_the_update_and_reports_the_norm_before_clipping() -> None:
    lr, limit = 0.5, 0.05
    plain, inputs, labels = small_lenet()
    clipped = LeNet()
    clipped.load_state_dict(plain.state_dict())
    start = snapshot(plain)

    free, _ = sgd_step(plain, inputs, labels, StepSettings(lr=lr, momentum=0.0), {})
    assert free.grad_norm > limit and not free.grad_clipped  # the premise: this gradient gets clipped
    result, _ = sgd_step(clipped, inputs, labels, StepSettings(lr=lr, momentum=0.0, max_grad_norm=limit), {})
    assert result.grad_clipped
    assert math.isclose(result.grad_norm, free.grad_norm, rel_tol=1e-5)  # before clipping, as documented
    # Plain SGD (no momentum, no weight decay): the update is -lr x the clipped gradient, norm <= lr x limit.
    moved = torch.cat([(v - start[k]).ravel() for k, v in clipped.state_dict().items()])
    assert float(moved.double().norm()) <= lr * limit * (1 + 1e-3)
    assert float(moved.double().norm()) == pytest.approx(lr * limit, rel=1e-3)  # and it did move that far

    unclipped = LeNet()
    unclipped.load_state_dict(start)
    loose, _ = sgd_step(unclipped, inputs, labels, StepSettings(lr=lr, momentum=0.0, max_grad_norm=1e6), {})
    assert not loose.grad_clipped
    for name, value in plain.state_dict().items():
        torch.testing.assert_close(unclipped.state_dict()[name], value)


# ---- the revision store -----------------------------------------------------------------------------


def make_store(tmp_path: Path) -> RevisionStore:
    base = tmp_path / "base.safetensors"
    sha256 = save_weights({"w": torch.zeros(3)}, base)
    return RevisionStore(tmp_path / "store", "m", "1.0", sha256, base)


def test_an_old_manifest_holding_nan_lists_with_null_and_is_rewritten_strict(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    with store.locked():
        store.append("step", parent=0, step=1, weights={"w": torch.ones(3)}, request_id="r1", result={"x": 1})
    path = store.directory / "manifest.json"
    old = json.loads(path.read_text())
    old["revisions"][1]["result"].update(loss_after=float("nan"), grad_norm=float("-inf"))
    path.write_text(json.dumps(old))  # what the older code wrote: NaN and -Infinity tokens
    assert "NaN" in path.read_text()

    (listed,) = [r for r in store.revisions() if r.revision == 1]
    assert listed.result is not None
    assert listed.result["loss_after"] is None and listed.result["grad_norm"] is None
    json.dumps(store.manifest(), allow_nan=False)  # what replies need
    found = store.find_request("r1")
    assert found is not None and found.result is not None and found.result["loss_after"] is None

    with store.locked():
        store.append("step", parent=1, step=2, weights={"w": torch.full((3,), 2.0)})

    def strict(token: str) -> None:
        raise AssertionError(f"manifest.json holds {token}")

    rewritten = json.loads(path.read_text(), parse_constant=strict)
    assert rewritten["revisions"][1]["result"]["loss_after"] is None


def test_the_store_refuses_non_finite_weights_and_momentum(tmp_path: Path) -> None:
    store = make_store(tmp_path)
    before = files(store.directory)
    with store.locked(), pytest.raises(ValueError, match="non-finite"):
        store.append("step", parent=0, step=1, weights={"w": torch.tensor([0.0, float("nan"), 1.0])})
    with store.locked(), pytest.raises(ValueError, match="non-finite"):
        store.append(
            "step", parent=0, step=1, weights={"w": torch.ones(3)}, momentum={"w": torch.full((3,), math.inf)}
        )
    assert files(store.directory) == before


# ---- settings and parsing ---------------------------------------------------------------------------


def test_max_lr_comes_from_the_archive_or_the_environment() -> None:
    assert service_config(None, {}, "cpu").max_lr == DEFAULT_MAX_LR == 10.0
    assert service_config({"max_lr": 100}, {}, "cpu").max_lr == 100.0
    assert service_config({"max_lr": 100}, {"CNNSERVE_MAX_LR": "0.5"}, "cpu").max_lr == 0.5
    for bad in ("nan", "inf", "0", "-1", "ten"):
        with pytest.raises(FailedPreconditionError, match="CNNSERVE_MAX_LR"):
            service_config(None, {"CNNSERVE_MAX_LR": bad}, "cpu")


def test_max_grad_norm_is_parsed_and_checked() -> None:
    body = {"op": "finetune", "inputs": [{"shape": [1], "data": [0.5]}], "labels": [1], "lr": 0.1}

    def parsed(**extra: Any) -> FineTuneRequest:
        request = parse_request({"body": json.dumps({**body, **extra}).encode()})
        assert isinstance(request, FineTuneRequest)
        return request

    assert parsed().max_grad_norm is None
    assert parsed(max_grad_norm=None).max_grad_norm is None
    assert parsed(max_grad_norm=0).max_grad_norm is None  # 0: no clipping, as in the proto
    assert parsed(max_grad_norm=2.5).max_grad_norm == 2.5
    for bad in (-1.0, "1", True, math.nan, math.inf):  # json.dumps writes NaN, which json.loads reads
        with pytest.raises(InvalidInputError, match="max_grad_norm"):
            parsed(max_grad_norm=bad)


def test_converters_carry_max_grad_norm_and_grad_clipped() -> None:
    to_call, to_request = FineTuneRequestConverter.to_types, FineTuneRequestConverter.from_types
    call = FineTuneCall("lenet", (ModelInput(image=b"x"),), (1,), lr=0.1, max_grad_norm=2.5)
    assert to_call(to_request(call)).max_grad_norm == 2.5
    unset = replace(call, max_grad_norm=None)
    assert not to_request(unset).HasField("max_grad_norm")
    assert to_call(to_request(unset)).max_grad_norm is None
    zero = to_request(call)
    zero.max_grad_norm = 0.0
    assert to_call(zero).max_grad_norm is None
    result = FineTuneResult(
        "lenet", "1.0", 3, 2, 3, 2.0, 1.5, 0.5, 7.0, 8, "all", 0.1, grad_clipped=True, max_grad_norm=2.5
    )
    back = FineTuneResponseConverter.to_types(FineTuneResponseConverter.from_types(result))
    assert back == result and back.grad_clipped and back.max_grad_norm == 2.5


# ---- the worker, in-process -------------------------------------------------------------------------


@pytest.fixture
def bounded_service(lenet_export: ExportResult, tmp_path: Path) -> ModelService:
    """A worker whose max_lr lets a diverging lr through to the step."""
    config = ServiceConfig(revisions_dir=str(tmp_path / "revisions"), max_lr=float(HIGH_BOUND))
    return ModelService(lenet_export.out, config)


def test_a_diverging_step_is_refused_writes_nothing_and_the_next_step_starts_from_the_head(
    bounded_service: ModelService, lenet_export: ExportResult, digits: ImageData, tmp_path: Path
) -> None:
    service = bounded_service
    inputs, labels = tensors(lenet_export, digits, 0, 8), digits.test_targets[:8].tolist()
    status, first = reply(service, op="finetune", inputs=inputs, labels=labels, lr=0.01)
    assert status == 200 and first["revision"] == 1
    assert service.store is not None
    before = files(service.store.directory)

    status, refused = reply(
        service, op="finetune", inputs=inputs, labels=labels, lr=DIVERGING_LR, request_id="diverges"
    )
    assert status == 412 and refused["error"]["code"] == "FAILED_PRECONDITION"
    message = refused["error"]["message"]
    assert message.startswith("fine-tune step refused: ") and "with lr 1e+12" in message
    assert "lenet stays at revision 1 and nothing was written" in message
    assert files(service.store.directory) == before  # no revision file, momentum, manifest entry or HEAD

    # The next good step starts from the head's weights and momentum, not from what the refused one left.
    head_weights = service.store.load(service.store.get(1))
    momentum = service.store.load_momentum(1)
    status, second = reply(
        service, op="finetune", inputs=inputs, labels=labels, lr=0.01, request_id="diverges"
    )
    assert status == 200 and (second["parent"], second["revision"], second["replayed"]) == (1, 2, False)
    card = load_card(lenet_export.out)
    reference = load_into(card.build_model(), head_weights)
    batch = torch.cat([torch.tensor(x["data"]).reshape(1, 1, 32, 32) for x in inputs])
    sgd_step(reference, batch, torch.tensor(labels), StepSettings(lr=0.01), momentum)
    stored = service.store.load(service.store.get(2))
    for name, value in reference.state_dict().items():
        torch.testing.assert_close(stored[name], value)


def test_an_lr_above_the_bound_is_invalid_argument_and_writes_nothing(
    service_default: ModelService, lenet_export: ExportResult, digits: ImageData
) -> None:
    assert service_default.store is not None
    before = files(service_default.store.directory)
    inputs, labels = tensors(lenet_export, digits, 0, 2), digits.test_targets[:2].tolist()
    status, body = reply(service_default, op="finetune", inputs=inputs, labels=labels, lr=10.5)
    assert status == 400 and body["error"]["code"] == "INVALID_ARGUMENT"
    assert body["error"]["field_violations"][0]["field"] == "lr"
    assert "10.5 is above this model's bound of 10" in body["error"]["message"]
    assert "CNNSERVE_MAX_LR" in body["error"]["message"]
    assert files(service_default.store.directory) == before
    status, _ = reply(service_default, op="finetune", inputs=inputs, labels=labels, lr=10.0)
    assert status != 400  # the bound itself is allowed


@pytest.fixture
def service_default(lenet_export: ExportResult, tmp_path: Path) -> ModelService:
    return ModelService(lenet_export.out, ServiceConfig(revisions_dir=str(tmp_path / "revisions")))


def test_an_old_store_with_a_diverged_revision_never_serves_it(
    lenet_export: ExportResult, digits: ImageData, tmp_path: Path
) -> None:
    config = ServiceConfig(revisions_dir=str(tmp_path / "revisions"))
    ModelService(lenet_export.out, config)  # creates the store
    directory = store_directory(tmp_path / "revisions")
    bad = plant_old_diverged_revision(directory, lenet_export.out, request_id="old-step")
    service = ModelService(lenet_export.out, config)  # a worker (re)started on that store
    inputs, labels = tensors(lenet_export, digits, 0, 2), digits.test_targets[:2].tolist()

    status, body = reply(service, inputs=inputs)
    assert status == 412 and body["error"]["code"] == "FAILED_PRECONDITION"
    assert body["error"]["message"].startswith(f"revision {bad} of lenet cannot be served")
    assert "classifier.4.weight has non-finite values" in body["error"]["message"]
    status, body = reply(service, inputs=inputs, revision=0)
    assert status == 200 and body["revision"] == 0
    status, listing = reply(service, op="revisions")
    assert status == 200 and listing["head"] == bad
    assert listing["revisions"][-1]["result"]["loss_after"] is None  # NaN listed as null
    assert reply(service, op="info")[0] == 200

    status, body = reply(service, op="finetune", inputs=inputs, labels=labels, lr=0.01)
    assert status == 412 and "cannot be served" in body["error"]["message"]
    status, body = reply(service, op="finetune", inputs=inputs, labels=labels, lr=0.01, request_id="old-step")
    assert status == 412 and "diverged (loss_after is not finite)" in body["error"]["message"]
    status, body = reply(service, op="rollback", to_revision=bad)
    assert status == 412 and "cannot be served" in body["error"]["message"]

    status, reset = reply(service, op="reset")
    assert status == 200 and reset["weights_of"] == 0
    status, body = reply(service, inputs=inputs)
    assert status == 200 and body["revision"] == reset["revision"]


def test_weights_that_overflow_on_an_input_answer_an_error_never_nan(
    lenet_export: ExportResult, digits: ImageData, tmp_path: Path
) -> None:
    """Finite weights can still overflow float32 on an input: that input gets an error, not NaN scores."""
    service = ModelService(lenet_export.out, ServiceConfig(revisions_dir=str(tmp_path / "revisions")))
    assert service.store is not None
    weights = {k: v.clone() for k, v in load_weights(service.base_weights).items()}
    weights["classifier.4.weight"] = torch.full_like(weights["classifier.4.weight"], 3e38)  # finite
    with service.store.locked():
        unstable = service.store.append("step", parent=0, step=1, weights=weights)
    inputs = tensors(lenet_export, digits, 0, 2)

    status, body = reply(service, inputs=inputs)
    assert status == 412 and body["error"]["code"] == "FAILED_PRECONDITION"
    assert body["error"]["message"].startswith(
        f"revision {unstable.revision} of lenet produced non-finite scores for inputs[0]"
    )
    status, body = reply(service, inputs=inputs, per_input_errors=True)
    assert status == 200 and [p["error"]["code"] for p in body["predictions"]] == ["FAILED_PRECONDITION"] * 2
    status, body = reply(service, inputs=inputs, revision=0)
    assert status == 200 and all(
        math.isfinite(t["probability"]) for p in body["predictions"] for t in p["top_k"]
    )


# ---- the gateway core, in-process backend -----------------------------------------------------------


def test_the_gateway_checks_max_grad_norm_and_passes_the_workers_refusal_on(
    bounded_service: ModelService, digits: ImageData
) -> None:
    images = tuple(ModelInput(image=png) for png in digit_pngs(digits, 0, 4))
    labels = tuple(digits.test_targets[:4].tolist())

    async def scenario() -> None:
        gateway = Gateway(InProcessBackend({"lenet": bounded_service}), CoreSettings())
        await gateway.start()
        for bad in (-1.0, 0.0, math.nan, math.inf):
            with pytest.raises(InvalidInputError, match="max_grad_norm"):
                await gateway.finetune(FineTuneCall("lenet", images, labels, lr=0.01, max_grad_norm=bad))
        clipped = await gateway.finetune(FineTuneCall("lenet", images, labels, lr=0.01, max_grad_norm=1e-4))
        assert clipped.grad_clipped and clipped.grad_norm > 1e-4 and clipped.revision == 1
        with pytest.raises(FailedPreconditionError, match="lenet stays at revision 1"):
            await gateway.finetune(FineTuneCall("lenet", images, labels, lr=DIVERGING_LR))
        assert (await gateway.list_revisions("lenet")).head == 1
        await gateway.close()

    asyncio.run(scenario())


# ---- the real stack ---------------------------------------------------------------------------------


@pytest.mark.torchserve
@pytest.mark.slow
def test_an_lr_above_the_bound_is_refused_by_the_served_model(
    client: ClassifierClient, digits: ImageData
) -> None:
    """On the session's shared TorchServe (default bound): refused before the lock, nothing changes."""
    images, labels = digit_pngs(digits, 0, 2), digits.test_targets[:2].tolist()
    listing = client.list_revisions("lenet")
    with pytest.raises(InvalidInputError) as caught:
        client.finetune_step("lenet", images, labels, lr=1e6)
    assert caught.value.violations[0].field == "lr"
    assert "1e+06 is above this model's bound of 10" in caught.value.message
    with pytest.raises(InvalidInputError, match="max_grad_norm"):
        client.finetune_step("lenet", images, labels, lr=0.01, max_grad_norm=-1.0)
    assert client.list_revisions("lenet") == listing
    assert client.classify("lenet", images[:1]).revision == listing.head


@pytest.fixture
def own_stack(
    tmp_path: Path, lenet_export: ExportResult, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[TorchServeSettings, Path]]:
    """A one-worker LeNet archive and the settings of a TorchServe of our own whose max_lr lets a diverging
    lr through (the session's shared one keeps the default bound)."""
    from cnnserve_export.archive import build_archive
    from cnnserve_export.config import default_settings

    store = tmp_path / "model_store"
    store.mkdir()
    build_archive(lenet_export.out, store, replace(default_settings("lenet"), min_workers=1, max_workers=1))
    monkeypatch.setenv("CNNSERVE_MAX_LR", HIGH_BOUND)  # TorchServe's environment is the test process's
    yield TorchServeSettings.with_ports(store, tmp_path / "torchserve", tmp_path / "revisions"), store


class Stack:
    """TorchServe + gateway + client, started and stopped together."""

    def __init__(self, settings: TorchServeSettings) -> None:
        self.torchserve = TorchServe(settings)
        self.torchserve.start()
        self.gateway: GatewayThread | None = None
        self.client: ClassifierClient | None = None
        try:
            self.torchserve.wait_ready(("lenet",), timeout=120)
            self.gateway = GatewayThread(settings_for(self.torchserve, metrics_listen="off"))
            self.client = ClassifierClient(self.gateway.target, timeout=60)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.gateway is not None:
            self.gateway.stop()
        self.torchserve.stop()


@pytest.mark.torchserve
@pytest.mark.slow
def test_a_diverging_step_is_refused_by_the_real_stack_and_a_restart_serves_on(
    own_stack: tuple[TorchServeSettings, Path], lenet_export: ExportResult, digits: ImageData
) -> None:
    settings, _ = own_stack
    images, labels = digit_pngs(digits, 300, 16), digits.test_targets[300:316].tolist()
    stack = Stack(settings)
    try:
        client = stack.client
        assert client is not None
        good = client.finetune_step("lenet", images, labels, lr=0.01, max_grad_norm=1.0)
        assert good.revision == 1 and good.grad_clipped == (good.grad_norm > 1.0)
        listing = client.list_revisions("lenet")
        with pytest.raises(FailedPreconditionError) as caught:
            client.finetune_step("lenet", images, labels, lr=DIVERGING_LR, request_id="diverges")
        message = caught.value.message
        print("refused:", message)
        assert message.startswith("fine-tune step refused: loss after the step is ")
        assert "with lr 1e+12; lenet stays at revision 1 and nothing was written" in message
        served = client.classify("lenet", images[:4])
        assert served.revision == 1
        assert all(math.isfinite(s.probability) for p in served.predictions for s in p)
        assert client.list_revisions("lenet") == listing
        # The worker's trainable copy is the head's again: the same request id now applies, from revision 1.
        after = client.finetune_step("lenet", images, labels, lr=0.01, request_id="diverges")
        assert (after.parent, after.revision, after.replayed) == (1, 2, False)
        assert math.isfinite(after.loss_before) and after.loss_before == pytest.approx(
            good.loss_after, rel=1e-4
        )
        expected = client.classify("lenet", images[:4], revision=2)
    finally:
        stack.stop()

    stack = Stack(settings)  # a restart on the same revision store
    try:
        client = stack.client
        assert client is not None
        served = client.classify("lenet", images[:4])
        assert served.revision == 2
        for mine, theirs in zip(served.predictions, expected.predictions, strict=True):
            np.testing.assert_allclose(
                [s.probability for s in mine], [s.probability for s in theirs], atol=1e-6
            )
        listing = client.list_revisions("lenet")
        assert listing.head == 2 and [r.kind for r in listing.revisions] == ["base", "step", "step"]

        # A store an older cnnserve left with a diverged revision as its head: listed, never served.
        bad = plant_old_diverged_revision(store_directory(settings.revisions_dir), lenet_export.out, "old")
        assert client.list_revisions("lenet").head == bad
        with pytest.raises(FailedPreconditionError) as refused:
            client.classify("lenet", images[:1])
        print("old diverged head:", refused.value.message)
        assert refused.value.message.startswith(f"revision {bad} of lenet cannot be served")
        assert client.classify("lenet", images[:1], revision=2).revision == 2
        reset = client.reset("lenet")
        assert client.classify("lenet", images[:1]).revision == reset.revision.revision
    finally:
        stack.stop()
