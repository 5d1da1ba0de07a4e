"""Running a real gateway (grpc.aio on port 0) inside the test process, on its own event loop thread."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from cnnserve.gateway.server import GatewayThread
from cnnserve.gateway.settings import GatewaySettings
from cnnserve.stack import torchserve_wiring
from cnnserve.torchserve import TorchServe

__all__ = ["GatewayThread", "settings_for"]


def settings_for(torchserve: TorchServe, **overrides: Any) -> GatewaySettings:
    base = GatewaySettings(
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        **torchserve_wiring(torchserve.settings),
        health_interval=0.5,
        grace_period=5.0,
    )
    return replace(base, **overrides)
