"""The gateway as a child process of ``cnnserve serve``: wire it to a TorchServe, start it, wait for SERVING,
stop it gracefully."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cnnserve.errors import UnavailableError
from cnnserve.processes import stop_child, tail

if TYPE_CHECKING:
    from cnnserve.torchserve import TorchServeSettings

__all__ = ["GatewayProcess", "GATEWAY_PID_FILE", "health_status", "torchserve_wiring"]

GATEWAY_PID_FILE = "gateway.pid"


def torchserve_wiring(settings: TorchServeSettings) -> dict[str, str]:
    """The :class:`~cnnserve.gateway.settings.GatewaySettings` fields that point a gateway at the TorchServe
    ``settings`` describe: its gRPC APIs, and its key file when token authorization is on."""
    return {
        "torchserve": settings.grpc_inference_target,
        "torchserve_management": settings.grpc_management_target,
        "torchserve_key_file": str(settings.key_file.resolve()) if settings.token_auth else "",
    }


def health_status(target: str, service: str = "", timeout: float = 2.0) -> str | None:
    """The gRPC health status name at ``target`` (None when nothing answers)."""
    from cnnserve.client import ClassifierClient
    from cnnserve.errors import CnnserveError

    with ClassifierClient(target, timeout=timeout) as client:
        try:
            return client.health(service)
        except CnnserveError:
            return None


class GatewayProcess:
    """``cnnserve gateway`` in its own process group, logging to ``<state_dir>/gateway.log``."""

    def __init__(self, state_dir: Path, arguments: Sequence[str], target: str) -> None:
        self.state_dir = state_dir
        self.arguments = list(arguments)
        self.target = target
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def log_file(self) -> Path:
        return self.state_dir / "gateway.log"

    def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "cnnserve.cli", "gateway", *self.arguments],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (self.state_dir / GATEWAY_PID_FILE).write_text(f"{self.process.pid}\n")

    def wait_serving(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise UnavailableError(
                    f"the gateway exited with {self.process.returncode}: {self.log_tail()}"
                )
            if health_status(self.target) == "SERVING":
                return
            time.sleep(0.2)
        raise UnavailableError(f"the gateway at {self.target} was not SERVING after {timeout:.0f} s")

    def log_tail(self, lines: int = 15) -> str:
        return tail(self.log_file, lines)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            stop_child(self.process, self.state_dir / GATEWAY_PID_FILE, timeout)
            self.process = None
