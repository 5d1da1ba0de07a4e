"""``inference.GRPCInferenceService`` on the gateway's gRPC port: each method converts, calls the plane,
converts back. Errors go through :func:`cnnserve.gateway.status.answer_or_abort`, as cnnserve.v1's do.

Registered with :meth:`OipServicer.handler` (a generic handler: the messages live in the private pool of
:mod:`.messages`, not in generated servicer classes). RPCs not listed there answer UNIMPLEMENTED.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import grpc

from cnnserve.errors import InvalidInputError
from cnnserve.gateway.oip import plane as oip
from cnnserve.gateway.oip.messages import SERVICE_NAME, pb
from cnnserve.gateway.oip.tensors import (
    IMAGE,
    INPUT,
    PROBABILITIES,
    InferRequest,
    InferResponse,
    RequestedOutput,
    RequestInput,
    Scalar,
)
from cnnserve.gateway.status import answer_or_abort

__all__ = ["OipServicer", "infer_request", "infer_response"]

Response = TypeVar("Response")


def _parameters(messages: Mapping[str, Any]) -> dict[str, Scalar]:
    values: dict[str, Scalar] = {}
    for key, message in messages.items():
        choice = message.WhichOneof("parameter_choice")
        if choice is not None:
            values[key] = getattr(message, choice)
    return values


def infer_request(request: pb.ModelInferRequest) -> InferRequest:
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise InvalidInputError.for_field(
            "raw_input_contents", f"{len(raw)} entries for {len(request.inputs)} inputs: send one per input"
        )
    inputs = []
    for index, tensor in enumerate(request.inputs):
        contents = tensor.contents
        typed: list[Any] = list(
            contents.bytes_contents if tensor.datatype == "BYTES" else contents.fp32_contents
        )
        if raw:
            if tensor.HasField("contents"):
                raise InvalidInputError.for_field(
                    tensor.name or f"inputs[{index}]", "data both in contents and in raw_input_contents"
                )
            data: bytes | list[Any] = raw[index]
        else:
            data = typed
        inputs.append(
            RequestInput(
                tensor.name, tensor.datatype, tuple(tensor.shape), data, _parameters(tensor.parameters)
            )
        )
    return InferRequest(
        model=request.model_name,
        version=request.model_version,
        inputs=tuple(inputs),
        outputs=tuple(RequestedOutput(o.name, _parameters(o.parameters)) for o in request.outputs),
        parameters=_parameters(request.parameters),
        id=request.id,
    )


def _set_parameters(target: Any, values: Mapping[str, Scalar]) -> None:
    for key, value in values.items():
        if isinstance(value, bool):
            target[key].bool_param = value
        elif isinstance(value, int):
            target[key].int64_param = value
        elif isinstance(value, float):
            target[key].double_param = value
        else:
            target[key].string_param = value


def infer_response(response: InferResponse) -> pb.ModelInferResponse:
    """Outputs always in raw_output_contents: tritonclient's ``as_numpy`` reads only those."""
    message = pb.ModelInferResponse(
        model_name=response.model,
        model_version=response.version,
        id=response.id,
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(name=o.name, datatype=o.datatype, shape=list(o.shape))
            for o in response.outputs
        ],
        raw_output_contents=[o.raw for o in response.outputs],
    )
    _set_parameters(message.parameters, response.parameters)
    return message


def _tensor_metadata(info: oip.TensorInfo) -> pb.ModelMetadataResponse.TensorMetadata:
    return pb.ModelMetadataResponse.TensorMetadata(
        name=info.name, datatype=info.datatype, shape=list(info.shape)
    )


def model_config_message(config: oip.ModelConfig) -> pb.ModelConfig:
    return pb.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        max_batch_size=config.max_batch_size,
        input=[
            pb.ModelInput(
                name=INPUT,
                data_type=pb.TYPE_FP32,
                format=pb.ModelInput.FORMAT_NCHW,
                dims=list(config.input_shape),
                optional=True,  # one of the two per request
            ),
            pb.ModelInput(name=IMAGE, data_type=pb.TYPE_STRING, dims=[1], optional=True),
        ],
        output=[pb.ModelOutput(name=PROBABILITIES, data_type=pb.TYPE_FP32, dims=[config.classes])],
    )


class OipServicer:
    def __init__(self, plane: oip.OipPlane) -> None:
        self.plane = plane

    async def _run(
        self,
        method: str,
        context: grpc.aio.ServicerContext[Any, Any],
        work: Callable[[float | None], Awaitable[Response]],
        shed: bool = True,
    ) -> Response:
        call = self.plane.observe(f"oip.grpc/{method}", lambda: work(context.time_remaining()), shed=shed)
        return await answer_or_abort(context, method, call)

    async def ServerLive(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:  # noqa: N802
        async def work(timeout: float | None) -> pb.ServerLiveResponse:
            return pb.ServerLiveResponse(live=True)

        return await self._run("ServerLive", context, work, shed=False)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: Any) -> pb.ServerReadyResponse:  # noqa: N802
        async def work(timeout: float | None) -> pb.ServerReadyResponse:
            return pb.ServerReadyResponse(ready=self.plane.server_ready())

        return await self._run("ServerReady", context, work, shed=False)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:  # noqa: N802
        async def work(timeout: float | None) -> pb.ModelReadyResponse:
            return pb.ModelReadyResponse(ready=await self.plane.model_ready(request.name, request.version))

        return await self._run("ModelReady", context, work, shed=False)

    async def ServerMetadata(  # noqa: N802
        self, request: pb.ServerMetadataRequest, context: Any
    ) -> pb.ServerMetadataResponse:
        async def work(timeout: float | None) -> pb.ServerMetadataResponse:
            return pb.ServerMetadataResponse(
                name=oip.SERVER_NAME, version=oip.SERVER_VERSION, extensions=list(oip.EXTENSIONS)
            )

        return await self._run("ServerMetadata", context, work)

    async def ModelMetadata(  # noqa: N802
        self, request: pb.ModelMetadataRequest, context: Any
    ) -> pb.ModelMetadataResponse:
        async def work(timeout: float | None) -> pb.ModelMetadataResponse:
            metadata = await self.plane.model_metadata(request.name, request.version, timeout)
            return pb.ModelMetadataResponse(
                name=metadata.name,
                versions=list(metadata.versions),
                platform=metadata.platform,
                inputs=[_tensor_metadata(t) for t in metadata.inputs],
                outputs=[_tensor_metadata(t) for t in metadata.outputs],
            )

        return await self._run("ModelMetadata", context, work)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: Any) -> pb.ModelConfigResponse:  # noqa: N802
        async def work(timeout: float | None) -> pb.ModelConfigResponse:
            config = await self.plane.model_config(request.name, request.version, timeout)
            return pb.ModelConfigResponse(config=model_config_message(config))

        return await self._run("ModelConfig", context, work)

    async def RepositoryIndex(  # noqa: N802
        self, request: pb.RepositoryIndexRequest, context: Any
    ) -> pb.RepositoryIndexResponse:
        async def work(timeout: float | None) -> pb.RepositoryIndexResponse:
            entries = await self.plane.index(ready_only=request.ready)
            return pb.RepositoryIndexResponse(
                models=[
                    pb.RepositoryIndexResponse.ModelIndex(
                        name=e.name,
                        version=e.version,
                        state="READY" if e.ready else "UNAVAILABLE",
                        reason="" if e.ready else "no READY worker",
                    )
                    for e in entries
                ]
            )

        return await self._run("RepositoryIndex", context, work)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:  # noqa: N802
        async def work(timeout: float | None) -> pb.ModelInferResponse:
            return infer_response(await self.plane.infer(infer_request(request), timeout))

        return await self._run("ModelInfer", context, work)

    def handler(self) -> grpc.GenericRpcHandler:
        """The service's generic handler, for ``server.add_generic_rpc_handlers``."""
        methods: dict[str, tuple[Any, Any]] = {  # name: (request type, response type)
            "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
            "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
            "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
            "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
            "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
            "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
            "ModelConfig": (pb.ModelConfigRequest, pb.ModelConfigResponse),
            "RepositoryIndex": (pb.RepositoryIndexRequest, pb.RepositoryIndexResponse),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                getattr(self, name),
                request_deserializer=request_type.FromString,
                response_serializer=response_type.SerializeToString,
            )
            for name, (request_type, response_type) in methods.items()
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)
