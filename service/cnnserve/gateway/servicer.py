"""The gRPC servicer: each method converts, calls the core, converts back. Errors go through status.py."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc

from cnnserve.gateway.converters import (
    ClassifyRequestConverter,
    ClassifyResponseConverter,
    FineTuneRequestConverter,
    FineTuneResponseConverter,
    ModelConverter,
    ModelStatusConverter,
    RevisionChangeConverter,
    RevisionListConverter,
    ShapesRequestConverter,
    ShapesResponseConverter,
)
from cnnserve.gateway.core import Gateway
from cnnserve.gateway.limits import ConcurrencyLimit
from cnnserve.gateway.metrics import GatewayMetrics, observed
from cnnserve.gateway.status import answer_or_abort
from cnnserve.v1 import classifier_pb2 as pb
from cnnserve.v1 import classifier_pb2_grpc as pb_grpc

__all__ = ["ClassifierServicer"]

Response = TypeVar("Response")


class ClassifierServicer(pb_grpc.ClassifierServicer):
    def __init__(
        self, gateway: Gateway, metrics: GatewayMetrics, limit: ConcurrencyLimit, stream_parallelism: int = 8
    ) -> None:
        self.gateway = gateway
        self.metrics = metrics
        self.limit = limit
        self.stream_parallelism = stream_parallelism

    async def _run(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        work: Callable[[float | None], Awaitable[Response]],
    ) -> Response:
        call = observed(self.metrics, self.limit, method, lambda: work(context.time_remaining()))
        return await answer_or_abort(context, method, call)

    async def Classify(self, request: pb.ClassifyRequest, context: Any) -> pb.ClassifyResponse:
        return await self._run("Classify", context, lambda timeout: self._classify_one(request, timeout))

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: Any
    ) -> AsyncIterator[pb.ClassifyResponse]:
        """Up to ``stream_parallelism`` requests in flight; responses leave in request order."""
        pending: deque[asyncio.Task[pb.ClassifyResponse]] = deque()

        async def classify(request: pb.ClassifyRequest) -> pb.ClassifyResponse:
            return await self._run(
                "ClassifyStream",
                context,
                lambda timeout: self._classify_one(request, timeout),
            )

        try:
            async for request in request_iterator:
                pending.append(asyncio.get_running_loop().create_task(classify(request)))
                while len(pending) >= self.stream_parallelism:
                    yield await pending.popleft()
            while pending:
                yield await pending.popleft()
        finally:
            for task in pending:
                task.cancel()

    async def _classify_one(self, request: pb.ClassifyRequest, timeout: float | None) -> pb.ClassifyResponse:
        call = ClassifyRequestConverter.to_types(request)
        return ClassifyResponseConverter.from_types(await self.gateway.classify(call, timeout))

    async def GetLayerShapes(
        self, request: pb.GetLayerShapesRequest, context: Any
    ) -> pb.GetLayerShapesResponse:
        async def work(timeout: float | None) -> pb.GetLayerShapesResponse:
            call = ShapesRequestConverter.to_types(request)
            return ShapesResponseConverter.from_types(await self.gateway.layer_shapes(call, timeout))

        return await self._run("GetLayerShapes", context, work)

    async def FineTuneStep(self, request: pb.FineTuneStepRequest, context: Any) -> pb.FineTuneStepResponse:
        async def work(timeout: float | None) -> pb.FineTuneStepResponse:
            call = FineTuneRequestConverter.to_types(request)
            return FineTuneResponseConverter.from_types(await self.gateway.finetune(call, timeout))

        return await self._run("FineTuneStep", context, work)

    async def ListModels(self, request: pb.ListModelsRequest, context: Any) -> pb.ListModelsResponse:
        async def work(timeout: float | None) -> pb.ListModelsResponse:
            models = await self.gateway.list_models()
            return pb.ListModelsResponse(models=[ModelStatusConverter.from_types(m) for m in models])

        return await self._run("ListModels", context, work)

    async def GetModel(self, request: pb.GetModelRequest, context: Any) -> pb.Model:
        async def work(timeout: float | None) -> pb.Model:
            details = await self.gateway.get_model(request.model, request.version, timeout)
            info = details.info
            self.metrics.model_device.labels(
                details.status.name, info.requested_device, info.device, info.provider
            ).set(1)
            return ModelConverter.from_types(details)

        return await self._run("GetModel", context, work)

    async def ListRevisions(self, request: pb.ListRevisionsRequest, context: Any) -> pb.ListRevisionsResponse:
        async def work(timeout: float | None) -> pb.ListRevisionsResponse:
            revisions = await self.gateway.list_revisions(request.model, request.version, timeout)
            return RevisionListConverter.from_types(revisions)

        return await self._run("ListRevisions", context, work)

    async def Rollback(self, request: pb.RollbackRequest, context: Any) -> pb.RevisionChange:
        async def work(timeout: float | None) -> pb.RevisionChange:
            change = await self.gateway.rollback(request.model, request.to_revision, request.version, timeout)
            return RevisionChangeConverter.from_types(change)

        return await self._run("Rollback", context, work)

    async def Reset(self, request: pb.ResetRequest, context: Any) -> pb.RevisionChange:
        async def work(timeout: float | None) -> pb.RevisionChange:
            change = await self.gateway.reset(request.model, request.version, timeout)
            return RevisionChangeConverter.from_types(change)

        return await self._run("Reset", context, work)
