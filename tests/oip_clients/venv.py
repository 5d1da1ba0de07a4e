"""``.venv-tritonclient``: the virtual environment the tritonclient scripts run in, created on demand.

tritonclient 2.73 needs protobuf < 7 and cnnserve pins protobuf 7, and two generated ``inference`` modules in
one process collide in protobuf's descriptor pool: so the clients get a venv of their own and run in a
subprocess. ``make test`` builds it first (``python -m tests.oip_clients.venv``); the tests' session fixture
builds it when it is missing or older than ``requirements.txt``. A stamp file holds the requirements it was
built from, so a changed pin rebuilds it. Creation takes a lock: two pytest processes never build it at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["VENV", "REQUIREMENTS", "VenvError", "venv_python", "is_current", "ensure_venv"]

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv-tritonclient"
REQUIREMENTS = Path(__file__).resolve().with_name("requirements.txt")
_STAMP = VENV / ".installed"
_LOCK = ROOT / ".venv-tritonclient.lock"
# What must import in the venv: both transports and the numpy helpers the scripts use.
_IMPORT_CHECK = "import tritonclient.grpc, tritonclient.http, tritonclient.utils, numpy, PIL"
_PIP_TIMEOUT_S = 900


class VenvError(RuntimeError):
    """The venv could not be built (no network to PyPI, a failed install); the message says which step."""


def venv_python() -> Path:
    return VENV / "bin" / "python"


def is_current() -> bool:
    """Built, and from the requirements as they are now."""
    return venv_python().exists() and _STAMP.exists() and _STAMP.read_text() == REQUIREMENTS.read_text()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with open(_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _run(step: str, command: list[str]) -> None:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        raise VenvError(f"{step}: no result after {_PIP_TIMEOUT_S} s ({' '.join(command)})") from exc
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise VenvError(f"{step} failed (exit {done.returncode}): {' '.join(command)}\n{tail}")


def ensure_venv() -> Path:
    """The venv's python, building the venv first when it is missing or stale. Raises :class:`VenvError`."""
    with _locked():
        if is_current():
            return venv_python()
        _STAMP.unlink(missing_ok=True)
        # The base interpreter of the running one (cnnserve's Python 3.11), not the .venv it runs in.
        base = getattr(sys, "_base_executable", sys.executable)
        _run("creating .venv-tritonclient", [base, "-m", "venv", "--clear", str(VENV)])
        pip = [str(venv_python()), "-m", "pip", "--disable-pip-version-check"]
        _run("installing tests/oip_clients/requirements.txt", [*pip, "install", "-r", str(REQUIREMENTS)])
        _run("importing tritonclient in .venv-tritonclient", [str(venv_python()), "-c", _IMPORT_CHECK])
        _STAMP.write_text(REQUIREMENTS.read_text())
        return venv_python()


def main() -> int:
    try:
        python = ensure_venv()
    except VenvError as exc:
        print(f"tests/oip_clients/venv.py: {exc}", file=sys.stderr)
        return 1
    print(f"tritonclient venv ready: {python}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
