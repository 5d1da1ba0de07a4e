"""The KServe peer's own virtual environment: ``<work_dir>/venv-kserve``, built once, reused while its stamp
matches.

KServe 0.21 needs ``protobuf < 7`` (the project runs 7.x), so it never joins the project's dependencies: the
benchmark builds a venv of its own with ``kserve``, the project's ``onnxruntime`` version (the same kernels as
our workers) and numpy. The stamp file records what was installed; a venv whose stamp differs (another
onnxruntime, another Python) is rebuilt from scratch. A venv that cannot be built (no network, no wheel for
this Python) raises :class:`PeerUnavailableError` with pip's last lines: the harness records the peer's rows
as skipped with that reason instead of failing the run.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

__all__ = [
    "KSERVE_REQUIREMENT",
    "VENV_DIR",
    "STAMP_FILE",
    "PeerUnavailableError",
    "requirements",
    "venv_python",
    "build_commands",
    "ensure_venv",
]

KSERVE_REQUIREMENT = "kserve==0.21.*"
VENV_DIR = "venv-kserve"
STAMP_FILE = "cnnserve-kserve-stamp.json"
BUILD_TIMEOUT_S = 1200.0  # pip resolves and downloads ~60 packages: minutes on a slow link
Log = Callable[[str], None]
Runner = Callable[..., subprocess.CompletedProcess[str]]


class PeerUnavailableError(RuntimeError):
    """The peer cannot run here; ``reason`` is what the report says instead of its rows."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def requirements(onnxruntime_version: str | None = None) -> tuple[str, ...]:
    """What the venv gets: KServe, the project's onnxruntime (same version: same kernels), numpy."""
    version = onnxruntime_version or metadata.version("onnxruntime")
    return (KSERVE_REQUIREMENT, f"onnxruntime=={version}", "numpy")


def venv_python(venv_dir: Path) -> Path:
    return venv_dir / "bin" / "python"


def build_commands(venv_dir: Path, wanted: Sequence[str], python: str = sys.executable) -> list[list[str]]:
    """The two commands that build the venv: a fresh ``python -m venv``, then one ``pip install``."""
    return [
        [python, "-m", "venv", "--clear", str(venv_dir)],
        [
            str(venv_python(venv_dir)),
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "--no-input",
            "--quiet",
            *wanted,
        ],
    ]


def _stamp(wanted: Sequence[str]) -> dict[str, object]:
    return {"requirements": list(wanted), "python": platform.python_version()}


def _read_stamp(venv_dir: Path) -> object:
    try:
        return json.loads((venv_dir / STAMP_FILE).read_text())
    except (OSError, ValueError):
        return None


def _last_lines(text: str, count: int = 6) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:]) or "no output"


def ensure_venv(
    work_dir: Path,
    log: Log,
    *,
    onnxruntime_version: str | None = None,
    run: Runner = subprocess.run,
    timeout: float = BUILD_TIMEOUT_S,
) -> Path:
    """The venv's python, building ``work_dir/venv-kserve`` first unless its stamp says it is current.

    Raises :class:`PeerUnavailableError` when a build command fails or times out (a half-built venv is
    removed, so the next run tries again).
    """
    venv_dir = work_dir / VENV_DIR
    wanted = requirements(onnxruntime_version)
    stamp = _stamp(wanted)
    python = venv_python(venv_dir)
    if python.exists() and _read_stamp(venv_dir) == stamp:
        return python
    log(f"building the KServe peer's venv in {venv_dir} ({' '.join(wanted)}; minutes, once) ...")
    work_dir.mkdir(parents=True, exist_ok=True)
    for command in build_commands(venv_dir, wanted):
        try:
            done = run(command, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            shutil.rmtree(venv_dir, ignore_errors=True)
            raise PeerUnavailableError(f"`{' '.join(command[:4])} ...` took over {timeout:.0f} s") from None
        except OSError as error:
            shutil.rmtree(venv_dir, ignore_errors=True)
            raise PeerUnavailableError(f"could not run {command[0]}: {error}") from None
        if done.returncode != 0:
            shutil.rmtree(venv_dir, ignore_errors=True)
            raise PeerUnavailableError(
                f"`{' '.join(command[:4])} ...` exited {done.returncode}: "
                f"{_last_lines(done.stderr or done.stdout)}"
            )
    (venv_dir / STAMP_FILE).write_text(json.dumps(stamp) + "\n")
    return python
