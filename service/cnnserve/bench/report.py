"""From result rows to what people read: the target ratios, ``results.json``, ``README.md`` and the plots.

Every ratio is computed from rows of one run. A missed target gets the figures that explain it, taken from
the same rows: the CPU each process spent per image (the machine has two cores that the load generator,
the gateway and TorchServe share), the gateway's micro-batch sizes, and where a call's time went.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cnnserve.bench.results import SCENARIOS, Row

__all__ = [
    "TargetResult",
    "evaluate_targets",
    "find",
    "write_results",
    "write_readme",
    "write_plots",
    "PLOTS",
]

PLOTS = {
    "throughput_vs_concurrency.png": "Throughput against concurrent clients, one image per call",
    "latency_cdf.png": "Per-call latency CDF, one image per call",
    "batched_calls.png": "Images per second: the model alone, the handler, and the gateway",
}
HIGH_CONCURRENCY = 64


@dataclass
class TargetResult:
    key: str
    description: str
    required: str  # e.g. ">= 1.00x"
    measured: float | None  # the ratio (or seconds / ms, as ``unit`` says); None: not measured
    unit: str  # "x", "ms", "s"
    met: bool | None  # None: not measured in this run
    figures: str = ""  # the numbers the ratio comes from
    shortfall: str = ""  # by how much it was missed
    why: list[str] = field(default_factory=list)  # evidence from this run
    close: list[str] = field(default_factory=list)  # what would close the gap

    @property
    def verdict(self) -> str:
        return {True: "met", False: "**missed**", None: "not measured"}[self.met]


def find(
    rows: Sequence[Row],
    name: str,
    model: str,
    *,
    concurrency: int | None = None,
    images_per_call: int | None = None,
    batching: str | None = None,
    inputs: str = "png",
) -> Row | None:
    """The first row that matches; gateway rows count only when the gateway fronted TorchServe."""
    for row in rows:
        if row.name != name or row.model != model or row.backend == "inprocess" or row.inputs != inputs:
            continue
        if concurrency is not None and row.concurrency != concurrency:
            continue
        if images_per_call is not None and row.images_per_call != images_per_call:
            continue
        if batching is not None and row.batching != batching:
            continue
        return row
    return None


# ---- evidence ---------------------------------------------------------------------------------------


def _cpu_us_per_image(row: Row) -> dict[str, float]:
    """CPU microseconds each process spent per image served: the cost model behind a CPU-bound point."""
    if not row.throughput_img_s:
        return {}
    costs = {"load generator": row.client_cpu_percent or 0.0, **row.server_cpu_percent}
    return {
        name: round(percent / 100.0 * 1e6 / row.throughput_img_s, 1)
        for name, percent in costs.items()
        if percent >= 1.0
    }


def _others_percent(row: Row) -> float:
    """CPU the machine spent outside the processes of this point (other people's work, the kernel)."""
    ours = (row.client_cpu_percent or 0.0) + sum(row.server_cpu_percent.values())
    return max(0.0, (row.machine_cpu_percent or 0.0) - ours)


def _describe_cpu(label: str, row: Row) -> str:
    costs = _cpu_us_per_image(row)
    parts = ", ".join(f"{name} {us:.0f}" for name, us in costs.items())
    return (
        f"{label}: {row.throughput_img_s:.0f} img/s, machine {row.machine_cpu_percent or 0:.0f} % busy "
        f"(100 % per core; {_others_percent(row):.0f} % of it outside this benchmark); CPU µs per image: "
        f"{parts} (total {sum(costs.values()):.0f})"
    )


def _gateway_batching(row: Row) -> str:
    extra = row.extra
    if "mean_gateway_server_ms" not in extra:
        return ""
    server, backend = extra["mean_gateway_server_ms"], extra["mean_backend_ms"]
    return (
        f"gateway at {row.concurrency} clients: {extra.get('mean_micro_batch', 0):.1f} inputs per "
        f"TorchServe request on average; per call {server:.2f} ms in the gateway, of which "
        f"{backend:.2f} ms waiting on TorchServe"
    )


def _ratio_target(
    key: str,
    description: str,
    ours: Row | None,
    theirs: Row | None,
    required: float,
    explain: Callable[[Row, Row, TargetResult, float], None],
) -> TargetResult:
    result = TargetResult(key, description, f">= {required:.2f}x", None, "x", None)
    if ours is None or theirs is None or not ours.throughput_img_s or not theirs.throughput_img_s:
        return result
    ratio = ours.throughput_img_s / theirs.throughput_img_s
    result.measured, result.met = round(ratio, 3), ratio >= required
    result.figures = f"{ours.throughput_img_s:.1f} vs {theirs.throughput_img_s:.1f} img/s"
    if not result.met:
        result.shortfall = (
            f"{ratio:.2f}x instead of {required:.2f}x: {100 * (1 - ratio / required):.0f} % short, "
            f"{required * theirs.throughput_img_s - ours.throughput_img_s:.0f} img/s more needed"
        )
        explain(ours, theirs, result, required)
    return result


def _explain_cpu_bound(
    ours: Row, theirs: Row, result: TargetResult, required: float, their_label: str, rows: Sequence[Row]
) -> None:
    result.why.append(_describe_cpu("gateway", ours))
    result.why.append(_describe_cpu(their_label, theirs))
    batching = _gateway_batching(ours)
    if batching:
        result.why.append(batching)
    ours_cost, theirs_cost = _cpu_us_per_image(ours), _cpu_us_per_image(theirs)
    echo = find(rows, "grpc-echo", ours.model, concurrency=ours.concurrency)
    echo_us = _cpu_us_per_image(echo).get("echo", 0.0) if echo else 0.0
    gateway_us = ours_cost.get("gateway", 0.0)
    if echo_us and gateway_us:
        result.why.append(
            f"a bare grpc.aio server spent {echo_us:.0f} µs CPU per call at the same concurrency "
            f"(grpc-echo): the gateway's {gateway_us:.0f} µs per one-image call is "
            f"{gateway_us / echo_us:.1f}x that floor"
        )
    direct = find(rows, "torchserve-grpc", ours.model, concurrency=ours.concurrency, batching="on")
    direct_us = _cpu_us_per_image(direct).get("torchserve", 0.0) if direct else 0.0
    behind_us = ours_cost.get("torchserve", 0.0)
    if direct_us and behind_us:
        result.why.append(
            f"TorchServe spent {direct_us:.0f} µs CPU per image called directly and {behind_us:.0f} µs "
            "behind the gateway's micro-batches"
        )
    saturated = (ours.machine_cpu_percent or 0) >= 170
    if saturated and ours_cost and theirs_cost:
        # Saturated: images/s = CPU-µs available per second / CPU-µs per image. Same CPU, required images/s:
        spent = sum(ours_cost.values()) * (ours.throughput_img_s or 0)  # CPU-µs per second on this path
        allowed = spent / (required * (theirs.throughput_img_s or 1))
        gateway = ours_cost.get("gateway", 0.0)
        result.why.append(
            "the cores were saturated, so throughput = 2 cores / CPU per image: the gateway path costs "
            f"{sum(ours_cost.values()):.0f} µs per image in all, {gateway:.0f} µs of it in the gateway"
        )
        result.close.append(
            f"with the CPU this point got ({_others_percent(ours):.0f} % went to other processes), the whole "
            f"path must cost <= {allowed:.0f} µs CPU per image (now {sum(ours_cost.values()):.0f}); the "
            f"gateway's own {gateway:.0f} µs per single-image call is the part cnnserve owns"
        )
    else:
        result.why.append(
            f"the machine was not saturated ({ours.machine_cpu_percent or 0:.0f} % of 200 %): calls wait "
            "rather than compute (micro-batch pipelining or TorchServe's batch delay)"
        )
        result.close.append(
            "keep more micro-batches in flight (--max-in-flight) so both TorchServe workers stay busy"
        )


def _explain_batched_call(
    model: str, per_call: int, rows: Sequence[Row]
) -> Callable[[Row, Row, TargetResult, float], None]:
    def explain(ours: Row, theirs: Row, result: TargetResult, required: float) -> None:
        service = find(rows, "service-inprocess", model, images_per_call=per_call)
        forward = theirs.p50_ms
        pieces = [
            f"the model alone: {forward:.2f} ms per {per_call}-image forward (ONNX Runtime, one thread)"
        ]
        biggest = ("", 0.0)
        if service is not None:
            handler = service.p50_ms - forward
            pieces.append(f"decode + preprocess + reply in the handler: +{handler:.2f} ms (in-process, p50)")
            biggest = max(
                biggest, ("decoding and preprocessing the PNGs in the handler", handler), key=lambda b: b[1]
            )
        extra = ours.extra
        if "mean_backend_ms" in extra:
            backend, server = extra["mean_backend_ms"], extra["mean_gateway_server_ms"]
            base = service.p50_ms if service is not None else forward
            pieces.append(f"TorchServe (transport, queue, worker IPC): +{backend - base:.2f} ms")
            pieces.append(f"the gateway itself: +{server - backend:.2f} ms")
            pieces.append(
                f"client <-> gateway: +{ours.mean_ms - server:.2f} ms (mean call {ours.mean_ms:.2f} ms)"
            )
            biggest = max(
                biggest,
                ("TorchServe's transport and queueing", backend - base),
                ("the gateway", server - backend),
                key=lambda b: b[1],
            )
        result.why.append("where a call's time goes: " + "; ".join(pieces))
        worker = ours.server_cpu_percent.get("torchserve", 0.0)
        others = _others_percent(ours)
        if (ours.machine_cpu_percent or 0) >= 170 and worker < 90 and others >= 50:
            result.why.append(
                f"TorchServe's process tree got {worker:.0f} % of a core for a call stream that keeps one "
                f"worker busy, while processes outside this benchmark used {others:.0f} % of the 200 %: the "
                "worker was starved of CPU, so part of the TorchServe share above is waiting for a core"
            )
        tensors = find(rows, "gateway", model, images_per_call=per_call, batching="off", inputs="tensor")
        if tensors is not None and tensors.throughput_img_s:
            ratio = tensors.throughput_img_s / (theirs.throughput_img_s or 1)
            result.why.append(
                f"the same call with preprocessed float32 tensors instead of PNGs: "
                f"{tensors.throughput_img_s:.1f} img/s ({ratio:.2f}x), p50 {tensors.p50_ms:.2f} ms"
            )
        budget_ms = per_call * 1000.0 / (required * (theirs.throughput_img_s or 1))
        now_ms = 1000.0 * per_call / (ours.throughput_img_s or 1)
        result.close.append(
            f"a {per_call}-image call must take <= {budget_ms:.2f} ms (now {now_ms:.2f} ms); "
            f"the largest piece is {biggest[0] or 'outside the model'} ({biggest[1]:.2f} ms)"
        )

    return explain


def _latency_target(rows: Sequence[Row], model: str) -> TargetResult:
    key = f"p50-c1-{model}"
    description = f"{_title(model)}, 1 client: gateway p50 <= torchserve-grpc p50 + 1 ms (same registration)"
    result = TargetResult(key, description, "<= +1.00 ms", None, "ms", None)
    # Both on the archive the gateway serves (TorchServe batch size 1): the difference is the extra hop.
    ours = find(rows, "gateway", model, concurrency=1, images_per_call=1, batching="off")
    theirs = find(rows, "torchserve-grpc", model, concurrency=1, batching="off")
    if ours is None or theirs is None:
        return result
    delta = ours.p50_ms - theirs.p50_ms
    result.measured, result.met = round(delta, 3), delta <= 1.0
    batched = find(rows, "torchserve-grpc", model, concurrency=1, batching="on")
    result.figures = f"{ours.p50_ms:.2f} vs {theirs.p50_ms:.2f} ms" + (
        f" (TorchServe with its own batching: {batched.p50_ms:.2f} ms)" if batched else ""
    )
    if not result.met:
        result.shortfall = f"+{delta:.2f} ms instead of <= +1.00 ms: {delta - 1.0:.2f} ms over"
        extra = ours.extra
        if "mean_gateway_server_ms" in extra:
            server, backend = extra["mean_gateway_server_ms"], extra["mean_backend_ms"]
            result.why.append(
                f"per call: {server:.2f} ms in the gateway, {backend:.2f} ms of it waiting on TorchServe, "
                f"{ours.mean_ms - server:.2f} ms between client and gateway (the extra hop)"
            )
        others = _others_percent(ours)
        if others >= 50:
            result.why.append(
                f"processes outside this benchmark used {others:.0f} % of the 200 % CPU during this point: "
                "every hop waits for a core"
            )
        result.close.append("cut the gateway's own time per call (server_ms - backend_ms) and the extra hop")
    return result


def _finetune_target(rows: Sequence[Row]) -> TargetResult:
    result = TargetResult(
        "finetune",
        "LeNet, 64 images: finetune-gateway <= 2x finetune-inprocess + 10 ms (medians)",
        "<= 1.00x of the bound",
        None,
        "x",
        None,
    )
    ours, theirs = find(rows, "finetune-gateway", "lenet"), find(rows, "finetune-inprocess", "lenet")
    if ours is None or theirs is None:
        return result
    bound = 2 * theirs.p50_ms + 10.0
    result.measured, result.met = round(ours.p50_ms / bound, 3), ours.p50_ms <= bound
    result.figures = f"{ours.p50_ms:.1f} ms vs bound {bound:.1f} ms (in-process {theirs.p50_ms:.1f} ms)"
    if not result.met:
        result.shortfall = f"{ours.p50_ms - bound:.1f} ms over the bound"
        extra = ours.extra
        result.why.append(
            f"per step (medians): {extra.get('median_gateway_server_ms', 0):.1f} ms in the gateway, "
            f"{extra.get('median_backend_ms', 0):.1f} ms of it in TorchServe; in-process the same work takes "
            f"{theirs.p50_ms:.1f} ms"
        )
        result.close.append(
            "find the time between TorchServe's reply and the in-process step: queueing, revision writes"
        )
    return result


def _cold_start_target(rows: Sequence[Row]) -> TargetResult:
    result = TargetResult(
        "cold-start", "cnnserve serve --detach -> first Classify (median)", "<= 30 s", None, "s", None
    )
    row = find(rows, "cold-start", "lenet")
    if row is None:
        return result
    seconds = row.p50_ms / 1000.0
    result.measured, result.met = round(seconds, 2), seconds <= 30.0
    result.figures = (
        f"median {seconds:.1f} s, worst {row.extra.get('seconds_max', 0):.1f} s over {row.reps} starts"
    )
    if not result.met:
        result.shortfall = f"{seconds - 30.0:.1f} s over"
        runs = row.extra.get("runs", [])
        if runs:
            returned, classified = runs[0]["serve_returned_s"], runs[0]["first_classify_s"]
            result.why.append(
                f"`serve --detach` returned after {returned:.1f} s (TorchServe, every worker, the gateway); "
                f"the first Classify {classified - returned:.1f} s later"
            )
        result.close.append("start fewer workers first, or start the gateway while TorchServe's workers load")
    return result


def _title(model: str) -> str:
    return {"lenet": "LeNet", "alexnet": "AlexNet"}.get(model, model)


def evaluate_targets(rows: Sequence[Row]) -> list[TargetResult]:
    c = HIGH_CONCURRENCY
    gateway_c = find(rows, "gateway", "lenet", concurrency=c, images_per_call=1, batching="off")
    return [
        _ratio_target(
            "gateway-vs-torchserve-grpc",
            f"LeNet, 1 image per call, {c} clients: gateway >= 1.0x torchserve-grpc (batching on)",
            gateway_c,
            find(rows, "torchserve-grpc", "lenet", concurrency=c, batching="on"),
            1.0,
            lambda ours, theirs, result, required: _explain_cpu_bound(
                ours, theirs, result, required, "torchserve-grpc", rows
            ),
        ),
        _ratio_target(
            "gateway-vs-grpc-echo",
            f"LeNet, 1 image per call, {c} clients: gateway >= 0.7x grpc-echo",
            gateway_c,
            find(rows, "grpc-echo", "lenet", concurrency=c),
            0.7,
            lambda ours, theirs, result, required: _explain_cpu_bound(
                ours, theirs, result, required, "grpc-echo", rows
            ),
        ),
        _ratio_target(
            "lenet-64-per-call",
            "LeNet, 64 images per call: gateway >= 0.5x ort-inprocess batch 64",
            find(rows, "gateway", "lenet", images_per_call=64, batching="off"),
            find(rows, "ort-inprocess", "lenet", images_per_call=64),
            0.5,
            _explain_batched_call("lenet", 64, rows),
        ),
        _ratio_target(
            "alexnet-32-per-call",
            "AlexNet, 32 images per call: gateway >= 0.8x ort-inprocess batch 32",
            find(rows, "gateway", "alexnet", images_per_call=32, batching="off"),
            find(rows, "ort-inprocess", "alexnet", images_per_call=32),
            0.8,
            _explain_batched_call("alexnet", 32, rows),
        ),
        _latency_target(rows, "lenet"),
        _latency_target(rows, "alexnet"),
        _finetune_target(rows),
        _cold_start_target(rows),
    ]


# ---- results.json -------------------------------------------------------------------------------------


def write_results(
    out: Path, rows: Sequence[Row], targets: Sequence[TargetResult], meta: dict[str, Any]
) -> Path:
    """``results.json``: ``{"machine", "settings", ..., "targets": [...], "rows": [...]}``."""
    path = out / "results.json"
    data = {
        **meta,
        "targets": [asdict(t) | {"verdict": t.verdict} for t in targets],
        "rows": [row.to_dict() for row in rows],
    }
    path.write_text(json.dumps(data, indent=1) + "\n")
    return path


# ---- README.md ----------------------------------------------------------------------------------------


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _measured(target: TargetResult) -> str:
    if target.measured is None:
        return "-"
    if target.unit == "x":
        return f"{target.measured:.2f}x"
    if target.unit == "ms":
        return f"{target.measured:+.2f} ms"
    return f"{target.measured:.1f} s"


def _variant(row: Row) -> str:
    label = f"batching {row.batching}" if row.batching else (row.backend or str(row.extra.get("path", "")))
    return label + (", tensors" if row.inputs == "tensor" else "")


def _results_table(rows: Sequence[Row]) -> list[str]:
    lines = [
        "| scenario | model | variant | clients | img/call | img/s (median) | min-max | p50 ms | p99 ms "
        "| client CPU % | server CPU % | machine CPU % |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|---|--:|",
    ]
    order = {name: index for index, name in enumerate(SCENARIOS)}
    for row in sorted(rows, key=lambda r: (order.get(r.name, 99), r.model, r.images_per_call, r.concurrency)):
        servers = ", ".join(f"{k} {v:.0f}" for k, v in row.server_cpu_percent.items() if v >= 1.0)
        spread = (
            f"{_fmt(row.throughput_min)}-{_fmt(row.throughput_max)}"
            if row.throughput_min is not None
            else "-"
        )
        lines.append(
            f"| {row.name} | {row.model} | {_variant(row)} | {row.concurrency} | {row.images_per_call} | "
            f"{_fmt(row.throughput_img_s)} | {spread} | {row.p50_ms:,.2f} | {row.p99_ms:,.2f} | "
            f"{_fmt(row.client_cpu_percent, 0)} | {servers or '-'} | {_fmt(row.machine_cpu_percent, 0)} |"
        )
    return lines


def write_readme(
    out: Path,
    rows: Sequence[Row],
    targets: Sequence[TargetResult],
    meta: dict[str, Any],
    plots: Sequence[str],
) -> Path:
    machine, settings = meta["machine"], meta["settings"]
    lines = [
        "# cnnserve benchmarks",
        "",
        f"Generated by `cnnserve bench` ({'smoke run' if settings['smoke'] else 'full run'}) on "
        f"{machine['date']} in {meta['duration_s'] / 60:.1f} min; rerun `make bench` to regenerate this "
        "directory (do not edit it by hand). Figures come from one run on a shared, noisy machine.",
        "",
        f"Machine: {machine['cpu_model']}, {machine['cores']} cores, {machine['memory_gib']} GiB; "
        f"Python {machine['python']}, torch {machine['torch']}, onnxruntime {machine['onnxruntime']}, "
        f"TorchServe {machine['torchserve']}, grpcio {machine['grpcio']}; load average at start "
        f"{machine['load_average']}.",
        "",
        f"Each point: {settings['warmup_s']} s warm-up, then {settings['reps']} repetitions of "
        f"{settings['duration_s']} s (load points) or at least {settings['reps']} timed calls over "
        f"{settings['duration_s']} s (in-process points, fine-tune steps).",
        "",
        "## Targets",
        "",
        "| target | measured | required | figures | result |",
        "|---|--:|--:|---|---|",
    ]
    for t in targets:
        lines.append(
            f"| {t.description} | {_measured(t)} | {t.required} | {t.figures or '-'} | {t.verdict} |"
        )
    missed = [t for t in targets if t.met is False]
    for t in missed:
        lines += ["", f"### Missed: {t.description}", "", f"- **By how much:** {t.shortfall}."]
        lines += [f"- **Why (this run's figures):** {why}." for why in t.why]
        lines += [f"- **What would close it:** {close}." for close in t.close]
    lines += ["", "## Plots", ""]
    for name in plots:
        lines += [f"![{PLOTS.get(name, name)}]({name})", ""]
    lines += ["## All results", "", *_results_table(rows), ""]
    lines += [
        "## How it is measured",
        "",
        "- `ort-inprocess`, `torchscript-inprocess`: `cnnserve.runtime.load_runtime(export, fmt, "
        "threads=1).run` on a preprocessed float32 batch in the harness process: the model alone.",
        "- `service-inprocess`: `ModelService.handle` on the envelope the gateway sends (PNG decode, "
        "preprocessing, forward, JSON reply) in the harness process: the handler's work without TorchServe.",
        "- `torchserve-grpc` / `torchserve-http`: one PNG per request straight to TorchServe (gRPC "
        '`Predictions` with `input={"body": png}`, HTTP `POST /predictions/<model>`), with the inference '
        "key. Batching off: the archive the gateway serves (TorchServe batch size 1; LeNet 2 workers, "
        "AlexNet 1); on: `<model>-batched`, the same export with TorchServe batching (LeNet batch 16 / 5 ms, "
        "AlexNet 8 / 5 ms).",
        "- `gateway`: `cnnserve gateway` in its own process in front of that TorchServe; `Classify` with one "
        "PNG per call, or 64 (LeNet) / 32 (AlexNet) per call; *batching on*: the same calls to the "
        "`<model>-batched` registration; *tensors*: the batched call with preprocessed float32 tensors "
        "instead of PNGs (no decoding or resizing in the handler).",
        "- `grpc-echo`: a bare grpc.aio server (generic handler, bytes in, same bytes out) sent the bytes of "
        "the LeNet `Classify` request: the transport floor. Its `model` column names the payload.",
        "- `finetune-inprocess`: `ModelService.handle` with a fine-tune envelope (decode, one SGD step, the "
        "revision written), the reference for the target; `finetune-sgd-step`: `sgd_step` alone on the eager "
        "model; `finetune-gateway`: `ClassifierClient.finetune_step`. LeNet, 64 PNGs, lr 0.01, one thread.",
        "- `cold-start`: `cnnserve serve --detach --no-build` with the archives present, until the first "
        "successful `Classify` through the gateway; then `cnnserve stop`.",
        "- The load generator is a separate process: closed-loop grpc.aio callers over up to 4 connections "
        "(HTTP: one keep-alive connection per caller). *client CPU %* is its own CPU (100 % = one core); "
        "*server CPU %* is per process tree over the whole point; both compete for the same cores.",
        "- Latency percentiles pool every call of every repetition; throughput is the median repetition's.",
        "",
    ]
    path = out / "README.md"
    path.write_text("\n".join(lines))
    return path


# ---- plots --------------------------------------------------------------------------------------------

_SYSTEMS: list[tuple[str, str | None, str]] = [
    ("gateway", "off", "gateway (default: TorchServe batch size 1)"),
    ("gateway", "on", "gateway, TorchServe batching on"),
    ("gateway", None, "gateway (in-process backend)"),
    ("torchserve-grpc", "on", "TorchServe gRPC, batching on"),
    ("torchserve-grpc", "off", "TorchServe gRPC, batching off"),
    ("torchserve-http", "on", "TorchServe HTTP, batching on"),
    ("torchserve-http", "off", "TorchServe HTTP, batching off"),
    ("grpc-echo", None, "gRPC echo (transport floor)"),
]


def _single_image_rows(rows: Sequence[Row], name: str, batching: str | None, model: str) -> list[Row]:
    return sorted(
        (
            r
            for r in rows
            if r.name == name
            and r.model == model
            and r.images_per_call == 1
            and r.batching == batching
            and r.throughput_img_s is not None
        ),
        key=lambda r: r.concurrency,
    )


def write_plots(out: Path, rows: Sequence[Row]) -> list[str]:
    """The PNGs (Agg backend, no display needed); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    models = [m for m in ("lenet", "alexnet") if any(r.model == m for r in rows)]
    written = []

    figure, axes = plt.subplots(1, max(1, len(models)), figsize=(6 * max(1, len(models)), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models, strict=False):
        for name, batching, label in _SYSTEMS:
            points = _single_image_rows(rows, name, batching, model)
            if points:
                axis.plot(
                    [r.concurrency for r in points],
                    [r.throughput_img_s for r in points],
                    marker="o",
                    label=label,
                )
        axis.set(
            xscale="log", yscale="log", xlabel="concurrent clients", ylabel="images / s", title=_title(model)
        )
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=7)
    figure.suptitle(PLOTS["throughput_vs_concurrency.png"])
    figure.tight_layout()
    figure.savefig(out / "throughput_vs_concurrency.png", dpi=110)
    plt.close(figure)
    written.append("throughput_vs_concurrency.png")

    levels = sorted({r.concurrency for r in rows if r.name == "gateway" and r.images_per_call == 1}) or [1]
    columns = sorted({levels[0], levels[-1]})
    figure, axes = plt.subplots(
        max(1, len(models)), len(columns), figsize=(6 * len(columns), 4 * max(1, len(models))), squeeze=False
    )
    for axes_row, model in zip(axes, models, strict=False):
        for axis, concurrency in zip(axes_row, columns, strict=True):
            for name, batching, label in _SYSTEMS:
                row = next(
                    (
                        r
                        for r in _single_image_rows(rows, name, batching, model)
                        if r.concurrency == concurrency
                    ),
                    None,
                )
                if row is not None and row.latency_cdf_ms:
                    fractions = [i / (len(row.latency_cdf_ms) - 1) for i in range(len(row.latency_cdf_ms))]
                    axis.plot(row.latency_cdf_ms, fractions, label=label)
            clients = f"{concurrency} client{'s' if concurrency > 1 else ''}"
            axis.set(
                xscale="log",
                xlabel="latency (ms)",
                ylabel="fraction of calls",
                title=f"{_title(model)}, {clients}",
            )
            # Ticks at 1, 2 and 5 per decade, as plain numbers: labelled minor ticks collide on narrow ranges.
            axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.grid(True, which="both", alpha=0.3)
            axis.legend(fontsize=7)
    figure.suptitle(PLOTS["latency_cdf.png"])
    figure.tight_layout()
    figure.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(figure)
    written.append("latency_cdf.png")

    figure, axes = plt.subplots(
        1, max(1, len(models)), figsize=(6.5 * max(1, len(models)), 3.8), squeeze=False
    )
    for axis, model in zip(axes[0], models, strict=False):
        bars = [
            (
                f"{r.name} {_variant(r)} ({r.images_per_call}/call, {r.concurrency} cl.)",
                r.throughput_img_s or 0.0,
            )
            for r in rows
            if r.model == model
            and r.throughput_img_s
            and r.name in ("ort-inprocess", "torchscript-inprocess", "service-inprocess", "gateway")
            and (r.images_per_call > 1 or r.concurrency == max(levels or [1]))
        ]
        drawn = axis.barh([label for label, _ in bars], [value for _, value in bars])
        axis.bar_label(drawn, fmt="%.0f", fontsize=7, padding=2)
        axis.set(xlabel="images / s", title=_title(model))
        axis.xaxis.set_major_locator(MaxNLocator(5))  # wide numbers: fewer ticks, or the labels collide
        axis.tick_params(axis="y", labelsize=7)
        axis.grid(True, axis="x", alpha=0.3)
    figure.suptitle(PLOTS["batched_calls.png"])
    figure.tight_layout()
    figure.savefig(out / "batched_calls.png", dpi=110)
    plt.close(figure)
    written.append("batched_calls.png")
    return written
