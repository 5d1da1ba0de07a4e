"""A backend that runs the model services in this process: for tests and experiments, not production.

It answers exactly what the TorchServe handler would (it is the same :class:`ModelService`), without Java,
workers or a network hop. Importing it imports torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping

from cnnserve.contract import envelope, read_reply
from cnnserve.errors import NotFoundError, UnavailableError
from cnnserve.gateway.backend import Reply, Request
from cnnserve.gateway.types import ModelStatus
from cnnserve.serving.service import ModelService

__all__ = ["InProcessBackend"]


class InProcessBackend:
    def __init__(self, services: Mapping[str, ModelService]) -> None:
        self.services = dict(services)
        self.calls = 0
        self.available = True  # tests flip this to simulate TorchServe going away
        self._lock = asyncio.Lock()  # one request at a time per process, like one TorchServe worker

    async def call(self, model: str, version: str, request: Request[Reply], timeout: float | None) -> Reply:
        if not self.available:
            raise UnavailableError("TorchServe is not reachable")
        service = self.services.get(model)
        if service is None or (version and version != service.card.version):
            raise NotFoundError(f"model {model!r} (or that version) is not served")
        self.calls += 1
        async with self._lock:
            (reply,) = await asyncio.to_thread(service.handle, [envelope(request)])
        return read_reply(request, reply.body)

    async def models(self) -> list[ModelStatus]:
        if not self.available:
            raise UnavailableError("TorchServe is not reachable")
        return [
            ModelStatus(name, service.card.version, (service.card.version,), 1, 1)
            for name, service in self.services.items()
        ]

    async def close(self) -> None:
        return None
