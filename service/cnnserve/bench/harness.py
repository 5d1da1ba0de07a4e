"""The order a benchmark run goes in, and what it leaves behind.

1. model artifacts (built once into the work directory, then reused);
2. in-process baselines, while nothing else of ours runs;
3. the servers: the echo server, TorchServe and the gateway (full run) or a gateway on the in-process
   backend (smoke run), and the KServe peer (full run; its venv built once); the load points, with the
   systems being compared run next to each other in time (one concurrency level, every system; then the
   next) so that drift in the machine's load hits them alike. Each ``kserve-oip`` point runs right beside its
   ``oip-grpc`` twin (same tensors, same serialized requests), which of the two goes first alternating;
4. fine-tune steps through the gateway (last: every step makes a new revision the workers then serve);
5. cold starts of ``cnnserve serve --detach``, after everything else has stopped;
6. ``results.json``, ``README.md`` and the plots in the output directory.

Everything started is stopped on the way out, failures included.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnserve.bench.kserve_peer import KIND as KSERVE
from cnnserve.bench.loadgen import LoadGenerator, LoadSpec
from cnnserve.bench.report import (
    TargetResult,
    describe_setup,
    evaluate_targets,
    write_plots,
    write_readme,
    write_results,
)
from cnnserve.bench.results import Row
from cnnserve.bench.scenarios import Images
from cnnserve.bench.settings import BenchSettings
from cnnserve.errors import CnnserveError, FailedPreconditionError

if TYPE_CHECKING:
    from cnnserve.deployment import GatewayClient

__all__ = ["Report", "run", "describe_machine"]

Log = Callable[[str], None]
# Inputs per call for the batched gateway points: the ort-inprocess batch each is compared with.
BATCHED = {"lenet": 64, "alexnet": 32}
# AlexNet's OIP tensor points stop at this many clients and batch at 1 client only: it takes ~25 ms an image
# on 2 cores, and `make bench` must stay under 20 minutes.
ALEXNET_TWIN_CLIENTS = 8

INPROCESS_BATCHES = {"lenet": (1, 64), "alexnet": (1, 32)}


def oip_twin_points(model: str, concurrency: tuple[int, ...]) -> list[tuple[int, int]]:
    """(clients, images per call) of the OIP tensor points run on the gateway and on the KServe peer."""
    if model == "alexnet":
        single = [c for c in concurrency if c <= ALEXNET_TWIN_CLIENTS]
        return [(c, 1) for c in single] + [(1, BATCHED[model])]
    return [(c, 1) for c in concurrency] + [(1, BATCHED[model]), (8, BATCHED[model])]


@dataclass
class Report:
    rows: list[Row]
    targets: list[TargetResult]
    files: list[Path]
    duration_s: float


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def describe_machine() -> dict[str, Any]:
    cpu_model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    memory_gib = 0.0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gib = round(int(line.split()[1]) / 2**20, 1)
    from cnnserve.torchserve import java_version

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),  # machine CPU % is over all of them (100 % per core)
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": memory_gib,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "onnxruntime": _version("onnxruntime"),
        "torchserve": _version("torchserve"),
        "grpcio": _version("grpcio"),
        "java": java_version() or "none",
        "load_average": [round(v, 2) for v in os.getloadavg()],
    }


def _inprocess(settings: BenchSettings, exports: dict[str, Path], images: Images, log: Log) -> Iterator[Row]:
    from cnnserve.bench import scenarios

    budget = settings.budget
    for model, export in exports.items():
        for batch in INPROCESS_BATCHES[model]:
            for fmt, name in (("onnx", "ort-inprocess"), ("torchscript", "torchscript-inprocess")):
                if settings.wants(name):
                    log(f"{name}: {model}, batch {batch}")
                    yield scenarios.inprocess_runtime(fmt, model, export, images, batch, budget)
            if settings.wants("service-inprocess"):
                log(f"service-inprocess: {model}, {batch} image(s) per call")
                yield scenarios.service_inprocess(model, export, images, batch, budget)
    if "lenet" in exports and (settings.wants("finetune-inprocess") or settings.wants("finetune-sgd-step")):
        log("finetune-inprocess: LeNet, 64 images")
        yield from scenarios.finetune_inprocess(exports["lenet"], images, budget, settings.finetune_steps)


class _Servers:
    """What the load points run against in this run, and the handles to stop them."""

    def __init__(self) -> None:
        self.echo: Any = None
        self.kserve: Any = None  # the KServe peer (full runs, when its venv could be built)
        self.stack: Any = None  # ServerStack (full run)
        self.inprocess: Any = None  # a GatewayThread on the in-process backend (smoke run)

    @property
    def gateway_target(self) -> str:
        return str(self.stack.gateway_target if self.stack else self.inprocess.target)

    @property
    def gateway_client(self) -> GatewayClient:
        """How clients reach the gateway (the in-process one: plaintext, no token)."""
        if self.stack:
            client: GatewayClient = self.stack.gateway_client
            return client
        return {"target": self.gateway_target, "token": None, "tls_ca": None}

    @property
    def metrics_url(self) -> str:
        return str(self.stack.metrics_url if self.stack else self.inprocess.metrics_url)

    def pids(self) -> dict[str, int]:
        pids = dict(self.stack.pids()) if self.stack else {}
        if self.echo is not None:
            pids["echo"] = self.echo.pid
        if self.kserve is not None:
            pids["kserve"] = self.kserve.pid
        return pids

    def stop(self) -> None:
        for item in (self.kserve, self.stack, self.inprocess, self.echo):
            if item is not None:
                item.stop()


def _load_points(
    settings: BenchSettings,
    servers: _Servers,
    loadgen: LoadGenerator,
    exports: dict[str, Path],
    images: Images,
    log: Log,
) -> Iterator[Row]:
    from cnnserve.bench.scenarios import load_point, model_tensors
    from cnnserve.bench.servers import BATCHED_SUFFIX, CpuMeter, GatewayBatches

    budget = settings.budget
    meter = CpuMeter(servers.pids())
    batches = GatewayBatches(servers.metrics_url)
    stack = servers.stack
    key = stack.inference_key if stack else ""
    backend = "torchserve" if stack else "inprocess"
    models = [m for m in BATCHED if m in exports]

    gateway_client = servers.gateway_client

    def spec(kind: str, target: str, model: str, concurrency: int, per_call: int = 1) -> LoadSpec:
        to_gateway = kind in ("gateway", "oip-grpc")
        to_torchserve = kind.startswith("torchserve")
        return LoadSpec(
            kind=kind,
            target=target,
            model=model,
            images=images.png,
            concurrency=concurrency,
            duration_s=budget.duration_s,
            warmup_s=budget.warmup_s,
            reps=budget.reps,
            images_per_call=per_call,
            token=(gateway_client["token"] or "") if to_gateway else (key if to_torchserve else ""),
            tls_ca=(gateway_client["tls_ca"] or "") if to_gateway else "",
        )

    for model in models:
        for concurrency in settings.concurrency:
            # The gateway serves the default archives: TorchServe batch size 1, the gateway micro-batches.
            gateway = {"backend": backend, "batching": "off" if stack else None}
            points: list[tuple[str, LoadSpec, dict[str, Any]]] = [
                ("gateway", spec("gateway", servers.gateway_target, model, concurrency), gateway)
            ]
            if model == "lenet":
                # The same calls over the Open Inference Protocol: ModelInfer on the same gateway port.
                oip = spec("oip-grpc", servers.gateway_target, model, concurrency)
                points.append(("oip-grpc", oip, gateway))
            if stack is not None:
                # The same calls to the -batched twin show what TorchServe's own batching adds behind it.
                batched = spec("gateway", servers.gateway_target, model + BATCHED_SUFFIX, concurrency)
                points.append(("gateway", batched, {"backend": backend, "batching": "on"}))
                for name, target in (
                    ("torchserve-grpc", stack.grpc_target),
                    ("torchserve-http", stack.http_target),
                ):
                    for batching, registration in (("on", model + BATCHED_SUFFIX), ("off", model)):
                        load = spec(name, target, registration, concurrency)
                        points.append((name, load, {"batching": batching}))
            if model == "lenet" and servers.echo is not None:
                points.append(("grpc-echo", spec("grpc-echo", servers.echo.target, model, concurrency), {}))
            for name, load, fields in points:
                if not settings.wants(name):
                    continue
                variant = f", batching {fields['batching']}" if "batching" in fields else ""
                log(f"{name}: {load.model}{variant}, {concurrency} client(s)")
                yield load_point(loadgen, load, name, meter, batches if name == "gateway" else None, **fields)
        if settings.wants("gateway"):
            per_call = BATCHED[model]
            log(f"gateway: {model}, {per_call} images per call, 1 client")
            load = spec("gateway", servers.gateway_target, model, 1, per_call)
            yield load_point(
                loadgen, load, "gateway", meter, batches, backend=backend, batching=gateway["batching"]
            )
            # The same call with the model's own input: what PNG decoding and resizing cost in the handler.
            log(f"gateway: {model}, {per_call} preprocessed tensors per call, 1 client")
            shape, tensors = model_tensors(exports[model], images, 8)
            load = replace(load, images=tensors, tensor_shape=shape)
            yield load_point(
                loadgen,
                load,
                "gateway",
                meter,
                batches,
                backend=backend,
                batching=gateway["batching"],
                inputs="tensor",
            )
        if model == "lenet" and settings.wants("oip-grpc"):
            # The gateway's 64-images call above, as one OIP ModelInfer of image BYTES [64].
            per_call = BATCHED[model]
            log(f"oip-grpc: {model}, {per_call} images per call, 1 client")
            load = spec("oip-grpc", servers.gateway_target, model, 1, per_call)
            yield load_point(
                loadgen, load, "oip-grpc", meter, None, backend=backend, batching=gateway["batching"]
            )
        # Preprocessed FP32 tensors as one OIP input, the same serialized ModelInfer requests to the gateway
        # and to KServe: the same client cost for both.
        behind = {"backend": backend, "batching": "off" if stack else None}  # as the gateway rows above
        twins = [("oip-grpc", servers.gateway_target, behind)]
        if servers.kserve is not None:
            twins.append(("kserve-oip", servers.kserve.target, {}))
        twins = [twin for twin in twins if settings.wants(twin[0])]
        if twins:
            shape, tensors = model_tensors(exports[model], images, 8)
        for index, (concurrency, per_call) in enumerate(
            oip_twin_points(model, settings.concurrency) if twins else ()
        ):
            for name, target, fields in twins[:: -1 if index % 2 else 1]:  # who goes first alternates
                log(f"{name}: {model}, {per_call} tensor(s) per call, {concurrency} client(s)")
                load = replace(
                    spec(name, target, model, concurrency, per_call), images=tensors, tensor_shape=shape
                )
                yield load_point(loadgen, load, name, meter, None, inputs="tensor", **fields)


# The LeNet points the gateway-processes rows repeat through a gateway of this many processes (the gateway's
# CPU is a limit there, not the model's): (clients, images per call).
SECOND_GATEWAY_PROCESSES = 2
PROCESSES_POINTS = ((64, 1), (1, 64))  # the one-process gateway has rows at both


def _processes_points(
    settings: BenchSettings,
    stack: Any,
    loadgen: LoadGenerator,
    images: Images,
    log: Log,
    skipped: dict[str, str],
) -> Iterator[Row]:
    """LeNet through a second gateway of SECOND_GATEWAY_PROCESSES processes in front of the same TorchServe,
    at the points of the first (one-process) gateway's rows it is compared with."""
    from cnnserve.bench.scenarios import load_point
    from cnnserve.bench.servers import CpuMeter

    processes = SECOND_GATEWAY_PROCESSES
    gateway = stack.second_gateway(processes)
    log(f"gateway-processes: starting a second gateway with --processes {processes} ...")
    gateway.start()
    try:
        try:
            gateway.wait_serving(timeout=120.0)
        except CnnserveError as exc:
            skipped["gateway-processes"] = f"the {processes}-process gateway did not start: {exc.message}"
            log(f"gateway-processes skipped: {skipped['gateway-processes']}")
            return
        listening = gateway.listening() or {}
        meter = CpuMeter(
            {"gateway": gateway.process.pid, **{k: v for k, v in stack.pids().items() if k != "gateway"}}
        )
        client = gateway.client
        for concurrency, per_call in PROCESSES_POINTS:
            log(
                f"gateway-processes: lenet, {processes} processes, {per_call} image(s) per call, "
                f"{concurrency} client(s)"
            )
            load = LoadSpec(
                kind="gateway",
                target=gateway.target,
                model="lenet",
                images=images.png,
                concurrency=concurrency,
                duration_s=settings.budget.duration_s,
                warmup_s=settings.budget.warmup_s,
                reps=settings.budget.reps,
                images_per_call=per_call,
                token=client["token"] or "",
                tls_ca=client["tls_ca"] or "",
            )
            row = load_point(
                loadgen, load, "gateway-processes", meter, None, backend="torchserve", batching="off"
            )
            row.extra["processes"] = processes
            row.extra["pids"] = listening.get("pids", [])
            yield row
    finally:
        gateway.stop()


def _worker_threads(export: Path) -> int:
    """Intra-op threads one of our TorchServe workers of this export gets: its archive defaults and the
    worker's rule (``serving/threads.py``), so the KServe peer's session gets the same."""
    from cnnserve.card import load_card
    from cnnserve.serving.threads import available_cores, default_threads
    from cnnserve_export.config import default_settings

    archive = default_settings(load_card(export).architecture)
    if archive.threads:
        return archive.threads
    return default_threads(available_cores(), archive.max_workers, archive.max_threads)


def _start_kserve(work_dir: Path, exports: dict[str, Path], state_dir: Path, log: Log) -> tuple[Any, str]:
    """(the running KServe peer, "") or (None, why it could not run): a peer that cannot be built or started
    is recorded as skipped, never a failed run."""
    from cnnserve.bench.kserve_peer import KServePeer, PeerUnavailableError, ensure_venv

    threads = {model: _worker_threads(export) for model, export in exports.items()}
    try:
        python = ensure_venv(work_dir, log)
        log(f"starting the KServe peer ({', '.join(f'{m}: {n} thread(s)' for m, n in threads.items())}) ...")
        return KServePeer(python, exports, threads, state_dir / "kserve" / "kserve.log"), ""
    except PeerUnavailableError as unavailable:
        reason = unavailable.reason
    except OSError as error:  # the venv's python could not be run at all
        reason = f"could not start the KServe ModelServer: {error}"
    log(f"kserve-oip skipped: {reason}")
    return None, reason


def run(
    settings: BenchSettings, log: Log = lambda message: print(message, file=sys.stderr, flush=True)
) -> Report:
    """Run the benchmark as ``settings`` say and write its results into ``settings.out``."""
    from cnnserve.bench import scenarios
    from cnnserve.bench.echo import EchoServer
    from cnnserve.bench.servers import ServerStack, find_exports, inprocess_gateway, prepare_artifacts

    started = time.monotonic()
    machine = describe_machine()
    work_dir = settings.work_dir
    if settings.smoke:
        exports = find_exports(work_dir, ("lenet",))
        if not exports:
            raise FailedPreconditionError(
                f"no LeNet export under {work_dir}/build/lenet/export: run `cnnserve bench` once (it builds "
                f"one) or `cnnserve bootstrap --work-dir {work_dir}/build`"
            )
        artifacts = None
    else:
        artifacts = prepare_artifacts(work_dir, log)
        exports = {m: path for m, path in artifacts.exports.items() if m in settings.models}
    images = scenarios.sample_images()
    rows: list[Row] = list(_inprocess(settings, exports, images, log))

    servers = _Servers()
    state_dir = work_dir / ("smoke-state" if settings.smoke else "state")
    skipped: dict[str, str] = {}  # scenario -> why it has no rows in this run
    server_names = {
        "gateway",
        "gateway-processes",
        "oip-grpc",
        "kserve-oip",
        "torchserve-grpc",
        "torchserve-http",
        "grpc-echo",
        "finetune-gateway",
    }
    if any(settings.wants(name) for name in server_names):
        with LoadGenerator(work_dir / "loadgen.log") as loadgen:
            try:
                if settings.wants("grpc-echo"):
                    servers.echo = EchoServer()
                if artifacts is not None:
                    servers.stack = ServerStack(artifacts, state_dir, settings.gateway_args)
                    servers.stack.start(log)
                else:
                    state_dir.mkdir(parents=True, exist_ok=True)
                    servers.inprocess = inprocess_gateway(exports, state_dir / "revisions")
                if settings.wants(KSERVE) and artifacts is None:
                    skipped[KSERVE] = "smoke runs do not build or start the KServe peer (full runs do)"
                elif settings.wants(KSERVE):
                    servers.kserve, why = _start_kserve(work_dir, exports, state_dir, log)
                    if why:
                        skipped[KSERVE] = why
                rows += _load_points(settings, servers, loadgen, exports, images, log)
                if settings.wants("gateway-processes") and servers.stack is not None and "lenet" in exports:
                    rows += _processes_points(settings, servers.stack, loadgen, images, log, skipped)
                if settings.wants("finetune-gateway") and "lenet" in exports:
                    log("finetune-gateway: LeNet, 64 images")
                    row = scenarios.finetune_gateway(
                        servers.gateway_client, images, settings.budget, settings.finetune_steps
                    )
                    row.backend = "torchserve" if servers.stack else "inprocess"
                    rows.append(row)
            finally:
                servers.stop()

    if artifacts is not None and artifacts.model_store is not None and settings.wants("cold-start"):
        log(f"cold-start: {settings.cold_start_reps} x `cnnserve serve --detach` -> first Classify")
        rows.append(
            scenarios.cold_start(
                artifacts.model_store, work_dir / "cold-start", images.png[0], settings.cold_start_reps, log
            )
        )

    targets = evaluate_targets(rows, cores=machine["cores"], skipped=skipped)
    duration = time.monotonic() - started
    settings.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": machine,
        "settings": {
            "smoke": settings.smoke,
            **asdict(settings.budget),
            "concurrency": list(settings.concurrency),
            "models": list(settings.models),
            "only": sorted(settings.only) if settings.only else None,
            "gateway_args": list(settings.gateway_args),
            "finetune_steps": settings.finetune_steps,
            "cold_start_reps": settings.cold_start_reps,
        },
        "setup": describe_setup(),
        "skipped": skipped,
        "peers": {KSERVE: servers.kserve.describe()} if servers.kserve is not None else {},
        "duration_s": round(duration, 1),
    }
    plots = write_plots(settings.out, rows)
    files = [
        write_results(settings.out, rows, targets, meta),
        write_readme(settings.out, rows, targets, meta, plots),
        *(settings.out / name for name in plots),
    ]
    return Report(rows, targets, files, duration)
