"""Shared fixtures: small real models trained once per session and reused by the serving tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from cnnserve.torchserve import TorchServe, TorchServeSettings
from cnnserve_export.config import small_config
from cnnserve_export.data import ImageData, load_dataset
from cnnserve_export.export import ExportResult, export_checkpoint
from cnnserve_export.train import TrainResult, train
from tests.helpers import torch_threads

if TYPE_CHECKING:
    from cnnserve.client import ClassifierClient
    from tests.gateway_helpers import GatewayThread


# torch's intra-op thread count as the session started (OMP_NUM_THREADS, else the cores). Code under test
# sets it for the whole process (the handler's initialize, the bench's in-process rows, tests that pin it),
# so every test and trained fixture starts from this count whatever ran before: the same results in any order.
SESSION_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _session_torch_threads() -> Iterator[None]:
    torch.set_num_threads(SESSION_THREADS)
    yield
    torch.set_num_threads(SESSION_THREADS)


@pytest.fixture(scope="session")
def digits() -> ImageData:
    return load_dataset("digits")


@pytest.fixture(scope="session")
def lenet_checkpoint(tmp_path_factory: pytest.TempPathFactory, digits: ImageData) -> TrainResult:
    """LeNet trained on the bundled digits: seconds on CPU, > 90 % test accuracy."""
    out = tmp_path_factory.mktemp("lenet-ckpt")
    config = small_config("lenet", str(out))
    with torch_threads(SESSION_THREADS):
        return train(config, data=digits, log=lambda _: None)


@pytest.fixture(scope="session")
def alexnet_checkpoint(tmp_path_factory: pytest.TempPathFactory, digits: ImageData) -> TrainResult:
    """AlexNet (10 classes) after a few SGD steps on a small digits subset: real weights, not trained far."""
    out = tmp_path_factory.mktemp("alexnet-ckpt")
    config = small_config("alexnet", str(out))
    with torch_threads(SESSION_THREADS):
        return train(config, data=digits, log=lambda _: None)


@pytest.fixture(scope="session")
def lenet_export(
    tmp_path_factory: pytest.TempPathFactory, lenet_checkpoint: TrainResult, digits: ImageData
) -> ExportResult:
    return export_checkpoint(lenet_checkpoint.out, tmp_path_factory.mktemp("lenet-export"), data=digits)


@pytest.fixture(scope="session")
def alexnet_export(
    tmp_path_factory: pytest.TempPathFactory, alexnet_checkpoint: TrainResult, digits: ImageData
) -> ExportResult:
    return export_checkpoint(alexnet_checkpoint.out, tmp_path_factory.mktemp("alexnet-export"), data=digits)


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_store(
    tmp_path_factory: pytest.TempPathFactory, lenet_export: ExportResult, alexnet_export: ExportResult
) -> Path:
    """Archives of the session's models: LeNet with two workers, AlexNet with one; TorchServe batching on
    (it is off by default) so that batches of several requests reach the real handler."""
    from dataclasses import replace

    from cnnserve_export.archive import build_archive
    from cnnserve_export.config import default_settings

    store = tmp_path_factory.mktemp("model_store")
    build_archive(
        lenet_export.out,
        store,
        replace(default_settings("lenet"), min_workers=2, max_workers=2, batch_size=8),
    )
    build_archive(alexnet_export.out, store, replace(default_settings("alexnet"), batch_size=4))
    return store


@pytest.fixture(scope="session")
def torchserve(tmp_path_factory: pytest.TempPathFactory, model_store: Path) -> Iterator[TorchServe]:
    """A real TorchServe on free loopback ports, token auth on, serving lenet and alexnet."""
    state = tmp_path_factory.mktemp("torchserve")
    settings = TorchServeSettings.with_ports(model_store, state / "torchserve", state / "revisions")
    server = TorchServe(settings)
    server.start()
    try:
        server.wait_ready(("alexnet", "lenet"), timeout=300)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def gateway(torchserve: TorchServe) -> Iterator[GatewayThread]:
    """A real gateway on a free port in front of the session's TorchServe."""
    from tests.gateway_helpers import GatewayThread, settings_for

    running = GatewayThread(settings_for(torchserve, http_listen="127.0.0.1:0"))
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="session")
def client(gateway: GatewayThread) -> Iterator[ClassifierClient]:
    from cnnserve.client import ClassifierClient

    with ClassifierClient(gateway.target, timeout=60) as connected:
        yield connected


@pytest.fixture(scope="session")
def lenet_int8_export(
    tmp_path_factory: pytest.TempPathFactory, lenet_export: ExportResult, digits: ImageData
) -> Path:
    """A copy of the session's LeNet export with its int8 graph (``--precision fp32,int8``, calibrated on 128
    training digits) and the precision report: nothing trained, a second or two of quantizing."""
    import shutil

    from cnnserve_export.quantize import add_precisions

    out = tmp_path_factory.mktemp("lenet-int8") / "export"
    shutil.copytree(lenet_export.out, out)
    add_precisions(out, ("fp32", "int8"), digits, calibration_size=128)
    return out
