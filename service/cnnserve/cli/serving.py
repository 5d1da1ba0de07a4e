"""Serving commands: ``archive``, ``bootstrap``, ``serve``, ``stop``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cnnserve.cli._output import EXIT_OK, emit
from cnnserve.errors import FailedPreconditionError

if TYPE_CHECKING:
    from cnnserve.deployment import Deployment
    from cnnserve.torchserve import TorchServeSettings

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
    parser.add_argument(
        "--precision",
        choices=["fp32", "int8"],
        default=defaults.precision,
        help="int8: serve the export's int8 graph (cnnserve export --precision fp32,int8; ONNX only)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="intra-op threads per worker (default: the worker's CPU quota over the workers; LeNet 1)",
    )
    parser.add_argument("--retention", type=int, help="fine-tuned revisions kept besides the base")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_run_archive)


def _run_archive(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cnnserve.card import load_card
    from cnnserve_export.archive import build_archive
    from cnnserve_export.config import default_settings

    settings = default_settings(load_card(args.export_dir).architecture)
    overrides: dict[str, Any] = {"format": args.format, "device": args.device, "precision": args.precision}
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


def torchserve_settings(args: argparse.Namespace) -> TorchServeSettings:
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
        description="Starts TorchServe, waits until every model has a READY worker, starts the gateway, "
        "waits until its health is SERVING, then supervises both: a process that dies is reported (exit code "
        "or signal, where its logs are) and started again, up to --max-restarts times in a row with a "
        "back-off of 1, 2, 4 ... 30 s, while the other keeps running; when the restarts are spent "
        "everything stops and serve exits 1. Foreground by default: Ctrl-C or SIGTERM stops everything "
        "cleanly. --detach runs the same supervisor in the background (its output in STATE_DIR/serve.log) "
        "and returns once it is ready; `cnnserve stop` stops it. "
        "The gateway is wired to the TorchServe this starts (its --torchserve* flags are ignored here); "
        "with --processes N it runs N gateway processes on its ports (docs/deployment.md), and serve waits "
        "until every one of them listens.",
    )
    add_torchserve_arguments(parser)
    add_arguments(parser)
    parser.add_argument(
        "--tls-ca",
        default=_env("CNNSERVE_GATEWAY_TLS_CA", ""),
        help="CA bundle serve's own checks of the gateway trust (env CNNSERVE_GATEWAY_TLS_CA; default: "
        "--tls-cert itself, right for a self-signed certificate)",
    )
    parser.add_argument("--detach", action="store_true", help="return once ready; stop with `cnnserve stop`")
    parser.add_argument("--no-gateway", dest="gateway", action="store_false", help="TorchServe only")
    parser.add_argument("--ready-timeout", type=float, default=300.0, help="seconds to wait for readiness")
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=int(_env("CNNSERVE_SERVE_MAX_RESTARTS", "5")),
        help="restarts in a row of a process that died, before serve gives up and stops everything "
        "(env CNNSERVE_SERVE_MAX_RESTARTS; default 5; the count starts again after 10 minutes up)",
    )
    parser.add_argument(
        "--no-restart",
        dest="restart",
        action="store_false",
        default=_env("CNNSERVE_SERVE_RESTART", "true").lower() != "false",
        help="stop everything when a process dies (env CNNSERVE_SERVE_RESTART=false; "
        "the same as --max-restarts 0)",
    )
    parser.add_argument(
        "--no-build", dest="build", action="store_false", help="fail instead of building models"
    )
    parser.add_argument("--json", action="store_true")
    # The detached supervisor's side of --detach: the pipe it reports readiness on.
    parser.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    parser.set_defaults(func=_run_serve)


def _serving_now(state: Path, settings: TorchServeSettings) -> list[str]:
    """What of a deployment in ``state`` still runs: "supervisor", "gateway", "torchserve"."""
    from cnnserve.deployment import GATEWAY_PID_FILE, SERVE_PID_FILE
    from cnnserve.processes import alive, read_pid
    from cnnserve.torchserve import PID_FILE

    pid_files = {
        "supervisor": state / SERVE_PID_FILE,
        "gateway": state / GATEWAY_PID_FILE,
        "torchserve": settings.state_dir / PID_FILE,
    }
    return [name for name, pid_file in pid_files.items() if alive(read_pid(pid_file))]


def _run_serve(args: argparse.Namespace) -> int:
    from cnnserve.deployment import Deployment
    from cnnserve.errors import InvalidInputError
    from cnnserve.gateway.settings import settings_from_args

    settings = torchserve_settings(args)
    state = Path(args.state_dir)
    running = _serving_now(state, settings)
    if running:
        raise FailedPreconditionError(
            f"already serving from {state} ({', '.join(running)} running: run `cnnserve stop` first)"
        )
    if args.max_restarts < 0:
        raise InvalidInputError.for_field("max_restarts", "must be 0 or more")
    # Settings and the gateway's certificate are checked before anything starts.
    gateway = settings_from_args(args) if args.gateway else None
    deployment = Deployment(settings, gateway, state, tls_ca=args.tls_ca or None)
    store = settings.model_store
    if not list(store.glob("*.mar")):
        if not args.build:
            raise FailedPreconditionError(f"no model archives in {store} (run `cnnserve bootstrap`)")
        from cnnserve_export.bootstrap import build_default_store

        print(f"{store} is empty: building the default models (a few minutes, once)", file=sys.stderr)
        build_default_store(store, state / "build")
    if args.detach:
        return _detach(args, state)
    return _supervise(args, deployment)


def _supervise(args: argparse.Namespace, deployment: Deployment) -> int:
    """Start the deployment, report it ready, and keep it running until a signal or the restarts run out."""
    import json
    import threading

    from cnnserve.deployment import SERVE_PID_FILE, RestartPolicy

    stop = threading.Event()

    def request_stop(signum: int, _frame: object) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, request_stop)
    policy = RestartPolicy(max_restarts=args.max_restarts if args.restart else 0)
    supervisor = deployment.supervisor(policy, args.ready_timeout, stop)
    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    pid_file = state / SERVE_PID_FILE
    pid_file.write_text(f"{os.getpid()}\n")
    try:
        started = time.monotonic()
        if not supervisor.start():
            print("cnnserve serve: stopped before it was ready", file=sys.stderr)
            return EXIT_OK
        info = _serve_info(args, deployment, time.monotonic() - started, policy.max_restarts)
        if args.ready_fd is not None:  # detached: tell `serve --detach`, which prints it
            print(_serve_text(info, detached=True))
            os.write(args.ready_fd, json.dumps(info).encode() + b"\n")
            os.close(args.ready_fd)
        else:
            emit(args, info, _serve_text(info, detached=False))
        sys.stdout.flush()
        supervisor.run()
        print("cnnserve serve: stopped", file=sys.stderr)
        return EXIT_OK
    finally:
        from cnnserve.processes import read_pid

        if read_pid(pid_file) == os.getpid():
            pid_file.unlink(missing_ok=True)


def _serve_info(
    args: argparse.Namespace, deployment: Deployment, seconds: float, restarts: int
) -> dict[str, Any]:
    from cnnserve.deployment import SERVE_LOG

    state = Path(args.state_dir)
    settings = deployment.torchserve.settings
    gateway = deployment.gateway
    return {
        "models": list(deployment.models),
        "ready_seconds": round(seconds, 2),
        "grpc_gateway": deployment.gateway_target,
        "gateway_tls_ca": gateway.client["tls_ca"] if gateway else None,
        "gateway_token_required": bool(gateway and gateway.settings.token),
        "gateway_pids": deployment.gateway_pids(),  # one, or the --processes N children
        "http_inference": deployment.http_url,
        "torchserve_grpc": deployment.grpc_target,
        "token_auth": settings.token_auth,
        "key_file": str(settings.key_file) if settings.token_auth else None,
        "logs": str(state),
        "supervisor_pid": os.getpid(),
        "supervisor_log": str(state / SERVE_LOG) if args.ready_fd is not None else None,
        "max_restarts": restarts,
    }


def _serve_text(info: dict[str, Any], detached: bool) -> str:
    curl = f"curl -T digit.png {info['http_inference']}/predictions/lenet"
    if info["token_auth"]:
        curl += f' -H "Authorization: Bearer $(jq -r .inference.key {info["key_file"]})"'
    lines = [f"serving {', '.join(info['models'])} (ready in {info['ready_seconds']} s)"]
    target = info["grpc_gateway"]
    if target:
        client = f"--target {target}"
        buf = "buf curl --protocol grpc"
        if info["gateway_tls_ca"]:
            client += f" --tls-ca {info['gateway_tls_ca']}"
            buf += f" --cacert {info['gateway_tls_ca']}"
            url = f"https://{target}"
        else:
            buf += " --http2-prior-knowledge"
            url = f"http://{target}"
        if info["gateway_token_required"]:
            client += ' --token "$CNNSERVE_GATEWAY_TOKEN"'
            buf += ' -H "authorization: Bearer $CNNSERVE_GATEWAY_TOKEN"'
        lines.append(f"  gRPC:  cnnserve classify digit.png --model lenet {client}")
        lines.append(f"         {buf} --list-methods {url}")
        pids = info["gateway_pids"]
        if len(pids) > 1:
            lines.append(
                f"         {len(pids)} gateway processes on one port (pids {', '.join(map(str, pids))})"
            )
    lines.append(f"  HTTP:  {curl}")
    restarts = info["max_restarts"]
    watch = f"restarted up to {restarts} times in a row" if restarts else "not restarted (--no-restart)"
    lines.append(f"  crashes: {watch}; pid {info['supervisor_pid']}")
    if info["supervisor_log"]:
        lines.append(f"  log:   {info['supervisor_log']}")
    lines.append("  stop:  " + ("cnnserve stop" if detached else "Ctrl-C / cnnserve stop"))
    return "\n".join(lines)


def _supervisor_flags(args: argparse.Namespace) -> list[str]:
    """``cnnserve serve`` flags for the detached supervisor: what this command was given (the gateway token
    goes in the environment, where ``ps`` does not show it)."""
    from dataclasses import fields

    from cnnserve.gateway.settings import GatewaySettings

    flags = ["--model-store", args.model_store, "--state-dir", args.state_dir, "--ts-host", args.ts_host]
    if args.revisions_dir:
        flags += ["--revisions-dir", args.revisions_dir]
    for name in (
        "inference_port",
        "management_port",
        "metrics_port",
        "grpc_inference_port",
        "grpc_management_port",
    ):
        flags += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if not args.token_auth:
        flags.append("--no-token-auth")
    for field in fields(GatewaySettings):
        if field.name != "token":
            flags += ["--" + field.name.replace("_", "-"), str(getattr(args, f"gateway_{field.name}"))]
    if args.tls_ca:
        flags += ["--tls-ca", args.tls_ca]
    if not args.gateway:
        flags.append("--no-gateway")
    flags += ["--ready-timeout", str(args.ready_timeout), "--no-build"]
    flags += ["--max-restarts", str(args.max_restarts)] if args.restart else ["--no-restart"]
    return flags


def _detach(args: argparse.Namespace, state: Path) -> int:
    """Start the supervisor in its own session and return what it reports once ready."""
    import json
    import select
    import subprocess

    from cnnserve.deployment import SERVE_LOG
    from cnnserve.errors import UnavailableError
    from cnnserve.processes import describe_exit

    state.mkdir(parents=True, exist_ok=True)
    log_path = state / SERVE_LOG
    offset = log_path.stat().st_size if log_path.exists() else 0
    read_end, write_end = os.pipe()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CNNSERVE_GATEWAY_TOKEN": args.gateway_token}
    command = [sys.executable, "-m", "cnnserve.cli", "serve", *_supervisor_flags(args)]
    with open(log_path, "ab") as output:
        child = subprocess.Popen(
            [*command, "--ready-fd", str(write_end)],
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            pass_fds=(write_end,),
            env=env,
            start_new_session=True,  # no terminal: it outlives this command and the shell that ran it
        )
    os.close(write_end)
    report = b""
    # TorchServe and the gateway each get --ready-timeout; the supervisor fails on its own before this.
    deadline = time.monotonic() + 2 * args.ready_timeout + 60
    try:
        while time.monotonic() < deadline:
            readable, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not readable:
                break
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            report += chunk
    except KeyboardInterrupt:  # Ctrl-C while it starts: stop it (it stops what it started) and say so
        child.terminate()
        child.wait()
        raise
    finally:
        os.close(read_end)
    if report.endswith(b"\n"):
        info = json.loads(report)
        emit(args, info, _serve_text(info, detached=True))
        return EXIT_OK
    try:
        returncode = child.wait(timeout=60)
    except subprocess.TimeoutExpired:
        child.terminate()  # it stops what it started
        returncode = child.wait(timeout=120)
    said = _last_error(log_path, offset)
    raise UnavailableError(
        f"{said or 'the detached supervisor ' + describe_exit(returncode) + ' before it was ready'} "
        f"(log: {log_path})"
    )


def _last_error(log_path: Path, offset: int) -> str:
    """The supervisor's error (``cnnserve: error: ...`` and any lines it goes on with) in its log after
    ``offset``."""
    with open(log_path, "rb") as stream:
        stream.seek(offset)
        text = stream.read().decode(errors="replace")
    _, found, error = text.rpartition("cnnserve: error: ")
    return error.strip() if found else ""


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
    parser = subparsers.add_parser(
        "stop",
        help="stop what `cnnserve serve` started (its supervisor, the gateway, TorchServe)",
        description="Sends SIGTERM to the supervisor in STATE_DIR/serve.pid, which stops the gateway (it "
        "drains its calls) and then TorchServe; whatever still runs after --timeout seconds, or without a "
        "supervisor, is stopped from its pid file directly.",
    )
    parser.add_argument("--state-dir", default=_env("CNNSERVE_STATE_DIR", "var"))
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds the supervisor gets")
    parser.add_argument("--json", action="store_true")
    parser.set_defaults(func=_run_stop)


def _run_stop(args: argparse.Namespace) -> int:
    from cnnserve.deployment import GATEWAY_PID_FILE, SERVE_PID_FILE
    from cnnserve.processes import alive, read_pid, stop_process_group, wait_gone
    from cnnserve.torchserve import PID_FILE

    state = Path(args.state_dir)
    # The gateway first: it turns NOT_SERVING and drains its calls while TorchServe still answers them.
    pid_files = {"gateway": state / GATEWAY_PID_FILE, "torchserve": state / "torchserve" / PID_FILE}
    running = {name for name, pid_file in pid_files.items() if alive(read_pid(pid_file))}
    supervisor = read_pid(state / SERVE_PID_FILE)
    supervised = alive(supervisor)
    if supervisor is not None and supervised:
        os.kill(supervisor, signal.SIGTERM)
        if not wait_gone(supervisor, args.timeout):
            os.kill(supervisor, signal.SIGKILL)  # then what it left running is stopped below
    (state / SERVE_PID_FILE).unlink(missing_ok=True)
    stopped = []
    for name, pid_file in pid_files.items():
        pid = read_pid(pid_file)
        if (pid and stop_process_group(pid)) or name in running:
            stopped.append(name)
        pid_file.unlink(missing_ok=True)
    text = f"stopped {', '.join(stopped)}" if stopped else "nothing was running"
    if supervised:
        text += " (and their supervisor)" if stopped else " (but a supervisor, now stopped)"
    emit(args, {"stopped": stopped, "supervisor": supervised}, text)
    return EXIT_OK
