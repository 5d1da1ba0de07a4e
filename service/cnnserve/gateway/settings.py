"""The gateway's settings: one typed object, built in ``main()`` from flags whose defaults come from env.

Each setting is declared once in :data:`OPTIONS` (flag, environment variable, default, meaning); the
argument parser, the settings object and the README's configuration table all come from it.
"""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from cnnserve.errors import InvalidInputError

__all__ = [
    "GatewaySettings",
    "OPTIONS",
    "AUTO_PROCESSES",
    "add_arguments",
    "settings_from_args",
    "settings_flags",
    "parse_address",
    "parse_processes",
]

AUTO_PROCESSES = 0  # --processes auto: chosen from the CPU quota at start (gateway/processes.py)


@dataclass(frozen=True)
class GatewaySettings:
    listen: str = "127.0.0.1:50051"
    metrics_listen: str = "127.0.0.1:9464"  # "off" disables the Prometheus endpoint
    http_listen: str = "127.0.0.1:8000"  # the OIP (KServe v2) REST API; "off" disables it
    torchserve: str = "127.0.0.1:7070"
    torchserve_management: str = "127.0.0.1:7071"
    torchserve_key_file: str = "var/torchserve/key_file.json"
    token: str = ""  # clients must send "authorization: Bearer <token>" (empty: no auth)
    tls_cert: str = ""
    tls_key: str = ""
    grace_period: float = 10.0
    max_message_mb: int = 32
    max_concurrent_rpcs: int = 256
    max_inputs: int = 64
    max_batch: int = 32
    max_in_flight: int = 2
    keepalive_time: float = 30.0
    keepalive_timeout: float = 10.0
    health_interval: float = 2.0
    backend_try_timeout: float = 10.0  # 0: no bound but the caller's deadline
    processes: int = AUTO_PROCESSES  # gateway processes on the same ports (1: one process, no supervisor)
    ready_file: str = ""  # written (JSON: pids, addresses) once every gateway process listens; "": none


# name -> (environment variable, meaning)
OPTIONS: dict[str, tuple[str, str]] = {
    "listen": ("CNNSERVE_GATEWAY_LISTEN", "gRPC address to listen on (port 0: any free port)"),
    "metrics_listen": ("CNNSERVE_GATEWAY_METRICS_LISTEN", "Prometheus /metrics address, or 'off'"),
    "http_listen": (
        "CNNSERVE_GATEWAY_HTTP_LISTEN",
        "Open Inference Protocol (KServe v2) REST address (port 0: any free port), or 'off'",
    ),
    "torchserve": ("CNNSERVE_TORCHSERVE_GRPC", "TorchServe's gRPC inference API"),
    "torchserve_management": (
        "CNNSERVE_TORCHSERVE_MANAGEMENT_GRPC",
        "TorchServe's gRPC management API (read-only use)",
    ),
    "torchserve_key_file": (
        "CNNSERVE_TORCHSERVE_KEY_FILE",
        "TorchServe's key_file.json (tokens); missing: no token",
    ),
    "token": ("CNNSERVE_GATEWAY_TOKEN", "bearer token clients must send; empty: no authentication"),
    "tls_cert": ("CNNSERVE_GATEWAY_TLS_CERT", "PEM certificate chain; with --tls-key, serve TLS"),
    "tls_key": ("CNNSERVE_GATEWAY_TLS_KEY", "PEM private key for --tls-cert"),
    "grace_period": ("CNNSERVE_GATEWAY_GRACE_SECONDS", "seconds in-flight calls get to finish on SIGTERM"),
    "max_message_mb": ("CNNSERVE_GATEWAY_MAX_MESSAGE_MB", "largest request accepted, MiB"),
    "max_concurrent_rpcs": (
        "CNNSERVE_GATEWAY_MAX_CONCURRENT_RPCS",
        "calls in progress before new ones are shed",
    ),
    "max_inputs": ("CNNSERVE_GATEWAY_MAX_INPUTS", "inputs per Classify/FineTuneStep request"),
    "max_batch": ("CNNSERVE_GATEWAY_MAX_BATCH", "single-input calls coalesced into one TorchServe request"),
    "max_in_flight": ("CNNSERVE_GATEWAY_MAX_IN_FLIGHT", "micro-batches per model at TorchServe at once"),
    "keepalive_time": ("CNNSERVE_GATEWAY_KEEPALIVE_SECONDS", "HTTP/2 keepalive ping interval"),
    "keepalive_timeout": (
        "CNNSERVE_GATEWAY_KEEPALIVE_TIMEOUT_SECONDS",
        "how long a keepalive ping may go unanswered",
    ),
    "health_interval": ("CNNSERVE_GATEWAY_HEALTH_SECONDS", "how often model health is read from TorchServe"),
    "backend_try_timeout": (
        "CNNSERVE_GATEWAY_BACKEND_TRY_SECONDS",
        "longest a Classify waits for one TorchServe answer before retrying once; 0: the caller's deadline",
    ),
    "processes": (
        "CNNSERVE_GATEWAY_PROCESSES",
        "gateway processes sharing the listen ports (SO_REUSEPORT), each with its own micro-batcher; "
        "0 or 'auto': from the CPU quota",
    ),
    "ready_file": (
        "CNNSERVE_GATEWAY_READY_FILE",
        "file written (JSON: pids, addresses) once every gateway process listens, removed at exit; "
        "empty: none",
    ),
}


def parse_processes(text: str) -> int:
    """``--processes``: a count, or ``auto`` (the same as 0: chosen from the CPU quota at start)."""
    if text.strip().lower() == "auto":
        return AUTO_PROCESSES
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of processes or 'auto'") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give 1 or more processes, or 0/'auto'")
    return value


# Flags whose text is not just the default's type applied to it.
_PARSERS: dict[str, Any] = {"processes": parse_processes}


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InvalidInputError.for_field("address", f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def add_arguments(parser: argparse.ArgumentParser, environ: Mapping[str, str] | None = None) -> None:
    """One flag per setting; its default is the environment variable's value, else the built-in one."""
    environ = os.environ if environ is None else environ
    defaults = GatewaySettings()
    group = parser.add_argument_group("gateway")
    for field in fields(GatewaySettings):
        env, meaning = OPTIONS[field.name]
        default = getattr(defaults, field.name)
        kind = _PARSERS.get(field.name, type(default))
        group.add_argument(
            "--" + field.name.replace("_", "-"),
            dest=f"gateway_{field.name}",
            metavar=field.name.upper(),
            type=kind,
            default=kind(environ[env]) if env in environ else default,
            help=f"{meaning} (env {env}; default {default!r})",
        )


def settings_from_args(args: argparse.Namespace) -> GatewaySettings:
    values: dict[str, Any] = {f.name: getattr(args, f"gateway_{f.name}") for f in fields(GatewaySettings)}
    settings = GatewaySettings(**values)
    parse_address(settings.listen)
    for listen in (settings.metrics_listen, settings.http_listen):
        if listen != "off":
            parse_address(listen)
    if bool(settings.tls_cert) != bool(settings.tls_key):
        raise InvalidInputError.for_field("tls", "give both --tls-cert and --tls-key, or neither")
    for name in ("max_message_mb", "max_concurrent_rpcs", "max_inputs", "max_batch", "max_in_flight"):
        if getattr(settings, name) < 1:
            raise InvalidInputError.for_field(name, "must be at least 1")
    if not (math.isfinite(settings.backend_try_timeout) and settings.backend_try_timeout >= 0):
        raise InvalidInputError.for_field("backend_try_timeout", "must be a number of seconds >= 0")
    if settings.processes < 0:
        raise InvalidInputError.for_field("processes", "must be 1 or more, or 0 (auto)")
    return settings


def settings_flags(settings: GatewaySettings) -> list[str]:
    """``cnnserve gateway`` flags for ``settings``, but the token: it travels in the environment
    (``CNNSERVE_GATEWAY_TOKEN``), where ``ps`` does not show it."""
    flags = []
    for field in fields(GatewaySettings):
        if field.name != "token":
            flags += ["--" + field.name.replace("_", "-"), str(getattr(settings, field.name))]
    return flags
