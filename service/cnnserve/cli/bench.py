"""``cnnserve bench``: cnnserve against what a user could run instead, in one run, with plots."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cnnserve.cli._output import EXIT_ERROR, EXIT_OK, emit

__all__ = ["register"]


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text} is not a positive number")
    return value


def _at_least_three(text: str) -> int:
    value = int(text)
    if value < 3:
        raise argparse.ArgumentTypeError("at least 3 repetitions per point")
    return value


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every value must be at least 1")
    return tuple(sorted(set(values)))


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="benchmark cnnserve against TorchServe, KServe, ONNX Runtime and a bare gRPC echo, with plots",
        description="Runs, in one invocation: the exported models in-process (ONNX Runtime, TorchScript), "
        "TorchServe called directly over gRPC and HTTP (batching on and off), the gateway (1 image per call "
        "at each concurrency, and batched calls), the gateway's OIP gRPC service next to a KServe "
        "ModelServer serving the same ONNX files (the same serialized ModelInfer requests to both), a bare "
        "grpc.aio echo server, fine-tune steps in-process and through the gateway, and cold starts of "
        "`cnnserve serve --detach`; every load point records each server's CPU ms per call. Writes "
        "results.json, README.md (target ratios) and PNG plots into --out. Builds the models into --work-dir "
        "on first use (minutes), and KServe's own venv into WORK_DIR/venv-kserve (pip, about a minute, once; "
        "where it cannot be built the kserve-oip rows are skipped with the reason). The full run takes "
        "15-20 minutes; --smoke takes seconds (no TorchServe, no KServe) and needs an export under "
        "WORK_DIR/build/lenet/export.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from cnnserve.bench.settings import SMOKE_BUDGET, Budget  # plain dataclasses: the one set of defaults

    parser.add_argument(
        "--out", help="output directory (default: docs/bench, or WORK_DIR/smoke with --smoke)"
    )
    parser.add_argument("--work-dir", default="var/bench", help="model artifacts (reused) and server state")
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="seconds-long run: LeNet in-process, echo, a gateway on the in-process backend (no TorchServe)",
    )
    parser.add_argument(
        "--duration",
        type=_positive_float,
        help=f"seconds per repetition (default {Budget().duration_s:g}; --smoke {SMOKE_BUDGET.duration_s:g})",
    )
    parser.add_argument(
        "--warmup",
        type=_positive_float,
        help=f"warm-up seconds per point (default {Budget().warmup_s:g}; --smoke {SMOKE_BUDGET.warmup_s:g})",
    )
    parser.add_argument("--reps", type=_at_least_three, default=3, help="repetitions per point")
    parser.add_argument(
        "--concurrency", type=_int_list, help="client counts for 1-image calls (default 1,8,64; --smoke 1,8)"
    )
    parser.add_argument(
        "--models", default="lenet,alexnet", help="comma-separated models (--smoke: LeNet only)"
    )
    from cnnserve.bench.results import SCENARIOS  # plain data (numpy at most): the one list

    parser.add_argument(
        "--only", help=f"comma-separated scenarios to run (default: all of {', '.join(SCENARIOS)})"
    )
    parser.add_argument(
        "--gateway-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra `cnnserve gateway` flag, e.g. --gateway-arg=--max-in-flight=4 (repeatable)",
    )
    parser.add_argument("--finetune-steps", type=int, default=10, help="measured fine-tune steps, at least")
    parser.add_argument("--cold-start-reps", type=_at_least_three, default=3, help="cold starts measured")
    parser.add_argument("--fail-on-miss", action="store_true", help="exit 1 when a measured target is missed")
    parser.add_argument("--json", action="store_true", help="print the targets and rows as JSON")
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: re-render README.md and the plots in --out (default docs/bench) from the "
        "results.json there",
    )
    parser.set_defaults(func=_run_bench)


def _run_bench(args: argparse.Namespace) -> int:
    if args.report_only:
        from cnnserve.bench.report import RESULTS_FILE, render

        out = Path(args.out or "docs/bench")
        files = render(out / RESULTS_FILE)
        emit(args, {"out": str(out), "files": [str(path) for path in files]}, f"rendered {out}")
        return EXIT_OK

    import logging
    from dataclasses import asdict

    from cnnserve.bench.harness import run
    from cnnserve.bench.results import SCENARIOS
    from cnnserve.bench.settings import SMOKE_BUDGET, BenchSettings, Budget
    from cnnserve.errors import InvalidInputError

    only = None
    if args.only:
        only = frozenset(name.strip() for name in args.only.split(",") if name.strip())
        unknown = sorted(only - set(SCENARIOS))
        if unknown:
            raise InvalidInputError.for_field(
                "only", f"unknown scenario {unknown[0]!r} (known: {', '.join(SCENARIOS)})"
            )
    work_dir = Path(args.work_dir)
    smoke = args.smoke
    models = tuple(m.strip() for m in args.models.split(",") if m.strip())
    if not models or any(m not in ("lenet", "alexnet") for m in models):
        raise InvalidInputError.for_field("models", f"{args.models!r}: choose from lenet, alexnet")
    settings = BenchSettings(
        out=Path(args.out) if args.out else (work_dir / "smoke" if smoke else Path("docs/bench")),
        work_dir=work_dir,
        budget=Budget(
            duration_s=args.duration or (SMOKE_BUDGET if smoke else Budget()).duration_s,
            warmup_s=args.warmup or (SMOKE_BUDGET if smoke else Budget()).warmup_s,
            reps=args.reps,
        ),
        smoke=smoke,
        concurrency=args.concurrency or ((1, 8) if smoke else (1, 8, 64)),
        models=("lenet",) if smoke else models,
        only=only,
        gateway_args=tuple(args.gateway_arg),
        finetune_steps=3 if smoke else args.finetune_steps,
        cold_start_reps=args.cold_start_reps,
    )
    # Each fine-tune step and gateway start logs at INFO; hundreds of them would bury the progress lines.
    logging.getLogger("cnnserve.serving").setLevel(logging.WARNING)
    logging.getLogger("cnnserve.gateway").setLevel(logging.WARNING)
    report = run(settings)
    targets = [asdict(t) | {"verdict": t.verdict} for t in report.targets]
    payload = {
        "out": str(settings.out),
        "duration_s": round(report.duration_s, 1),
        "files": [str(path) for path in report.files],
        "targets": targets,
        "rows": [row.to_dict() for row in report.rows],
    }

    def text() -> str:
        lines = [f"wrote {settings.out} in {report.duration_s / 60:.1f} min", "targets:"]
        for t in report.targets:
            measured = "-" if t.measured is None else f"{t.measured:g} {t.unit}"
            lines.append(
                f"  {t.verdict.strip('*'):<12} {t.description}: {measured} ({t.required}) {t.figures}"
            )
        return "\n".join(lines)

    emit(args, payload, text)
    missed = any(t.met is False for t in report.targets)
    return EXIT_ERROR if args.fail_on_miss and missed else EXIT_OK
