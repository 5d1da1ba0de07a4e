"""``--processes N``: N gateway processes on the same ports, under a supervisor that keeps them running.

One Python process tops out near one core. With N > 1, ``cnnserve gateway`` becomes a supervisor:

- it resolves the listen addresses first: each port (0 included) is checked free and then held with a
  ``SO_REUSEPORT`` socket that only binds (never listens, so the kernel hands it no connection), which keeps
  a port 0's concrete number for every child, and for a child started again, until the supervisor exits;
- it starts N children, each ``cnnserve gateway --processes 1`` on those concrete addresses (a subprocess,
  not a fork: grpc is not fork-safe), each with its own TorchServe channels and micro-batcher; they listen
  with ``SO_REUSEPORT`` and the kernel spreads new connections over them (a connection stays with the child
  that accepted it: HTTP/2 clients with one channel use one child);
- the children's metrics are aggregated the Prometheus way: ``PROMETHEUS_MULTIPROC_DIR`` is a private
  directory the supervisor creates (and removes at exit), set in the children's environment before they
  import prometheus_client, and any child's ``/metrics`` answers for all (:mod:`cnnserve.gateway.metrics`);
  a reaped child is ``mark_process_dead``;
- SIGTERM/SIGINT are forwarded; each child drains as one gateway does (health NOT_SERVING, then
  ``grace_period`` for calls in flight), and the supervisor waits for them;
- a child that dies is started again after a back-off (0.5 s doubling to 8 s; back to 0.5 s once one has
  run a minute), and when one dies :data:`MAX_START_FAILURES` times in a row before it listened the
  supervisor stops the rest and fails (the command exits 1);
- ``ready_file``, when set, is written once all N children listen (JSON: the supervisor's pid, the
  children's, the concrete addresses) and removed while one is missing.

Children know their supervisor from ``CNNSERVE_GATEWAY_SUPERVISOR_PID`` and stop (draining) when it is gone.

N defaults from the CPU quota (:func:`default_processes`); docs/deployment.md says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cnnserve.errors import FailedPreconditionError, UnavailableError
from cnnserve.gateway.settings import GatewaySettings, parse_address, settings_flags
from cnnserve.processes import describe_exit

__all__ = [
    "SUPERVISOR_ENV",
    "MULTIPROC_ENV",
    "MAX_AUTO_PROCESSES",
    "MAX_START_FAILURES",
    "ProcessPlan",
    "default_processes",
    "plan_processes",
    "reserve_address",
    "gateway_command",
    "write_ready_file",
    "read_ready_file",
    "supervisor_pid",
    "GatewaySupervisor",
    "supervise",
]

log = logging.getLogger(__name__)

SUPERVISOR_ENV = "CNNSERVE_GATEWAY_SUPERVISOR_PID"  # set in each child: the pid it stops without
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"  # prometheus_client's own variable
MAX_AUTO_PROCESSES = 8
CORES_PER_PROCESS = 4  # auto: one gateway process per this many cores (the rest is TorchServe's)
MAX_START_FAILURES = 5  # deaths in a row before listening, per child, before the supervisor gives up
_FIRST_DELAY, _MAX_DELAY, _STABLE_AFTER = 0.5, 8.0, 60.0  # restart back-off, seconds
_TICK = 0.05  # how often the supervisor looks at its children (exits, ready files)


# ---- how many ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessPlan:
    """How many gateway processes, and why (logged at start)."""

    processes: int
    reason: str


def default_processes(cores: int) -> int:
    """``max(1, min(8, cores // 4))``: 1 up to 7 cores, 4 on 16, 8 from 32 (docs/deployment.md)."""
    return max(1, min(MAX_AUTO_PROCESSES, cores // CORES_PER_PROCESS))


def plan_processes(requested: int, cores: int | None = None) -> ProcessPlan:
    """``requested`` processes, or with 0 (auto) :func:`default_processes` of the cores this process may
    use (affinity and cgroup CPU quota: :func:`cnnserve.serving.threads.available_cores`)."""
    if requested > 0:
        return ProcessPlan(requested, f"--processes {requested}")
    if cores is None:
        from cnnserve.serving.threads import available_cores

        cores = available_cores()
    chosen = default_processes(cores)
    return ProcessPlan(
        chosen,
        f"auto: {cores} core{'s' if cores != 1 else ''} in this process's CPU quota, one gateway process "
        f"per {CORES_PER_PROCESS} (1 to {MAX_AUTO_PROCESSES}): the rest is for TorchServe's workers",
    )


# ---- addresses -----------------------------------------------------------------------------------------


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def reserve_address(address: str) -> tuple[str, socket.socket]:
    """``address`` with a concrete port (a port 0 picked now), and the ``SO_REUSEPORT`` socket that holds it.

    The port must be free: a first bind without ``SO_REUSEPORT`` fails where anything listens, another
    gateway with ``SO_REUSEPORT`` included (whose connections the children would otherwise share).
    FailedPreconditionError when it is taken."""
    host, port = parse_address(address)
    try:
        family, kind, proto, _, sockaddr = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers are fine
            probe.bind(sockaddr)
            port = probe.getsockname()[1]
        held = socket.socket(family, kind, proto)
        try:
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            held.bind((sockaddr[0], port, *sockaddr[2:]))
        except BaseException:
            held.close()
            raise
    except OSError as error:
        raise FailedPreconditionError(f"cannot listen on {address}: {error.strerror or error}") from None
    return _join(host, port), held


# ---- ready files ---------------------------------------------------------------------------------------


def write_ready_file(path: str | Path, pid: int, pids: Sequence[int], settings: GatewaySettings) -> None:
    """Say, atomically, that the gateway whose process ``pid`` started listens with processes ``pids`` on
    ``settings``' addresses."""
    path = Path(path)
    body = {
        "pid": pid,
        "pids": list(pids),
        "processes": len(pids),
        "listen": settings.listen,
        "http_listen": settings.http_listen,
        "metrics_listen": settings.metrics_listen,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(body) + "\n")
    partial.replace(path)


def read_ready_file(path: str | Path) -> dict[str, Any] | None:
    """What :func:`write_ready_file` wrote, or None when there is no such file (yet, or any more)."""
    try:
        body = json.loads(Path(path).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return body if isinstance(body, dict) else None


def supervisor_pid(environ: Mapping[str, str]) -> int | None:
    """The supervisor a child gateway runs under (:data:`SUPERVISOR_ENV`), None when it runs alone."""
    text = environ.get(SUPERVISOR_ENV, "")
    return int(text) if text.isdigit() else None


# ---- the supervisor ------------------------------------------------------------------------------------


def gateway_command(settings: GatewaySettings) -> list[str]:
    """The command line of one child: ``cnnserve gateway`` with ``settings`` (its token goes in the
    environment)."""
    return [sys.executable, "-m", "cnnserve.cli", "gateway", *settings_flags(settings)]


@dataclass
class _Child:
    index: int
    ready_file: Path
    process: asyncio.subprocess.Process | None = None
    ready_since: float | None = None
    deaths: int = 0  # in a row, for the back-off
    start_failures: int = 0  # deaths in a row before it listened
    restart_at: float = 0.0


class GatewaySupervisor:
    """Runs ``processes`` children of ``settings`` (see the module's docstring) until :meth:`run`'s ``stop``
    is set. ``command`` gives a child's command line from its settings (tests run a gateway on an in-process
    backend with it)."""

    def __init__(
        self,
        settings: GatewaySettings,
        processes: int,
        command: Callable[[GatewaySettings], list[str]] = gateway_command,
    ) -> None:
        if processes < 2:
            raise ValueError("a supervisor runs 2 or more gateway processes")
        self.settings = settings
        self.processes = processes
        self.command = command
        self._children: list[_Child] = []
        self._held: list[socket.socket] = []
        self._workdir: Path | None = None
        self._ready_written = False

    @property
    def pids(self) -> list[int]:
        """The children running now."""
        return [
            c.process.pid for c in self._children if c.process is not None and c.process.returncode is None
        ]

    def _resolve(self) -> GatewaySettings:
        """``settings`` with every listen address concrete, each held by a socket of ours."""

        def concrete(address: str) -> str:
            if address == "off":
                return address
            resolved, held = reserve_address(address)
            self._held.append(held)
            return resolved

        settings = self.settings
        return replace(
            settings,
            listen=concrete(settings.listen),
            http_listen=concrete(settings.http_listen),
            metrics_listen=concrete(settings.metrics_listen),
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Start the children and keep them running until ``stop`` is set, then stop them (each drains).
        UnavailableError when a child keeps dying before it listens."""
        try:
            resolved = self._resolve()
            self._workdir = Path(tempfile.mkdtemp(prefix="cnnserve-gateway-"))
            metrics_dir = self._workdir / "metrics"
            metrics_dir.mkdir()
            env = {
                **os.environ,
                MULTIPROC_ENV: str(metrics_dir),
                SUPERVISOR_ENV: str(os.getpid()),
                "CNNSERVE_GATEWAY_TOKEN": self.settings.token,
            }
            self._children = [_Child(i, self._workdir / "ready" / f"{i}.json") for i in range(self.processes)]
            log.info(
                "gateway supervisor (pid %d): %d processes on %s, OIP REST %s, metrics %s",
                os.getpid(),
                self.processes,
                resolved.listen,
                resolved.http_listen,
                resolved.metrics_listen,
            )
            while not stop.is_set():
                for child in self._children:
                    await self._tend(child, resolved, env, metrics_dir)
                self._update_ready_file(resolved)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), _TICK)
        finally:
            await self._stop_children()
            self._cleanup()

    async def _tend(
        self, child: _Child, resolved: GatewaySettings, env: dict[str, str], metrics: Path
    ) -> None:
        """Start ``child`` when it is due, see whether it listens, handle its death."""
        now = time.monotonic()
        process = child.process
        if process is None:
            if now >= child.restart_at:
                await self._start(child, resolved, env)
            return
        if process.returncode is None:
            if child.ready_since is None:
                ready = read_ready_file(child.ready_file)
                if ready is not None and ready.get("pid") == process.pid:
                    child.ready_since = now
                    log.info("gateway process %d (pid %d) listens", child.index, process.pid)
            return
        await process.wait()  # reaped already: returncode is set
        _mark_dead(process.pid, metrics)
        child.ready_file.unlink(missing_ok=True)
        child.process = None
        how = describe_exit(process.returncode)
        if child.ready_since is None:
            child.start_failures += 1
        else:
            child.start_failures = 0
            if now - child.ready_since >= _STABLE_AFTER:
                child.deaths = 0
        child.ready_since = None
        if child.start_failures >= MAX_START_FAILURES:
            raise UnavailableError(
                f"gateway process {child.index} {how} before it listened, {child.start_failures} times in a "
                "row; giving up (its output is above)"
            )
        child.deaths += 1
        delay = min(_MAX_DELAY, _FIRST_DELAY * 2 ** (child.deaths - 1))
        child.restart_at = now + delay
        log.error(
            "gateway process %d (pid %d) %s; starting it again in %.1f s",
            child.index,
            process.pid,
            how,
            delay,
        )

    async def _start(self, child: _Child, resolved: GatewaySettings, env: dict[str, str]) -> None:
        child.ready_file.unlink(missing_ok=True)
        own = replace(resolved, processes=1, ready_file=str(child.ready_file))
        child.process = await asyncio.create_subprocess_exec(*self.command(own), env=env)
        log.info("started gateway process %d (pid %d)", child.index, child.process.pid)

    def _update_ready_file(self, resolved: GatewaySettings) -> None:
        if not self.settings.ready_file:
            return
        ready = all(c.ready_since is not None for c in self._children)
        if ready and not self._ready_written:
            write_ready_file(self.settings.ready_file, os.getpid(), self.pids, resolved)
            log.info("all %d gateway processes listen (pids %s)", self.processes, self.pids)
        elif not ready and self._ready_written:
            Path(self.settings.ready_file).unlink(missing_ok=True)
        self._ready_written = ready

    async def _stop_children(self) -> None:
        """SIGTERM every child, wait ``grace_period`` (and a margin) for them to drain, then SIGKILL."""
        if self.settings.ready_file:
            Path(self.settings.ready_file).unlink(missing_ok=True)
        running = [c.process for c in self._children if c.process is not None]
        for process in running:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        waits = [asyncio.ensure_future(process.wait()) for process in running]
        if waits:
            _, late = await asyncio.wait(waits, timeout=self.settings.grace_period + 10.0)
            for process in running:
                if process.returncode is None:
                    log.warning("gateway process (pid %d) did not stop in time: killing it", process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            if late:
                await asyncio.wait(late)
        for process in running:
            if process.returncode not in (0, None):
                log.warning(
                    "gateway process (pid %d) %s while stopping",
                    process.pid,
                    describe_exit(process.returncode),
                )
            if self._workdir is not None:
                _mark_dead(process.pid, self._workdir / "metrics")

    def _cleanup(self) -> None:
        for held in self._held:
            held.close()
        self._held.clear()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def _mark_dead(pid: int, metrics_dir: Path) -> None:
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid, str(metrics_dir))  # type: ignore[no-untyped-call]


async def supervise(
    settings: GatewaySettings,
    processes: int,
    command: Callable[[GatewaySettings], list[str]] = gateway_command,
) -> None:
    """Run a :class:`GatewaySupervisor` until SIGTERM or SIGINT (forwarded to the children)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await GatewaySupervisor(settings, processes, command).run(stop)
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    log.info("gateway supervisor: every process stopped")
