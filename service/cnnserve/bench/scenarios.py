"""The scenarios: each function measures one thing and returns its result row(s).

In-process baselines run in this process with one intra-op thread (what each TorchServe worker gets);
everything behind a socket is driven by the load generator's process (:mod:`cnnserve.bench.loadgen`), or,
for sequential calls (fine-tune steps, cold start), by a blocking client here while nothing else runs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnserve.bench.loadgen import LoadGenerator, LoadSpec, pooled_latencies
from cnnserve.bench.results import Row, load_row, percentile, timed_row
from cnnserve.bench.servers import BATCHED_SUFFIX, CpuMeter, GatewayBatches
from cnnserve.bench.settings import Budget
from cnnserve.processes import free_ports

if TYPE_CHECKING:
    from cnnserve.deployment import GatewayClient

__all__ = [
    "Images",
    "sample_images",
    "model_tensors",
    "inprocess_runtime",
    "service_inprocess",
    "load_point",
    "finetune_inprocess",
    "finetune_gateway",
    "cold_start",
]

FINETUNE_LR = 0.01
Log = Callable[[str], None]


@dataclass(frozen=True)
class Images:
    """Test images of the bundled digits, PNG-encoded as a user would send them, with their labels."""

    png: tuple[bytes, ...]
    labels: tuple[int, ...]


def sample_images(count: int = 64) -> Images:
    from cnnserve.preprocess import encode_png
    from cnnserve_export.data import load_dataset

    data = load_dataset("digits")
    return Images(
        tuple(encode_png(image) for image in data.test_images[:count]),
        tuple(int(label) for label in data.test_targets[:count]),
    )


def _model_input(export_dir: Path, images: Images, count: int) -> Any:
    """The preprocessed float32 (count, C, H, W) batch the model itself sees."""
    import torch

    from cnnserve.card import load_card
    from cnnserve.preprocess import Preprocessing, decode_image, prepare_images

    card = load_card(export_dir)
    pre = Preprocessing.from_card(card)
    decoded = [decode_image(images.png[i % len(images.png)], pre.channels) for i in range(count)]
    return prepare_images(torch.stack(decoded), pre)


def model_tensors(export_dir: Path, images: Images, count: int) -> tuple[tuple[int, ...], tuple[bytes, ...]]:
    """``count`` images preprocessed for the model: their (C, H, W) shape and float32 little-endian bytes."""
    batch = _model_input(export_dir, images, count).numpy().astype("<f4")
    return tuple(batch.shape[1:]), tuple(sample.tobytes() for sample in batch)


def _time_calls(call: Callable[[], object], budget: Budget, minimum: int) -> list[float]:
    """Warm up for ``budget.warmup_s`` (at least 2 calls), then time calls for ``budget.duration_s``."""
    deadline, calls = time.perf_counter() + budget.warmup_s, 0
    while calls < 2 or time.perf_counter() < deadline:
        call()
        calls += 1
    latencies: list[float] = []
    deadline = time.perf_counter() + budget.duration_s
    while len(latencies) < max(minimum, budget.reps) or time.perf_counter() < deadline:
        started = time.perf_counter()
        call()
        latencies.append((time.perf_counter() - started) * 1000.0)
    return latencies


# ---- in-process baselines -----------------------------------------------------------------------------


def inprocess_runtime(
    fmt: str, model: str, export_dir: Path, images: Images, batch: int, budget: Budget
) -> Row:
    """The exported model alone: ``load_runtime(export_dir, fmt, threads=1).run`` on a float batch."""
    import torch

    from cnnserve.runtime import load_runtime

    torch.set_num_threads(1)
    runtime = load_runtime(export_dir, fmt, threads=1)
    inputs = _model_input(export_dir, images, batch)
    latencies = _time_calls(lambda: runtime.run(inputs), budget, minimum=3)
    name = "ort-inprocess" if fmt == "onnx" else "torchscript-inprocess"
    return timed_row(name, model, batch, latencies, extra={"threads": 1, "input_shape": list(inputs.shape)})


def service_inprocess(model: str, export_dir: Path, images: Images, count: int, budget: Budget) -> Row:
    """The handler's work without TorchServe: ``ModelService.handle`` on the gateway's envelope of PNGs.

    Decode, preprocess, forward (ONNX Runtime, one thread) and the packed reply: what a worker does per call.
    """
    import torch

    from cnnserve.contract import ClassifyRequest, RawInput, envelope
    from cnnserve.serving.service import ModelService, ServiceConfig

    torch.set_num_threads(1)
    service = ModelService(export_dir, ServiceConfig(), name=model)
    pngs = [images.png[i % len(images.png)] for i in range(count)]
    request = envelope(ClassifyRequest(tuple(RawInput(png) for png in pngs)))

    def call() -> None:
        (reply,) = service.handle([request])
        if reply.status != 200:
            raise RuntimeError(f"ModelService answered {reply.status}: {reply.body[:200]!r}")

    latencies = _time_calls(call, budget, minimum=3)
    return timed_row("service-inprocess", model, count, latencies, extra={"threads": 1, "format": "onnx"})


# ---- load points --------------------------------------------------------------------------------------


def load_point(
    loadgen: LoadGenerator,
    spec: LoadSpec,
    name: str,
    meter: CpuMeter,
    batches: GatewayBatches | None = None,
    **fields: Any,
) -> Row:
    """One load point through the load generator, with the CPU every process used meanwhile."""
    spec = replace(spec, cpu_pids=meter.tree_pids())  # read from /proc around each timed repetition
    before = batches.read() if batches else {}
    meter.start()
    result = loadgen.run(spec)
    servers, machine = meter.stop()
    after = batches.read() if batches else {}
    reps = result.reps
    wall = sum(rep.wall_s for rep in reps)
    calls = sum(rep.calls for rep in reps)
    extra: dict[str, Any] = {"request_bytes": result.request_bytes}
    if spec.kind == "gateway" and calls:
        extra |= {
            # per call, from the reply's Timing: the gateway's time and the TorchServe call inside it
            "mean_gateway_server_ms": round(sum(rep.server_ms for rep in reps) / calls, 3),
            "mean_backend_ms": round(sum(rep.backend_ms for rep in reps) / calls, 3),
            # inputs in the TorchServe request each call rode on (> 1: micro-batched)
            "mean_batch_inputs_per_call": round(sum(rep.batch_inputs for rep in reps) / calls, 2),
        }
        if batches is not None and spec.images_per_call == 1:  # larger calls skip the micro-batcher
            extra["mean_micro_batch"] = batches.mean(before, after, spec.model)  # warm-up included
    if calls:
        # CPU milliseconds per answered call, timed repetitions only: per server tree, and the client's.
        extra["cpu_ms_per_call"] = {
            tree: round(1000.0 * sum(rep.server_cpu_s.get(tree, 0.0) for rep in reps) / calls, 4)
            for tree in spec.cpu_pids
        }
        extra["client_cpu_ms_per_call"] = round(1000.0 * sum(rep.cpu_s for rep in reps) / calls, 4)
    errors = [rep.first_error for rep in reps if rep.first_error]
    if errors:
        extra["first_error"] = errors[0]
    return load_row(
        name,
        spec.model.removesuffix(BATCHED_SUFFIX),
        spec.concurrency,
        spec.images_per_call,
        [rep.throughput_img_s for rep in reps],
        pooled_latencies(reps),
        sum(rep.errors for rep in reps),
        client_cpu_percent=round(100.0 * sum(rep.cpu_s for rep in reps) / wall, 1) if wall else None,
        server_cpu_percent=servers,
        machine_cpu_percent=machine,
        extra=extra,
        **fields,
    )


# ---- fine-tuning --------------------------------------------------------------------------------------


def finetune_inprocess(export_dir: Path, images: Images, budget: Budget, steps: int) -> list[Row]:
    """LeNet, 64 images: ``ModelService.handle`` with a fine-tune envelope (the reference), and
    ``sgd_step`` alone on the eager model.

    ``ModelService.handle`` does the work a worker does for ``FineTuneStep``: decode and preprocess the
    PNGs, one SGD step, and the new revision written to the revision store; ``sgd_step`` is the step only.
    """
    import torch

    from cnnserve.card import load_card
    from cnnserve.contract import FineTuneRequest, RawInput, envelope
    from cnnserve.serving.finetune import StepSettings, sgd_step
    from cnnserve.serving.service import ModelService, ServiceConfig
    from cnnserve.weights import load_into, load_weights

    torch.set_num_threads(1)
    count = len(images.png)
    rows = []
    with tempfile.TemporaryDirectory(prefix="cnnserve-bench-revisions-") as revisions:
        service = ModelService(export_dir, ServiceConfig(revisions_dir=revisions), name="lenet")
        step = iter(range(1_000_000))

        def service_step() -> None:
            request = FineTuneRequest(
                tuple(RawInput(png) for png in images.png),
                tuple(images.labels),
                FINETUNE_LR,
                request_id=f"bench-{next(step)}",  # the gateway always sends one: same lookups
            )
            (reply,) = service.handle([envelope(request)])
            if reply.status != 200:
                raise RuntimeError(f"fine-tune step failed: {reply.body[:200]!r}")

        latencies = _time_calls(service_step, budget, minimum=steps)
        rows.append(
            timed_row("finetune-inprocess", "lenet", count, latencies, extra={"path": "ModelService.handle"})
        )

    card = load_card(export_dir)
    model = load_into(card.build_model(), load_weights(export_dir / card.weights_file))
    inputs = _model_input(export_dir, images, count)
    labels = torch.tensor(images.labels, dtype=torch.int64)
    buffers: dict[str, torch.Tensor] = {}

    def bare_step() -> None:
        nonlocal buffers
        _, buffers = sgd_step(model, inputs, labels, StepSettings(FINETUNE_LR), buffers)

    latencies = _time_calls(bare_step, budget, minimum=steps)
    rows.append(timed_row("finetune-sgd-step", "lenet", count, latencies, extra={"path": "sgd_step"}))
    return rows


def finetune_gateway(gateway: GatewayClient, images: Images, budget: Budget, steps: int) -> Row:
    """``ClassifierClient.finetune_step`` on LeNet with 64 PNGs, one step after another."""
    from cnnserve.client import ClassifierClient

    timings: list[tuple[float, float]] = []
    with ClassifierClient(**gateway, timeout=120) as client:

        def call() -> None:
            result = client.finetune_step("lenet", list(images.png), list(images.labels), lr=FINETUNE_LR)
            timings.append((result.timing.server_ms, result.timing.backend_ms))

        latencies = _time_calls(call, budget, minimum=steps)
    measured = timings[-len(latencies) :]
    return timed_row(
        "finetune-gateway",
        "lenet",
        len(images.png),
        latencies,
        extra={
            "median_gateway_server_ms": round(percentile([t[0] for t in measured], 50), 3),
            "median_backend_ms": round(percentile([t[1] for t in measured], 50), 3),
        },
    )


# ---- cold start ---------------------------------------------------------------------------------------


def _cnnserve(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cnnserve.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _cold_start_once(model_store: Path, state_dir: Path, image: bytes, timeout: float) -> dict[str, float]:
    from cnnserve.client import ClassifierClient
    from cnnserve.errors import CnnserveError

    ports = free_ports(6)
    target = f"127.0.0.1:{ports[5]}"
    started = time.perf_counter()
    try:
        served = _cnnserve(
            "serve", "--detach", "--no-build", "--json",
            "--model-store", str(model_store),
            "--state-dir", str(state_dir),
            "--inference-port", str(ports[0]),
            "--management-port", str(ports[1]),
            "--metrics-port", str(ports[2]),
            "--grpc-inference-port", str(ports[3]),
            "--grpc-management-port", str(ports[4]),
            "--listen", target,
            "--metrics-listen", "off",
            timeout=timeout,
        )  # fmt: skip
        if served.returncode != 0:
            raise RuntimeError(f"cnnserve serve --detach failed: {served.stderr.strip()[-500:]}")
        detached = time.perf_counter()
        with ClassifierClient(target, timeout=30) as client:
            while True:
                try:
                    client.classify("lenet", [image])
                    break
                except CnnserveError:
                    if time.perf_counter() - started > timeout:
                        raise
                    time.sleep(0.05)
        classified = time.perf_counter()
    finally:
        stopped = _cnnserve("stop", "--state-dir", str(state_dir), timeout=120)
        if stopped.returncode != 0:
            raise RuntimeError(f"cnnserve stop failed: {stopped.stderr.strip()[-500:]}")
    return {
        "serve_returned_s": round(detached - started, 3),
        "first_classify_s": round(classified - started, 3),
        "stop_s": round(time.perf_counter() - classified, 3),
    }


def cold_start(
    model_store: Path, state_root: Path, image: bytes, reps: int, log: Log, timeout: float = 300
) -> Row:
    """``cnnserve serve --detach`` with the archives present -> first successful Classify; then stop.

    Each repetition gets a fresh state directory (no revisions, no logs) and new ports.
    """
    if state_root.exists():
        shutil.rmtree(state_root)  # stale logs and revisions from an earlier run
    runs = []
    for rep in range(reps):
        runs.append(_cold_start_once(model_store, state_root / f"cold-{rep}", image, timeout))
        log(f"  cold start {rep + 1}/{reps}: {runs[-1]['first_classify_s']:.1f} s to the first Classify")
    seconds = [run["first_classify_s"] for run in runs]
    row = timed_row("cold-start", "lenet", 1, [s * 1000.0 for s in seconds], extra={"runs": runs})
    row.throughput_img_s = row.throughput_min = row.throughput_max = None
    row.extra["models"] = sorted(p.stem for p in model_store.glob("*.mar"))
    row.extra["seconds_median"] = round(percentile(seconds, 50), 2)
    row.extra["seconds_max"] = round(max(seconds), 2)
    row.extra["command"] = "cnnserve serve --detach --no-build (TorchServe + gateway); cnnserve stop"
    return row
