"""Each failure gets its true code and message (issue 10): the mapping of what TorchServe answers, retries,
undecodable request bodies, a handler bug, workers killed under load, and TorchServe itself dying.

The unit tests need no TorchServe. The ``torchserve`` ones start their own (LeNet with two workers and a
``probe`` model whose test-only handler has a bug on purpose), since they kill its processes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import threading
import time
import zipfile
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import grpc
import numpy as np
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cnnserve.contract import ClassifyReply, ClassifyRequest, ClassScore
from cnnserve.errors import (
    CnnserveError,
    DeadlineExceededError,
    ErrorKind,
    InternalError,
    InvalidInputError,
    NotFoundError,
    OverloadedError,
    QueueFullError,
    UnavailableError,
    WorkerDiedError,
)
from cnnserve.gateway.backend import Reply, Request, translate_error
from cnnserve.gateway.core import CoreSettings, Gateway
from cnnserve.gateway.server import GatewayThread
from cnnserve.gateway.settings import GatewaySettings
from cnnserve.gateway.types import ClassifyCall, ModelInput, ModelStatus, TensorInput
from cnnserve.serving.service import Reply as WorkerReply
from cnnserve.torchserve import TorchServe, TorchServeSettings
from cnnserve.v1 import classifier_pb2 as pb
from cnnserve.v1 import classifier_pb2_grpc as pb_grpc
from cnnserve_export.export import ExportResult
from tests.gateway_helpers import settings_for
from tests.torchserve_helpers import post

LENET_INPUT = np.zeros((1, 32, 32), dtype="<f4").tobytes()

# ---- translate_error: what TorchServe 0.12 was seen to answer (docs/architecture.md, "Errors") ------

_JAVA = "\norg.pytorch.serve.http.InternalServerException"
_NO_WORKER = (
    'Model "lenet" has no worker to serve inference request. Please use scale workers API to add workers. '
    "If this is a sequence inference, please check if it is closed, or expired; or exceeds "
    "maxSequenceJobQueueSize\nInternalServerException.()"
)
_REFUSED = (
    "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:7070: "
    "Failed to connect to remote host: Connection refused"
)


@pytest.mark.parametrize(
    ("code", "details", "expected", "retryable", "says"),
    [
        (grpc.StatusCode.UNAVAILABLE, _REFUSED, UnavailableError, True, "not reachable"),
        (grpc.StatusCode.UNAVAILABLE, "Socket closed", UnavailableError, True, "not reachable"),
        (grpc.StatusCode.UNAVAILABLE, "Prediction failed" + _JAVA, InternalError, False, "handler failed"),
        (grpc.StatusCode.RESOURCE_EXHAUSTED, "Worker died." + _JAVA, WorkerDiedError, True, "worker died"),
        (grpc.StatusCode.INTERNAL, "Worker died." + _JAVA, WorkerDiedError, True, "worker died"),
        (grpc.StatusCode.INTERNAL, _NO_WORKER, QueueFullError, True, "queue for lenet is full"),
        (
            grpc.StatusCode.INTERNAL,
            "Model not found: nosuch\norg.pytorch.serve.archive.model.ModelNotFoundException",
            NotFoundError,
            False,
            "not served",
        ),
        (
            grpc.StatusCode.INTERNAL,
            "Model version: 9.9 does not exist for model: lenet\n"
            "org.pytorch.serve.archive.model.ModelVersionNotFoundException",
            NotFoundError,
            False,
            "not served",
        ),
        (
            grpc.StatusCode.PERMISSION_DENIED,
            "Token Authorization failed. Token either incorrect, expired, or not provided correctly",
            InternalError,
            False,
            "key file",
        ),
        (
            grpc.StatusCode.CANCELLED,
            "Stream removed (RST_STREAM (Received RST_STREAM with error code 8))",
            InternalError,
            False,
            "max_request_size",
        ),
        (grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded", DeadlineExceededError, False, "deadline"),
        (
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "Sent message larger than max (70000000 vs. 67108864)",
            OverloadedError,
            False,
            "size limit",
        ),
        (grpc.StatusCode.INVALID_ARGUMENT, "bad request" + _JAVA, InvalidInputError, False, "bad request"),
        (grpc.StatusCode.UNKNOWN, "something new" + _JAVA, InternalError, False, "gateway error id"),
        (grpc.StatusCode.INTERNAL, "", InternalError, False, "gateway error id"),
    ],
)
def test_translate_error_maps_what_torchserve_answers(
    code: grpc.StatusCode, details: str, expected: type[CnnserveError], retryable: bool, says: str
) -> None:
    error = grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)
    translated = translate_error(error, "lenet")
    assert type(translated) is expected
    assert translated.retryable is retryable
    assert says in translated.message
    assert "org.pytorch" not in translated.message and "Exception" not in translated.message


def test_a_reset_after_the_call_s_own_deadline_is_that_deadline() -> None:
    """A microseconds deadline can end as CANCELLED with TorchServe's RST_STREAM (seen in CI): only before
    the deadline does a reset mean a request TorchServe dropped for its size."""
    reset = "Stream removed (RST_STREAM (Received RST_STREAM with error code 8))"
    error = grpc.aio.AioRpcError(
        grpc.StatusCode.CANCELLED, grpc.aio.Metadata(), grpc.aio.Metadata(), details=reset
    )
    assert type(translate_error(error, "lenet", deadline_passed=True)) is DeadlineExceededError
    assert "max_request_size" in translate_error(error, "lenet", deadline_passed=False).message


def test_only_connection_failures_and_dead_workers_are_unavailable() -> None:
    assert WorkerDiedError("x").kind is ErrorKind.UNAVAILABLE and WorkerDiedError.retryable
    assert QueueFullError("x").kind is ErrorKind.RESOURCE_EXHAUSTED and QueueFullError.retryable
    assert not OverloadedError.retryable and not InternalError.retryable  # load shedding is not retried


# ---- the core: retries and health re-checks, with a scripted backend --------------------------------------


def _canned(request: ClassifyRequest) -> ClassifyReply:
    top = (ClassScore("3", 3, 0.9),)
    return ClassifyReply("lenet", "1.0", 0, (top,) * len(request.inputs))


class ScriptedBackend:
    """Holds its first ``held`` calls unanswered until their timeout (as TorchServe did after a worker was
    killed under load), raises ``failures`` in order, one per call, then answers; records each call's
    timeout."""

    def __init__(self, failures: Sequence[CnnserveError] = (), held: int = 0) -> None:
        self.failures = list(failures)
        self.held = held
        self.timeouts: list[float | None] = []

    async def call(self, model: str, version: str, request: Request[Reply], timeout: float | None) -> Reply:
        self.timeouts.append(timeout)
        if len(self.timeouts) <= self.held:
            assert timeout is not None, "a held call without a bound would hang its caller"
            await asyncio.sleep(timeout)
            raise DeadlineExceededError("the deadline passed before the model answered")
        if self.failures:
            raise self.failures.pop(0)
        assert isinstance(request, ClassifyRequest)
        return cast(Reply, _canned(request))

    async def models(self) -> list[ModelStatus]:
        return [ModelStatus("lenet", "1.0", ("1.0",), 1, 1)]

    async def close(self) -> None:
        return None


def _classify_call(inputs: int) -> ClassifyCall:
    tensor = TensorInput((1, 32, 32), LENET_INPUT)
    return ClassifyCall("lenet", tuple(ModelInput(tensor=tensor) for _ in range(inputs)))


@pytest.mark.parametrize("inputs", [1, 3], ids=["micro-batched", "direct"])
@pytest.mark.parametrize(
    "failure",
    [UnavailableError("down"), WorkerDiedError("died"), QueueFullError("full")],
    ids=lambda e: type(e).__name__,
)
def test_classify_retries_once_on_retryable_failures(inputs: int, failure: CnnserveError) -> None:
    async def scenario() -> None:
        backend = ScriptedBackend([failure])
        gateway = Gateway(backend)
        await gateway.start()
        result = await gateway.classify(_classify_call(inputs), timeout=5.0)
        assert len(result.predictions) == inputs and len(backend.timeouts) == 2
        first, second = backend.timeouts
        assert first is not None and second is not None and second < first  # the deadline is the caller's
        twice = ScriptedBackend([failure, failure])
        gateway = Gateway(twice)
        await gateway.start()
        with pytest.raises(type(failure)):
            await gateway.classify(_classify_call(inputs))
        assert len(twice.timeouts) == 2

    asyncio.run(scenario())


@pytest.mark.parametrize("inputs", [1, 3], ids=["micro-batched", "direct"])
def test_a_held_classify_is_retried_after_the_try_timeout_not_the_deadline(inputs: int) -> None:
    async def scenario() -> None:
        backend = ScriptedBackend(held=1)
        gateway = Gateway(backend, CoreSettings(try_timeout=0.2))
        await gateway.start()
        started = time.monotonic()
        result = await gateway.classify(_classify_call(inputs), timeout=30.0)
        assert len(result.predictions) == inputs and backend.timeouts == [0.2, 0.2]
        assert time.monotonic() - started < 5.0  # the bound, a back-off and an answer; not the 30 s deadline
        # The caller's own deadline, shorter than the bound, is final: no retry.
        short = ScriptedBackend(held=1)
        gateway = Gateway(short, CoreSettings(try_timeout=10.0))
        await gateway.start()
        with pytest.raises(DeadlineExceededError):
            await gateway.classify(_classify_call(inputs), timeout=0.2)
        assert short.timeouts == [0.2]

    asyncio.run(scenario())


@pytest.mark.parametrize(
    "failure",
    [InternalError("bug"), OverloadedError("shed"), NotFoundError("gone"), InvalidInputError("bad")],
    ids=lambda e: type(e).__name__,
)
def test_classify_does_not_retry_other_failures(failure: CnnserveError) -> None:
    async def scenario() -> None:
        backend = ScriptedBackend([failure])
        gateway = Gateway(backend)
        await gateway.start()
        with pytest.raises(type(failure)):
            await gateway.classify(_classify_call(1))
        assert len(backend.timeouts) == 1

    asyncio.run(scenario())


def test_an_unreachable_backend_asks_for_a_health_check_at_once() -> None:
    async def scenario() -> None:
        gateway = Gateway(ScriptedBackend([UnavailableError("down"), UnavailableError("down")]))
        await gateway.start()
        with pytest.raises(UnavailableError):
            await gateway.classify(_classify_call(1))
        await asyncio.wait_for(gateway.wait_for_refresh(interval=600.0), timeout=5.0)  # not the interval

        # A worker dying is no reason to re-check TorchServe: the wait lasts its whole interval.
        died = Gateway(ScriptedBackend([WorkerDiedError("died")]))
        await died.start()
        await died.classify(_classify_call(1))  # retried, answered
        started = time.monotonic()
        await died.wait_for_refresh(interval=0.3)
        assert time.monotonic() - started >= 0.3

    asyncio.run(scenario())


# ---- the handler: a bug answers INTERNAL with an error id, never an exception ----------------------------


@dataclass
class _Context:
    statuses: dict[int, int]
    model_name: str = "lenet"

    def set_response_content_type(self, index: int, content_type: str) -> None:
        assert content_type == "application/json"

    def set_response_status(self, code: int, phrase: str, index: int) -> None:
        self.statuses[index] = code


class _BrokenService:
    name = "lenet"

    def __init__(self, outcome: BaseException | list[WorkerReply]) -> None:
        self.outcome = outcome

    def handle(self, requests: Sequence[Any]) -> list[WorkerReply]:
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


@pytest.mark.parametrize(
    ("outcome", "status", "code"),
    [
        (ValueError("Out of range float values are not JSON compliant"), 500, "INTERNAL"),
        ([WorkerReply(200, b"{}")], 500, "INTERNAL"),  # one reply for a batch of three
        (MemoryError(), 429, "RESOURCE_EXHAUSTED"),
        (NotFoundError("revision 7 does not exist"), 404, "NOT_FOUND"),
    ],
    ids=["bug", "wrong-reply-count", "out-of-memory", "escaped-cnnserve-error"],
)
def test_the_handler_answers_every_request_when_the_service_raises(
    outcome: BaseException | list[Reply], status: int, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    import json

    from cnnserve.serving.handler import CnnserveHandler

    handler = CnnserveHandler()
    handler.service = _BrokenService(outcome)  # type: ignore[assignment]
    context = _Context({})
    with caplog.at_level(logging.INFO, logger="cnnserve.serving.handler"):
        bodies = handler.handle([{"body": b"x"}] * 3, context)
    assert len(bodies) == 3 and context.statuses == {0: status, 1: status, 2: status}
    errors = [json.loads(body)["error"] for body in bodies]
    assert {e["code"] for e in errors} == {code}
    if code in ("INTERNAL", "RESOURCE_EXHAUSTED"):
        match = re.search(r"error id ([0-9a-f]{12})", errors[0]["message"])
        assert match and "TorchServe's model log" in errors[0]["message"]
        logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
        assert logged and logged[0].levelno == logging.ERROR and logged[0].exc_info is not None


# ---- undecodable request bodies: INVALID_ARGUMENT for every method -----------------------------------

_GARBAGE = b"\x0a\xff\x01"  # field 1, length 255, one byte left: not a message of any type


def _raw_call(channel: grpc.Channel, method: str, streams: tuple[bool, bool], metadata: Any) -> None:
    kwargs: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}
    if streams == (False, False):
        channel.unary_unary(method, **kwargs)(_GARBAGE, timeout=10, metadata=metadata)
    elif streams == (False, True):
        list(channel.unary_stream(method, **kwargs)(_GARBAGE, timeout=10, metadata=metadata))
    elif streams == (True, False):
        channel.stream_unary(method, **kwargs)(iter([_GARBAGE]), timeout=10, metadata=metadata)
    else:
        list(channel.stream_stream(method, **kwargs)(iter([_GARBAGE]), timeout=10, metadata=metadata))


def _every_method() -> list[tuple[str, tuple[bool, bool], str]]:
    services = [
        pb.DESCRIPTOR.services_by_name["Classifier"],
        health_pb2.DESCRIPTOR.services_by_name["Health"],
        reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"],
    ]
    return [
        (f"/{s.full_name}/{m.name}", (m.client_streaming, m.server_streaming), m.input_type.full_name)
        for s in services
        for m in s.methods
    ]


@pytest.fixture
def canned_gateway() -> Iterator[GatewayThread]:
    settings = GatewaySettings(
        listen="127.0.0.1:0",
        metrics_listen="off",
        http_listen="off",
        torchserve="127.0.0.1:1",
        torchserve_management="127.0.0.1:1",
        token="s3cret",
    )
    running = GatewayThread(settings, ScriptedBackend())
    try:
        yield running
    finally:
        running.stop()


def test_undecodable_request_bodies_are_invalid_argument(canned_gateway: GatewayThread) -> None:
    token = (("authorization", "Bearer s3cret"),)
    with grpc.insecure_channel(canned_gateway.target) as channel:
        for method, streams, message in _every_method():
            with pytest.raises(grpc.RpcError) as caught:
                _raw_call(channel, method, streams, token)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, method
            assert caught.value.details() == f"the request body is not a valid {message} message"
        # Authentication still comes first, and valid requests still pass the guard.
        with pytest.raises(grpc.RpcError) as caught:
            _raw_call(channel, "/cnnserve.v1.Classifier/Classify", (False, False), ())
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        stub = pb_grpc.ClassifierStub(channel)
        request = pb.ClassifyRequest(
            model="lenet", inputs=[pb.Input(tensor=pb.Tensor(shape=[1, 32, 32], data=LENET_INPUT))]
        )
        assert stub.Classify(request, timeout=10, metadata=token).predictions
        replies = list(stub.ClassifyStream(iter([request, request]), timeout=10, metadata=token))
        assert len(replies) == 2
        # A stream's bad message fails the stream at that message.
        stream = channel.stream_stream(
            "/cnnserve.v1.Classifier/ClassifyStream", request_serializer=None, response_deserializer=None
        )
        with pytest.raises(grpc.RpcError) as caught:
            list(stream(iter([request.SerializeToString(), _GARBAGE]), timeout=10, metadata=token))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1  # SERVING
        listing = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10, metadata=token
        )
        assert any(r.list_services_response.service for r in listing)


# ---- the real stack: our own TorchServe, since these tests kill its processes ------------------------

# A test-only handler: subclasses the real one and gives ModelService a genuine bug (top_k 13 raises deep
# inside it), so that the error path is the real one. Never part of a product archive.
_PROBE_HANDLER = """
from cnnserve.serving.handler import CnnserveHandler


class ProbeHandler(CnnserveHandler):
    def initialize(self, context):
        super().initialize(context)
        top_k = self.service._top_k

        def buggy_top_k(logits, k):
            if k == 13:
                raise RuntimeError("probe: a bug in the worker")
            return top_k(logits, k)

        self.service._top_k = buggy_top_k
"""


def _probe_archive(export: ExportResult, store: Path) -> None:
    from cnnserve_export.archive import HANDLER_MODULE, build_archive, default_settings

    settings = replace(default_settings("lenet"), name="probe", min_workers=1, max_workers=1)
    archive = build_archive(export.out, store, settings)
    with zipfile.ZipFile(archive) as built:
        entries = {info.filename: built.read(info) for info in built.infolist()}
    entries[f"{HANDLER_MODULE}.py"] = _PROBE_HANDLER.encode()
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as rewritten:
        for name, data in entries.items():
            rewritten.writestr(name, data)


@dataclass
class Stack:
    torchserve: TorchServe
    gateway: GatewayThread

    def frontend(self) -> psutil.Process:
        assert self.torchserve.process is not None
        root = psutil.Process(self.torchserve.process.pid)
        return next(p for p in [root, *root.children(recursive=True)] if p.name() == "java")

    def workers(self) -> set[int]:
        """The frontend's live worker processes (a killed one stays a zombie until Java reaps it)."""
        found = set()
        for process in self.frontend().children():
            try:
                if any("model_service_worker.py" in part for part in process.cmdline()):
                    found.add(process.pid)
            except (psutil.ZombieProcess, psutil.NoSuchProcess):
                continue
        return found

    def worker_of(self, model: str) -> int:
        """The pid of a worker of ``model`` that is alive and answering (its reply names it)."""
        status, body = post(self.torchserve, model, {"shape": [1, 32, 32], "data": [0.0] * 1024})
        assert status == 200, body
        return int(body["worker"])


def _wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, lenet_export: ExportResult) -> Iterator[Stack]:
    """TorchServe (lenet: two workers, TorchServe batching on; probe: one worker) and a gateway whose health
    poll is a minute apart, so that only an immediate re-check can notice TorchServe dying in time."""
    from cnnserve_export.archive import build_archive, default_settings

    root = tmp_path_factory.mktemp("failures")
    store = root / "store"
    build_archive(
        lenet_export.out,
        store,
        replace(default_settings("lenet"), min_workers=2, max_workers=2, batch_size=8),
    )
    _probe_archive(lenet_export, store)
    settings = TorchServeSettings.with_ports(store, root / "torchserve", root / "revisions")
    torchserve = TorchServe(settings)
    torchserve.start()
    running: Stack | None = None
    try:
        torchserve.wait_ready(("lenet", "probe"), timeout=300)
        gateway = GatewayThread(settings_for(torchserve, metrics_listen="off", health_interval=60.0))
        running = Stack(torchserve, gateway)
        yield running
    finally:
        if running is not None:
            running.gateway.stop()
            torchserve = running.torchserve  # a test may have restarted it
        torchserve.stop()


def _classify_request(model: str = "lenet", top_k: int = 0, inputs: int = 1) -> pb.ClassifyRequest:
    tensor = pb.Tensor(shape=[1, 32, 32], data=LENET_INPUT)
    return pb.ClassifyRequest(model=model, top_k=top_k, inputs=[pb.Input(tensor=tensor)] * inputs)


@pytest.mark.torchserve
@pytest.mark.slow
@pytest.mark.parametrize("inputs", [1, 2], ids=["micro-batched", "direct"])
def test_a_handler_bug_is_internal_with_an_error_id_found_in_the_worker_log(
    stack: Stack, inputs: int
) -> None:
    with grpc.insecure_channel(stack.gateway.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        assert stub.Classify(_classify_request("probe", inputs=inputs), timeout=30).predictions
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(_classify_request("probe", top_k=13, inputs=inputs), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    message = caught.value.details()
    match = re.fullmatch(
        r"internal error in the probe worker \(error id ([0-9a-f]{12}); "
        r"its traceback is in TorchServe's model log\)",
        message,
    )
    assert match, message
    model_log = stack.torchserve.logs_dir / "model_log.log"

    def logged() -> bool:
        text = model_log.read_text(errors="replace") if model_log.exists() else ""
        at = text.find(f"error id {match.group(1)}")
        return at >= 0 and "RuntimeError: probe: a bug in the worker" in text[at:]

    _wait_for(logged, 15, f"error id {match.group(1)} and its traceback in {model_log}")


@pytest.mark.torchserve
@pytest.mark.slow
def test_kill_9_of_workers_under_load_loses_no_classify(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    clients, kills = 16, 3
    stop = threading.Event()
    outcomes: Counter[str] = Counter()
    failures: list[str] = []
    lock = threading.Lock()

    def load(stub: pb_grpc.ClassifierStub) -> None:
        request = _classify_request()
        while not stop.is_set():
            try:
                stub.Classify(request, timeout=60)
                outcome = "ok"
            except grpc.RpcError as error:
                outcome = error.code().name
                with lock:
                    failures.append(f"{error.code().name}: {error.details()}")
            with lock:
                outcomes[outcome] += 1

    def calls() -> int:
        with lock:
            return sum(outcomes.values())

    killed: list[int] = []
    caplog.set_level(logging.INFO, logger="cnnserve.gateway.core")
    started = time.monotonic()
    with grpc.insecure_channel(stack.gateway.target) as channel:
        stub = pb_grpc.ClassifierStub(channel)
        threads = [threading.Thread(target=load, args=(stub,), daemon=True) for _ in range(clients)]
        for thread in threads:
            thread.start()
        try:
            for _ in range(kills):
                before = calls()
                _wait_for(lambda before=before: calls() >= before + 200, 60, "200 calls under load")
                victim = stack.worker_of("lenet")
                psutil.Process(victim).send_signal(signal.SIGKILL)
                killed.append(victim)
                # TorchServe restarts it: wait for a replacement READY worker before the next kill.
                _wait_for(
                    lambda victim=victim: (
                        victim not in stack.workers()
                        and stack.torchserve.model_status("lenet").count("READY") == 2
                    ),
                    60,
                    f"lenet's worker {victim} replaced",
                )
            before = calls()
            _wait_for(lambda: calls() >= before + 200, 60, "200 calls after the last restart")
        finally:
            stop.set()
            for thread in threads:
                thread.join(90)
    retries = sum("retrying a classify call" in r.getMessage() for r in caplog.records)
    print(
        f"\n{calls()} Classify calls from {clients} clients in {time.monotonic() - started:.1f} s, "
        f"{len(killed)} workers killed ({killed}), {retries} calls retried, {len(failures)} failed"
    )
    assert len(killed) == kills
    assert failures == [] and outcomes["ok"] == calls()


@pytest.mark.torchserve
@pytest.mark.slow
def test_the_gateway_is_not_serving_at_once_when_torchserve_dies_and_serves_again_after(stack: Stack) -> None:
    assert stack.gateway.running.settings.health_interval >= 60  # only an immediate re-check can be in time
    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    model_health = health_pb2.HealthCheckRequest(service="cnnserve.v1.Classifier/lenet")
    old_key = stack.torchserve.keys().inference
    with grpc.insecure_channel(stack.gateway.target) as channel:
        health_stub, stub = health_pb2_grpc.HealthStub(channel), pb_grpc.ClassifierStub(channel)
        watch = health_stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=60)
        assert next(watch).status == serving

        stack.frontend().send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        while next(watch).status != not_serving:
            pass
        latency = time.monotonic() - killed_at
        watch.cancel()
        print(f"\nNOT_SERVING {latency * 1000:.0f} ms after kill -9 of TorchServe's frontend")
        assert latency < 3.0
        assert health_stub.Check(model_health, timeout=10).status == not_serving  # set before the overall one
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(_classify_request(), timeout=30)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE

        # TorchServe back on the same ports, with new tokens: nobody touches the gateway.
        stack.torchserve.stop()
        stack.torchserve = TorchServe(stack.torchserve.settings)
        stack.torchserve.start()
        stack.torchserve.wait_ready(("lenet",), timeout=300)
        assert stack.torchserve.keys().inference != old_key
        attempts = 0

        def classified() -> bool:
            nonlocal attempts
            attempts += 1
            try:
                return bool(stub.Classify(_classify_request(), timeout=30).predictions)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAVAILABLE, error.details()
                return False

        _wait_for(classified, 15, "a Classify through the gateway after TorchServe's restart")
        served_at = time.monotonic()
        # The call that got through asks for a health check: SERVING without waiting for the minute's poll.
        _wait_for(lambda: health_stub.Check(model_health, timeout=10).status == serving, 5, "lenet SERVING")
    serving_after = time.monotonic() - served_at
    print(f"Classify worked again after {attempts} attempt(s); SERVING {serving_after:.2f} s later")
