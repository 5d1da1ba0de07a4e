"""The client's load-balancing option: with round_robin, calls spread over every gateway the target names.

Two real gateways (grpc.aio on port 0), each in front of its own in-process worker, and one target that
resolves to both (what a headless Kubernetes Service's DNS name gives): round_robin sends calls to both,
pick_first keeps them on one connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cnnserve.client import ClassifierClient
from cnnserve.gateway.inprocess import InProcessBackend
from cnnserve.gateway.server import GatewayThread
from cnnserve.gateway.settings import GatewaySettings
from cnnserve.serving.service import ModelService, ServiceConfig
from cnnserve_export.data import ImageData
from cnnserve_export.export import ExportResult
from tests.helpers import png_bytes


@pytest.fixture
def two_gateways(
    lenet_export: ExportResult, tmp_path: Path
) -> Iterator[list[tuple[GatewayThread, InProcessBackend]]]:
    settings = GatewaySettings(listen="127.0.0.1:0", metrics_listen="off", http_listen="off")
    running = []
    try:
        for _ in range(2):
            backend = InProcessBackend({"lenet": ModelService(lenet_export.out, ServiceConfig())})
            running.append((GatewayThread(settings, backend), backend))
        yield running
    finally:
        for gateway, _ in running:
            gateway.stop()


def _both(gateways: list[tuple[GatewayThread, InProcessBackend]]) -> str:
    return "ipv4:" + ",".join(gateway.target for gateway, _ in gateways)


@pytest.mark.parametrize(("policy", "reached"), [("round_robin", 2), ("pick_first", 1)])
def test_round_robin_spreads_calls_over_every_gateway(
    two_gateways: list[tuple[GatewayThread, InProcessBackend]], digits: ImageData, policy: str, reached: int
) -> None:
    image = png_bytes(digits.test_images[0][0].numpy())
    with ClassifierClient(_both(two_gateways), lb_policy=policy) as client:
        for _ in range(8):
            assert client.classify("lenet", [image]).predictions[0]
    calls = [backend.calls for _, backend in two_gateways]
    assert sum(calls) == 8
    assert sum(1 for count in calls if count) == reached, calls


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        ClassifierClient("127.0.0.1:1", lb_policy="least_request")
