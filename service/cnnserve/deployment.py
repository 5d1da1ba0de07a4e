"""One deployment: TorchServe and the gateway wired to it, as ``cnnserve serve`` and the benchmark run them,
the one way every client inside the project reaches the gateway, and the supervisor that restarts either
process when it dies.

- :class:`Deployment`: built from a :class:`~cnnserve.torchserve.TorchServeSettings`, the user's
  :class:`~cnnserve.gateway.settings.GatewaySettings` (or none: TorchServe only) and a state directory. It
  wires the gateway to that TorchServe (:func:`wire_gateway`, the one place that does), starts both in order
  and waits until each is ready, says where they answer and their pids, and stops them (the gateway first).
  :meth:`Deployment.supervisor` keeps them running.
- :func:`gateway_client`: ``ClassifierClient`` arguments for a client on this machine, from the gateway's
  :class:`~cnnserve.gateway.settings.GatewaySettings`: its port on loopback, its token, and with TLS the CA
  to trust (``--tls-ca``, else the gateway's own certificate, which is its own CA when self-signed) and the
  host name to dial (one the certificate names: the address itself, else ``localhost``/``127.0.0.1``).
  ``serve``'s readiness checks, the container probe and the benchmark's clients all use it.
- :class:`GatewayProcess`: ``cnnserve gateway`` in its own process group; :class:`TorchServeChild`: a
  :class:`~cnnserve.torchserve.TorchServe` as the supervisor sees it.
- :class:`Supervisor`: starts the processes in order, then watches them; one that dies is described (exit
  code or signal, and where its logs are), the rest of its process group is stopped, and it is started
  again after a back-off, a bounded number of times (:class:`RestartPolicy`). The others keep running.

Files in the state directory: ``gateway.pid``, ``gateway.log`` and, while it listens, ``gateway.ready`` (the
gateway; with ``--processes N`` > 1 the pid is its supervisor's), ``torchserve/`` (when the
TorchServe settings put it there, as ``serve`` and the benchmark do), and ``serve`` adds ``serve.pid`` and,
detached, ``serve.log``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol, TypedDict

from cnnserve.errors import CnnserveError, FailedPreconditionError, InvalidInputError, UnavailableError
from cnnserve.gateway.settings import GatewaySettings, parse_address, settings_flags
from cnnserve.processes import describe_exit, file_size, stop_child, tail
from cnnserve.torchserve import TorchServe, TorchServeSettings

__all__ = [
    "Deployment",
    "wire_gateway",
    "served_models",
    "GATEWAY_PID_FILE",
    "GATEWAY_READY_FILE",
    "SERVE_PID_FILE",
    "SERVE_LOG",
    "GatewayClient",
    "gateway_client",
    "certificate_names",
    "TorchServeWiring",
    "torchserve_wiring",
    "gateway_flags",
    "GatewayProcess",
    "TorchServeChild",
    "Supervised",
    "RestartPolicy",
    "Supervisor",
]

GATEWAY_PID_FILE = "gateway.pid"
GATEWAY_READY_FILE = "gateway.ready"  # written by the gateway once every one of its processes listens
SERVE_PID_FILE = "serve.pid"  # the supervisor (``cnnserve serve``, foreground or detached)
SERVE_LOG = "serve.log"  # a detached supervisor's output

log = logging.getLogger("cnnserve.serve")

_WILDCARDS = ("", "0.0.0.0", "::")


# ---- reaching the gateway ------------------------------------------------------------------------------


class GatewayClient(TypedDict):
    """``ClassifierClient(**kwargs)``: how a client on this machine reaches one gateway."""

    target: str
    token: str | None
    tls_ca: str | None


def certificate_names(path: str | Path) -> tuple[str, ...] | None:
    """The DNS names and IP addresses a PEM certificate (the first of a chain) is for: its subjectAltName,
    else its common name. None when it cannot be read here (then nobody second-guesses gRPC's check)."""
    # The standard library's only certificate parser without a connection; CPython's own tests use it.
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        decoded = decode(str(path))
    except (OSError, ssl.SSLError, ValueError):
        return None
    names = tuple(
        str(value).strip()
        for kind, value in decoded.get("subjectAltName", ())
        if kind in ("DNS", "IP Address")
    )
    if names:
        return names
    common = tuple(str(v) for rdn in decoded.get("subject", ()) for key, v in rdn if key == "commonName")
    return common or None


def _same_host(host: str, name: str) -> bool:
    try:
        return ipaddress.ip_address(host) == ipaddress.ip_address(name)
    except ValueError:
        pass
    host, name = host.lower().rstrip("."), name.lower().rstrip(".")
    if name.startswith("*."):  # one label, as TLS wildcards go
        return host.endswith(name[1:]) and "." not in host[: -len(name) + 1]
    return host == name


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tls_host(host: str, certificate: str) -> str:
    """A name for ``host`` that ``certificate`` is valid for (gRPC verifies the name it dials)."""
    names = certificate_names(certificate)
    if names is None or any(_same_host(host, name) for name in names):
        return host
    if _is_loopback(host):
        for candidate in ("localhost", "127.0.0.1", "::1"):
            if any(_same_host(candidate, name) for name in names):
                return candidate
    also = " (or localhost)" if _is_loopback(host) else ""
    raise FailedPreconditionError(
        f"the gateway's certificate {certificate} is for {', '.join(names)}, but clients on this machine "
        f"reach it as {host}: give the certificate a subjectAltName for {host}{also}"
    )


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def gateway_client(
    settings: GatewaySettings, tls_ca: str | None = None, target: str | None = None
) -> GatewayClient:
    """How a client on this machine reaches the gateway ``settings`` describe.

    ``target`` (default: the gateway's ``listen`` address; a wildcard address becomes 127.0.0.1) is dialled
    with TLS when the gateway serves it or ``tls_ca`` is given, trusting ``tls_ca`` or else the gateway's
    own certificate. With the gateway's certificate at hand, a loopback host the certificate does not name
    is dialled by a loopback name it does (``localhost``, ``127.0.0.1``); FailedPreconditionError when
    there is none. The token is the gateway's (health checks need none; every other call does).
    """
    host, port = parse_address(target or settings.listen)
    if host in _WILDCARDS:
        host = "127.0.0.1"
    tls = bool(settings.tls_cert or tls_ca)
    if settings.tls_cert:
        host = _tls_host(host, settings.tls_cert)
    return {
        "target": _join(host, port),
        "token": settings.token or None,
        "tls_ca": (tls_ca or settings.tls_cert) if tls else None,
    }


def _health(client: GatewayClient, service: str, timeout: float) -> tuple[str | None, str]:
    """(status name, '') from the gRPC health service, or (None, why not)."""
    from cnnserve.client import ClassifierClient

    try:
        with ClassifierClient(**client, timeout=timeout) as connected:
            return connected.health(service), ""
    except CnnserveError as error:
        return None, f"{error.kind.code_name}: {error.message}"


# ---- the gateway wired to TorchServe, and the two processes --------------------------------------------


class TorchServeWiring(TypedDict):
    """The :class:`~cnnserve.gateway.settings.GatewaySettings` fields that say which TorchServe to use."""

    torchserve: str
    torchserve_management: str
    torchserve_key_file: str


def torchserve_wiring(settings: TorchServeSettings) -> TorchServeWiring:
    """The :class:`~cnnserve.gateway.settings.GatewaySettings` fields that point a gateway at the TorchServe
    ``settings`` describe: its gRPC APIs, and its key file when token authorization is on."""
    return {
        "torchserve": settings.grpc_inference_target,
        "torchserve_management": settings.grpc_management_target,
        "torchserve_key_file": str(settings.key_file.resolve()) if settings.token_auth else "",
    }


def wire_gateway(gateway: GatewaySettings, torchserve: TorchServeSettings) -> GatewaySettings:
    """``gateway`` pointed at the TorchServe ``torchserve`` describes, whatever its own ``torchserve*``
    fields said: the gateway settings of every :class:`Deployment`."""
    return replace(gateway, **torchserve_wiring(torchserve))


def gateway_flags(settings: GatewaySettings) -> list[str]:
    """``cnnserve gateway`` flags for ``settings``, but the token: it travels in the environment
    (``CNNSERVE_GATEWAY_TOKEN``), where ``ps`` does not show it."""
    return settings_flags(settings)


class Supervised(Protocol):
    """A process the :class:`Supervisor` starts, watches, and starts again."""

    name: str

    @property
    def process(self) -> subprocess.Popen[bytes] | None: ...

    def start(self) -> None: ...

    def wait_ready(self, timeout: float, stop: threading.Event) -> bool:
        """True once ready, False when ``stop`` is set first; UnavailableError when it dies or times out."""
        ...

    def stop(self) -> None: ...

    def where_logs(self) -> str:
        """Where to look: "logs in var/torchserve/logs"."""
        ...

    def last_lines(self) -> str: ...


class GatewayProcess:
    """``cnnserve gateway`` in its own process group, logging to ``<state_dir>/gateway.log``.

    It is ready once ``<state_dir>/gateway.ready`` says every one of its processes listens (``--ready-file``:
    with ``--processes N`` the health service on the shared port answers from whichever process took the
    connection, so SERVING from one says nothing of the others) and its health is SERVING."""

    name = "the gateway"

    def __init__(self, state_dir: Path, settings: GatewaySettings, tls_ca: str | None = None) -> None:
        self.state_dir = state_dir
        self.settings = settings
        self.client = gateway_client(settings, tls_ca)
        self.process: subprocess.Popen[bytes] | None = None
        self._log_start = 0  # where this start's lines begin in gateway.log

    @property
    def target(self) -> str:
        return self.client["target"]

    @property
    def log_file(self) -> Path:
        return self.state_dir / "gateway.log"

    @property
    def ready_file(self) -> Path:
        return self.state_dir / GATEWAY_READY_FILE

    def listening(self) -> dict[str, Any] | None:
        """What the gateway's ready file says (its pid, its processes' pids, its addresses), None while
        not every process listens."""
        from cnnserve.gateway.processes import read_ready_file

        return read_ready_file(self.ready_file)

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CNNSERVE_GATEWAY_TOKEN": self.settings.token}
        self._log_start = file_size(self.log_file)
        self.ready_file.unlink(missing_ok=True)  # a killed gateway's: this start writes its own
        flags = gateway_flags(replace(self.settings, ready_file=str(self.ready_file.resolve())))
        with open(self.log_file, "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cnnserve.cli", "gateway", *flags],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        (self.state_dir / GATEWAY_PID_FILE).write_text(f"{self.process.pid}\n")

    def wait_serving(self, timeout: float = 60.0, stop: threading.Event | None = None) -> bool:
        """Block until every gateway process listens (its ready file) and the health is SERVING (True), or
        ``stop`` is set (False); UnavailableError when the gateway exits or time runs out."""
        deadline = time.monotonic() + timeout
        stop = stop or threading.Event()
        answer = ""
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise UnavailableError(
                    f"the gateway {describe_exit(self.process.returncode)} while starting; "
                    f"{self.where_logs()}{_lines('gateway.log', self.last_lines())}"
                )
            listening = self.listening()
            if listening is None or listening.get("pid") != (self.process and self.process.pid):
                status, why = None, "not every gateway process listens yet"
            else:
                status, why = _health(self.client, "", 2.0)
            if status == "SERVING":
                return True
            answer = status or why
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"the gateway at {self.target} was not SERVING after {timeout:.0f} s (the last answer: "
                    f"{answer}); {self.where_logs()}"
                )
            if stop.wait(0.2):
                return False

    def wait_ready(self, timeout: float, stop: threading.Event) -> bool:
        return self.wait_serving(timeout, stop)

    def where_logs(self) -> str:
        return f"log in {self.log_file}"

    def last_lines(self, lines: int = 5) -> str:
        """The last lines this start of the gateway logged."""
        return tail(self.log_file, lines, since=self._log_start)

    def log_tail(self, lines: int = 15) -> str:
        return tail(self.log_file, lines)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            stop_child(self.process, self.state_dir / GATEWAY_PID_FILE, timeout)
            self.process = None
            self.ready_file.unlink(missing_ok=True)  # one a killed gateway left


def served_models(settings: TorchServeSettings) -> tuple[str, ...]:
    """The models a TorchServe with ``settings`` loads: its ``models``, else every archive in its model store
    (by file name, sorted), as the store holds them now."""
    return settings.models or tuple(sorted(path.stem for path in settings.model_store.glob("*.mar")))


class TorchServeChild:
    """A :class:`~cnnserve.torchserve.TorchServe`, ready when each of ``models`` has a READY worker (none
    given: each model it loads, :func:`served_models`, read at every start)."""

    name = "TorchServe"

    def __init__(self, torchserve: TorchServe, models: Sequence[str] = ()) -> None:
        self.torchserve = torchserve
        self._models = tuple(models)

    @property
    def models(self) -> tuple[str, ...]:
        return self._models or served_models(self.torchserve.settings)

    @property
    def process(self) -> subprocess.Popen[bytes] | None:
        return self.torchserve.process

    def start(self) -> None:
        self.torchserve.start()

    def wait_ready(self, timeout: float, stop: threading.Event) -> bool:
        return self.torchserve.wait_ready(self.models, timeout, stop)

    def stop(self) -> None:
        self.torchserve.stop()

    def where_logs(self) -> str:
        return f"logs in {self.torchserve.logs_dir}"

    def last_lines(self) -> str:
        return self.torchserve.last_lines()


def _lines(name: str, text: str) -> str:
    return f"; the last lines of {name}:\n{text}" if text else ""


def _stop_all(children: Sequence[Supervised]) -> None:
    """Stop ``children``, the last first (the gateway before TorchServe: it drains its calls); a failure is
    logged and the rest are still stopped."""
    for child in reversed(children):
        try:
            child.stop()
        except Exception:
            log.exception("stopping %s failed", child.name)


# ---- the supervisor -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RestartPolicy:
    """How often a dead process is started again: at most ``max_restarts`` times in a row (0: never), after
    ``first_delay`` seconds, doubling up to ``max_delay``; a process that then runs ``reset_after`` seconds
    gets its whole budget back."""

    max_restarts: int = 5
    first_delay: float = 1.0
    max_delay: float = 30.0
    reset_after: float = 600.0

    def delay(self, restart: int) -> float:
        """Seconds to wait before restart number ``restart`` (1, 2, ...)."""
        return min(self.max_delay, self.first_delay * 2.0 ** (restart - 1))


class Supervisor:
    """Starts ``children`` in order (each once the one before is ready), then keeps them running.

    When one dies, it says how (exit code or signal) and where its logs are, stops what is left of its
    process group, and starts it again per the :class:`RestartPolicy`, waiting for it to be ready; the
    children after it (the gateway after TorchServe) keep running, and are waited for to be ready again.
    When the restarts are spent, everything is stopped and :meth:`run` raises UnavailableError saying so.
    Setting ``stop`` (a signal handler does) stops everything, the last child first.
    """

    def __init__(
        self,
        children: Sequence[Supervised],
        policy: RestartPolicy,
        ready_timeout: float,
        stop: threading.Event | None = None,
        poll_interval: float = 0.2,
    ) -> None:
        self.children = list(children)
        self.policy = policy
        self.ready_timeout = ready_timeout
        self.stopping = stop or threading.Event()
        self.poll_interval = poll_interval
        self.restarts = [0] * len(self.children)  # restarts in a row, per child
        self._ready_at = [0.0] * len(self.children)

    def start(self) -> bool:
        """Start every child; False when ``stop`` was set first (everything started is stopped again).
        A child that dies or is not ready in time stops everything and raises."""
        try:
            for index, child in enumerate(self.children):
                child.start()
                if not child.wait_ready(self.ready_timeout, self.stopping):
                    self.stop()
                    return False
                self._ready_at[index] = time.monotonic()
        except BaseException:
            self.stop()
            raise
        return True

    def run(self) -> None:
        """Watch until ``stop`` is set; always leaves everything stopped."""
        try:
            while not self.stopping.wait(self.poll_interval):
                for index, child in enumerate(self.children):
                    process = child.process
                    if process is not None and process.poll() is not None:
                        self._recover(index, process.returncode)
                        break
        finally:
            self.stop()

    def stop(self) -> None:
        _stop_all(self.children)

    def _recover(self, index: int, returncode: int) -> None:
        child = self.children[index]
        died = time.monotonic()
        death = f"{child.name} {describe_exit(returncode)}"
        log.error("%s; %s%s", death, child.where_logs(), _lines("its output", child.last_lines()))
        child.stop()  # what is left of its process group: workers, or a Java whose wrapper was killed
        if died - self._ready_at[index] >= self.policy.reset_after:
            self.restarts[index] = 0
        failure = ""
        while True:
            done = self.restarts[index]
            if done >= self.policy.max_restarts:
                if self.policy.max_restarts == 0:
                    reason = "restarts are off (--no-restart)"
                else:
                    reason = f"gave up after {done} restart{'s' if done != 1 else ''} in a row"
                    reason += f" (the last one: {failure})" if failure else ""
                raise UnavailableError(f"{death}; {reason}; {child.where_logs()}")
            self.restarts[index] = done + 1
            delay = self.policy.delay(done + 1)
            log.warning(
                "restarting %s in %.0f s (restart %d of %d)",
                child.name,
                delay,
                done + 1,
                self.policy.max_restarts,
            )
            if self.stopping.wait(delay):
                return
            try:
                child.start()
                if not child.wait_ready(self.ready_timeout, self.stopping):
                    return
                break
            except CnnserveError as error:
                child.stop()
                failure = error.message.split("\n", 1)[0]
                log.error("%s did not come back: %s", child.name, error.message)
        self._ready_at[index] = time.monotonic()
        log.info(
            "%s is back (restart %d of %d, %.1f s after it died)",
            child.name,
            self.restarts[index],
            self.policy.max_restarts,
            self._ready_at[index] - died,
        )
        for later in self.children[index + 1 :]:
            try:
                if later.wait_ready(self.ready_timeout, self.stopping):
                    log.info(
                        "%s is ready again (%.1f s after %s died)",
                        later.name,
                        time.monotonic() - died,
                        child.name,
                    )
            except UnavailableError as error:
                process = later.process
                if process is None or process.poll() is None:  # one that died is reported by run()
                    log.warning("%s is not ready again: %s", later.name, error.message)


# ---- the deployment -----------------------------------------------------------------------------------


class Deployment:
    """TorchServe with the ``torchserve`` settings and, unless ``gateway`` is None, ``cnnserve gateway`` in
    front of it: each a child process in its own process group.

    The gateway runs with the user's ``gateway`` settings wired to this TorchServe (:func:`wire_gateway`),
    keeps ``gateway.pid`` and ``gateway.log`` in ``state_dir``, and needs a fixed ``listen`` port: its
    clients, and a gateway started again after it died, dial the address its settings name. ``models`` are
    those a start waits for a READY worker of (default: :func:`served_models`). ``tls_ca`` is the CA bundle
    this process's own clients of the gateway trust (default: the gateway's certificate).
    ``gateway_processes``, when given, overrides the gateway settings' ``processes`` (0: auto).

    Building one checks what can be checked before anything starts (InvalidInputError for a port 0,
    FailedPreconditionError for a certificate no client here could verify). :meth:`start` starts it once;
    :meth:`supervisor` gives the :class:`Supervisor` that starts it and keeps it running.
    """

    def __init__(
        self,
        torchserve: TorchServeSettings,
        gateway: GatewaySettings | None,
        state_dir: Path,
        *,
        models: Sequence[str] = (),
        tls_ca: str | None = None,
        gateway_processes: int | None = None,
    ) -> None:
        self.state_dir = state_dir
        self.torchserve = TorchServe(torchserve)
        self._torchserve_child = TorchServeChild(self.torchserve, models)
        self.gateway: GatewayProcess | None = None
        if gateway is not None:
            if gateway_processes is not None:
                if gateway_processes < 0:
                    raise InvalidInputError.for_field("processes", "must be 1 or more, or 0 (auto)")
                gateway = replace(gateway, processes=gateway_processes)
            wired = wire_gateway(gateway, torchserve)
            if parse_address(wired.listen)[1] == 0:
                raise InvalidInputError.for_field(
                    "listen", "the gateway of a deployment needs a fixed port (--listen HOST:PORT)"
                )
            self.gateway = GatewayProcess(state_dir, wired, tls_ca)

    @property
    def children(self) -> list[Supervised]:
        """What runs, in the order it starts: TorchServe, then the gateway."""
        return [self._torchserve_child, *([self.gateway] if self.gateway is not None else [])]

    @property
    def models(self) -> tuple[str, ...]:
        """The models a start waits for."""
        return self._torchserve_child.models

    @property
    def gateway_client(self) -> GatewayClient | None:
        """How a client on this machine reaches the gateway (None: TorchServe only)."""
        return self.gateway.client if self.gateway is not None else None

    @property
    def gateway_target(self) -> str | None:
        return self.gateway.target if self.gateway is not None else None

    @property
    def grpc_target(self) -> str:
        """TorchServe's gRPC inference API, HOST:PORT."""
        return self.torchserve.settings.grpc_inference_target

    @property
    def http_url(self) -> str:
        """TorchServe's HTTP inference API."""
        settings = self.torchserve.settings
        return settings.url(settings.inference_port)

    def supervisor(
        self, policy: RestartPolicy, ready_timeout: float, stop: threading.Event | None = None
    ) -> Supervisor:
        """The supervisor that starts this deployment (:meth:`Supervisor.start`) and keeps it running
        (:meth:`Supervisor.run`), restarting what dies as ``policy`` says."""
        return Supervisor(self.children, policy, ready_timeout, stop)

    def start(self, ready_timeout: float = 300.0, stop: threading.Event | None = None) -> bool:
        """Start TorchServe and wait until each model has a READY worker, then the gateway and wait until it
        is SERVING (each within ``ready_timeout`` seconds): True. False when ``stop`` was set first. One that
        dies or is not ready in time stops everything and raises UnavailableError. Unsupervised: nothing
        starts again what dies later."""
        return self.supervisor(RestartPolicy(max_restarts=0), ready_timeout, stop).start()

    def pids(self) -> dict[str, int]:
        """``{"torchserve": pid, "gateway": pid}`` of the processes started (and not stopped); with
        ``--processes N`` > 1 the gateway's is its supervisor's (:meth:`gateway_pids`: its processes)."""
        started = {"torchserve": self._torchserve_child.process}
        if self.gateway is not None:
            started["gateway"] = self.gateway.process
        return {name: process.pid for name, process in started.items() if process is not None}

    def gateway_pids(self) -> list[int]:
        """The gateway processes that serve (one, or a supervisor's N), as its ready file says; [] while
        not every one listens."""
        listening = self.gateway.listening() if self.gateway is not None else None
        return [int(pid) for pid in listening["pids"]] if listening else []

    def stop(self) -> None:
        """Stop the gateway (it drains its calls), then TorchServe; what does not run is skipped."""
        _stop_all(self.children)

    def __enter__(self) -> Deployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
