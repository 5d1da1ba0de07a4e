"""The OIP REST API (KServe v2 / Triton HTTP) on the gateway: an aiohttp app on the gateway's event loop.

Routes: ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{m}[/versions/{v}]``,
``.../ready``, ``.../config``, ``POST .../infer`` and Triton's ``POST /v2/repository/index``. Tensors come
as JSON or in Triton's binary-tensor extension (the ``Inference-Header-Content-Length`` header: the JSON
header, then each input with a ``binary_data_size`` parameter, in order; outputs asked for with
``binary_data`` or the request's ``binary_data_output`` come back the same way). tritonclient.http sends
and asks for binary by default.

Every error answers ``{"error": "..."}`` with the HTTP status of the error's kind
(:func:`cnnserve.gateway.status.to_http`); malformed requests are 400, never 5xx. Bearer token on every
route but the health checks, as on the gRPC side.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from aiohttp import web

from cnnserve.errors import CnnserveError, InvalidInputError, UnauthenticatedError
from cnnserve.gateway.oip import plane as oip
from cnnserve.gateway.oip.tensors import (
    IMAGE,
    INPUT,
    PROBABILITIES,
    InferRequest,
    InferResponse,
    OutputTensor,
    RequestedOutput,
    RequestInput,
    Scalar,
)
from cnnserve.gateway.status import to_http

__all__ = ["HEADER_LENGTH", "create_app", "infer_request", "infer_response"]

log = logging.getLogger(__name__)

HEADER_LENGTH = "Inference-Header-Content-Length"
_JSON = "application/json"
_HEALTH_PREFIX = "/v2/health/"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# ---- request parsing ---------------------------------------------------------------------------------


def _object(value: Any, field: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError.for_field(field, "expected a JSON object")
    return value


def _parameters(value: Any, field: str) -> dict[str, Scalar]:
    if value is None:
        return {}
    values = _object(value, field)
    for key, item in values.items():
        if not isinstance(item, (bool, int, float, str)):
            raise InvalidInputError.for_field(f"{field}.{key}", "a parameter is a number, a string or a bool")
    return values


def _flat(data: Any, field: str) -> list[Any]:
    """Row-major elements of (possibly nested) JSON lists, without recursion (nesting may be deep)."""
    if not isinstance(data, list):
        raise InvalidInputError.for_field(field, "expected a list")
    flat: list[Any] = []
    stack: list[Any] = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _base64_elements(values: Sequence[Any], field: str) -> list[bytes]:
    decoded = []
    for index, value in enumerate(values):
        if not isinstance(value, str):
            raise InvalidInputError.for_field(field, f"element {index}: BYTES in JSON are base64 strings")
        try:
            decoded.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            raise InvalidInputError.for_field(field, f"element {index} is not valid base64") from None
    return decoded


def _shape(value: Any, field: str) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in value):
        raise InvalidInputError.for_field(field, "expected a list of integers")
    return tuple(value)


def _bool(parameters: Mapping[str, Scalar], key: str, field: str, default: bool) -> bool:
    value = parameters.get(key, default)
    if not isinstance(value, bool):
        raise InvalidInputError.for_field(f"{field}.{key}", f"expected true or false, got {value!r}")
    return value


def infer_request(model: str, version: str, body: bytes, header_length: str | None) -> InferRequest:
    """The request in ``body``: JSON, or with ``header_length``, a JSON header followed by binary tensors."""
    binary = b""
    if header_length is not None:
        try:
            length = int(header_length)
        except ValueError:
            raise InvalidInputError.for_field(HEADER_LENGTH, f"{header_length!r} is not a length") from None
        if not 0 <= length <= len(body):
            raise InvalidInputError.for_field(HEADER_LENGTH, f"{length} for a body of {len(body)} bytes")
        body, binary = body[:length], body[length:]
    try:
        parsed = json.loads(body)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InvalidInputError.for_field("body", "not a JSON inference request") from None
    request = _object(parsed, "body")
    items = request.get("inputs")
    if not isinstance(items, list):
        raise InvalidInputError.for_field("inputs", "required: a list of input tensors")
    offset = 0
    inputs = []
    for index, item in enumerate(items):
        where = f"inputs[{index}]"
        tensor = _object(item, where)
        name = tensor.get("name")
        datatype = tensor.get("datatype")
        if not isinstance(name, str) or not isinstance(datatype, str):
            raise InvalidInputError.for_field(where, "name and datatype are required strings")
        shape = _shape(tensor.get("shape"), f"{name}.shape")
        parameters = _parameters(tensor.get("parameters"), f"{name}.parameters")
        data: bytes | list[Any]
        if "binary_data_size" in parameters:
            size = parameters["binary_data_size"]
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise InvalidInputError.for_field(
                    f"{name}.parameters.binary_data_size", "expected a size >= 0"
                )
            if offset + size > len(binary):
                raise InvalidInputError.for_field(
                    f"{name}.parameters.binary_data_size",
                    f"{size} bytes from offset {offset}; the binary data has {len(binary)}",
                )
            data = binary[offset : offset + size]
            offset += size
        elif "data" in tensor:
            data = _flat(tensor["data"], f"{name}.data")
            if datatype == "BYTES":
                data = _base64_elements(data, f"{name}.data")
        else:
            raise InvalidInputError.for_field(where, "data (or a binary_data_size parameter) is required")
        inputs.append(RequestInput(name, datatype, shape, data, parameters))
    if offset != len(binary):
        raise InvalidInputError.for_field(
            HEADER_LENGTH, f"{len(binary) - offset} bytes of binary data no input's binary_data_size covers"
        )
    outputs = []
    requested = request.get("outputs", [])
    if not isinstance(requested, list):
        raise InvalidInputError.for_field("outputs", "expected a list")
    for index, item in enumerate(requested):
        output = _object(item, f"outputs[{index}]")
        name = output.get("name")
        if not isinstance(name, str):
            raise InvalidInputError.for_field(f"outputs[{index}].name", "required: a string")
        outputs.append(
            RequestedOutput(name, _parameters(output.get("parameters"), f"outputs[{index}].parameters"))
        )
    request_id = request.get("id", "")
    if not isinstance(request_id, str):
        raise InvalidInputError.for_field("id", "expected a string")
    return InferRequest(
        model=model,
        version=version,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        parameters=_parameters(request.get("parameters"), "parameters"),
        id=request_id,
    )


# ---- responses ---------------------------------------------------------------------------------------


def _binary(output: OutputTensor, default: bool, index: int) -> bool:
    parameters = output.requested.parameters if output.requested is not None else {}
    return _bool(parameters, "binary_data", f"outputs[{index}].parameters", default)


def infer_response(request: InferRequest, response: InferResponse) -> web.Response:
    default_binary = _bool(request.parameters, "binary_data_output", "parameters", False)
    outputs = []
    binaries = []
    for index, output in enumerate(response.outputs):
        entry: dict[str, Any] = {
            "name": output.name,
            "datatype": output.datatype,
            "shape": list(output.shape),
        }
        if _binary(output, default_binary, index):
            entry["parameters"] = {"binary_data_size": len(output.raw)}
            binaries.append(output.raw)
        else:
            values = output.values()
            entry["data"] = [v.decode() if isinstance(v, bytes) else v for v in values]
        outputs.append(entry)
    document: dict[str, Any] = {
        "model_name": response.model,
        "model_version": response.version,
        "parameters": dict(response.parameters),
        "outputs": outputs,
    }
    if response.id:
        document["id"] = response.id
    header = json.dumps(document).encode()
    if not binaries:
        return web.Response(body=header, content_type=_JSON)
    return web.Response(
        body=header + b"".join(binaries),
        content_type="application/octet-stream",
        headers={HEADER_LENGTH: str(len(header))},
    )


def _metadata_json(metadata: oip.ModelMetadata) -> dict[str, Any]:
    def tensor(info: oip.TensorInfo) -> dict[str, Any]:
        return {"name": info.name, "datatype": info.datatype, "shape": list(info.shape)}

    return {
        "name": metadata.name,
        "versions": list(metadata.versions),
        "platform": metadata.platform,
        "inputs": [tensor(t) for t in metadata.inputs],
        "outputs": [tensor(t) for t in metadata.outputs],
    }


def _config_json(config: oip.ModelConfig) -> dict[str, Any]:
    """Triton's model configuration JSON (model_config.proto's field names)."""
    return {
        "name": config.name,
        "platform": config.platform,
        "backend": config.backend,
        "max_batch_size": config.max_batch_size,
        "input": [
            {
                "name": INPUT,
                "data_type": "TYPE_FP32",
                "format": "FORMAT_NCHW",
                "dims": list(config.input_shape),
                "optional": True,
            },
            {
                "name": IMAGE,
                "data_type": "TYPE_STRING",
                "format": "FORMAT_NONE",
                "dims": [1],
                "optional": True,
            },
        ],
        "output": [{"name": PROBABILITIES, "data_type": "TYPE_FP32", "dims": [config.classes]}],
    }


# ---- the app -----------------------------------------------------------------------------------------


class _Routes:
    def __init__(self, plane: oip.OipPlane) -> None:
        self.plane = plane

    async def _run(
        self, method: str, work: Callable[[], Awaitable[web.StreamResponse]], shed: bool = True
    ) -> web.StreamResponse:
        return await self.plane.observe(f"oip.http/{method}", work, shed=shed)

    async def live(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            return web.Response(status=200)

        return await self._run("ServerLive", work, shed=False)

    async def ready(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            if self.plane.server_ready():
                return web.Response(status=200)
            return _error(400, "not ready: no model has a READY worker, or TorchServe is not reachable")

        return await self._run("ServerReady", work, shed=False)

    async def model_ready(self, request: web.Request) -> web.StreamResponse:
        model, version = _model(request)

        async def work() -> web.StreamResponse:
            if await self.plane.model_ready(model, version):
                return web.Response(status=200)
            return _error(400, f"model {model!r} is not ready: no READY worker")

        return await self._run("ModelReady", work, shed=False)

    async def server_metadata(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            return web.json_response(
                {"name": oip.SERVER_NAME, "version": oip.SERVER_VERSION, "extensions": list(oip.EXTENSIONS)}
            )

        return await self._run("ServerMetadata", work)

    async def model_metadata(self, request: web.Request) -> web.StreamResponse:
        model, version = _model(request)

        async def work() -> web.StreamResponse:
            return web.json_response(_metadata_json(await self.plane.model_metadata(model, version, None)))

        return await self._run("ModelMetadata", work)

    async def model_config(self, request: web.Request) -> web.StreamResponse:
        model, version = _model(request)

        async def work() -> web.StreamResponse:
            return web.json_response(_config_json(await self.plane.model_config(model, version, None)))

        return await self._run("ModelConfig", work)

    async def index(self, request: web.Request) -> web.StreamResponse:
        async def work() -> web.StreamResponse:
            body = await request.read()
            ready = False
            if body.strip():
                try:
                    options = _object(json.loads(body), "body")
                except (UnicodeDecodeError, ValueError, RecursionError):
                    raise InvalidInputError.for_field("body", "not JSON") from None
                ready = _bool(options, "ready", "body", False)
            entries = await self.plane.index(ready_only=ready)
            return web.json_response(
                [
                    {"name": e.name, "version": e.version, "state": "READY" if e.ready else "UNAVAILABLE"}
                    for e in entries
                ]
            )

        return await self._run("RepositoryIndex", work)

    async def infer(self, request: web.Request) -> web.StreamResponse:
        model, version = _model(request)

        async def work() -> web.StreamResponse:
            parsed = infer_request(model, version, await request.read(), request.headers.get(HEADER_LENGTH))
            return infer_response(parsed, await self.plane.infer(parsed, None))

        return await self._run("ModelInfer", work)


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


def _auth_middleware(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith(_HEALTH_PREFIX):
            sent = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(sent, expected):
                raise UnauthenticatedError("missing or wrong bearer token")
        return await handler(request)

    return auth


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every failure as ``{"error": ...}``: cnnserve errors by kind, aiohttp's (404, 405, 413) by status."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        if exc.status == 404:
            return _error(404, f"no route {request.method} {request.path}")
        return _error(exc.status, exc.reason)
    except CnnserveError as error:
        status, message = to_http(error, request.path)
        response = _error(status, message)
        if isinstance(error, UnauthenticatedError):
            response.headers["WWW-Authenticate"] = "Bearer"
        return response
    except Exception as error:  # a bug: logged with its traceback, the client reads "internal error"
        status, message = to_http(error, request.path)
        return _error(status, message)


def create_app(plane: oip.OipPlane, token: str = "", max_body_bytes: int = 32 * 2**20) -> web.Application:
    """The REST app over ``plane``; ``token``: the bearer token clients must send (empty: none)."""
    middlewares = [_errors]
    if token:
        middlewares.append(_auth_middleware(token))
    app = web.Application(middlewares=middlewares, client_max_size=max_body_bytes)
    routes = _Routes(plane)
    app.router.add_get("/v2/health/live", routes.live)
    app.router.add_get("/v2/health/ready", routes.ready)
    app.router.add_get("/v2", routes.server_metadata)
    app.router.add_get("/v2/", routes.server_metadata)
    app.router.add_post("/v2/repository/index", routes.index)
    for base in ("/v2/models/{model}", "/v2/models/{model}/versions/{version}"):
        app.router.add_get(base, routes.model_metadata)
        app.router.add_get(f"{base}/ready", routes.model_ready)
        app.router.add_get(f"{base}/config", routes.model_config)
        app.router.add_post(f"{base}/infer", routes.infer)
    return app
