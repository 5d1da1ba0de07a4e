"""The docker-compose deployment: valid for the Compose Specification and docker-compose, within our rules.

Offline and without a Docker engine: ``check-jsonschema`` (the vendored compose-spec schema) and
``docker-compose config -q`` validate every file combination; the rest reads the YAML. Booting the stack for
real is ``make compose-smoke`` (service/docker/compose-smoke.sh), not a test: it needs a Docker engine.
docker-compose missing is a failure, never a skip: CI installs it (.ci/install-system-packages).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "service" / "docker"
BASE = ROOT / "docker-compose.yml"
OVERRIDES = sorted(DOCKER.glob("compose.*.yml"))
COMBINATIONS = [[BASE]] + [[BASE, override] for override in OVERRIDES]
DOCKERFILES = sorted(DOCKER.rglob("Dockerfile*"))
MANAGEMENT_PORTS = {8081, 7071}
# Services that run once and exit (others wait for them with service_completed_successfully).
ONE_SHOT = {"builder"}


def load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), path
    return data


def services(path: Path) -> dict[str, dict[str, Any]]:
    return load(path).get("services") or {}


def published(service: dict[str, Any]) -> list[tuple[str, int | None, int]]:
    """(host ip, host port, container port) of each published port, short or long syntax."""
    result: list[tuple[str, int | None, int]] = []
    for port in service.get("ports", []):
        if isinstance(port, dict):
            host_port = port.get("published")
            result.append(
                (port.get("host_ip", ""), int(host_port) if host_port else None, int(port["target"]))
            )
            continue
        parts = str(port).split("/")[0].split(":")
        ip = parts[0] if len(parts) == 3 else ""
        host = parts[-2] if len(parts) >= 2 else None
        result.append((ip, int(host) if host else None, int(parts[-1])))
    return result


def compose_env() -> dict[str, str]:
    """The environment without our overrides, so the files validate with their own defaults."""
    return {k: v for k, v in os.environ.items() if not k.startswith(("CNNSERVE_", "COMPOSE_"))}


def file_args(files: list[Path]) -> list[str]:
    return [arg for path in files for arg in ("-f", str(path))]


# ---- the validators ---------------------------------------------------------------------------------------


def test_files_match_the_compose_specification() -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    assert checker.exists(), f"{checker} is missing: run make setup (dev extra)"
    result = subprocess.run(
        [str(checker), "--builtin-schema", "vendor.compose-spec", str(BASE), *map(str, OVERRIDES)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("files", COMBINATIONS, ids=lambda files: "+".join(p.name for p in files))
def test_docker_compose_accepts_the_files(files: list[Path]) -> None:
    binary = shutil.which("docker-compose")
    assert binary is not None, (
        "docker-compose is not installed: `apt-get install docker-compose` (Debian 12: 1.29, validates "
        "offline, no Docker engine needed); CI gets it from .ci/install-system-packages"
    )
    result = subprocess.run(
        [binary, "--project-directory", str(ROOT), *file_args(files), "config", "-q"],
        capture_output=True,
        text=True,
        env=compose_env(),
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr


# ---- our rules --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [BASE, *OVERRIDES], ids=lambda p: p.name)
def test_published_ports_are_on_loopback_and_never_management(path: Path) -> None:
    for name, service in services(path).items():
        for ip, _, container in published(service):
            assert ip == "127.0.0.1", (
                f"{path.name}: {name} publishes {container} on {ip or 'every interface'}"
            )
            assert container not in MANAGEMENT_PORTS, f"{path.name}: {name} publishes management port"


def test_only_the_gateway_and_torchserve_inference_are_published() -> None:
    ports = {name: {c for _, _, c in published(s)} for name, s in services(BASE).items()}
    # the gateway: gRPC (cnnserve.v1 and OIP), OIP REST, metrics
    assert ports == {"builder": set(), "torchserve": {8080}, "gateway": {50051, 8000, 9464}}


def test_long_running_services_have_healthcheck_restart_and_grace() -> None:
    for name, service in services(BASE).items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            continue
        test = (service.get("healthcheck") or {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        assert service.get("restart") in ("always", "unless-stopped", "on-failure"), name
        assert service.get("stop_grace_period"), name


def test_gateway_healthcheck_is_the_grpc_probe_and_grace_outlasts_its_own() -> None:
    gateway = services(BASE)["gateway"]
    assert gateway["healthcheck"]["test"][1:4] == ["python", "-m", "cnnserve.gateway.probe"]
    grace = float(gateway["environment"]["CNNSERVE_GATEWAY_GRACE_SECONDS"])
    stop = re.fullmatch(r"(\d+)s", gateway["stop_grace_period"])
    assert stop, gateway["stop_grace_period"]
    assert float(stop.group(1)) > grace, "docker must not SIGKILL the gateway before its grace period ends"


def test_start_order_builder_then_torchserve_then_gateway() -> None:
    defined = services(BASE)
    assert defined["torchserve"]["depends_on"] == {"builder": {"condition": "service_completed_successfully"}}
    assert defined["gateway"]["depends_on"] == {"torchserve": {"condition": "service_healthy"}}


@pytest.mark.parametrize("path", [BASE, *OVERRIDES, *DOCKERFILES], ids=lambda p: p.name)
def test_no_latest_tags(path: Path) -> None:
    assert not re.search(r":latest\b", path.read_text()), path


def _pinned(reference: str) -> bool:
    name = reference.rsplit("/", 1)[-1]
    return "@sha256:" in reference or (":" in name and not name.endswith(":latest"))


def test_images_and_base_images_are_pinned() -> None:
    for path in [BASE, *OVERRIDES]:
        for name, service in services(path).items():
            if "image" in service:
                image = re.sub(r"\$\{[A-Z_]+:-([^}]+)\}", r"\1", service["image"])
                assert _pinned(image), f"{path.name}: {name} image {service['image']}"
            args = (service.get("build") or {}).get("args") or {}
            for arg, value in args.items():
                if arg.endswith("_IMAGE"):
                    default = re.fullmatch(r"\$\{[A-Z_]+:-([^}]+)\}", str(value))
                    assert default, f"{path.name}: {name} {arg} should be ${{CNNSERVE_...:-default}}"
                    assert _pinned(default.group(1)), f"{path.name}: {name} {arg}={value}"
    for path in DOCKERFILES:
        text = path.read_text()
        for default in re.findall(r"^ARG \w+_IMAGE=(\S+)", text, re.MULTILINE):
            assert _pinned(default), f"{path}: {default}"
        for base in re.findall(r"^FROM (\S+)", text, re.MULTILINE):
            assert base.startswith("${"), f"{path}: FROM {base} is not a build argument"


def test_no_top_level_name() -> None:
    for path in [BASE, *OVERRIDES]:
        assert "name" not in load(path), f"{path.name}: docker-compose 1.29 rejects a top-level name"


def test_gpu_override_reserves_nvidia_gpus_with_the_gpu_image() -> None:
    torchserve = services(DOCKER / "compose.gpu.yml")["torchserve"]
    devices = torchserve["deploy"]["resources"]["reservations"]["devices"]
    assert devices and all(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    args = torchserve["build"]["args"]
    assert args["TORCHSERVE_BASE_IMAGE"].endswith("pytorch/torchserve:0.12.0-gpu}")
    assert "onnxruntime-gpu" in (DOCKER / "requirements" / args["WORKER_REQUIREMENTS"]).read_text()


def test_gpu_worker_requirements_never_install_both_onnxruntimes() -> None:
    """onnxruntime and onnxruntime-gpu install the same module: a GPU image or extra has only the GPU one."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = [dep.partition("==")[0] for dep in extras["worker-gpu"]]
    assert "onnxruntime-gpu" in names and "onnxruntime" not in names
    assert [d for d in extras["worker-gpu"] if d.startswith("torch")] == [
        d for d in extras["worker"] if d.startswith("torch")
    ]
    for path in (DOCKER / "requirements").glob("*gpu*.txt"):
        requirements = [line.split("==")[0].strip() for line in path.read_text().splitlines() if "==" in line]
        assert "onnxruntime" not in requirements, path.name


def test_local_bases_gpu_uses_the_python_311_gpu_stand_in() -> None:
    """--local-bases --gpu: the GPU base image is the local Python 3.11 stand-in (whose wheels the wheelhouse
    has), not Docker Hub's Python 3.9 image; the wheelhouse fetches the GPU lists for CPython 3.11."""
    compose = (DOCKER / "compose.sh").read_text()
    assert "export CNNSERVE_TORCHSERVE_GPU_BASE_IMAGE=$LOCAL_TORCHSERVE_GPU_IMAGE" in compose
    common = (DOCKER / "common.sh").read_text()
    assert "LOCAL_TORCHSERVE_GPU_IMAGE=cnnserve-local/torchserve:0.12.0-gpu" in common
    wheelhouse = (DOCKER / "wheelhouse.sh").read_text()
    assert "--python-version 3.11 --abi cp311" in wheelhouse
    assert "lists+=(torchserve-base-gpu worker-gpu)" in wheelhouse
    for name in ("torchserve-base-gpu", "worker-gpu"):
        assert (DOCKER / "requirements" / f"{name}.txt").exists()
    base = (DOCKER / "local" / "Dockerfile.torchserve-base").read_text()
    assert "ARG BASE_REQUIREMENTS=torchserve-base.txt" in base and "${BASE_REQUIREMENTS}" in base


def test_docker_compose_gpu_override_with_local_bases_resolves_to_the_local_gpu_image() -> None:
    binary = shutil.which("docker-compose")
    assert binary is not None, "docker-compose is not installed (see test_docker_compose_accepts_the_files)"
    env = {**compose_env(), "CNNSERVE_TORCHSERVE_GPU_BASE_IMAGE": "cnnserve-local/torchserve:0.12.0-gpu"}
    result = subprocess.run(
        [binary, "--project-directory", str(ROOT), *file_args([BASE, DOCKER / "compose.gpu.yml"]), "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    torchserve = yaml.safe_load(result.stdout)["services"]["torchserve"]
    assert torchserve["build"]["args"]["TORCHSERVE_BASE_IMAGE"] == "cnnserve-local/torchserve:0.12.0-gpu"
    assert torchserve["build"]["args"]["WORKER_REQUIREMENTS"] == "worker-gpu.txt"
    assert torchserve["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"


def test_host_network_override_listens_on_loopback_only() -> None:
    for name, service in services(DOCKER / "compose.host-network.yml").items():
        if name in ONE_SHOT:
            assert service["environment"]["CNNSERVE_TS_HOST"] == "127.0.0.1"
            continue
        assert service["network_mode"] == "host", name
        for key, value in (service.get("environment") or {}).items():
            if re.fullmatch(r"[\d.]+:\d+", str(value)):
                assert str(value).startswith("127.0.0.1:"), f"{name}: {key}={value}"


def test_gateway_image_has_no_torch() -> None:
    lines = (DOCKER / "requirements" / "gateway.txt").read_text().lower().splitlines()
    assert not any(line.startswith("torch") for line in lines)
    assert 'import torch"' in (DOCKER / "Dockerfile.gateway").read_text(), "the build no longer checks"
    gateway_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert not any(dep.startswith("torch") for dep in gateway_extra["gateway"])


def _pyproject_pins() -> dict[str, str]:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {}
    for dependency in (d for group in extras.values() for d in group):
        name, _, version = dependency.partition("==")
        if version:
            pins[name.lower().replace("_", "-")] = version
    return pins


@pytest.mark.parametrize("path", sorted((DOCKER / "requirements").glob("*.txt")), ids=lambda p: p.name)
def test_image_pins_match_pyproject(path: Path) -> None:
    """Images pin what pyproject.toml pins (for Python 3.11); torch is the CPU build on purpose, except in the
    GPU stand-in (torchserve-base-gpu.txt), which needs pyproject.toml's CUDA build."""
    pins = _pyproject_pins()
    for line in path.read_text().splitlines():
        requirement, _, marker = line.split("#")[0].partition(";")
        if not requirement.strip() or ("<" in marker and "3.11" in marker):
            continue
        name, _, version = requirement.strip().partition("==")
        assert version, f"{path.name}: {line} is not pinned"
        name = name.lower().replace("_", "-")
        if name == "torch":
            assert version == (pins["torch"] if "gpu" in path.name else "2.13.0+cpu"), line
        elif name in pins:
            assert version == pins[name], f"{path.name}: {name}=={version}, pyproject.toml {pins[name]}"


@pytest.mark.parametrize("script", sorted(DOCKER.rglob("*.sh")), ids=lambda p: p.name)
def test_scripts_parse(script: Path) -> None:
    shell = "sh" if script.read_text().startswith("#!/bin/sh") else "bash"
    result = subprocess.run([shell, "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    if script.name != "common.sh":  # sourced, not run
        assert os.access(script, os.X_OK), f"{script} is not executable"
