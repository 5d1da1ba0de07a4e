"""Serving commands: ``archive``, ``bootstrap``, ``serve``, ``stop``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from cnnserve.cli._output import EXIT_OK, emit
from cnnserve.errors import FailedPreconditionError

__all__ = ["register", "torchserve_settings", "add_torchserve_arguments"]


def register(subparsers: Any) -> None:
    _add_archive(subparsers)
    _add_bootstrap(subparsers)
    _add_serve(subparsers)
    _add_stop(subparsers)
    _add_torchserve_config(subparsers)


def _env(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _add_archive(subparsers: Any) -> None:
    from cnnserve_export.config import ArchiveSettings

    defaults = ArchiveSettings()
    parser = subparsers.add_parser(
        "archive",
        help="build model_store/<name>.mar for TorchServe from an export directory",
        description="Package an export (model, card, weights, handler and its modules, model-config.yaml) "
        "with torch-model-archiver. TorchServe batching is off by default (the gateway micro-batches); "
        "workers depend on the architecture (AlexNet 1, LeNet 2) unless given.",
    )
    parser.add_argument("export_dir", metavar="EXPORT_DIR")
    parser.add_argument("--model-store", default=_env("CNNSERVE_MODEL_STORE", "model_store"))
    parser.add_argument("--name", help="TorchServe model name (default: the model card's)")
    parser.add_argument("--format", choices=["onnx", "torchscript"], default=defaults.format)
    parser.add_argument("--batch-size", type=int, help="TorchServe batch size")
    parser.add_argument("--max-batch-delay-ms", type=int, help="how long TorchServe waits to fill a batch")
    parser.add_argument("--workers", type=int, help="workers (min = max)")
    parser.add_argument("--response-timeout", type=int, help="seconds TorchServe waits for a handler reply")
    parser.add_argument("--device", choices=["cpu", "gpu"], default=defaults.device)
    parser.add_argument("--threads", type=int, help="intra-op threads per worker (default 1)")
    parser.add_argument("--retention", type=int, help="fine-tuned revisions kept besides the base")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_run_archive)


def _run_archive(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cnnserve.card import load_card
    from cnnserve_export.archive import build_archive
    from cnnserve_export.config import default_settings

    settings = default_settings(load_card(args.export_dir).architecture)
    overrides: dict[str, Any] = {"format": args.format, "device": args.device}
    for flag, field in (
        ("name", "name"),
        ("batch_size", "batch_size"),
        ("max_batch_delay_ms", "max_batch_delay_ms"),
        ("response_timeout", "response_timeout_s"),
        ("threads", "threads"),
        ("retention", "retention"),
    ):
        if getattr(args, flag) is not None:
            overrides[field] = getattr(args, flag)
    if args.workers is not None:
        overrides.update(min_workers=args.workers, max_workers=args.workers)
    settings = replace(settings, **overrides)
    path = build_archive(args.export_dir, args.model_store, settings)
    emit(args, {"archive": str(path), "settings": settings.__dict__}, f"wrote {path}")
    return EXIT_OK


def _add_bootstrap(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "bootstrap",
        help="train, export and archive the default models into an empty model store",
        description="Builds lenet.mar and alexnet.mar from scikit-learn's bundled digits (no downloads); "
        "skips archives that already exist unless --force.",
    )
    parser.add_argument("--model-store", default=_env("CNNSERVE_MODEL_STORE", "model_store"))
    parser.add_argument(
        "--work-dir", default=_env("CNNSERVE_BUILD_DIR", "var/build"), help="checkpoints/exports"
    )
    parser.add_argument("--force", action="store_true", help="rebuild archives that exist")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_run_bootstrap)


def _run_bootstrap(args: argparse.Namespace) -> int:
    from cnnserve_export.bootstrap import build_default_store

    built = build_default_store(args.model_store, args.work_dir, force=args.force)
    emit(
        args, {"built": [str(p) for p in built]}, "\n".join(f"wrote {p}" for p in built) or "nothing to build"
    )
    return EXIT_OK


def add_torchserve_arguments(parser: argparse.ArgumentParser) -> None:
    """TorchServe's listeners and files; each flag's default comes from its environment variable."""
    group = parser.add_argument_group("TorchServe")
    group.add_argument("--model-store", default=_env("CNNSERVE_MODEL_STORE", "model_store"))
    group.add_argument(
        "--state-dir", default=_env("CNNSERVE_STATE_DIR", "var"), help="config, keys, logs, pids"
    )
    group.add_argument(
        "--revisions-dir",
        default=os.environ.get("CNNSERVE_REVISIONS_DIR"),
        help="default: STATE_DIR/revisions",
    )
    group.add_argument(
        "--ts-host", default=_env("CNNSERVE_TS_HOST", "127.0.0.1"), help="TorchServe listen address"
    )
    for flag, env, default in (
        ("--inference-port", "CNNSERVE_TS_INFERENCE_PORT", 8080),
        ("--management-port", "CNNSERVE_TS_MANAGEMENT_PORT", 8081),
        ("--metrics-port", "CNNSERVE_TS_METRICS_PORT", 8082),
        ("--grpc-inference-port", "CNNSERVE_TS_GRPC_INFERENCE_PORT", 7070),
        ("--grpc-management-port", "CNNSERVE_TS_GRPC_MANAGEMENT_PORT", 7071),
    ):
        group.add_argument(flag, type=int, default=int(_env(env, str(default))), help=f"env {env}")
    group.add_argument(
        "--no-token-auth",
        dest="token_auth",
        action="store_false",
        default=_env("CNNSERVE_TS_TOKEN_AUTH", "true").lower() != "false",
        help="turn TorchServe's token authorization off (local development only)",
    )


def torchserve_settings(args: argparse.Namespace) -> Any:
    from cnnserve.torchserve import TorchServeSettings

    state_dir = Path(args.state_dir)
    return TorchServeSettings(
        model_store=Path(args.model_store),
        state_dir=state_dir / "torchserve",
        revisions_dir=Path(args.revisions_dir) if args.revisions_dir else state_dir / "revisions",
        host=args.ts_host,
        inference_port=args.inference_port,
        management_port=args.management_port,
        metrics_port=args.metrics_port,
        grpc_inference_port=args.grpc_inference_port,
        grpc_management_port=args.grpc_management_port,
        token_auth=args.token_auth,
    )


def _add_serve(subparsers: Any) -> None:
    from cnnserve.gateway.settings import add_arguments

    parser = subparsers.add_parser(
        "serve",
        help="start TorchServe and the gRPC gateway (building the default models when the store is empty)",
        description="Foreground by default: Ctrl-C or SIGTERM stops everything cleanly. With --detach, "
        "returns once every model has a READY worker and the gateway's health is SERVING (stop it with "
        "`cnnserve stop`). "
        "The gateway is wired to the TorchServe this starts (its --torchserve* flags are ignored here).",
    )
    add_torchserve_arguments(parser)
    add_arguments(parser)
    parser.add_argument("--detach", action="store_true", help="return once ready; stop with `cnnserve stop`")
    parser.add_argument("--no-gateway", dest="gateway", action="store_false", help="TorchServe only")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    parser.add_argument(
        "--no-build", dest="build", action="store_false", help="fail instead of building models"
    )
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_run_serve)


def _gateway_arguments(args: argparse.Namespace, settings: Any) -> list[str]:
    """``cnnserve gateway`` flags: the user's gateway settings, wired to the TorchServe we start."""
    from dataclasses import fields

    from cnnserve.gateway.settings import GatewaySettings, settings_from_args
    from cnnserve.stack import torchserve_wiring

    gateway = settings_from_args(args)
    wired = torchserve_wiring(settings)
    flags = []
    for field in fields(GatewaySettings):
        value = wired.get(field.name, getattr(gateway, field.name))
        flags += ["--" + field.name.replace("_", "-"), str(value)]
    return flags


def _run_serve(args: argparse.Namespace) -> int:
    from cnnserve.gateway.settings import parse_address
    from cnnserve.stack import GatewayProcess
    from cnnserve.torchserve import PID_FILE, TorchServe

    settings = torchserve_settings(args)
    if _alive(settings.state_dir / PID_FILE):
        raise FailedPreconditionError(
            f"already serving from {settings.state_dir} (run `cnnserve stop` first)"
        )
    store = settings.model_store
    if not list(store.glob("*.mar")):
        if not args.build:
            raise FailedPreconditionError(f"no model archives in {store} (run `cnnserve bootstrap`)")
        from cnnserve_export.bootstrap import build_default_store

        print(f"{store} is empty: building the default models (a few minutes, once)", file=sys.stderr)
        build_default_store(store, Path(args.state_dir) / "build")
    models = tuple(sorted(p.stem for p in store.glob("*.mar")))
    started = time.monotonic()
    torchserve = TorchServe(settings)
    gateway = None
    torchserve.start()
    try:
        torchserve.wait_ready(models, timeout=args.ready_timeout)
        if args.gateway:
            host, port = parse_address(args.gateway_listen)
            gateway = GatewayProcess(
                Path(args.state_dir), _gateway_arguments(args, settings), f"{host}:{port}"
            )
            gateway.start()
            gateway.wait_serving(timeout=args.ready_timeout)
    except BaseException:
        if gateway is not None:
            gateway.stop()
        torchserve.stop()
        raise
    keys = torchserve.keys()
    info = {
        "models": list(models),
        "ready_seconds": round(time.monotonic() - started, 2),
        "grpc_gateway": gateway.target if gateway else None,
        "http_inference": settings.url(settings.inference_port),
        "torchserve_grpc": settings.grpc_inference_target,
        "token_auth": settings.token_auth,
        "key_file": str(settings.key_file) if settings.token_auth else None,
        "logs": str(Path(args.state_dir)),
    }
    curl = f"curl -T digit.png {info['http_inference']}/predictions/lenet"
    if keys.inference:
        curl += f' -H "Authorization: Bearer $(jq -r .inference.key {info["key_file"]})"'
    lines = [f"serving {', '.join(models)} (ready in {info['ready_seconds']} s)"]
    if gateway:
        lines.append(f"  gRPC:  cnnserve classify digit.png --model lenet --target {gateway.target}")
        lines.append(
            f"         buf curl --protocol grpc --http2-prior-knowledge --list-methods http://{gateway.target}"
        )
    lines.append(f"  HTTP:  {curl}")
    lines.append("  stop:  Ctrl-C" + ("" if not args.detach else " / cnnserve stop"))
    emit(args, info, "\n".join(lines))
    sys.stdout.flush()
    if args.detach:
        torchserve.process = None  # keep both running after we exit
        return EXIT_OK
    return _wait_in_foreground(torchserve, gateway)


def _wait_in_foreground(torchserve: Any, gateway: Any) -> int:
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    processes = [p for p in (torchserve, gateway) if p is not None]
    try:
        while not stopping and all(p.process.poll() is None for p in processes):
            time.sleep(0.2)
    finally:
        died = [p for p in processes if p.process.poll() is not None]
        print("stopping ...", file=sys.stderr)
        if gateway is not None:
            gateway.stop()  # first: it turns NOT_SERVING and drains its calls
        torchserve.stop()
    if died and not stopping:
        raise FailedPreconditionError(f"{type(died[0]).__name__} exited on its own: {died[0].log_tail()}")
    return EXIT_OK


def _alive(pid_file: Path) -> bool:
    from cnnserve.processes import read_pid

    pid = read_pid(pid_file)
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _add_torchserve_config(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "torchserve-config",
        help="write TorchServe's config.properties and log4j2.xml for running it yourself (containers)",
        description="Writes STATE_DIR/torchserve/config.properties and log4j2.xml exactly as "
        "`cnnserve serve` would, then prints the torchserve command line to run with them.",
    )
    add_torchserve_arguments(parser)
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_run_torchserve_config)


def _run_torchserve_config(args: argparse.Namespace) -> int:
    from cnnserve.torchserve import TorchServe

    torchserve = TorchServe(torchserve_settings(args))
    config, log_config = torchserve.write_config()
    command = torchserve.command(config, log_config, required=False)
    emit(
        args,
        {"config": str(config), "log_config": str(log_config), "command": command},
        " ".join(command),
    )
    return EXIT_OK


def _add_stop(subparsers: Any) -> None:
    parser = subparsers.add_parser("stop", help="stop what `cnnserve serve --detach` started")
    parser.add_argument("--state-dir", default=_env("CNNSERVE_STATE_DIR", "var"))
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_run_stop)


def _run_stop(args: argparse.Namespace) -> int:
    from cnnserve.processes import read_pid, stop_process_group
    from cnnserve.stack import GATEWAY_PID_FILE
    from cnnserve.torchserve import PID_FILE

    state = Path(args.state_dir)
    stopped = []
    # The gateway first: it turns NOT_SERVING and drains its calls while TorchServe still answers them.
    for name, pid_file in (
        ("gateway", state / GATEWAY_PID_FILE),
        ("torchserve", state / "torchserve" / PID_FILE),
    ):
        if not pid_file.exists():
            continue
        pid = read_pid(pid_file)
        if pid and stop_process_group(pid):
            stopped.append(name)
        pid_file.unlink(missing_ok=True)
    emit(args, {"stopped": stopped}, f"stopped {', '.join(stopped)}" if stopped else "nothing was running")
    return EXIT_OK
