"""Two complete replicas behind a real L7 gRPC balancer on one machine, sharing one revision store.

::

    python -m cnnserve.cluster_smoke [--model-store DIR] [--model lenet] [--work-dir DIR] [--json]

Starts two replicas with the real CLI (``cnnserve serve --detach``: a TorchServe and a gateway each, their own
state directory and ports, one shared ``--revisions-dir``) and haproxy in front of both on loopback, then
checks, under concurrent Classify load through the balancer:

- FineTuneStep calls through the balancer land on both replicas (each gateway's own /metrics says which one
  answered), and the revisions they make are consecutive: each step's parent is the revision before it;
- a ``request_id`` repeated straight to the other replica returns the first reply and makes no revision;
- a Classify with ``min_revision = r`` sent straight to the other replica right after the step that made ``r``
  is served with a revision >= r;
- a pinned revision gives the same probabilities from both replicas;
- after ``kill -9`` of one replica (its supervisor, TorchServe's process group and the gateway) haproxy's
  health check marks it DOWN, and the survivor keeps answering Classify and FineTuneStep through the balancer.
  Failed calls are counted, split by phase: before the kill (must be none), between the kill and haproxy's
  DOWN (in-flight calls of the dead replica), after it (must be none).

A failed check raises :class:`SmokeCheckError`; the figures come back as a :class:`SmokeReport`.

haproxy, not nginx: open-source nginx only marks a server failed passively (``max_fails`` counts failed
client calls), while haproxy probes each replica actively every ``inter`` ms and shows its verdict on the
stats socket. Its ``httpchk`` cannot send a gRPC request body (the 5-byte message prefix holds NUL bytes), so
the check is a ``tcp-check`` that speaks HTTP/2 itself: one ``grpc.health.v1.Health/Check`` call, passing
only on a SERVING reply. A gateway whose TorchServe has no READY worker answers NOT_SERVING, so the
balancer takes out a replica whose backend died as well as one whose gateway did.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from cnnserve.errors import CnnserveError

__all__ = [
    "SmokeSettings",
    "SmokeReport",
    "SmokeCheckError",
    "run_smoke",
    "haproxy_config",
    "grpc_health_probe",
    "main",
]

T = TypeVar("T")

PROBABILITY_ATOL = 1e-6  # one CPU, one runtime: only the batch a call rode in can move the last bits
# The gRPC message HealthCheckResponse{status: SERVING}: no compression, length 2, field 1 = 1.
SERVING_MESSAGE = bytes.fromhex("00000000020801")
GATEWAY_PID_FILE = "gateway.pid"  # as `cnnserve serve` writes them in its state directory
TORCHSERVE_PID_FILE = Path("torchserve") / "torchserve.pid"
# TorchServe's workers listen on STATE_DIR/torchserve/tmp/.ts.sock.<port>, a Unix socket: 107 bytes at most.
WORKER_SOCKET = Path("torchserve") / "tmp" / ".ts.sock.65535"
UNIX_PATH_MAX = 107


class SmokeCheckError(AssertionError):
    """A property of the replicated deployment did not hold; the message says which and with what values."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeCheckError(message)


@dataclass(frozen=True)
class SmokeSettings:
    model_store: Path  # holds <model>.mar; only that archive is served
    work_dir: Path  # state directories, the shared revision store, haproxy's config and logs
    model: str = "lenet"
    min_steps_per_replica: int = 2  # FineTuneStep calls through the balancer until each replica answered this
    max_steps: int = 16  # ... failing after this many
    load_threads: int = 3  # concurrent Classify callers through the balancer
    check_inter_ms: int = 250  # haproxy's health-check interval ...
    check_fall: int = 2  # ... and failed checks in a row before it marks a server DOWN
    calls_after_detection: int = 30  # Classify calls the survivor must answer after the DOWN
    ready_timeout: float = 300.0
    call_timeout: float = 60.0
    haproxy: str = "haproxy"


@dataclass
class SmokeReport:
    model: str
    ready_seconds: float  # both replicas started in parallel, until both answer
    steps: int = 0  # FineTuneStep calls through the balancer before the kill
    steps_by_replica: dict[str, int] = field(default_factory=dict)
    revisions: list[int] = field(default_factory=list)  # the revisions those steps made, in order
    replayed_revision: int = 0  # what the request_id repeated through the other replica answered
    min_revision_asked: int = 0
    min_revision_served: int = 0
    pinned_revision: int = 0
    pinned_max_abs_diff: float = 0.0
    killed: str = ""
    detect_seconds: float = 0.0  # kill -9 until haproxy's stats say DOWN
    haproxy_check: str = ""  # haproxy's verdict on the dead server (check_status, e.g. L4CON)
    haproxy_log: str = ""  # the line haproxy logged when it took the server out
    survivor_steps: list[int] = field(default_factory=list)  # revisions made through the balancer afterwards
    classify_calls: int = 0
    failures_before_kill: int = 0
    failures_during_outage: int = 0  # between the kill and the DOWN: calls the dead replica had in flight
    failures_after_detection: int = 0
    failure_codes: dict[str, int] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def text(self) -> str:
        steps = ", ".join(f"{name} {count}" for name, count in sorted(self.steps_by_replica.items()))
        codes = ", ".join(f"{code} {count}" for code, count in sorted(self.failure_codes.items())) or "none"
        return "\n".join(
            [
                f"two replicas of {self.model} behind haproxy, one revision store (ready in "
                f"{self.ready_seconds:.1f} s)",
                f"  fine-tune steps through the balancer: {self.steps} ({steps}); revisions "
                f"{self.revisions[0]}..{self.revisions[-1]}, each parent the revision before it",
                f"  request_id repeated via the other replica: revision {self.replayed_revision}, no new one",
                f"  min_revision {self.min_revision_asked} straight to the other replica: served "
                f"{self.min_revision_served}",
                f"  pinned revision {self.pinned_revision} on both replicas: max |dp| "
                f"{self.pinned_max_abs_diff:.2e}",
                f"  kill -9 of replica {self.killed}: haproxy marked it DOWN ({self.haproxy_check}) after "
                f"{self.detect_seconds:.2f} s",
                f"  Classify through the balancer: {self.classify_calls} calls, failed "
                f"{self.failures_before_kill} before the kill, {self.failures_during_outage} between the "
                f"kill and DOWN, {self.failures_after_detection} after ({codes})",
                f"  haproxy: {self.haproxy_log}",
                f"  the survivor went on fine-tuning: revisions {self.survivor_steps}",
                f"  wall time {self.wall_seconds:.1f} s",
            ]
        )


# ---- haproxy ------------------------------------------------------------------------------------------


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def _hpack_literal(name: bytes | int, value: str) -> bytes:
    """A header field literal without indexing, no Huffman: a static-table name index (< 15) or a new name."""
    encoded = value.encode()
    if isinstance(name, int):
        return bytes([name, len(encoded)]) + encoded
    return bytes([0, len(name)]) + name + bytes([len(encoded)]) + encoded


def grpc_health_probe(authority: str = "cnnserve") -> bytes:
    """One gRPC ``grpc.health.v1.Health/Check`` call (service "") over cleartext HTTP/2, as bytes on the wire.

    The connection preface, an empty SETTINGS frame, HEADERS on stream 1 and a DATA frame with the empty
    HealthCheckRequest (END_STREAM). A fresh connection for every check, so the preface is always first.
    """
    headers = (
        bytes([0x83, 0x86])  # :method POST, :scheme http (static table 3 and 6)
        + _hpack_literal(4, "/grpc.health.v1.Health/Check")  # :path
        + _hpack_literal(1, authority)  # :authority
        + _hpack_literal(b"content-type", "application/grpc")
        + _hpack_literal(b"te", "trailers")
    )
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    end_headers, end_stream = 0x4, 0x1
    return (
        preface
        + _h2_frame(0x4, 0, 0, b"")
        + _h2_frame(0x1, end_headers, 1, headers)
        + _h2_frame(0x0, end_stream, 1, bytes(5))
    )


def haproxy_config(
    port: int, stats_socket: Path, servers: Sequence[tuple[str, int]], inter_ms: int, fall: int
) -> str:
    """haproxy.cfg: gRPC (h2c) on 127.0.0.1:``port``, round robin over ``servers`` (name, port)."""
    lines = [
        "global",
        f"    stats socket {stats_socket} mode 600 level admin",
        "defaults",
        "    mode http",
        "    timeout connect 1s",
        "    timeout client 120s",
        "    timeout server 120s",  # a fine-tune step on a loaded machine
        f"    timeout check {max(inter_ms, 1000)}ms",
        # A connection refused (a replica gone, not yet marked DOWN) is tried on the other server: the
        # request never reached the dead one. Nothing else is retried: FineTuneStep is not idempotent.
        "    retries 2",
        "    option redispatch 1",
        "    retry-on conn-failure",
        "frontend grpc",
        f"    bind 127.0.0.1:{port} proto h2",
        "    default_backend replicas",
        "backend replicas",
        "    balance roundrobin",
        "    option tcp-check",
        "    tcp-check connect",
        f"    tcp-check send-binary {grpc_health_probe().hex()}",
        f"    tcp-check expect binary {SERVING_MESSAGE.hex()}",
        f"    default-server inter {inter_ms}ms fall {fall} rise 1",
        *(f"    server {name} 127.0.0.1:{server_port} proto h2 check" for name, server_port in servers),
    ]
    return "\n".join(lines) + "\n"


class Balancer:
    """haproxy in the foreground (``-db``), its warnings (servers going DOWN) in ``log``."""

    def __init__(
        self, executable: str, directory: Path, servers: Sequence[tuple[str, int]], port: int
    ) -> None:
        self.directory = directory
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.stats_socket = directory / "haproxy.sock"
        self.config = directory / "haproxy.cfg"
        self.log = directory / "haproxy.log"
        self.executable = executable
        self.servers = [name for name, _ in servers]
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, settings: SmokeSettings, servers: Sequence[tuple[str, int]]) -> None:
        self.config.write_text(
            haproxy_config(
                self.port, self.stats_socket, servers, settings.check_inter_ms, settings.check_fall
            )
        )
        with open(self.log, "ab") as log:
            self._process = subprocess.Popen(
                [self.executable, "-db", "-f", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def server_states(self) -> dict[str, tuple[str, str]]:
        """(status, check_status) of each server from the stats socket: ("UP", "L7OK"), ("DOWN", "L4CON")."""
        if self._process is not None and self._process.poll() is not None:
            raise SmokeCheckError(f"haproxy exited with code {self._process.returncode}: {self._log_tail()}")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
            connection.connect(str(self.stats_socket))
            connection.sendall(b"show stat\n")
            chunks = []
            while chunk := connection.recv(65536):
                chunks.append(chunk)
        lines = b"".join(chunks).decode().splitlines()
        header = lines[0].lstrip("# ").split(",")
        states = {}
        for line in lines[1:]:
            row = dict(zip(header, line.split(","), strict=False))  # trailing empty fields
            if row.get("pxname") == "replicas" and row.get("svname") in self.servers:
                states[row["svname"]] = (row["status"], row["check_status"])
        return states

    def all_up(self) -> bool | None:
        """True once the stats socket answers and every server passed its health check; else None."""
        try:
            states = self.server_states()
        except (FileNotFoundError, ConnectionRefusedError):  # haproxy has not opened its socket yet
            return None
        up = len(states) == len(self.servers) and all(status == "UP" for status, _ in states.values())
        return True if up else None

    def down_line(self, server: str) -> str | None:
        """The line haproxy logged when it marked ``server`` DOWN (None before it did)."""
        wanted = f"Server replicas/{server} is DOWN"
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return next((line.strip() for line in text.splitlines() if wanted in line), None)

    def _log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""


# ---- replicas -----------------------------------------------------------------------------------------


@dataclass
class Replica:
    """One complete replica: ``cnnserve serve --detach`` (a TorchServe and a gateway) in its own state dir."""

    name: str
    state_dir: Path
    ports: list[int]  # TorchServe inference, management, metrics, gRPC inference, gRPC management
    grpc_port: int
    metrics_port: int
    supervisor_pid: int = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def serve_command(self, model_store: Path, revisions_dir: Path, ready_timeout: float) -> list[str]:
        from cnnserve.gateway.settings import GatewaySettings

        flags = [
            "--model-store", str(model_store),
            "--state-dir", str(self.state_dir),
            "--revisions-dir", str(revisions_dir),
            "--inference-port", str(self.ports[0]),
            "--management-port", str(self.ports[1]),
            "--metrics-port", str(self.ports[2]),
            "--grpc-inference-port", str(self.ports[3]),
            "--grpc-management-port", str(self.ports[4]),
            "--listen", self.target,
            "--metrics-listen", f"127.0.0.1:{self.metrics_port}",
            "--ready-timeout", str(ready_timeout),
            "--no-build",
            "--no-restart",  # a replica that dies stays dead: the balancer, not the supervisor, copes
            "--grace-period", "2",  # `cnnserve stop` at the end: nothing is in flight by then
        ]  # fmt: skip
        # Any other listener the gateway has (each would collide with the other replica's default port).
        for setting in dataclasses.fields(GatewaySettings):
            if setting.name.endswith("_listen") and setting.name != "metrics_listen":
                flags += ["--" + setting.name.replace("_", "-"), "off"]
        return [sys.executable, "-m", "cnnserve.cli", "serve", "--detach", "--json", *flags]

    def rpc_counts(self, method: str) -> float:
        """RPCs of ``method`` this replica's gateway answered OK, from its own /metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        total = 0.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name == "cnnserve_gateway_rpcs_total"
                    and sample.labels.get("method") == method
                    and sample.labels.get("code") == "OK"
                ):
                    total += sample.value
        return total

    def kill(self) -> None:
        """kill -9 of the whole replica: the supervisor first (it would restart the rest), then the gateway
        and TorchServe's process group (the frontend and its Python workers)."""
        from cnnserve.processes import read_pid

        os.kill(self.supervisor_pid, signal.SIGKILL)
        for pid_file in (self.state_dir / GATEWAY_PID_FILE, self.state_dir / TORCHSERVE_PID_FILE):
            pid = read_pid(pid_file)
            check(pid is not None, f"replica {self.name}: no pid in {pid_file}")
            assert pid is not None
            os.killpg(pid, signal.SIGKILL)

    def stop(self) -> None:
        subprocess.run(
            [sys.executable, "-m", "cnnserve.cli", "stop", "--state-dir", str(self.state_dir)],
            check=False,  # a replica killed on purpose has little left to stop
            capture_output=True,
            timeout=180,
        )


PORT_TAKEN = ("Address already in use", "address already in use", "Failed to bind")


def _port_taken(replica: Replica) -> bool:
    """Whether a replica failed because a port picked free was taken meanwhile (other work on the machine
    also binds, and connects from, the same range)."""
    logs = [replica.state_dir / "serve.log", replica.state_dir / "gateway.log"]
    logs += list((replica.state_dir / "torchserve" / "logs").glob("*"))
    return any(
        marker in path.read_text(errors="replace") for path in logs if path.is_file() for marker in PORT_TAKEN
    )


def _start_replicas(
    settings: SmokeSettings, model_store: Path, revisions: Path, attempts: int = 3
) -> list[Replica]:
    """Two replicas on free ports, started at once (each `serve --detach` returns once its stack is ready);
    started again on new ports when a port was taken between picking and binding it."""
    from cnnserve.processes import free_ports

    for attempt in range(1, attempts + 1):
        ports = free_ports(2 * 7)
        replicas = [
            Replica(
                name,
                settings.work_dir / (f"replica-{name}" if attempt == 1 else f"replica-{name}-{attempt}"),
                ports[i * 7 : i * 7 + 5],
                *ports[i * 7 + 5 : i * 7 + 7],
            )
            for i, name in enumerate(("a", "b"))
        ]
        children = [
            subprocess.Popen(
                replica.serve_command(model_store, revisions, settings.ready_timeout),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )
            for replica in replicas
        ]
        failed = {}
        try:
            for replica, child in zip(replicas, children, strict=True):
                out, err = child.communicate(timeout=3 * settings.ready_timeout)
                if child.returncode == 0:
                    replica.supervisor_pid = int(json.loads(out)["supervisor_pid"])
                else:
                    failed[replica.name] = err.decode(errors="replace")[-3000:]
        except BaseException:  # interrupted, or a start that outlived its deadline: stop what did start
            for replica in replicas:
                replica.stop()
            raise
        finally:
            for child in children:  # interrupted: the other's command goes too
                if child.poll() is None:
                    child.kill()
                    child.wait()
        if not failed:
            return replicas
        for replica in replicas:
            replica.stop()
        retry = attempt < attempts and all(_port_taken(r) for r in replicas if r.name in failed)
        check(retry, "; ".join(f"replica {name} did not start: {error}" for name, error in failed.items()))
    raise AssertionError("unreachable: the last attempt returned or failed its check")


# ---- load ---------------------------------------------------------------------------------------------


@dataclass
class ClassifyLoad:
    """Threads calling Classify through the balancer until stopped; every outcome kept with its time."""

    target: str
    model: str
    inputs: Sequence[Any]
    threads: int
    timeout: float
    outcomes: list[tuple[float, str]] = field(default_factory=list)  # (monotonic end, "OK" or error kind)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def start(self) -> None:
        for index in range(self.threads):
            worker = threading.Thread(
                target=self._run, args=(index,), name=f"classify-load-{index}", daemon=True
            )
            worker.start()
            self._workers.append(worker)

    def _run(self, index: int) -> None:
        from cnnserve.client import ClassifierClient

        with ClassifierClient(self.target, timeout=self.timeout) as client:
            while not self._stop.is_set():
                try:
                    client.classify(self.model, [self.inputs[index % len(self.inputs)]], top_k=1)
                    outcome = "OK"
                except CnnserveError as error:
                    outcome = error.kind.name
                except Exception as error:  # counted and reported, never lost in a thread
                    outcome = type(error).__name__
                with self._lock:
                    self.outcomes.append((time.monotonic(), outcome))

    def successes_after(self, moment: float) -> int:
        with self._lock:
            return sum(1 for at, outcome in self.outcomes if outcome == "OK" and at > moment)

    def stop(self) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(self.timeout + 10)


# ---- the smoke test -----------------------------------------------------------------------------------


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, interval: float = 0.05) -> T:
    """``probe()``'s first non-None value; SmokeCheckError naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value is not None:
            return value
        if time.monotonic() > deadline:
            raise SmokeCheckError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def _inputs(shape: Sequence[int], count: int, seed: int = 0) -> list[Any]:
    """Deterministic preprocessed inputs of the model's shape (no dataset needed: the proof is about
    revisions, not accuracy)."""
    from cnnserve.gateway.types import TensorInput

    rng = np.random.default_rng(seed)
    return [
        TensorInput(tuple(shape), rng.standard_normal(tuple(shape), dtype=np.float32).tobytes())
        for _ in range(count)
    ]


def _reply_fields(reply: Any) -> dict[str, Any]:
    """A FineTuneStep reply without what may differ on a replay (the flag itself and the gateway's timing)."""
    fields = dataclasses.asdict(reply)
    fields.pop("replayed")
    fields.pop("timing")
    return fields


def run_smoke(settings: SmokeSettings, log: Callable[[str], None] = lambda _: None) -> SmokeReport:
    from cnnserve.client import ClassifierClient
    from cnnserve.processes import free_ports

    started = time.monotonic()
    archive = settings.model_store / f"{settings.model}.mar"
    check(archive.exists(), f"no {archive}")
    check(
        shutil.which(settings.haproxy) is not None,
        f"{settings.haproxy} is not installed (apt-get install haproxy)",
    )
    store = settings.work_dir / "model_store"  # this model alone: the replicas load nothing else
    store.mkdir(parents=True, exist_ok=True)
    shutil.copy2(archive, store / archive.name)
    revisions_dir = settings.work_dir / "revisions"  # the volume both replicas share
    socket_path = settings.work_dir.resolve() / "replica-a-9" / WORKER_SOCKET  # the longest state dir
    check(
        len(str(socket_path)) <= UNIX_PATH_MAX,
        f"work dir {settings.work_dir} is too deep: TorchServe's worker socket {socket_path} would be longer "
        f"than {UNIX_PATH_MAX} bytes (use a shorter --work-dir)",
    )

    log("starting two replicas (cnnserve serve --detach) ...")
    replicas = _start_replicas(settings, store, revisions_dir)
    servers = [(replica.name, replica.grpc_port) for replica in replicas]
    balancer = Balancer(settings.haproxy, settings.work_dir, servers, free_ports(1)[0])
    load: ClassifyLoad | None = None
    try:
        balancer.start(settings, servers)
        wait_for("haproxy to see both replicas UP", balancer.all_up, 60)
        report = SmokeReport(settings.model, ready_seconds=time.monotonic() - started)
        log(f"both replicas ready and UP behind haproxy after {report.ready_seconds:.1f} s")
        clients = {r.name: ClassifierClient(r.target, timeout=settings.call_timeout) for r in replicas}
        through = ClassifierClient(balancer.target, timeout=settings.call_timeout)
        model = through.get_model(settings.model)
        shape, classes = list(model.info.input_shape), len(model.info.labels)
        batch = _inputs(shape, 4, seed=1)
        labels = [index % classes for index in range(len(batch))]
        load = ClassifyLoad(
            balancer.target,
            settings.model,
            _inputs(shape, 8, seed=2),
            settings.load_threads,
            settings.call_timeout,
        )
        load.start()
        by_name = {r.name: r for r in replicas}

        def step_through_balancer(request_id: str) -> tuple[str, Any]:
            """One FineTuneStep through haproxy, and the replica whose gateway answered it."""
            before = {r.name: r.rpc_counts("FineTuneStep") for r in replicas}
            reply = through.finetune_step(settings.model, batch, labels, lr=0.01, request_id=request_id)
            grew = [r.name for r in replicas if r.rpc_counts("FineTuneStep") > before[r.name]]
            check(len(grew) == 1, f"step {request_id}: replicas whose FineTuneStep count grew: {grew}")
            return grew[0], reply

        # ---- steps through the balancer land on both replicas; revisions consecutive ----
        replies: list[tuple[str, Any]] = []
        counts: Counter[str] = Counter()
        session = uuid.uuid4().hex[:8]
        while min(counts[r.name] for r in replicas) < settings.min_steps_per_replica:
            check(
                len(replies) < settings.max_steps,
                f"{settings.max_steps} steps through the balancer and they went {dict(counts)}",
            )
            answered, reply = step_through_balancer(f"smoke-{session}-{len(replies)}")
            counts[answered] += 1
            replies.append((answered, reply))
            # Read-your-writes, right away, straight from the replica that did not make the revision.
            other = next(r for r in replicas if r.name != answered)
            served = clients[other.name].classify(settings.model, [batch[0]], min_revision=reply.revision)
            report.min_revision_asked, report.min_revision_served = reply.revision, served.revision
            check(
                served.revision >= reply.revision,
                f"replica {other.name} served revision {served.revision} for min_revision {reply.revision}",
            )
        report.steps = len(replies)
        report.steps_by_replica = dict(counts)
        report.revisions = [reply.revision for _, reply in replies]
        first = replies[0][1].revision
        check(
            report.revisions == list(range(first, first + len(replies))),
            f"steps made revisions {report.revisions}: not consecutive (two steps got one, or one was lost)",
        )
        check(
            [reply.parent for _, reply in replies] == [revision - 1 for revision in report.revisions],
            f"parents {[reply.parent for _, reply in replies]} of revisions {report.revisions}",
        )
        history = through.list_revisions(settings.model)
        chain = [r for r in history.revisions if r.revision >= first]
        check(
            [(r.revision, r.parent, r.kind) for r in chain] == [(n, n - 1, "step") for n in report.revisions],
            f"the history after revision {first - 1}: {[(r.revision, r.parent, r.kind) for r in chain]}",
        )

        # ---- a request_id repeated through the other replica returns the first result ----
        answered, reply = replies[0]
        other = next(r for r in replicas if r.name != answered)
        replay = clients[other.name].finetune_step(
            settings.model, batch, labels, lr=0.01, request_id=f"smoke-{session}-0"
        )
        check(replay.replayed, f"replica {other.name} applied request_id smoke-{session}-0 again")
        check(
            _reply_fields(replay) == _reply_fields(reply), f"replay {replay} differs from the first {reply}"
        )
        report.replayed_revision = replay.revision
        head = through.list_revisions(settings.model).head
        check(
            head == report.revisions[-1],
            f"head {head} after the replay; the last step made {report.revisions[-1]}",
        )

        # ---- a pinned revision gives the same probabilities from both replicas ----
        # The step before the head: older than the head, and always kept. The first step of the run may be
        # pruned by now: an uneven balancer can need more steps (max_steps) than the store keeps (retention).
        pinned = report.revisions[-2]
        report.pinned_revision = pinned
        scores = {}
        for name, client in clients.items():
            result = client.classify(settings.model, batch, top_k=classes, revision=pinned)
            check(
                result.revision == pinned,
                f"replica {name} served revision {result.revision}, pinned {pinned}",
            )
            scores[name] = np.array(
                [[s.probability for s in sorted(p, key=lambda s: s.index)] for p in result.predictions]
            )
        report.pinned_max_abs_diff = float(np.abs(scores["a"] - scores["b"]).max())
        check(
            report.pinned_max_abs_diff <= PROBABILITY_ATOL,
            f"pinned revision {first}: the replicas differ by {report.pinned_max_abs_diff:.3g}",
        )

        # ---- kill -9 of one replica under load ----
        victim, survivor = by_name["b"], by_name["a"]
        report.killed = victim.name
        killed_at = time.monotonic()
        victim.kill()
        log(f"killed replica {victim.name} (kill -9)")

        def victim_down() -> str | None:
            status, check_status = balancer.server_states()[victim.name]
            return check_status if status == "DOWN" else None

        report.haproxy_check = wait_for(f"haproxy to mark {victim.name} DOWN", victim_down, 60, interval=0.02)
        detected_at = time.monotonic()
        report.detect_seconds = detected_at - killed_at
        log(f"haproxy marked {victim.name} DOWN ({report.haproxy_check}) after {report.detect_seconds:.2f} s")
        report.haproxy_log = wait_for("haproxy's log line", lambda: balancer.down_line(victim.name), 10)
        wait_for(
            f"{settings.calls_after_detection} Classify calls through the balancer after the DOWN",
            lambda: True if load.successes_after(detected_at) >= settings.calls_after_detection else None,
            120,
        )
        for index in range(2):
            before = survivor.rpc_counts("FineTuneStep")
            step = through.finetune_step(
                settings.model, batch, labels, lr=0.01, request_id=f"smoke-{session}-after-{index}"
            )
            check(
                survivor.rpc_counts("FineTuneStep") == before + 1,
                "a step after the kill was not the survivor's",
            )
            report.survivor_steps.append(step.revision)
        expected = [report.revisions[-1] + 1, report.revisions[-1] + 2]
        check(
            report.survivor_steps == expected,
            f"steps after the kill made {report.survivor_steps}, not {expected}",
        )
        load.stop()
        stopped_at = time.monotonic()

        failures = [(at, outcome) for at, outcome in load.outcomes if outcome != "OK"]
        report.classify_calls = len(load.outcomes)
        report.failures_before_kill = sum(1 for at, _ in failures if at <= killed_at)
        report.failures_during_outage = sum(1 for at, _ in failures if killed_at < at <= detected_at)
        report.failures_after_detection = sum(1 for at, _ in failures if detected_at < at <= stopped_at)
        report.failure_codes = dict(Counter(outcome for _, outcome in failures))
        check(
            report.failures_before_kill == 0, f"Classify failed with both replicas up: {report.failure_codes}"
        )
        check(
            report.failures_after_detection == 0,
            f"{report.failures_after_detection} Classify calls failed after {victim.name} was marked DOWN",
        )
        for client in (*clients.values(), through):
            client.close()
        report.wall_seconds = time.monotonic() - started
        return report
    finally:
        if load is not None:
            load.stop()
        balancer.stop()
        with ThreadPoolExecutor(len(replicas)) as pool:
            list(pool.map(Replica.stop, replicas))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m cnnserve.cluster_smoke", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--model-store",
        default=os.environ.get("CNNSERVE_MODEL_STORE", "model_store"),
        help="where <model>.mar is (built with `cnnserve bootstrap` when missing)",
    )
    parser.add_argument("--model", default=SmokeSettings.model)
    parser.add_argument(
        "--work-dir", help="state, revisions and haproxy files (default: a new temporary dir)"
    )
    parser.add_argument("--haproxy", default=SmokeSettings.haproxy, help="the haproxy executable")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)

    model_store = Path(args.model_store)
    if not (model_store / f"{args.model}.mar").exists():
        print(
            f"{model_store} has no {args.model}.mar: running `cnnserve bootstrap` (minutes, once)",
            file=sys.stderr,
        )
        subprocess.run(
            [sys.executable, "-m", "cnnserve.cli", "bootstrap", "--model-store", str(model_store)], check=True
        )
    work_dir = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="cnnserve-cluster-"))
    settings = SmokeSettings(model_store, work_dir, model=args.model, haproxy=args.haproxy)
    try:
        report = run_smoke(settings, log=lambda line: print(line, file=sys.stderr))
    except SmokeCheckError as failure:
        print(f"cluster smoke FAILED: {failure} (files in {work_dir})", file=sys.stderr)
        return 1
    print(json.dumps(dataclasses.asdict(report), indent=1) if args.json else report.text())
    if not args.work_dir:
        shutil.rmtree(work_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
