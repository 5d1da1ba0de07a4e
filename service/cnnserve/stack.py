"""The stack ``cnnserve serve`` runs: TorchServe and the gateway as child processes, the one way every client
inside the project reaches the gateway, and the supervisor that restarts either process when it dies.

- :func:`gateway_client`: ``ClassifierClient`` arguments for a client on this machine, from the gateway's
  :class:`~cnnserve.gateway.settings.GatewaySettings`: its port on loopback, its token, and with TLS the CA
  to trust (``--tls-ca``, else the gateway's own certificate, which is its own CA when self-signed) and the
  host name to dial (one the certificate names: the address itself, else ``localhost``/``127.0.0.1``).
  ``serve``'s readiness checks, the container probe and the benchmark's clients all use it.
- :class:`GatewayProcess`: ``cnnserve gateway`` in its own process group.
- :class:`Supervisor`: starts the processes in order, then watches them; one that dies is described (exit
  code or signal, and where its logs are), the rest of its process group is stopped, and it is started
  again after a back-off, a bounded number of times (:class:`RestartPolicy`). The others keep running.
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
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypedDict

from cnnserve.errors import CnnserveError, FailedPreconditionError, UnavailableError
from cnnserve.gateway.settings import GatewaySettings, parse_address
from cnnserve.processes import describe_exit, file_size, stop_child, tail

if TYPE_CHECKING:
    from cnnserve.torchserve import TorchServe, TorchServeSettings

__all__ = [
    "GATEWAY_PID_FILE",
    "SERVE_PID_FILE",
    "SERVE_LOG",
    "GatewayClient",
    "gateway_client",
    "certificate_names",
    "torchserve_wiring",
    "gateway_flags",
    "GatewayProcess",
    "TorchServeChild",
    "Supervised",
    "RestartPolicy",
    "Supervisor",
]

GATEWAY_PID_FILE = "gateway.pid"
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


# ---- the gateway process -------------------------------------------------------------------------------


def torchserve_wiring(settings: TorchServeSettings) -> dict[str, str]:
    """The :class:`~cnnserve.gateway.settings.GatewaySettings` fields that point a gateway at the TorchServe
    ``settings`` describe: its gRPC APIs, and its key file when token authorization is on."""
    return {
        "torchserve": settings.grpc_inference_target,
        "torchserve_management": settings.grpc_management_target,
        "torchserve_key_file": str(settings.key_file.resolve()) if settings.token_auth else "",
    }


def gateway_flags(settings: GatewaySettings) -> list[str]:
    """``cnnserve gateway`` flags for ``settings``, but the token: it travels in the environment
    (``CNNSERVE_GATEWAY_TOKEN``), where ``ps`` does not show it."""
    flags = []
    for field in fields(GatewaySettings):
        if field.name != "token":
            flags += ["--" + field.name.replace("_", "-"), str(getattr(settings, field.name))]
    return flags


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
    """``cnnserve gateway`` in its own process group, logging to ``<state_dir>/gateway.log``."""

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

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "CNNSERVE_GATEWAY_TOKEN": self.settings.token}
        self._log_start = file_size(self.log_file)
        with open(self.log_file, "ab") as output:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cnnserve.cli", "gateway", *gateway_flags(self.settings)],
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        (self.state_dir / GATEWAY_PID_FILE).write_text(f"{self.process.pid}\n")

    def wait_serving(self, timeout: float = 60.0, stop: threading.Event | None = None) -> bool:
        """Block until the gateway's health is SERVING (True), or ``stop`` is set (False); UnavailableError
        when the gateway exits or time runs out."""
        deadline = time.monotonic() + timeout
        stop = stop or threading.Event()
        answer = ""
        while True:
            if self.process is not None and self.process.poll() is not None:
                raise UnavailableError(
                    f"the gateway {describe_exit(self.process.returncode)} while starting; "
                    f"{self.where_logs()}{_lines('gateway.log', self.last_lines())}"
                )
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


class TorchServeChild:
    """A :class:`~cnnserve.torchserve.TorchServe`, ready when each of ``models`` has a READY worker."""

    name = "TorchServe"

    def __init__(self, torchserve: TorchServe, models: Sequence[str]) -> None:
        self.torchserve = torchserve
        self.models = tuple(models)

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
        for child in reversed(self.children):  # the gateway first: it drains its calls
            try:
                child.stop()
            except Exception:
                log.exception("stopping %s failed", child.name)

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
