"""The gateway server: grpc.aio with an auth interceptor, load shedding, health, reflection and metrics.

:func:`create_server` builds and starts it on an address (port 0 picks a free port; tests use that) and
returns a :class:`RunningGateway`; :func:`serve` runs one until SIGTERM/SIGINT with a graceful shutdown:
health turns NOT_SERVING first, new calls are refused, calls in flight get ``grace_period`` seconds.
:class:`GatewayThread` runs one on an event loop thread of its own, beside blocking code (tests, benchmarks).

Beside ``cnnserve.v1.Classifier`` the same server serves ``inference.GRPCInferenceService`` (the Open
Inference Protocol, :mod:`cnnserve.gateway.oip`), and, unless ``http_listen`` is "off", the OIP REST API runs
as an aiohttp app on the same event loop; both go through the same core, interceptors, limit and metrics.

With ``processes`` > 1 (or auto choosing more than one), :func:`serve` runs the supervisor of
:mod:`cnnserve.gateway.processes` instead, whose children are each this server, listening with
``SO_REUSEPORT`` on the same ports (``reuse_port``) and serving metrics aggregated over all of them.

Health is re-checked every ``health_interval`` seconds, and at once when the connection to TorchServe drops
or a call cannot reach it (``Gateway.request_refresh``). A request body that is not a valid protobuf message
is INVALID_ARGUMENT for every method (:class:`DecodeErrorInterceptor`), not grpc's default UNKNOWN.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import inspect
import logging
import os
import signal
import socket
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cnnserve.gateway.backend import Backend, ConnectionWatcher, TorchServeBackend
from cnnserve.gateway.core import CoreSettings, Gateway
from cnnserve.gateway.limits import ConcurrencyLimit
from cnnserve.gateway.metrics import GatewayMetrics
from cnnserve.gateway.oip.messages import POOL as OIP_POOL
from cnnserve.gateway.oip.messages import SERVICE_NAME as OIP_SERVICE_NAME
from cnnserve.gateway.oip.messages import reflection_pool
from cnnserve.gateway.oip.plane import OipPlane
from cnnserve.gateway.oip.servicer import OipServicer
from cnnserve.gateway.servicer import ClassifierServicer
from cnnserve.gateway.settings import GatewaySettings, parse_address
from cnnserve.v1 import classifier_pb2, classifier_pb2_grpc

__all__ = [
    "RunningGateway",
    "GatewayThread",
    "DecodeErrorInterceptor",
    "create_server",
    "serve",
    "SERVICE_NAME",
    "model_health_name",
]

log = logging.getLogger(__name__)
T = TypeVar("T")

SERVICE_NAME = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].full_name  # cnnserve.v1.Classifier
_OUR_METHODS = f"/{SERVICE_NAME}/"
_HEALTH_METHODS = "/grpc.health.v1.Health/"


def model_health_name(model: str) -> str:
    """The health-check service name for one model: ``cnnserve.v1.Classifier/<model>``."""
    return f"{SERVICE_NAME}/{model}"


def _abort_handler(
    handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that fails every call with ``code``."""

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def streaming(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    return _handler_like(handler, unary, streaming, handler.request_deserializer)


def _handler_like(
    handler: grpc.RpcMethodHandler,
    unary: Callable[..., Any],
    streaming: Callable[..., Any],
    request_deserializer: Callable[[bytes], Any] | None,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` (one or a stream of requests and of responses) running
    ``unary`` where it answers one response and ``streaming`` where it answers a stream."""
    kwargs = {
        "request_deserializer": request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(streaming, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary, **kwargs)
    return grpc.stream_stream_rpc_method_handler(streaming, **kwargs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Requires ``authorization: Bearer <token>`` on every call but the health checks."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_HEALTH_METHODS):
            return handler
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        sent_bytes = sent.encode() if isinstance(sent, str) else sent
        if not hmac.compare_digest(sent_bytes, self._expected):
            return _abort_handler(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token")
        return handler


class _Undecodable:
    """What a guarded request deserializer returns for bytes that are not a valid message."""

    __slots__ = ()


_UNDECODABLE = _Undecodable()


def _request_type(method: str) -> str:
    """``/cnnserve.v1.Classifier/Classify`` -> ``cnnserve.v1.ClassifyRequest`` (unknown: ``method``)."""
    service, _, name = method.strip("/").rpartition("/")
    for pool in (descriptor_pool.Default(), OIP_POOL):  # the OIP's messages have a pool of their own
        try:
            found = pool.FindServiceByName(service).methods_by_name[name]
        except KeyError:
            continue
        return str(found.input_type.full_name)
    return method


def _guard_decoding(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """``handler`` with a deserializer that marks undecodable bytes instead of raising, and a behaviour of
    the same kind (async or not, streaming or not) that answers a marked request INVALID_ARGUMENT."""
    decode = handler.request_deserializer
    if decode is None:  # raw bytes: nothing to decode
        return handler
    behaviour = handler.unary_unary or handler.unary_stream or handler.stream_unary or handler.stream_stream
    streaming_requests = handler.request_streaming
    code = grpc.StatusCode.INVALID_ARGUMENT
    message = f"the request body is not a valid {_request_type(method)} message"

    def deserialize(data: bytes) -> Any:
        try:
            return decode(data)
        except DecodeError:
            return _UNDECODABLE

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        async for request in requests:
            if request is _UNDECODABLE:
                await context.abort(code, message)
            yield request

    def checked_sync(requests: Iterator[Any], context: grpc.ServicerContext) -> Iterator[Any]:
        for request in requests:
            if request is _UNDECODABLE:
                context.abort(code, message)
            yield request

    async def answer(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if streaming_requests:
            request = checked(request, context)
        elif request is _UNDECODABLE:
            await context.abort(code, message)
        return await behaviour(request, context)

    async def stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if streaming_requests:
            request = checked(request, context)
        elif request is _UNDECODABLE:
            await context.abort(code, message)
        async for response in behaviour(request, context):
            yield response

    def answer_sync(request: Any, context: grpc.ServicerContext) -> Any:
        if streaming_requests:
            request = checked_sync(request, context)
        elif request is _UNDECODABLE:
            context.abort(code, message)
        return behaviour(request, context)

    def stream_sync(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if streaming_requests:
            request = checked_sync(request, context)
        elif request is _UNDECODABLE:
            context.abort(code, message)
        yield from behaviour(request, context)

    if inspect.iscoroutinefunction(behaviour):
        wrapped: Callable[..., Any] = answer
    elif inspect.isasyncgenfunction(behaviour):
        wrapped = stream
    elif inspect.isgeneratorfunction(behaviour):
        wrapped = stream_sync
    else:
        wrapped = answer_sync
    return _handler_like(handler, wrapped, wrapped, deserialize)


class DecodeErrorInterceptor(grpc.aio.ServerInterceptor):
    """Undecodable request bytes -> INVALID_ARGUMENT "the request body is not a valid <Message> message".

    grpc.aio decodes the request before it calls the servicer, and a deserializer that raises makes the call
    UNKNOWN. Each method's guarded handler is built once and kept: a call only looks it up. (Streaming
    methods are guarded through their request iterator; one that reads with ``context.read()`` is not.)
    """

    def __init__(self) -> None:
        self._guarded: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return None
        cached = self._guarded.get(details.method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        guarded = _guard_decoding(handler, details.method)
        self._guarded[details.method] = (handler, guarded)
        return guarded


@dataclass
class RunningGateway:
    server: grpc.aio.Server
    port: int
    gateway: Gateway
    health: health.aio.HealthServicer
    metrics: GatewayMetrics
    settings: GatewaySettings
    metrics_port: int | None = None
    http_port: int | None = None  # the OIP REST API's; None: off
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)
    _metrics_server: Any = None
    _http_runner: Any = None  # aiohttp.web.AppRunner

    async def update_health(self) -> None:
        states = await self.gateway.refresh_models()
        for model, serving in states.items():
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if serving
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            await self.health.set(model_health_name(model), status)
            self.metrics.model_serving.labels(model).set(1 if serving else 0)
        overall = (
            health_pb2.HealthCheckResponse.SERVING
            if self.gateway.serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.health.set("", overall)
        await self.health.set(SERVICE_NAME, overall)
        await self.health.set(OIP_SERVICE_NAME, overall)

    async def _watch_health(self) -> None:
        while True:
            await self.gateway.wait_for_refresh(self.settings.health_interval)
            try:
                await self.update_health()
            except Exception:
                log.exception("health update failed")

    async def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING first, then refuse new calls and give in-flight ones ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        grace = self.settings.grace_period if grace is None else grace
        stopping = [self.server.stop(grace)]
        if self._http_runner is not None:  # stops listening; requests in flight get up to --grace-period
            stopping.append(self._http_runner.cleanup())
        await asyncio.gather(*stopping)
        await self.gateway.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()


def _server_credentials(settings: GatewaySettings) -> grpc.ServerCredentials | None:
    if not settings.tls_cert:
        return None
    return grpc.ssl_server_credentials(
        [(Path(settings.tls_key).read_bytes(), Path(settings.tls_cert).read_bytes())]
    )


async def create_server(
    settings: GatewaySettings,
    backend: Backend | None = None,
    metrics: GatewayMetrics | None = None,
    *,
    reuse_port: bool = False,
) -> RunningGateway:
    """Build, start and return the gateway. ``backend`` defaults to TorchServe as ``settings`` say.
    ``reuse_port``: listen with ``SO_REUSEPORT`` (gRPC, REST and metrics), beside the other processes of a
    ``--processes N`` gateway; otherwise an address in use is an error, as it should be for one process."""
    metrics = metrics or GatewayMetrics()
    max_bytes = settings.max_message_mb * 2**20
    if backend is None:
        backend = TorchServeBackend(
            settings.torchserve,
            settings.torchserve_management,
            settings.torchserve_key_file or None,
            max_message_bytes=max_bytes,
        )
    core = Gateway(
        backend,
        CoreSettings(
            max_inputs=settings.max_inputs,
            max_batch=settings.max_batch,
            max_in_flight=settings.max_in_flight,
            try_timeout=settings.backend_try_timeout or None,
        ),
        on_batch=lambda model, size: metrics.batch_inputs.labels(model).observe(size),
    )
    interceptors: list[grpc.aio.ServerInterceptor] = []
    if settings.token:
        interceptors.append(AuthInterceptor(settings.token))
    interceptors.append(DecodeErrorInterceptor())  # innermost: it sees (and caches) the registered handlers
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", max_bytes),
            ("grpc.max_send_message_length", max_bytes),
            ("grpc.keepalive_time_ms", int(settings.keepalive_time * 1000)),
            ("grpc.keepalive_timeout_ms", int(settings.keepalive_timeout * 1000)),
            ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            # grpc turns SO_REUSEPORT on by default: a second gateway on a port would silently share it.
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    # Shedding lives in the servicer, not in an interceptor: an interceptor that wraps handlers builds a new
    # handler object on every call, on the gateway's hottest path.
    limit = ConcurrencyLimit(settings.max_concurrent_rpcs, metrics.in_flight.set)
    classifier_pb2_grpc.add_ClassifierServicer_to_server(ClassifierServicer(core, metrics, limit), server)
    oip_plane = OipPlane(core, metrics, limit)
    server.add_generic_rpc_handlers((OipServicer(oip_plane).handler(),))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = (
        SERVICE_NAME,
        OIP_SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    # The OIP's messages live in a pool of their own (oip/messages.py): reflection reads one with all four.
    reflection.enable_server_reflection(services, server, pool=reflection_pool(services))
    host, port = parse_address(settings.listen)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    credentials = _server_credentials(settings)
    bound = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    running = RunningGateway(server, bound, core, health_servicer, metrics, settings)
    await core.start()
    await running.update_health()
    if settings.metrics_listen != "off":
        from prometheus_client import start_http_server

        metrics_host, metrics_port = parse_address(settings.metrics_listen)
        if reuse_port:
            running._metrics_server = _start_shared_metrics_server(
                metrics_host, metrics_port, metrics.registry
            )
        else:
            running._metrics_server, _ = start_http_server(
                metrics_port, metrics_host, registry=metrics.registry
            )
        running.metrics_port = running._metrics_server.server_port
    if settings.http_listen != "off":
        try:
            running._http_runner, running.http_port = await _start_http(
                settings, oip_plane, max_bytes, reuse_port
            )
        except BaseException:  # its address taken, say: leave nothing running behind the error
            if running._metrics_server is not None:
                running._metrics_server.shutdown()
            await core.close()
            raise
    await server.start()
    loop = asyncio.get_running_loop()
    running._tasks.append(loop.create_task(running._watch_health()))
    if isinstance(backend, ConnectionWatcher):
        running._tasks.append(loop.create_task(backend.watch_connection(core.request_refresh)))
    log.info(
        "gateway listening on %s:%d, OIP REST on %s (TorchServe %s)",
        host,
        bound,
        "off"
        if running.http_port is None
        else f"{settings.http_listen.rpartition(':')[0]}:{running.http_port}",
        settings.torchserve,
    )
    return running


def _start_shared_metrics_server(host: str, port: int, registry: Any) -> Any:
    """prometheus_client's ``start_http_server``, listening with ``SO_REUSEPORT``: the one port every
    process of a ``--processes N`` gateway answers on (each answers for all)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import make_wsgi_app
    from prometheus_client.exposition import ThreadingWSGIServer

    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]

    class SharedServer(ThreadingWSGIServer):
        address_family = family
        allow_reuse_port = True

    class Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            return None

    server = make_server(host, port, make_wsgi_app(registry), SharedServer, handler_class=Quiet)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server


async def _start_http(
    settings: GatewaySettings, plane: OipPlane, max_bytes: int, reuse_port: bool = False
) -> tuple[Any, int]:
    """The OIP REST app on ``settings.http_listen``, with the gRPC side's token and TLS; (runner, port)."""
    import ssl

    from aiohttp import web

    from cnnserve.gateway.oip.rest import create_app

    ssl_context = None
    if settings.tls_cert:
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.load_cert_chain(settings.tls_cert, settings.tls_key)
    runner = web.AppRunner(
        create_app(plane, settings.token, max_bytes), access_log=None, shutdown_timeout=settings.grace_period
    )
    await runner.setup()
    host, port = parse_address(settings.http_listen)
    site = web.TCPSite(
        runner,
        host,
        port,
        ssl_context=ssl_context,
        shutdown_timeout=settings.grace_period,
        reuse_port=reuse_port or None,  # None: aiohttp's default, as for one process
    )
    await site.start()
    return runner, int(runner.addresses[0][1])


async def serve(
    settings: GatewaySettings,
    ready: Callable[[RunningGateway], None] | None = None,
    backend: Backend | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully.

    With ``settings.processes`` (auto: from the CPU quota) over 1, run the supervisor of that many gateway
    processes instead (:func:`cnnserve.gateway.processes.supervise`; ``ready`` and ``backend`` are for one
    process). A child of that supervisor (``CNNSERVE_GATEWAY_SUPERVISOR_PID``) shares its ports and metrics
    and stops when the supervisor is gone."""
    from cnnserve.gateway import processes

    supervisor = processes.supervisor_pid(os.environ)
    if supervisor is None:
        plan = processes.plan_processes(settings.processes)
        log.info("gateway processes: %d (%s)", plan.processes, plan.reason)
        if plan.processes > 1:
            if backend is not None:
                raise ValueError("a backend object serves one process: run --processes 1 with it")
            await processes.supervise(settings, plan.processes)
            return
    multiprocess_dir = os.environ.get(processes.MULTIPROC_ENV) if supervisor is not None else None
    running = await create_server(
        settings,
        backend,
        GatewayMetrics(multiprocess_dir=multiprocess_dir),
        reuse_port=supervisor is not None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    watch = None
    if supervisor is not None:
        watch = loop.create_task(_watch_supervisor(supervisor, stop))
    if ready is not None:
        ready(running)
    if settings.ready_file:
        processes.write_ready_file(settings.ready_file, os.getpid(), [os.getpid()], _listening(running))
    try:
        await stop.wait()
    finally:
        if settings.ready_file:  # first: whoever waits on it must not take a draining gateway as ready
            with contextlib.suppress(OSError):
                os.unlink(settings.ready_file)
        if watch is not None:
            watch.cancel()
    log.info("shutting down: health NOT_SERVING, %.1f s grace for calls in flight", settings.grace_period)
    with contextlib.suppress(asyncio.CancelledError):
        await running.stop()


def _listening(running: RunningGateway) -> GatewaySettings:
    """``running``'s settings with the ports it really listens on (a port 0 resolved)."""
    from dataclasses import replace

    settings = running.settings

    def concrete(address: str, port: int | None) -> str:
        if address == "off" or port is None:
            return address
        host = parse_address(address)[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    return replace(
        settings,
        listen=concrete(settings.listen, running.port),
        http_listen=concrete(settings.http_listen, running.http_port),
        metrics_listen=concrete(settings.metrics_listen, running.metrics_port),
    )


async def _watch_supervisor(pid: int, stop: asyncio.Event, interval: float = 1.0) -> None:
    """Set ``stop`` once process ``pid`` (this child's supervisor) is no longer its parent: a supervisor
    killed with SIGKILL must not leave its children serving on its ports."""
    while os.getppid() == pid:
        await asyncio.sleep(interval)
    log.warning("the gateway supervisor (pid %d) is gone: stopping", pid)
    stop.set()


class GatewayThread:
    """A gateway served from a private event loop thread, so that blocking code can call it meanwhile."""

    def __init__(self, settings: GatewaySettings, backend: Backend | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.running: RunningGateway = self.run(create_server(settings, backend))

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float = 120) -> T:
        """Run ``coroutine`` on the gateway's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.running.port}"

    @property
    def http_url(self) -> str | None:
        """The OIP REST API's base URL (``http://127.0.0.1:PORT``); None when it is off."""
        port = self.running.http_port
        if port is None:
            return None
        scheme = "https" if self.running.settings.tls_cert else "http"
        return f"{scheme}://127.0.0.1:{port}"

    @property
    def metrics_url(self) -> str | None:
        port = self.running.metrics_port
        return f"http://127.0.0.1:{port}/metrics" if port else None

    def stop(self, grace: float | None = 0.0) -> None:
        try:
            self.run(self.running.stop(grace))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            if not self.thread.is_alive():
                self.loop.close()
