"""Intra-op threads per worker: the CPU quota shared out among the workers on the machine.

The rule (``docs/precision.md``, "Threads"), applied when neither ``CNNSERVE_WORKER_THREADS`` nor
``handler.threads`` in the archive's ``model-config.yaml`` sets the count:

    cores   = CPUs this process may run on (``sched_getaffinity``), capped by the cgroup CPU quota
              (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us / cpu.cfs_period_us``, the tightest along the
              process's cgroup path), rounded down, at least 1
    threads = max(1, cores // workers), then at most the model's ``max_threads`` when it has one

``workers`` is ``CNNSERVE_WORKERS_ON_MACHINE`` when set (the workers of every model on this machine: what
an operator running several models should give), else the model's own ``maxWorkers``. ``max_threads`` is
per model (``handler.max_threads``, written by ``cnnserve archive``): LeNet is overhead-bound, a second
thread per worker only adds contention, so its archives say 1; AlexNet is compute-bound and has no cap, so
one AlexNet worker uses every core of its quota.

Python 3.9-compatible: bundled into archives with the rest of ``serving/``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["CGROUP_ROOT", "cpu_quota_cores", "available_cores", "default_threads"]

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _ancestors(base: Path, relative: str) -> list[Path]:
    """``base/relative`` and each directory above it up to ``base`` (a limit anywhere above binds too)."""
    parts = [p for p in relative.strip("/").split("/") if p]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_quota(directory: Path) -> float | None:
    text = _read(directory / "cpu.max")  # "max 100000" or "<quota> <period>" in microseconds
    if not text:
        return None
    quota, _, period = text.partition(" ")
    if quota == "max":
        return None
    try:
        return int(quota) / int(period or "100000")
    except ValueError:
        return None


def _v1_quota(directory: Path) -> float | None:
    quota, period = _read(directory / "cpu.cfs_quota_us"), _read(directory / "cpu.cfs_period_us")
    try:
        if quota is None or period is None or int(quota) <= 0:  # -1: no limit
            return None
        return int(quota) / int(period)
    except ValueError:
        return None


def cpu_quota_cores(root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The tightest CPU quota on this process's cgroups, in cores (``1.5``), or None without a quota.

    ``proc_self_cgroup`` lines are ``0::/path`` (v2) or ``N:cpu,cpuacct:/path`` (v1). Inside a container
    the path may name the host's hierarchy, which is not mounted: the mount's root is checked as well.
    """
    quotas: list[float] = []
    for line in (_read(proc_self_cgroup) or "").splitlines():
        _, _, rest = line.partition(":")
        controllers, _, relative = rest.partition(":")
        if controllers == "":  # cgroup v2
            candidates = [(d, _v2_quota) for d in _ancestors(root, relative)]
        elif "cpu" in controllers.split(","):
            candidates = [
                (d, _v1_quota)
                for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct")
                for d in _ancestors(mount, relative)
            ]
        else:
            continue
        for directory, read in candidates:
            quota = read(directory)
            if quota is not None and quota > 0:
                quotas.append(quota)
    if not quotas:  # no /proc/self/cgroup (not Linux) or no limit along the path: the root's, if any
        for quota in (_v2_quota(root), _v1_quota(root / "cpu")):
            if quota is not None and quota > 0:
                quotas.append(quota)
    return min(quotas) if quotas else None


def available_cores(
    quota_cores: float | None = None, affinity: int | None = None, *, read_quota: bool = True
) -> int:
    """Cores this process may use: its CPU affinity, capped by the CPU quota (rounded down), at least 1."""
    if affinity is None:
        getaffinity = getattr(os, "sched_getaffinity", None)
        affinity = len(getaffinity(0)) if getaffinity is not None else (os.cpu_count() or 1)
    if quota_cores is None and read_quota:
        quota_cores = cpu_quota_cores()
    cores = affinity if quota_cores is None else min(affinity, math.floor(quota_cores))
    return max(1, cores)


def default_threads(cores: int, workers: int, max_threads: int | None = None) -> int:
    """``max(1, cores // workers)``, at most ``max_threads`` (None or 0: no cap)."""
    threads = max(1, cores // max(1, workers))
    if max_threads:
        threads = min(threads, max_threads)
    return threads
