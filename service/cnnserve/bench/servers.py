"""What the benchmark runs against: model artifacts, the deployment it measures (TorchServe and the gateway,
as :class:`~cnnserve.deployment.Deployment` runs them for ``cnnserve serve``), the gateway on the in-process
backend (smoke runs), and meters on their CPU and micro-batches.

Layout under the work directory (default ``var/bench``; reused between runs):

- ``model_store/``: ``lenet.mar`` and ``alexnet.mar`` as ``cnnserve bootstrap`` builds them (cold start
  serves this store);
- ``build/<model>/export``: the exports they were archived from (the in-process baselines load these);
- ``bench_store/``: the same two archives (TorchServe batch size 1: the gateway micro-batches) plus
  ``<model>-batched`` (TorchServe batching on), so direct clients can call one export with TorchServe's
  batching on and off;
- ``state/``: TorchServe's and the gateway's state and logs for the current run.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cnnserve.deployment import Deployment, GatewayClient, GatewayProcess
    from cnnserve.gateway.server import GatewayThread
    from cnnserve.gateway.settings import GatewaySettings

__all__ = [
    "MODELS",
    "Artifacts",
    "find_exports",
    "prepare_artifacts",
    "ServerStack",
    "inprocess_gateway",
    "CpuMeter",
    "GatewayBatches",
]

MODELS = ("lenet", "alexnet")
BATCHED_SUFFIX = "-batched"
# TorchServe batching for the -batched twins: requests per handle() call, and the wait to fill one.
TWIN_BATCHING = {"lenet": (16, 5), "alexnet": (8, 5)}
Log = Callable[[str], None]


@dataclass(frozen=True)
class Artifacts:
    exports: dict[str, Path]  # model -> export directory
    model_store: Path | None = None  # the default archives (cold start)
    bench_store: Path | None = None  # the default archives and their -batched twins


def find_exports(work_dir: Path, models: Sequence[str]) -> dict[str, Path]:
    """``<work_dir>/build/<model>/export`` for each model that has one."""
    found = {}
    for model in models:
        export = work_dir / "build" / model / "export"
        if (export / "model_card.json").exists():
            found[model] = export
    return found


def prepare_artifacts(work_dir: Path, log: Log) -> Artifacts:
    """Train and export what is missing (minutes, once); archive every run (seconds).

    Archives are rebuilt from the exports each time so that they carry the handler code and archive defaults
    of this checkout: a stale .mar would benchmark old code.
    """
    from cnnserve.card import load_card
    from cnnserve_export.archive import build_archive
    from cnnserve_export.bootstrap import build_default_store
    from cnnserve_export.config import default_settings

    model_store, bench_store = work_dir / "model_store", work_dir / "bench_store"
    exports = find_exports(work_dir, MODELS)
    if len(exports) < len(MODELS):
        log(f"training and exporting the default models into {work_dir / 'build'} (a few minutes, once) ...")
        build_default_store(model_store, work_dir / "build", log=log, force=True)
        exports = find_exports(work_dir, MODELS)
    bench_store.mkdir(parents=True, exist_ok=True)
    for model in MODELS:
        settings = default_settings(load_card(exports[model]).architecture)
        log(f"archiving {model}.mar (defaults: TorchServe batch size 1) ...")
        source = build_archive(exports[model], model_store, settings)
        shutil.copy2(source, bench_store / source.name)
        batch_size, delay_ms = TWIN_BATCHING[model]
        twin = f"{model}{BATCHED_SUFFIX}"
        log(f"archiving {twin}.mar (TorchServe batch {batch_size} / {delay_ms} ms) ...")
        build_archive(
            exports[model],
            bench_store,
            replace(settings, name=twin, batch_size=batch_size, max_batch_delay_ms=delay_ms),
        )
    return Artifacts(exports, model_store, bench_store)


# ---- CPU use ----------------------------------------------------------------------------------------


def _tree(pid: int) -> list[Any]:
    import psutil  # type: ignore[import-untyped]

    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _cpu_seconds(processes: Sequence[Any]) -> dict[int, float]:
    import psutil

    seconds = {}
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = process.cpu_times()
            seconds[process.pid] = times.user + times.system
    return seconds


class CpuMeter:
    """CPU used by named process trees (and the whole machine) between :meth:`start` and :meth:`stop`.

    A tree is read at start: a worker TorchServe restarts mid-point is not counted, which the
    ``machine_cpu_percent`` beside it would show.
    """

    def __init__(self, roots: dict[str, int]) -> None:
        self.roots = roots
        self._started: dict[str, tuple[list[Any], dict[int, float]]] = {}
        self._wall = 0.0

    def start(self) -> None:
        import psutil

        psutil.cpu_percent(None)  # resets the machine-wide counter
        self._started = {}
        for name, pid in self.roots.items():
            processes = _tree(pid)
            self._started[name] = (processes, _cpu_seconds(processes))
        self._wall = time.perf_counter()

    def tree_pids(self) -> dict[str, tuple[int, ...]]:
        """{tree: the pids in it now}: what the load generator reads from /proc for CPU per call."""
        return {name: tuple(process.pid for process in _tree(pid)) for name, pid in self.roots.items()}

    def stop(self) -> tuple[dict[str, float], float]:
        """({tree: % of one core}, machine-wide % with 100 % per core)."""
        import psutil

        wall = time.perf_counter() - self._wall
        machine = psutil.cpu_percent(None) * (psutil.cpu_count() or 1)
        used = {}
        for name, (processes, before) in self._started.items():
            after = _cpu_seconds(processes)
            seconds = sum(after[pid] - before[pid] for pid in after if pid in before)
            used[name] = round(100.0 * seconds / wall, 1) if wall > 0 else 0.0
        return used, round(machine, 1)


# ---- the gateway's own view of its micro-batches ------------------------------------------------------

_BATCH_LINE = re.compile(r'^cnnserve_gateway_batch_inputs_(sum|count)\{model="([^"]+)"\}\s+(\S+)$')


class GatewayBatches:
    """Micro-batch sizes from the gateway's Prometheus histogram, as deltas between two reads."""

    def __init__(self, metrics_url: str | None) -> None:
        self.metrics_url = metrics_url

    def read(self) -> dict[str, tuple[float, float]]:
        """{model: (inputs sent, batches sent)} so far; empty when there is no metrics endpoint."""
        if not self.metrics_url:
            return {}
        with urllib.request.urlopen(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        totals: dict[str, list[float]] = {}
        for line in text.splitlines():
            match = _BATCH_LINE.match(line)
            if match:
                kind, model, value = match.groups()
                totals.setdefault(model, [0.0, 0.0])[0 if kind == "sum" else 1] = float(value)
        return {model: (values[0], values[1]) for model, values in totals.items()}

    @staticmethod
    def mean(
        before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]], model: str
    ) -> float:
        inputs = after.get(model, (0.0, 0.0))[0] - before.get(model, (0.0, 0.0))[0]
        batches = after.get(model, (0.0, 0.0))[1] - before.get(model, (0.0, 0.0))[1]
        return round(inputs / batches, 2) if batches else 0.0


# ---- TorchServe and the gateway as the deployment runs them ---------------------------------------------


class ServerStack:
    """The :class:`~cnnserve.deployment.Deployment` the benchmark measures: TorchServe serving ``bench_store``
    on free loopback ports, and ``cnnserve gateway`` in front of it with ``gateway_args`` (``cnnserve
    gateway`` flags; its ``--torchserve*`` flags are ignored: it is wired to this TorchServe)."""

    def __init__(self, artifacts: Artifacts, state_dir: Path, gateway_args: Sequence[str] = ()) -> None:
        from cnnserve.deployment import Deployment
        from cnnserve.processes import free_ports
        from cnnserve.torchserve import TorchServeSettings

        assert artifacts.bench_store is not None
        if state_dir.exists():
            shutil.rmtree(state_dir)  # a fresh revision store: every run starts from the trained base
        ports = free_ports(8)  # TorchServe's five, the gateway's, its metrics' and its OIP REST API's
        torchserve = TorchServeSettings.with_ports(
            artifacts.bench_store, state_dir / "torchserve", state_dir / "revisions", ports[:5]
        )
        self.metrics_url = f"http://127.0.0.1:{ports[6]}/metrics"
        self.gateway_args = list(gateway_args)
        arguments = [
            "--listen", f"127.0.0.1:{ports[5]}",
            "--metrics-listen", f"127.0.0.1:{ports[6]}",
            "--http-listen", f"127.0.0.1:{ports[7]}",
            *self.gateway_args,
        ]  # fmt: skip
        models = tuple(m + suffix for m in MODELS for suffix in ("", BATCHED_SUFFIX))
        self.deployment: Deployment = Deployment(
            torchserve, _parse_gateway_args(arguments), state_dir, models=models
        )
        assert self.deployment.gateway_client is not None and self.deployment.gateway_target is not None
        # The load generator and the fine-tune client follow the gateway's TLS and token (--gateway-arg).
        self.gateway_client: GatewayClient = self.deployment.gateway_client
        self.gateway_target: str = self.deployment.gateway_target

    @property
    def models(self) -> tuple[str, ...]:
        return self.deployment.models

    @property
    def grpc_target(self) -> str:
        return self.deployment.grpc_target

    @property
    def http_target(self) -> str:
        settings = self.deployment.torchserve.settings
        return f"{settings.host}:{settings.inference_port}"

    @property
    def inference_key(self) -> str:
        return self.deployment.torchserve.keys().inference or ""

    def start(self, log: Log, timeout: float = 300.0) -> None:
        started = time.monotonic()
        log(f"starting TorchServe with {', '.join(self.models)} ...")
        self.deployment.start(ready_timeout=timeout)
        log(f"TorchServe and the gateway are ready ({time.monotonic() - started:.0f} s)")

    def pids(self) -> dict[str, int]:
        return self.deployment.pids()

    def second_gateway(self, processes: int) -> GatewayProcess:
        """Another ``cnnserve gateway`` in front of the same TorchServe, with ``--processes`` (free ports, its
        own state directory), not started: the ``gateway-processes`` rows compare it with the first."""
        from cnnserve.deployment import GatewayProcess
        from cnnserve.processes import free_ports

        first = self.deployment.gateway
        assert first is not None
        listen, metrics, http = free_ports(3)
        settings = replace(
            first.settings,
            listen=f"127.0.0.1:{listen}",
            metrics_listen=f"127.0.0.1:{metrics}",
            http_listen=f"127.0.0.1:{http}",
            processes=processes,
        )
        tls_ca = self.gateway_client["tls_ca"]
        return GatewayProcess(self.deployment.state_dir / f"gateway-{processes}-processes", settings, tls_ca)

    def stop(self) -> None:
        self.deployment.stop()

    def __enter__(self) -> ServerStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _parse_gateway_args(arguments: Sequence[str]) -> GatewaySettings:
    """``cnnserve gateway ARGUMENTS`` as settings (defaults from the environment, as the gateway reads
    them)."""
    from cnnserve.errors import InvalidInputError
    from cnnserve.gateway.settings import add_arguments, settings_from_args

    parser = argparse.ArgumentParser(prog="cnnserve gateway", exit_on_error=False)
    add_arguments(parser)
    try:
        parsed, unknown = parser.parse_known_args(list(arguments))
    except argparse.ArgumentError as error:
        raise InvalidInputError.for_field("gateway_arg", str(error)) from None
    if unknown:
        raise InvalidInputError.for_field(
            "gateway_arg", f"not a `cnnserve gateway` flag: {' '.join(unknown)}"
        )
    return settings_from_args(parsed)


def inprocess_gateway(exports: dict[str, Path], revisions_dir: Path) -> GatewayThread:
    """The gateway with the in-process backend, on its own event loop thread: smoke runs, no TorchServe.

    It shares this process (and its GIL) with the harness; only the load generator is outside.
    """
    from cnnserve.gateway.inprocess import InProcessBackend
    from cnnserve.gateway.server import GatewayThread
    from cnnserve.gateway.settings import GatewaySettings
    from cnnserve.serving.service import ModelService, ServiceConfig

    config = ServiceConfig(revisions_dir=str(revisions_dir))
    backend = InProcessBackend({name: ModelService(path, config, name) for name, path in exports.items()})
    settings = GatewaySettings(
        listen="127.0.0.1:0", metrics_listen="127.0.0.1:0", http_listen="127.0.0.1:0", health_interval=1.0
    )
    return GatewayThread(settings, backend)
