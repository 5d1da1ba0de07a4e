"""Run TorchServe 0.12 for cnnserve: its configuration, its process, and knowing when it is ready.

:class:`TorchServe` writes ``config.properties`` and a quiet ``log4j2.xml`` into a state directory, starts
``torchserve --foreground`` there in its own process group, waits until every model has a READY worker
(``/ping`` answers long before that), and stops it with SIGTERM. Each instance gets its own temporary
directory, so several can run side by side (TorchServe otherwise keeps one global pid file in /tmp).

``torchserve --foreground`` is a Python wrapper that waits for its Java frontend and then returns normally,
whatever happened to Java. We run that wrapper through :func:`main` (``python -m cnnserve.torchserve``),
which exits the way Java did, so that a supervisor can say "killed by signal 9 (SIGKILL)".

Security defaults: every listener on 127.0.0.1, token authorization on (keys in
``<state_dir>/key_file.json``), the model-management API (register/unregister) off, model archives loadable
only from the local model store.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cnnserve.errors import FailedPreconditionError, UnavailableError
from cnnserve.processes import describe_exit, file_size, free_ports, stop_child, tail

__all__ = [
    "TorchServeSettings",
    "TorchServeKeys",
    "TorchServe",
    "render_config",
    "read_keys",
    "read_key_file",
    "java_version",
    "PID_FILE",
]

KEY_FILE = "key_file.json"
PID_FILE = "torchserve.pid"
# Tokens never expire on their own: the gateway holds the inference key for as long as TorchServe runs.
TOKEN_EXPIRATION_MIN = 60 * 24 * 365

_LOG4J2 = """<?xml version="1.0" encoding="UTF-8"?>
<!-- cnnserve: INFO logging (TorchServe's default DEBUG cost 20-35% throughput); per-request metrics off. -->
<Configuration>
  <Appenders>
    <Console name="STDOUT" target="SYSTEM_OUT">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
    </Console>
    <RollingFile name="ts_log" fileName="${env:LOG_LOCATION:-logs}/ts_log.log"
                 filePattern="${env:LOG_LOCATION:-logs}/ts_log.%i.log.gz">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
      <Policies><SizeBasedTriggeringPolicy size="50 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
    <RollingFile name="model_log" fileName="${env:LOG_LOCATION:-logs}/model_log.log"
                 filePattern="${env:LOG_LOCATION:-logs}/model_log.%i.log.gz">
      <PatternLayout pattern="%d{ISO8601} [%-5p] %t %c - %m%n"/>
      <Policies><SizeBasedTriggeringPolicy size="50 MB"/></Policies>
      <DefaultRolloverStrategy max="3"/>
    </RollingFile>
  </Appenders>
  <Loggers>
    <Logger name="ACCESS_LOG" level="off"/>
    <Logger name="io.netty" level="error"/>
    <Logger name="org.apache" level="off"/>
    <Logger name="MODEL_LOG" level="info" additivity="false"><AppenderRef ref="model_log"/></Logger>
    <Logger name="MODEL_METRICS" level="off"/>
    <Logger name="TS_METRICS" level="off"/>
    <Logger name="org.pytorch.serve" level="info" additivity="false"><AppenderRef ref="ts_log"/></Logger>
    <Logger name="org.pytorch.serve.wlm" level="warn" additivity="false"><AppenderRef ref="ts_log"/></Logger>
    <Root level="warn"><AppenderRef ref="STDOUT"/><AppenderRef ref="ts_log"/></Root>
  </Loggers>
</Configuration>
"""


@dataclass(frozen=True)
class TorchServeSettings:
    model_store: Path
    state_dir: Path  # config.properties, key_file.json, logs/, tmp/
    revisions_dir: Path  # the fine-tune revision store, shared by every worker
    models: tuple[str, ...] = ()  # archive names to load; empty: every .mar in the store
    host: str = "127.0.0.1"
    inference_port: int = 8080
    management_port: int = 8081
    metrics_port: int = 8082
    grpc_inference_port: int = 7070
    grpc_management_port: int = 7071
    token_auth: bool = True
    max_request_bytes: int = 64 * 2**20  # a batch of 32 AlexNet tensors is 19 MiB; TorchServe's default 6.5
    job_queue_size: int = 1000
    java_heap: str = "1g"
    # GPUs TorchServe hands out to workers (round-robin gpu_id). None: TorchServe's own detection (nvidia-smi;
    # 0 without it); 0: every worker on CPU whatever the archives ask (`--device cpu`).
    number_of_gpu: int | None = None

    def url(self, port: int) -> str:
        return f"http://{self.host}:{port}"

    @property
    def grpc_inference_target(self) -> str:
        return f"{self.host}:{self.grpc_inference_port}"

    @property
    def grpc_management_target(self) -> str:
        return f"{self.host}:{self.grpc_management_port}"

    @property
    def key_file(self) -> Path:
        """Where TorchServe writes its token-authorization keys (at every start)."""
        return self.state_dir / KEY_FILE

    @classmethod
    def with_ports(
        cls,
        model_store: Path,
        state_dir: Path,
        revisions_dir: Path,
        ports: Sequence[int] | None = None,
        **overrides: Any,
    ) -> TorchServeSettings:
        """Settings whose five listeners (HTTP inference, management, metrics; gRPC inference, management)
        take ``ports``, or free loopback ports: tests, benchmarks, instances side by side."""
        names = (
            "inference_port",
            "management_port",
            "metrics_port",
            "grpc_inference_port",
            "grpc_management_port",
        )
        chosen = dict(zip(names, ports if ports is not None else free_ports(len(names)), strict=True))
        return cls(model_store, state_dir, revisions_dir, **{**chosen, **overrides})


@dataclass(frozen=True)
class TorchServeKeys:
    inference: str | None
    management: str | None

    def key(self, api: str) -> str | None:
        """The key for ``api``: "inference" or "management"."""
        return self.inference if api == "inference" else self.management

    def header(self, api: str) -> dict[str, str]:
        key = self.key(api)
        return {"Authorization": f"Bearer {key}"} if key else {}


def render_config(settings: TorchServeSettings) -> str:
    """``config.properties`` for ``settings``."""
    store = settings.model_store.resolve()
    lines = {
        "inference_address": settings.url(settings.inference_port),
        "management_address": settings.url(settings.management_port),
        "metrics_address": settings.url(settings.metrics_port),
        "grpc_inference_address": settings.host,
        "grpc_inference_port": settings.grpc_inference_port,
        "grpc_management_address": settings.host,
        "grpc_management_port": settings.grpc_management_port,
        "model_store": store,
        # "all": every archive in the store, under the name its manifest gives (`cnnserve archive --name`).
        "load_models": ",".join(f"{name}={name}.mar" for name in settings.models) or "all",
        # Only archives already in the local store may ever be registered.
        "allowed_urls": f"file://{store}/.*\\.mar",
        "enable_model_api": "false",
        "disable_token_authorization": "false" if settings.token_auth else "true",
        "token_expiration_min": TOKEN_EXPIRATION_MIN,
        "metrics_mode": "prometheus",
        "max_request_size": settings.max_request_bytes,
        "max_response_size": settings.max_request_bytes,
        "job_queue_size": settings.job_queue_size,
        "install_py_dep_per_model": "false",
        "enable_envvars_config": "false",
        "vmargs": f"-Xmx{settings.java_heap} -XX:+ExitOnOutOfMemoryError",
    }
    if settings.number_of_gpu is not None:
        lines["number_of_gpu"] = settings.number_of_gpu
    return "".join(f"{key}={value}\n" for key, value in lines.items())


def read_keys(state_dir: Path) -> TorchServeKeys:
    """The token-authorization keys TorchServe wrote into its working directory."""
    return read_key_file(state_dir / KEY_FILE)


def read_key_file(path: Path) -> TorchServeKeys:
    """TorchServe's ``key_file.json`` (absent: no keys, token authorization is off)."""
    if not path.exists():
        return TorchServeKeys(None, None)
    data = json.loads(path.read_text())
    return TorchServeKeys(data["inference"]["key"], data["management"]["key"])


def java_version() -> str | None:
    """``java -version``'s first line, or None when there is no java."""
    java = shutil.which("java")
    if java is None:
        return None
    result = subprocess.run([java, "-version"], capture_output=True, text=True, check=False)
    return (result.stderr or result.stdout).splitlines()[0] if result.returncode == 0 else None


def _torchserve_command(required: bool = True) -> str:
    candidate = Path(sys.executable).parent / "torchserve"
    found = str(candidate) if candidate.exists() else shutil.which("torchserve")
    if found is None:
        if required:
            raise FailedPreconditionError("torchserve is not installed: run `make setup`")
        return "torchserve"  # a command line to print, for a machine (or container) that has it
    return found


class TorchServe:
    """One TorchServe process tree, started and stopped by us."""

    def __init__(self, settings: TorchServeSettings) -> None:
        self.settings = settings
        self.process: subprocess.Popen[bytes] | None = None
        self.output_start = 0  # where this start's lines begin in torchserve.out

    @property
    def state_dir(self) -> Path:
        return self.settings.state_dir

    @property
    def logs_dir(self) -> Path:
        """``torchserve.out`` (the process's own output), ``ts_log.log`` (frontend), ``model_log.log``."""
        return self.state_dir / "logs"

    def keys(self) -> TorchServeKeys:
        return read_keys(self.state_dir) if self.settings.token_auth else TorchServeKeys(None, None)

    def start(self) -> None:
        if java_version() is None:
            raise FailedPreconditionError(
                "TorchServe needs Java 17+: install it with `sudo apt-get install openjdk-17-jre-headless`"
            )
        state = self.state_dir.resolve()
        config, log_config = self.write_config()
        (state / KEY_FILE).unlink(missing_ok=True)
        env = {
            **os.environ,
            "TMPDIR": str(state / "tmp"),  # TorchServe's pid file lives in TMPDIR: one per instance
            "TEMP": str(state / "tmp"),  # the JVM's java.io.tmpdir (model archives are extracted there)
            "LOG_LOCATION": str(state / "logs"),
            "METRICS_LOCATION": str(state / "logs"),
            "CNNSERVE_REVISIONS_DIR": str(self.settings.revisions_dir.resolve()),
        }
        command = self.command(config, log_config)
        if importlib.util.find_spec("ts") is not None:
            # TorchServe's wrapper, run by :func:`main` so that its exit status is Java's.
            command = [sys.executable, "-m", "cnnserve.torchserve", *command[1:]]
        self.output_start = file_size(state / "logs" / "torchserve.out")
        with open(state / "logs" / "torchserve.out", "ab") as output:
            self.process = subprocess.Popen(
                command, cwd=state, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        (state / PID_FILE).write_text(f"{self.process.pid}\n")

    def write_config(self) -> tuple[Path, Path]:
        """Write ``config.properties`` and ``log4j2.xml`` into the state directory; return their paths."""
        state = self.state_dir.resolve()
        (state / "tmp").mkdir(parents=True, exist_ok=True)
        (state / "logs").mkdir(exist_ok=True)
        self.settings.revisions_dir.mkdir(parents=True, exist_ok=True)
        config, log_config = state / "config.properties", state / "log4j2.xml"
        config.write_text(render_config(self.settings))
        log_config.write_text(_LOG4J2)
        return config, log_config

    @staticmethod
    def command(config: Path, log_config: Path, required: bool = True) -> list[str]:
        """The torchserve command line for a written configuration (``required``: torchserve is here)."""
        return [
            _torchserve_command(required),
            "--start",
            "--foreground",
            "--ncs",
            "--ts-config", str(config),
            "--log-config", str(log_config),
        ]  # fmt: skip

    def _get(self, url: str, api: str, timeout: float = 5.0) -> Any:
        request = urllib.request.Request(url, headers=self.keys().header(api))
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())

    def model_status(self, name: str) -> list[str]:
        """Worker statuses of ``name`` (READY, UNLOADING, ...), from the management API."""
        described = self._get(
            f"{self.settings.url(self.settings.management_port)}/models/{name}", "management"
        )
        return [worker["status"] for entry in described for worker in entry.get("workers", [])]

    def wait_ready(
        self, models: tuple[str, ...], timeout: float = 180.0, stop: threading.Event | None = None
    ) -> bool:
        """Block until each model has a READY worker (True), or ``stop`` is set (False); UnavailableError if
        TorchServe dies or time runs out."""
        deadline = time.monotonic() + timeout
        stop = stop or threading.Event()
        pending = list(models)
        while pending:
            if self.process is not None and self.process.poll() is not None:
                raise UnavailableError(
                    f"TorchServe {describe_exit(self.process.returncode)} while starting; "
                    f"logs in {self.logs_dir}{self._last_lines()}"
                )
            try:
                if "READY" in self.model_status(pending[0]):
                    pending.pop(0)
                    continue
            except (urllib.error.URLError, OSError, json.JSONDecodeError, KeyError):
                pass  # not listening yet, or the key file is not written yet
            if time.monotonic() > deadline:
                raise UnavailableError(
                    f"TorchServe: no READY worker for {pending[0]} in {timeout:.0f} s; "
                    f"logs in {self.logs_dir}"
                )
            if stop.wait(0.25):
                return False
        return True

    def last_lines(self, lines: int = 5) -> str:
        """The last lines this start of TorchServe wrote to ``torchserve.out`` (where Java reports)."""
        return tail(self.logs_dir / "torchserve.out", lines, since=self.output_start)

    def _last_lines(self) -> str:
        last = self.last_lines()
        return f"; the last lines of torchserve.out:\n{last}" if last else ""

    def log_tail(self, lines: int = 20) -> str:
        """The last whole lines of each of TorchServe's logs, each under its file name."""
        parts = []
        for name in ("torchserve.out", "ts_log.log", "model_log.log"):
            text = tail(self.logs_dir / name, lines)
            if text:
                parts.append(f"==> {self.logs_dir / name} <==\n{text}")
        return "\n".join(parts)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            stop_child(self.process, self.state_dir / PID_FILE, timeout)
            self.process = None


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m cnnserve.torchserve ARGS``: TorchServe's ``torchserve ARGS``, exiting as Java did.

    TorchServe 0.12's wrapper (``ts.model_server.start``) starts the Java frontend with ``subprocess.Popen``
    and, with ``--foreground``, waits for it and returns normally: its exit status says nothing. We note the
    Popen it makes, and after it returns exit with Java's code, or die of Java's signal.
    """
    from ts import model_server

    started: list[subprocess.Popen[bytes]] = []

    class _Noted(subprocess.Popen[bytes]):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            started.append(self)

    subprocess.Popen = _Noted  # type: ignore[misc,assignment]  # this process runs nothing else
    sys.argv = ["torchserve", *(sys.argv[1:] if argv is None else argv)]
    model_server.start()
    if not started:
        sys.exit(1)  # the wrapper did not start Java (it printed why)
    code = started[-1].wait()
    if code < 0:
        with contextlib.suppress(OSError, ValueError):  # SIGKILL's handler cannot be set, nor needs to be
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
        sys.exit(128 - code)  # a signal this process survived (ignored): the shell's convention
    sys.exit(code)


if __name__ == "__main__":
    main()
