"""Child processes cnnserve starts in their own process group (TorchServe, the gateway, the supervisor)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

__all__ = [
    "stop_process_group",
    "stop_child",
    "read_pid",
    "alive",
    "wait_gone",
    "describe_exit",
    "tail",
    "file_size",
    "free_ports",
]


def stop_process_group(pid: int, timeout: float = 30.0) -> bool:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``timeout``; False when it was not there."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        if not _group_running(pid):
            return True
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    return True


def _group_running(pgid: int) -> bool:
    """Whether process group ``pgid`` has a member that is not a zombie (one that exited but that its parent
    has not reaped yet; killpg(pgid, 0) still finds those)."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    proc = Path("/proc")
    if not proc.is_dir():
        return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # "pid (comm) state ppid pgrp ...": comm may hold spaces and ")", so split after the last ")".
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_child(process: subprocess.Popen[bytes], pid_file: Path, timeout: float = 30.0) -> None:
    """Stop a child started with ``start_new_session=True`` (and whatever is left of its process group, also
    once the child itself has died), reap it, and remove its pid file."""
    stop_process_group(process.pid, timeout)
    process.wait()
    pid_file.unlink(missing_ok=True)


def read_pid(pid_file: Path) -> int | None:
    """The process id a pid file holds (None when the file is missing or holds no number)."""
    try:
        return int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None


def alive(pid: int | None) -> bool:
    """Whether a process ``pid`` exists (a zombie counts until its parent reaps it)."""
    if pid is None or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, under another user
    return True


def wait_gone(pid: int, timeout: float) -> bool:
    """Wait until process ``pid`` (not necessarily our child) is gone; False when it outlived ``timeout``."""
    deadline = time.monotonic() + timeout
    while alive(pid):
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def describe_exit(returncode: int | None) -> str:
    """How a process ended, from its ``Popen.returncode``: "exited with code 1", "was killed by signal 9
    (SIGKILL)"."""
    if returncode is None:
        return "is still running"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            return f"was killed by signal {-returncode}"
        return f"was killed by signal {-returncode} ({name})"
    return f"exited with code {returncode}"


_TAIL_BYTES = 64 * 1024  # read this much of the end of a log, however large it has grown


def tail(path: Path, lines: int = 20, since: int = 0) -> str:
    """The last ``lines`` whole lines of a log file written after byte ``since`` ('' when there are none)."""
    try:
        with open(path, "rb") as stream:
            size = stream.seek(0, os.SEEK_END)
            start = max(since, size - _TAIL_BYTES)
            stream.seek(start)
            text = stream.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
    found = text.splitlines(keepends=True)
    if start > since:
        found = found[1:]  # the first line read is cut: never show half a line
    return "".join(found[-lines:]).strip()


def file_size(path: Path) -> int:
    """Bytes in ``path`` now (0 when it does not exist): where this run's lines of a log will start."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


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
