"""Gateway commands: ``gateway`` (run it), and clients ``classify``, ``finetune``, ``revisions``, ``models``.

``cnnserve shapes --remote`` lives with ``shapes`` in :mod:`cnnserve.cli.offline` and uses
:func:`add_target_arguments` / :func:`connect` from here.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnserve.cli._output import EXIT_OK, emit
from cnnserve.client import LB_POLICIES
from cnnserve.contract import DEFAULT_MOMENTUM, DEFAULT_TOP_K
from cnnserve.errors import InvalidInputError

if TYPE_CHECKING:
    from cnnserve.gateway.types import ModelDetails

__all__ = ["register", "add_target_arguments", "connect"]


def register(subparsers: Any) -> None:
    _add_gateway(subparsers)
    _add_classify(subparsers)
    _add_finetune(subparsers)
    _add_revisions(subparsers)
    _add_models(subparsers)


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("gateway connection")
    group.add_argument(
        "--target",
        default=os.environ.get("CNNSERVE_TARGET", "127.0.0.1:50051"),
        help="gateway HOST:PORT (env CNNSERVE_TARGET)",
    )
    group.add_argument(
        "--token",
        default=os.environ.get("CNNSERVE_GATEWAY_TOKEN", ""),
        help="bearer token (env CNNSERVE_GATEWAY_TOKEN)",
    )
    group.add_argument(
        "--tls-ca", default=os.environ.get("CNNSERVE_GATEWAY_TLS_CA", ""), help="CA bundle: use TLS"
    )
    group.add_argument("--timeout", type=float, default=60.0, help="seconds per call (the gRPC deadline)")
    group.add_argument(
        "--lb-policy",
        choices=LB_POLICIES,
        default=os.environ.get("CNNSERVE_LB_POLICY", LB_POLICIES[0]),
        help="gRPC load balancing over the addresses --target resolves to (env CNNSERVE_LB_POLICY): "
        "round_robin spreads calls over every gateway behind a DNS name with one address per replica, e.g. "
        "dns:///cnnserve-gateway-headless.cnnserve.svc.cluster.local:50051 (docs/kubernetes.md)",
    )


def connect(args: argparse.Namespace) -> Any:
    from cnnserve.client import ClassifierClient

    return ClassifierClient(
        args.target,
        token=args.token or None,
        tls_ca=args.tls_ca or None,
        timeout=args.timeout,
        lb_policy=args.lb_policy,
    )


# ---- gateway ----------------------------------------------------------------------------------------


def _add_gateway(subparsers: Any) -> None:
    from cnnserve.gateway.settings import add_arguments

    parser = subparsers.add_parser(
        "gateway",
        help="run the gRPC gateway in front of a running TorchServe",
        description="Serves cnnserve.v1.Classifier, grpc.health.v1.Health and server reflection; Prometheus "
        "metrics on --metrics-listen. SIGTERM: health NOT_SERVING, then in-flight calls get --grace-period.",
    )
    add_arguments(parser)
    parser.set_defaults(func=_run_gateway)


def _run_gateway(args: argparse.Namespace) -> int:
    import asyncio

    from cnnserve.gateway.server import RunningGateway, serve
    from cnnserve.gateway.settings import settings_from_args

    settings = settings_from_args(args)

    def ready(running: RunningGateway) -> None:
        metrics = f", metrics on port {running.metrics_port}" if running.metrics_port else ""
        print(f"gateway serving on port {running.port}{metrics}", file=sys.stderr, flush=True)

    asyncio.run(serve(settings, ready))
    return EXIT_OK


# ---- classify ---------------------------------------------------------------------------------------


def _add_classify(subparsers: Any) -> None:
    parser = subparsers.add_parser("classify", help="classify image files through the gateway")
    parser.add_argument("images", nargs="+", metavar="IMG", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--top-k", type=int, default=DEFAULT_TOP_K)
    parser.add_argument("--revision", type=int, help="pin a revision (0: the trained base)")
    parser.add_argument("--min-revision", type=int, help="serve this revision or newer")
    add_target_arguments(parser)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_run_classify)


def _run_classify(args: argparse.Namespace) -> int:
    images = [Path(path).read_bytes() for path in args.images]
    with connect(args) as client:
        result = client.classify(
            args.model, images, top_k=args.top_k, revision=args.revision, min_revision=args.min_revision
        )
    rows = [
        {
            "image": path,
            "top_k": [{"label": s.label, "index": s.index, "probability": s.probability} for s in scores],
        }
        for path, scores in zip(args.images, result.predictions, strict=True)
    ]
    payload = {"model": result.model, "version": result.version, "revision": result.revision, "results": rows}

    def text() -> str:
        lines = [f"{result.model} v{result.version} revision {result.revision}"]
        for row in rows:
            best = ", ".join(f"{t['label']} {t['probability']:.3f}" for t in row["top_k"])
            lines.append(f"  {row['image']}: {best}")
        return "\n".join(lines)

    emit(args, payload, text)
    return EXIT_OK


# ---- finetune ---------------------------------------------------------------------------------------


def _add_finetune(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "finetune",
        help="stream batches of a dataset through FineTuneStep and print the loss per step",
        description="Sends the dataset's training images PNG-encoded (so the server preprocesses them as in "
        "training) in batches; every step returns the new revision that all workers then serve.",
    )
    parser.add_argument("--model", default="lenet")
    parser.add_argument(
        "--dataset", default="digits", help="digits | fashion-mnist | mnist | cifar10 | folder:PATH"
    )
    parser.add_argument("--data-dir")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--lr", type=float, default=0.01, help="SGD learning rate (refused above the worker's max_lr)"
    )
    parser.add_argument("--momentum", type=float, default=DEFAULT_MOMENTUM)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--train-layers", choices=["all", "classifier"], default="all")
    parser.add_argument(
        "--max-grad-norm",
        type=float,
        metavar="N",
        help="clip each step's gradient to this total L2 norm (default: no clipping)",
    )
    parser.add_argument("--seed", type=int, default=0)
    add_target_arguments(parser)
    parser.add_argument("--json", action="store_true", help="one JSON object per step, then a summary")
    parser.set_defaults(func=_run_finetune)


def _run_finetune(args: argparse.Namespace) -> int:
    import json

    import torch

    from cnnserve.preprocess import encode_png
    from cnnserve_export.data import load_dataset

    if args.steps < 1 or args.batch_size < 1:
        raise InvalidInputError.for_field("steps", "--steps and --batch-size must be at least 1")
    data = load_dataset(args.dataset, data_dir=args.data_dir, seed=args.seed)
    order = torch.randperm(len(data.train_targets), generator=torch.Generator().manual_seed(args.seed))
    steps = []
    with connect(args) as client:
        for step in range(args.steps):
            index = order[(torch.arange(args.batch_size) + step * args.batch_size) % len(order)]
            images = [encode_png(data.train_images[i]) for i in index.tolist()]
            labels = data.train_targets[index].tolist()
            started = time.perf_counter()
            result = client.finetune_step(
                args.model,
                images,
                labels,
                lr=args.lr,
                momentum=args.momentum,
                weight_decay=args.weight_decay,
                train_layers=args.train_layers,
                max_grad_norm=args.max_grad_norm,
            )
            row = {
                "step": step + 1,
                "revision": result.revision,
                "loss_before": round(result.loss_before, 5),
                "loss_after": round(result.loss_after, 5),
                "batch_accuracy": round(result.batch_accuracy, 4),
                "grad_norm": round(result.grad_norm, 4),
                "grad_clipped": result.grad_clipped,
                "ms": round((time.perf_counter() - started) * 1000, 1),
            }
            steps.append(row)
            if args.json:
                print(json.dumps(row), flush=True)
            else:
                print(
                    f"step {row['step']:>4}  revision {row['revision']:>5}  loss {row['loss_before']:.4f} -> "
                    f"{row['loss_after']:.4f}  batch acc {row['batch_accuracy']:.2%}  ({row['ms']} ms)"
                    + ("  gradient clipped" if row["grad_clipped"] else ""),
                    flush=True,
                )
    summary = {"model": args.model, "steps": len(steps), "revision": steps[-1]["revision"]}
    emit(args, summary, f"{args.model} now serves revision {summary['revision']}")
    return EXIT_OK


# ---- revisions and models ---------------------------------------------------------------------------


def _add_revisions(subparsers: Any) -> None:
    parser = subparsers.add_parser("revisions", help="list a model's revisions, roll back or reset")
    parser.add_argument("--model", default="lenet")
    action = parser.add_mutually_exclusive_group()
    action.add_argument(
        "--rollback", type=int, metavar="N", help="serve revision N's weights again (new revision)"
    )
    action.add_argument("--reset", action="store_true", help="serve the trained base again (new revision)")
    add_target_arguments(parser)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_run_revisions)


def _run_revisions(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    with connect(args) as client:
        if args.rollback is not None or args.reset:
            change = client.reset(args.model) if args.reset else client.rollback(args.model, args.rollback)
            new = change.revision
            message = (
                f"{change.model}: revision {new.revision} ({new.kind}) has the weights of {change.weights_of}"
            )
            emit(args, asdict(change), message)
            return EXIT_OK
        listing = client.list_revisions(args.model)

    def text() -> str:
        lines = [f"{listing.model}: head {listing.head}"]
        for r in listing.revisions:
            flags = " (pruned)" if r.pruned else ""
            marker = "*" if r.revision == listing.head else " "
            lines.append(f" {marker} {r.revision:>5}  {r.kind:<8} step {r.step:>4}  {r.sha256[:12]}{flags}")
        return "\n".join(lines)

    emit(args, asdict(listing), text)
    return EXIT_OK


def _add_models(subparsers: Any) -> None:
    parser = subparsers.add_parser("models", help="list served models, or describe one (--model)")
    parser.add_argument("--model", help="describe this model: input, classes, formats, parity, revision")
    add_target_arguments(parser)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_run_models)


def _describe_model(details: ModelDetails) -> str:
    status, info, parity = details.status, details.info, details.info.parity
    formats = ", ".join(
        f"{name} max diff {row['max_abs_diff']:.1e}"
        for name, row in sorted(parity.get("formats", {}).items())
    )
    shape, resize = "x".join(map(str, info.input_shape)), "x".join(map(str, info.resize))
    workers = f"{status.ready_workers}/{status.workers}"
    accuracy = float(info.training.get("test_accuracy") or 0.0)
    return "\n".join(
        [
            f"{status.name} v{status.version}: {info.architecture}, {workers} workers ready, "
            f"{info.format} on {info.device}",
            f"  input {shape}; images resized to {resize}, padded {info.pad}; "
            f"mean {list(info.mean)} std {list(info.std)}",
            f"  classes ({len(info.labels)}): {', '.join(info.labels)}",
            f"  trained on {info.dataset.get('name', '')}: test accuracy {accuracy:.2%}",
            f"  parity ({'passed' if parity.get('passed') else 'FAILED'}, "
            f"{parity.get('samples', 0)} images): {formats}",
            f"  revision {info.revision}; fine-tuning {'on' if info.fine_tuning else 'off'}",
        ]
    )


def _run_models(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    with connect(args) as client:
        if args.model:
            details = client.get_model(args.model)
            data = {"status": asdict(details.status), **details.info.to_json()}
            emit(args, data, lambda: _describe_model(details))
            return EXIT_OK
        models = client.list_models()
    emit(
        args,
        [asdict(m) | {"serving": m.serving} for m in models],
        lambda: "\n".join(
            f"{m.name:<12} v{m.version:<6} {m.ready_workers}/{m.workers} workers ready" for m in models
        ),
    )
    return EXIT_OK
