"""Precision and thread rows, in one run: fp32 against int8, one thread against every core.

- ``ort-inprocess``: ``load_runtime(export, "onnx", threads=t, precision=p).run`` on a preprocessed batch,
  for p in fp32, int8 and t in 1 and the cores this process may use (:func:`available_cores`).
- ``gateway``: the gateway in front of a TorchServe serving two archives of the same export, ``<model>``
  (fp32) and ``<model>-int8``, each with the default workers and threads (the worker's CPU-quota rule),
  at ``clients`` concurrent callers sending ``per_call`` PNG images each.

:func:`targets` checks the issue's goals on these rows: the int8 gateway >= 3x the fp32 gateway, and >= 0.8x
``ort-inprocess`` int8 at every core. ``python -m cnnserve.bench.precision EXPORT_DIR --out results.json``
runs both (the export must hold int8: ``cnnserve export --precision fp32,int8``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from cnnserve.bench.results import Row, load_row, timed_row
from cnnserve.bench.settings import Budget

__all__ = ["INT8_SUFFIX", "inprocess_precision_rows", "gateway_precision_rows", "targets", "main"]

INT8_SUFFIX = "-int8"  # the int8 archive's TorchServe name beside the fp32 one
# A call waits for the ``clients x per_call`` images ahead of it: 2048 AlexNet images at ~20 img/s (fp32, a
# busy 2-core machine) is ~100 s, beyond the load generator's default 120 s once a repetition starts.
GATEWAY_DEADLINE_S = 600.0
Log = Callable[[str], None]


def inprocess_precision_rows(
    model: str, export_dir: Path, images: Any, budget: Budget, batch: int = 32, log: Log = print
) -> list[Row]:
    """``ort-inprocess`` at ``batch``: fp32 and int8, at one thread and at every core."""
    import torch

    from cnnserve.bench.scenarios import _model_input, _time_calls
    from cnnserve.runtime import Runtime, load_runtime
    from cnnserve.serving.threads import available_cores

    inputs = _model_input(export_dir, images, batch)
    rows = []
    for precision in ("fp32", "int8"):
        for threads in sorted({1, available_cores()}):
            log(f"ort-inprocess: {model} {precision}, batch {batch}, {threads} thread(s)")
            torch.set_num_threads(threads)
            runtime = load_runtime(export_dir, "onnx", threads=threads, precision=precision)

            def call(runtime: Runtime = runtime) -> object:
                return runtime.run(inputs)

            latencies = _time_calls(call, budget, minimum=3)
            extra = {"threads": threads, "precision": precision, "input_shape": list(inputs.shape)}
            rows.append(timed_row("ort-inprocess", model, batch, latencies, extra=extra))
    return rows


def gateway_precision_rows(
    model: str,
    export_dir: Path,
    images: Any,
    budget: Budget,
    work_dir: Path,
    clients: int = 64,
    per_call: int = 32,
    log: Log = print,
) -> list[Row]:
    """``gateway`` rows for the fp32 and the int8 archive of ``export_dir``, served side by side."""
    from cnnserve.bench.loadgen import LoadGenerator, LoadSpec, pooled_latencies
    from cnnserve.card import load_card
    from cnnserve.deployment import wire_gateway
    from cnnserve.gateway.server import GatewayThread
    from cnnserve.gateway.settings import GatewaySettings
    from cnnserve.torchserve import TorchServe, TorchServeSettings
    from cnnserve_export.archive import build_archive
    from cnnserve_export.config import default_settings

    archive = default_settings(load_card(export_dir).architecture)
    store = work_dir / "model_store"
    names = {"fp32": model, "int8": model + INT8_SUFFIX}
    for precision, name in names.items():
        log(f"archiving {name} ({precision})")
        build_archive(export_dir, store, replace(archive, name=name, precision=precision))
    settings = TorchServeSettings.with_ports(store, work_dir / "torchserve", work_dir / "revisions")
    server = TorchServe(settings)
    rows = []
    server.start()
    gateway = None
    loadgen = None
    try:
        server.wait_ready(tuple(names.values()), timeout=600)
        # 64 calls of 32 AlexNet images wait at one worker far longer than the default 10 s try bound on a
        # busy 2-core machine, and every try resent made it worse (measured: all 192 calls of a point ran
        # past their deadline). This bench measures throughput: only the caller's deadline bounds a call.
        own = GatewaySettings(
            listen="127.0.0.1:0", metrics_listen="off", http_listen="off", backend_try_timeout=0
        )
        gateway = GatewayThread(wire_gateway(own, settings))
        loadgen = LoadGenerator()
        for precision, name in names.items():
            log(f"gateway: {name}, {clients} clients, {per_call} images per call")
            spec = LoadSpec(
                kind="gateway",
                target=gateway.target,
                model=name,
                images=tuple(images.png),
                concurrency=clients,
                duration_s=budget.duration_s,
                warmup_s=budget.warmup_s,
                reps=budget.reps,
                images_per_call=per_call,
                timeout_s=GATEWAY_DEADLINE_S,
            )
            result = loadgen.run(spec)
            errors = [rep.first_error for rep in result.reps if rep.first_error]
            extra: dict[str, Any] = {"precision": precision, "archive": name}
            if errors:
                extra["first_error"] = errors[0]
            rows.append(
                load_row(
                    "gateway",
                    model,
                    clients,
                    per_call,
                    [rep.throughput_img_s for rep in result.reps],
                    pooled_latencies(result.reps),
                    sum(rep.errors for rep in result.reps),
                    backend="torchserve",
                    batching="off",
                    extra=extra,
                )
            )
    finally:
        if loadgen is not None:
            loadgen.close()
        if gateway is not None:
            gateway.stop()
        server.stop()
    return rows


def _find(rows: Sequence[Row], name: str, precision: str, threads: int | None = None) -> Row | None:
    for row in rows:
        same = row.name == name and row.extra.get("precision") == precision
        if same and (threads is None or row.extra.get("threads") == threads):
            return row
    return None


def targets(rows: Sequence[Row]) -> list[dict[str, Any]]:
    """The issue's two goals, each with the figures it compares and whether it was met."""
    fp32_gateway, int8_gateway = _find(rows, "gateway", "fp32"), _find(rows, "gateway", "int8")
    threads = max((r.extra.get("threads", 1) for r in rows if r.name == "ort-inprocess"), default=1)
    int8_inprocess = _find(rows, "ort-inprocess", "int8", threads)
    checks: list[dict[str, Any]] = []
    for goal, ours, theirs, factor in (
        ("int8 gateway >= 3x fp32 gateway (same run)", int8_gateway, fp32_gateway, 3.0),
        (f"int8 gateway >= 0.8x ort-inprocess int8 at {threads} threads", int8_gateway, int8_inprocess, 0.8),
    ):
        if ours is None or theirs is None or not theirs.throughput_img_s:
            checks.append({"goal": goal, "met": None, "why": "a row is missing"})
            continue
        ratio = (ours.throughput_img_s or 0.0) / theirs.throughput_img_s
        checks.append(
            {
                "goal": goal,
                "met": ratio >= factor,
                "ratio": round(ratio, 2),
                "img_s": [ours.throughput_img_s, theirs.throughput_img_s],
            }
        )
    return checks


def main(argv: Sequence[str] | None = None) -> int:
    from cnnserve.bench.scenarios import sample_images

    parser = argparse.ArgumentParser(prog="python -m cnnserve.bench.precision", description=__doc__)
    parser.add_argument("export_dir", type=Path, help="an export with int8 (--precision fp32,int8)")
    parser.add_argument("--model", default="alexnet")
    parser.add_argument("--out", type=Path, required=True, help="results JSON to write")
    parser.add_argument("--duration", type=float, default=Budget.duration_s, help="seconds per repetition")
    parser.add_argument("--warmup", type=float, default=Budget.warmup_s)
    parser.add_argument("--reps", type=int, default=Budget.reps)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--per-call", type=int, default=32)
    parser.add_argument("--no-gateway", action="store_true", help="only the in-process rows")
    parser.add_argument(
        "--gateway-duration",
        type=float,
        help="seconds per gateway repetition (default --duration); make it several times a call's latency",
    )
    parser.add_argument("--gateway-warmup", type=float, help="gateway warm-up seconds (default --warmup)")
    args = parser.parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    budget = Budget(duration_s=args.duration, warmup_s=args.warmup, reps=args.reps)
    images = sample_images()
    rows = inprocess_precision_rows(args.model, args.export_dir, images, budget, args.per_call, log)
    if not args.no_gateway:
        with tempfile.TemporaryDirectory(prefix="cnnserve-precision-") as tmp:
            gateway_budget = replace(
                budget,
                duration_s=args.gateway_duration or budget.duration_s,
                warmup_s=args.gateway_warmup if args.gateway_warmup is not None else budget.warmup_s,
            )
            rows += gateway_precision_rows(
                args.model,
                args.export_dir,
                images,
                gateway_budget,
                Path(tmp),
                args.clients,
                args.per_call,
                log,
            )
    checks = targets(rows)
    args.out.write_text(json.dumps({"rows": [r.to_dict() for r in rows], "targets": checks}, indent=2) + "\n")
    for row in rows:
        print(
            f"{row.name:<14} {row.extra.get('precision')} threads={row.extra.get('threads', '-')} "
            f"clients={row.concurrency} per_call={row.images_per_call}: {row.throughput_img_s} img/s "
            f"(p50 {row.p50_ms:.1f} ms, errors {row.errors})"
        )
    for check in checks:
        print(check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
