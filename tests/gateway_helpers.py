"""Running a real gateway (grpc.aio on port 0) inside the test process, on its own event loop thread."""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from dataclasses import replace
from typing import Any

from cnnserve.deployment import torchserve_wiring
from cnnserve.gateway.backend import Backend, Reply, Request
from cnnserve.gateway.server import GatewayThread
from cnnserve.gateway.settings import GatewaySettings
from cnnserve.gateway.types import ModelStatus
from cnnserve.torchserve import TorchServe

__all__ = ["GatewayThread", "HeldBackend", "hold_backend", "settings_for"]


def settings_for(torchserve: TorchServe, **overrides: Any) -> GatewaySettings:
    base = GatewaySettings(
        listen="127.0.0.1:0",
        metrics_listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",  # every test gateway on free ports: many run at once
        **torchserve_wiring(torchserve.settings),
        health_interval=0.5,
        grace_period=5.0,
    )
    return replace(base, **overrides)


class HeldBackend:
    """A backend in front of another that holds every call of ``ops`` at the door until :meth:`release`.

    Tests use it to make the condition they test happen instead of sleeping and hoping: callers that must
    coalesce into one batch, an RPC that must still be in flight at shutdown, a concurrency limit that must be
    full. ``arrived`` counts the held ops' calls so far, ``waiting`` those still at the door. Use it from the
    event loop it serves; from another thread, release with ``loop.call_soon_threadsafe(held.release)``.
    """

    def __init__(self, inner: Backend, ops: Collection[str] = ("classify",)) -> None:
        self.inner = inner
        self.ops = frozenset(ops)
        self.arrived = 0
        self.waiting = 0
        self._open = asyncio.Event()

    def release(self) -> None:
        """Let the waiting calls through, and every later one."""
        self._open.set()

    async def call(self, model: str, version: str, request: Request[Reply], timeout: float | None) -> Reply:
        if request.op in self.ops:
            self.arrived += 1
            self.waiting += 1
            try:
                await self._open.wait()
            finally:
                self.waiting -= 1
        return await self.inner.call(model, version, request, timeout)

    async def models(self) -> list[ModelStatus]:
        return await self.inner.models()

    async def close(self) -> None:
        await self.inner.close()


def hold_backend(gateway: GatewayThread, ops: Collection[str] = ("classify",)) -> HeldBackend:
    """Put a :class:`HeldBackend` in front of a running gateway's backend; returns it."""
    held = HeldBackend(gateway.running.gateway.backend, ops)
    gateway.running.gateway.backend = held
    return held
