"""Running a real gateway (grpc.aio on port 0) inside the test process, on its own event loop thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import replace
from typing import Any, TypeVar

from cnnserve.gateway.backend import Backend
from cnnserve.gateway.server import RunningGateway, create_server
from cnnserve.gateway.settings import GatewaySettings
from cnnserve.stack import torchserve_wiring
from cnnserve.torchserve import TorchServe

T = TypeVar("T")


def settings_for(torchserve: TorchServe, **overrides: Any) -> GatewaySettings:
    base = GatewaySettings(
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        **torchserve_wiring(torchserve.settings),
        health_interval=0.5,
        grace_period=5.0,
    )
    return replace(base, **overrides)


class GatewayThread:
    """A gateway served from a private event loop, so blocking clients can call it from the test thread."""

    def __init__(self, settings: GatewaySettings, backend: Backend | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningGateway = self.run(create_server(settings, backend))

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    def stop(self, grace: float | None = 0.0) -> None:
        try:
            self.run(self.running.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
