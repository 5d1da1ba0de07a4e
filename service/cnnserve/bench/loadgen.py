"""The load generator: a closed loop of ``concurrency`` callers over a small grpc.aio (or HTTP) client pool.

It runs in its own process (``python -m cnnserve.bench.loadgen``, driven by :class:`LoadGenerator`), so it
never shares a GIL with the server it measures; it still shares the machine's cores, which is why every
result carries the generator's own CPU time. One JSON line in (a :class:`LoadSpec`), one JSON line out (a
:class:`PointResult`), until stdin closes.

Each caller sends its next call as soon as the previous one returned. A repetition lasts ``duration_s``;
calls still open at the deadline finish and count, and the repetition's wall time runs until the last one
returned. Warm-up runs the same loop for ``warmup_s`` and is thrown away.

Kinds of target (what each call is):

- ``gateway``: ``cnnserve.v1.Classifier/Classify`` with ``images_per_call`` PNG images;
- ``torchserve-grpc``: TorchServe's ``Predictions`` with ``input={"body": <png>}``, as a user would send it;
- ``torchserve-http``: ``POST /predictions/<model>`` with the PNG as ``application/octet-stream``;
- ``grpc-echo``: the echo server, sent the bytes of the ``gateway`` request and answered with them;
- ``oip-grpc``: the gateway's ``inference.GRPCInferenceService/ModelInfer`` (:mod:`cnnserve.bench.oip`);
- ``kserve-oip``: the same ModelInfer client and the same serialized requests, sent to the KServe peer
  (:mod:`cnnserve.bench.kserve_peer`), so that both servers get byte-identical calls at the same client cost.

Server CPU per call: the spec names the server processes (``cpu_pids``, per process tree); each repetition
reads their CPU time (user + system, all threads) from ``/proc/<pid>/stat`` when it starts and when its last
call returned, so the figure covers the timed calls only, never the warm-up.

This module imports grpc and the generated stubs only: no torch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol

from cnnserve.contract import DEFAULT_TOP_K
from cnnserve.gateway.types import Timing

__all__ = [
    "KINDS",
    "ECHO_METHOD",
    "LoadSpec",
    "RepResult",
    "PointResult",
    "LoadGenerator",
    "run_point",
    "pooled_latencies",
    "proc_cpu_seconds",
]

KINDS = ("gateway", "torchserve-grpc", "torchserve-http", "grpc-echo", "oip-grpc", "kserve-oip")
ECHO_METHOD = "/cnnserve.bench.Echo/Echo"
_MAX_MESSAGE = 64 * 2**20


@dataclass(frozen=True)
class LoadSpec:
    kind: str  # one of KINDS
    target: str  # HOST:PORT
    model: str
    images: tuple[bytes, ...]  # encoded images; call i sends images[i*n : i*n + n] (cyclically)
    concurrency: int
    duration_s: float
    warmup_s: float
    reps: int
    images_per_call: int = 1
    tensor_shape: tuple[int, ...] = ()  # gateway: ``images`` are float32 (C, H, W) tensors of this shape
    token: str = ""  # TorchServe's inference key (torchserve-* kinds), the gateway's token (gateway)
    tls_ca: str = ""  # gRPC kinds: PEM CA bundle to trust; set: TLS
    channels: int = 4  # gRPC connections the callers share (HTTP: one connection per caller)
    timeout_s: float = 120.0
    # Server process trees whose CPU each repetition reads from /proc: {tree name: its pids}.
    cpu_pids: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def to_json(self) -> str:
        data = asdict(self)
        data["images"] = [base64.b64encode(image).decode() for image in self.images]
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> LoadSpec:
        data = json.loads(text)
        data["images"] = tuple(base64.b64decode(image) for image in data["images"])
        data["tensor_shape"] = tuple(data["tensor_shape"])
        data["cpu_pids"] = {name: tuple(pids) for name, pids in data.get("cpu_pids", {}).items()}
        return cls(**data)


@dataclass
class RepResult:
    calls: int
    images: int
    errors: int
    wall_s: float
    cpu_s: float  # the generator process's CPU time (all threads, gRPC's included)
    latencies_ms: list[float]
    server_ms: float = 0.0  # gateway calls: sums of the reply's Timing fields
    backend_ms: float = 0.0
    batch_inputs: int = 0
    first_error: str = ""
    server_cpu_s: dict[str, float] = field(default_factory=dict)  # per tree of ``cpu_pids``, timed calls only

    @property
    def throughput_img_s(self) -> float:
        return self.images / self.wall_s if self.wall_s > 0 else 0.0


@dataclass
class PointResult:
    reps: list[RepResult] = field(default_factory=list)
    request_bytes: int = 0  # the size of one call's request message

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PointResult:
        return cls([RepResult(**rep) for rep in data["reps"]], data["request_bytes"])


# ---- the clients ------------------------------------------------------------------------------------


class _Client(Protocol):
    request_bytes: int

    async def call(self, caller: int, index: int) -> Timing: ...

    async def close(self) -> None: ...


class _GrpcPool:
    """Up to ``spec.channels`` grpc.aio channels to ``spec.target``, shared by the callers."""

    def __init__(self, spec: LoadSpec) -> None:
        import grpc

        options = [
            ("grpc.max_send_message_length", _MAX_MESSAGE),
            ("grpc.max_receive_message_length", _MAX_MESSAGE),
            # Without a local subchannel pool, channels to one target share one TCP connection.
            ("grpc.use_local_subchannel_pool", 1),
        ]
        count = max(1, min(spec.channels, spec.concurrency))
        self._timeout = spec.timeout_s
        if spec.tls_ca:
            credentials = grpc.ssl_channel_credentials(Path(spec.tls_ca).read_bytes())
            self._channel_list = [
                grpc.aio.secure_channel(spec.target, credentials, options=options) for _ in range(count)
            ]
        else:
            self._channel_list = [
                grpc.aio.insecure_channel(spec.target, options=options) for _ in range(count)
            ]
        self._metadata = (("authorization", f"Bearer {spec.token}"),) if spec.token else ()

    async def close(self) -> None:
        for channel in self._channel_list:
            await channel.close()


def _images_for(spec: LoadSpec, index: int) -> list[bytes]:
    count = len(spec.images)
    start = index * spec.images_per_call
    return [spec.images[(start + offset) % count] for offset in range(spec.images_per_call)]


def _classify_requests(spec: LoadSpec) -> list[Any]:
    """Prebuilt ClassifyRequests (one per distinct image window), so callers do not build protos."""
    from cnnserve.v1 import classifier_pb2 as pb

    def message(data: bytes) -> Any:
        if spec.tensor_shape:
            return pb.Input(tensor=pb.Tensor(shape=list(spec.tensor_shape), data=data))
        return pb.Input(image=data)

    # Tensor calls are megabytes each: one request, sent again and again, keeps memory flat.
    distinct = 1 if spec.tensor_shape else max(1, min(len(spec.images), 64))
    return [
        pb.ClassifyRequest(
            model=spec.model, inputs=[message(data) for data in _images_for(spec, i)], top_k=DEFAULT_TOP_K
        )
        for i in range(distinct)
    ]


class _GatewayClient(_GrpcPool):
    def __init__(self, spec: LoadSpec) -> None:
        from cnnserve.v1 import classifier_pb2_grpc as pb_grpc

        super().__init__(spec)
        self._stubs = [pb_grpc.ClassifierStub(channel) for channel in self._channel_list]
        self._requests = _classify_requests(spec)
        self.request_bytes = self._requests[0].ByteSize()

    async def call(self, caller: int, index: int) -> Timing:
        stub = self._stubs[caller % len(self._stubs)]
        reply = await stub.Classify(
            self._requests[index % len(self._requests)], timeout=self._timeout, metadata=self._metadata
        )
        if not reply.predictions:
            raise RuntimeError("a Classify reply without predictions")
        timing = reply.timing
        return Timing(timing.server_ms, timing.backend_ms, timing.batch_inputs)


class _EchoClient(_GrpcPool):
    def __init__(self, spec: LoadSpec) -> None:
        super().__init__(spec)
        # No serializers: bytes go out and come back as they are.
        self._methods = [channel.unary_unary(ECHO_METHOD) for channel in self._channel_list]
        self._payloads = [request.SerializeToString() for request in _classify_requests(spec)]
        self.request_bytes = len(self._payloads[0])

    async def call(self, caller: int, index: int) -> Timing:
        payload = self._payloads[index % len(self._payloads)]
        reply = await self._methods[caller % len(self._methods)](payload, timeout=self._timeout)
        if len(reply) != len(payload):
            raise RuntimeError(f"echo returned {len(reply)} bytes for {len(payload)}")
        return Timing()


class _TorchServeGrpcClient(_GrpcPool):
    def __init__(self, spec: LoadSpec) -> None:
        from cnnserve.torchserve_api import inference_pb2, inference_pb2_grpc

        super().__init__(spec)
        self._stubs = [inference_pb2_grpc.InferenceAPIsServiceStub(c) for c in self._channel_list]
        self._requests = [
            inference_pb2.PredictionsRequest(model_name=spec.model, input={"body": image})
            for image in spec.images[:64]
        ]
        self.request_bytes = self._requests[0].ByteSize()
        self._checked = False

    async def call(self, caller: int, index: int) -> Timing:
        stub = self._stubs[caller % len(self._stubs)]
        reply = await stub.Predictions(
            self._requests[index % len(self._requests)], timeout=self._timeout, metadata=self._metadata
        )
        if not self._checked:  # the handler answers errors with a JSON body too: look at one reply
            _check_prediction(reply.prediction)
            self._checked = True
        return Timing()


def _check_prediction(body: bytes) -> None:
    data = json.loads(body)
    if "predictions" not in data:
        raise RuntimeError(f"TorchServe answered without predictions: {body[:200]!r}")


class _HttpConnection:
    """One keep-alive HTTP/1.1 connection: just enough of the protocol for TorchServe's replies."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        if self.writer is None or self.reader is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionError("the server closed the connection")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while (size := int((await self.reader.readline()).split(b";")[0], 16)) > 0:
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readline()
            await self.reader.readline()
            payload = b"".join(chunks)
        else:
            payload = await self.reader.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return status, payload

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError):
                await self.writer.wait_closed()
        self.reader = self.writer = None


class _TorchServeHttpClient:
    def __init__(self, spec: LoadSpec) -> None:
        host, _, port = spec.target.rpartition(":")
        self._connections = [_HttpConnection(host, int(port)) for _ in range(spec.concurrency)]
        auth = f"Authorization: Bearer {spec.token}\r\n" if spec.token else ""
        self._requests = [
            (
                (
                    f"POST /predictions/{spec.model} HTTP/1.1\r\nHost: {spec.target}\r\n"
                    f"Content-Type: application/octet-stream\r\n{auth}Content-Length: {len(image)}\r\n\r\n"
                ).encode(),
                image,
            )
            for image in spec.images[:64]
        ]
        self.request_bytes = len(self._requests[0][0]) + len(self._requests[0][1])
        self._checked = False

    async def call(self, caller: int, index: int) -> Timing:
        head, body = self._requests[index % len(self._requests)]
        status, payload = await self._connections[caller].request(head, body)
        if status != 200:
            raise RuntimeError(f"HTTP {status}: {payload[:200]!r}")
        if not self._checked:
            _check_prediction(payload)
            self._checked = True
        return Timing()

    async def close(self) -> None:
        for connection in self._connections:
            await connection.close()


def _client(spec: LoadSpec) -> _Client:
    if spec.kind == "gateway":
        return _GatewayClient(spec)
    if spec.kind == "grpc-echo":
        return _EchoClient(spec)
    if spec.kind == "torchserve-grpc":
        return _TorchServeGrpcClient(spec)
    if spec.kind == "torchserve-http":
        return _TorchServeHttpClient(spec)
    if spec.kind in ("oip-grpc", "kserve-oip"):
        from cnnserve.bench.oip import OipGrpcClient

        return OipGrpcClient(spec)
    raise ValueError(f"unknown load kind {spec.kind!r} (known: {', '.join(KINDS)})")


# ---- server CPU from /proc ----------------------------------------------------------------------------

_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def proc_cpu_seconds(pid: int, proc: Path = Path("/proc")) -> float | None:
    """User + system CPU seconds of process ``pid`` so far, every thread included (None: gone).

    ``/proc/<pid>/stat`` is ``pid (comm) state ppid ...``; comm may hold spaces and ")", so the fields are
    counted after the last ")": utime and stime are the 12th and 13th there, in clock ticks.
    """
    try:
        fields = (proc / str(pid) / "stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (OSError, ValueError, IndexError):
        return None


def _tree_seconds(cpu_pids: dict[str, tuple[int, ...]]) -> dict[str, dict[int, float]]:
    read = {name: {pid: proc_cpu_seconds(pid) for pid in pids} for name, pids in cpu_pids.items()}
    return {name: {pid: s for pid, s in found.items() if s is not None} for name, found in read.items()}


def _cpu_used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds each tree used between two reads (a process that came or went counts for neither)."""
    return {
        name: round(sum(after[name][pid] - seconds for pid, seconds in pids.items() if pid in after[name]), 4)
        for name, pids in before.items()
    }


# ---- the loop ---------------------------------------------------------------------------------------


async def _repetition(client: _Client, spec: LoadSpec, duration_s: float) -> RepResult:
    latencies: list[float] = []
    totals = {"server_ms": 0.0, "backend_ms": 0.0, "batch_inputs": 0.0}
    errors: list[str] = []
    servers_started = _tree_seconds(spec.cpu_pids)
    cpu_started = time.process_time()
    started = time.perf_counter()
    deadline = started + duration_s

    async def caller(number: int) -> None:
        index = number
        while time.perf_counter() < deadline:
            sent = time.perf_counter()
            try:
                timing = await client.call(number, index)
            except Exception as exc:  # counted and reported, never fatal: the point says how many
                errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
                await asyncio.sleep(0.01)  # a server that fails at once must not turn this into a spin
            else:
                latencies.append((time.perf_counter() - sent) * 1000.0)
                totals["server_ms"] += timing.server_ms
                totals["backend_ms"] += timing.backend_ms
                totals["batch_inputs"] += timing.batch_inputs
            index += spec.concurrency

    await asyncio.gather(*(caller(number) for number in range(spec.concurrency)))
    servers_used = _cpu_used(servers_started, _tree_seconds(spec.cpu_pids))
    return RepResult(
        calls=len(latencies),
        images=len(latencies) * spec.images_per_call,
        errors=len(errors),
        wall_s=time.perf_counter() - started,
        cpu_s=time.process_time() - cpu_started,
        latencies_ms=[round(ms, 4) for ms in latencies],
        server_ms=totals["server_ms"],
        backend_ms=totals["backend_ms"],
        batch_inputs=int(totals["batch_inputs"]),
        first_error=errors[0] if errors else "",
        server_cpu_s=servers_used,
    )


async def run_point(spec: LoadSpec) -> PointResult:
    """Warm up, then ``spec.reps`` repetitions."""
    if spec.concurrency < 1 or spec.reps < 1 or not spec.images:
        raise ValueError("a load point needs concurrency >= 1, reps >= 1 and at least one image")
    client = _client(spec)
    try:
        if spec.warmup_s > 0:
            await _repetition(client, spec, spec.warmup_s)
        reps = [await _repetition(client, spec, spec.duration_s) for _ in range(spec.reps)]
    finally:
        await client.close()
    return PointResult(reps, client.request_bytes)


def _serve(stdin: IO[str], stdout: IO[str]) -> None:
    for line in stdin:
        if not line.strip():
            continue
        try:
            result = asyncio.run(run_point(LoadSpec.from_json(line)))
            stdout.write(json.dumps({"ok": asdict(result)}) + "\n")
        except Exception as exc:
            stdout.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        stdout.flush()


class LoadGenerator:
    """The load generator's process: started once, given one point at a time."""

    def __init__(self, log_file: Path | None = None) -> None:
        self._log = open(log_file, "ab") if log_file else None  # noqa: SIM115 - closed in close()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "cnnserve.bench.loadgen"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log if self._log else subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def run(self, spec: LoadSpec) -> PointResult:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(spec.to_json() + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the load generator exited with {self.process.wait()}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"the load generator failed: {reply['error']}")
        return PointResult.from_dict(reply["ok"])

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()
        if self._log is not None:
            self._log.close()

    def __enter__(self) -> LoadGenerator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def pooled_latencies(reps: Sequence[RepResult]) -> list[float]:
    return [ms for rep in reps for ms in rep.latencies_ms]


if __name__ == "__main__":
    _serve(sys.stdin, sys.stdout)
