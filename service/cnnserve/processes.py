"""Child processes cnnserve starts in their own process group (TorchServe, the gateway)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = ["stop_process_group", "stop_child", "read_pid", "tail", "free_ports"]


def stop_process_group(pid: int, timeout: float = 30.0) -> bool:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``timeout``; False when it was not there."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return True
        with contextlib.suppress(ChildProcessError):  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        time.sleep(0.1)
    os.killpg(pid, signal.SIGKILL)
    return True


def stop_child(process: subprocess.Popen[bytes], pid_file: Path, timeout: float = 30.0) -> None:
    """Stop a child started with ``start_new_session=True``, reap it, and remove its pid file."""
    stop_process_group(process.pid, timeout)
    process.wait()
    pid_file.unlink(missing_ok=True)


def read_pid(pid_file: Path) -> int | None:
    """The process id a pid file holds (None when the file is missing or holds no number)."""
    try:
        return int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    if not path.exists():
        return ""
    return "".join(path.read_text(errors="replace").splitlines(keepends=True)[-lines:]).strip()


def free_ports(count: int) -> list[int]:
    """Loopback ports nothing listens on right now (bound together, then released by the OS)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
