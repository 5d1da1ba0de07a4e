"""``cnnserve gateway --processes N``: N real processes on the same loopback ports (port 0 resolved once).

Two kinds of children: ``cnnserve gateway`` itself in front of a TorchServe that is not there (it answers
health and UNAVAILABLE, which is all a restart and the exit status need), and, where answers and a drain
matter, a gateway on the in-process LeNet backend, started by this module run as a script (``python -m
tests.test_gateway_processes child ...``) under the same supervisor. Which process answered is read from
the aggregated metrics (``cnnserve_gateway_process_rpcs_total{pid}``). Nothing waits on time: every wait is
for a state (a ready file, a metric, an exit), with a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from cnnserve.client import ClassifierClient
from cnnserve.deployment import Deployment
from cnnserve.errors import FailedPreconditionError, UnavailableError
from cnnserve.gateway.backend import Backend, Reply, Request
from cnnserve.gateway.processes import (
    MULTIPROC_ENV,
    SUPERVISOR_ENV,
    default_processes,
    plan_processes,
    read_ready_file,
    reserve_address,
)
from cnnserve.gateway.settings import GatewaySettings, add_arguments, settings_flags, settings_from_args
from cnnserve.gateway.types import ModelStatus
from cnnserve.processes import alive, free_ports
from cnnserve.torchserve import TorchServeSettings

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
DEADLINE = 120.0  # seconds any one state may take to arrive on two busy cores (children import torch)


# ---- the rule and the settings --------------------------------------------------------------------------


def test_the_default_is_one_process_per_four_cores_between_one_and_eight() -> None:
    assert [default_processes(c) for c in (1, 2, 3, 4, 7, 8, 16, 31, 32, 64, 128)] == [
        1, 1, 1, 1, 1, 2, 4, 7, 8, 8, 8,
    ]  # fmt: skip
    assert plan_processes(0, cores=16).processes == 4
    assert "16 cores" in plan_processes(0, cores=16).reason
    assert plan_processes(3, cores=2).processes == 3  # asked for: not capped
    assert plan_processes(0).processes >= 1  # this machine's quota


@pytest.mark.parametrize(("text", "expected"), [("auto", 0), ("AUTO", 0), ("0", 0), ("1", 1), ("6", 6)])
def test_processes_flag_and_environment(text: str, expected: int) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser, {})
    assert settings_from_args(parser.parse_args(["--processes", text])).processes == expected
    from_env = argparse.ArgumentParser()
    add_arguments(from_env, {"CNNSERVE_GATEWAY_PROCESSES": text})
    assert settings_from_args(from_env.parse_args([])).processes == expected


@pytest.mark.parametrize("text", ["-1", "two"])
def test_a_bad_process_count_is_refused(text: str) -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_arguments(parser, {})
    with pytest.raises(argparse.ArgumentError, match="processes"):
        parser.parse_args(["--processes", text])


def test_a_reserved_port_is_concrete_shared_with_reuseport_and_closed_to_others() -> None:
    address, held = reserve_address("127.0.0.1:0")
    with held:
        port = int(address.rpartition(":")[2])
        assert port > 0 and held.getsockname()[1] == port
        with socket.socket() as plain, pytest.raises(OSError):
            plain.bind(("127.0.0.1", port))  # only a SO_REUSEPORT socket (a child) may join
        with socket.socket() as child:
            child.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            child.bind(("127.0.0.1", port))
            child.listen()
            with pytest.raises(FailedPreconditionError, match="cannot listen"):
                reserve_address(address)  # a port something listens on is not free, reuseport or not


def test_a_deployment_passes_its_gateway_processes(tmp_path: Path) -> None:
    torchserve = TorchServeSettings.with_ports(
        tmp_path / "store", tmp_path / "torchserve", tmp_path / "revisions", [7001, 7002, 7003, 7004, 7005]
    )
    user = GatewaySettings(listen="127.0.0.1:50051", processes=1)
    deployment = Deployment(torchserve, user, tmp_path / "state", gateway_processes=3)
    unchanged = Deployment(torchserve, user, tmp_path / "state")
    assert deployment.gateway is not None and unchanged.gateway is not None
    assert (deployment.gateway.settings.processes, unchanged.gateway.settings.processes) == (3, 1)
    assert deployment.gateway_pids() == []  # nothing listens
    flags = settings_flags(deployment.gateway.settings)
    assert flags[flags.index("--processes") + 1] == "3"


# ---- helpers for the real processes --------------------------------------------------------------------


def wait_for(
    what: str, probe: Callable[[], T | None], process: subprocess.Popen[bytes] | None, log: Path
) -> T:
    """``probe()``'s first answer that is not None; fails when ``process`` (if any) exits first or time
    runs out."""
    deadline = time.monotonic() + DEADLINE
    while True:
        found = probe()
        if found is not None:
            return found
        if process is not None and process.poll() is not None:
            pytest.fail(f"the gateway exited with {process.returncode} before {what}:\n{log.read_text()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {DEADLINE:.0f} s:\n{log.read_text()}")
        time.sleep(0.05)


def scrape(metrics_listen: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The samples of a /metrics endpoint: {(name, sorted labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{metrics_listen}/metrics", timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def per_pid(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], method: str) -> dict[int, float]:
    return {
        int(dict(labels)["pid"]): value
        for (name, labels), value in samples.items()
        if name == "cnnserve_gateway_process_rpcs_total" and dict(labels).get("method") == method
    }


def rpcs(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], method: str, code: str) -> float:
    return samples.get(("cnnserve_gateway_rpcs_total", (("code", code), ("method", method))), 0.0)


def environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    return dict(entry.partition("=")[::2] for entry in entries if entry)


def parent_of(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])


class Started:
    """A gateway command running in its own process group, its output in ``log``."""

    def __init__(self, command: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> None:
        self.log = tmp_path / "gateway.log"
        self.ready_file = tmp_path / "ready.json"
        with open(self.log, "wb") as output:
            self.process = subprocess.Popen(
                command,
                cwd=ROOT,
                stdout=output,
                stderr=subprocess.STDOUT,
                env=env or {**os.environ, "PYTHONUNBUFFERED": "1"},
                start_new_session=True,
            )

    def ready(self) -> dict[str, Any]:
        return wait_for("its ready file", lambda: read_ready_file(self.ready_file), self.process, self.log)

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the gateway did not stop after SIGTERM:\n{self.log.read_text()}")

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


def listen_flags(tmp_path: Path) -> list[str]:
    return [
        "--listen", "127.0.0.1:0",
        "--http-listen", "127.0.0.1:0",
        "--metrics-listen", "127.0.0.1:0",
        "--ready-file", str(tmp_path / "ready.json"),
        "--health-interval", "0.5",
    ]  # fmt: skip


@pytest.fixture
def no_torchserve() -> list[str]:
    """``--torchserve*`` flags naming a loopback port nothing listens on."""
    port = free_ports(1)[0]
    return ["--torchserve", f"127.0.0.1:{port}", "--torchserve-management", f"127.0.0.1:{port}"]


@pytest.fixture
def started() -> Iterator[list[Started]]:
    running: list[Started] = []
    yield running
    for gateway in running:
        gateway.kill()


# ---- cnnserve gateway itself ---------------------------------------------------------------------------


def test_one_process_is_the_gateway_alone(
    tmp_path: Path, no_torchserve: list[str], started: list[Started]
) -> None:
    command = [sys.executable, "-m", "cnnserve.cli", "gateway", "--processes", "1", *listen_flags(tmp_path)]
    gateway = Started([*command, *no_torchserve], tmp_path)
    started.append(gateway)
    ready = gateway.ready()
    assert ready["pid"] == gateway.process.pid and ready["pids"] == [gateway.process.pid]
    assert not ready["listen"].endswith(":0") and not ready["metrics_listen"].endswith(":0")
    environ = Path(f"/proc/{gateway.process.pid}/environ").read_bytes()
    assert MULTIPROC_ENV.encode() not in environ and SUPERVISOR_ENV.encode() not in environ
    with ClassifierClient(ready["listen"], timeout=30) as client:
        assert client.health() == "NOT_SERVING"  # answered: TorchServe is not there
        with pytest.raises(UnavailableError):
            client.list_models()
    samples = scrape(ready["metrics_listen"])
    assert rpcs(samples, "ListModels", "UNAVAILABLE") == 1
    assert per_pid(samples, "ListModels") == {}  # a per-instance registry: no multiprocess files
    assert gateway.stop() == 0
    assert not gateway.ready_file.exists()


def test_a_killed_process_is_started_again_and_its_calls_still_count(
    tmp_path: Path, no_torchserve: list[str], started: list[Started]
) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "CNNSERVE_GATEWAY_PROCESSES": "2"}  # the variable's way
    command = [sys.executable, "-m", "cnnserve.cli", "gateway", *listen_flags(tmp_path), *no_torchserve]
    gateway = Started(command, tmp_path, env)
    started.append(gateway)
    ready = gateway.ready()
    supervisor = gateway.process.pid
    pids = ready["pids"]
    assert ready["pid"] == supervisor and len(set(pids)) == 2
    assert all(parent_of(pid) == supervisor for pid in pids)
    assert not ready["listen"].endswith(":0") and not ready["http_listen"].endswith(":0")
    metrics_dir = Path(environment(pids[0])[MULTIPROC_ENV])
    assert metrics_dir.is_dir() and environment(pids[1])[MULTIPROC_ENV] == str(metrics_dir)
    assert environment(pids[0])[SUPERVISOR_ENV] == str(supervisor)

    # Fresh channels until both processes have answered (the kernel picks one per connection).
    calls = 0
    while len(per_pid(scrape(ready["metrics_listen"]), "ListModels")) < 2:
        assert calls < 64, f"64 connections all went to one process: {scrape(ready['metrics_listen'])}"
        with ClassifierClient(ready["listen"], timeout=30) as client, pytest.raises(UnavailableError):
            client.list_models()
        calls += 1
    samples = scrape(ready["metrics_listen"])
    assert set(per_pid(samples, "ListModels")) == set(pids)
    assert sum(per_pid(samples, "ListModels").values()) == calls
    assert rpcs(samples, "ListModels", "UNAVAILABLE") == calls

    victim = pids[0]
    os.kill(victim, signal.SIGKILL)

    def replaced() -> dict[str, Any] | None:
        now = read_ready_file(gateway.ready_file)
        return now if now and victim not in now["pids"] and len(now["pids"]) == 2 else None

    again = wait_for("a new process in place of the killed one", replaced, gateway.process, gateway.log)
    assert pids[1] in again["pids"] and again["listen"] == ready["listen"]  # the same port 0 resolved
    assert not alive(victim)  # reaped by the supervisor
    assert "was killed by signal 9 (SIGKILL); starting it again" in gateway.log.read_text()
    samples = scrape(ready["metrics_listen"])
    assert rpcs(samples, "ListModels", "UNAVAILABLE") == calls  # the dead process's calls still count
    assert victim in per_pid(samples, "ListModels")
    with ClassifierClient(ready["listen"], timeout=30) as client:
        assert client.health() == "NOT_SERVING"
    assert gateway.stop() == 0
    assert not any(alive(pid) for pid in again["pids"])
    assert not gateway.ready_file.exists() and not metrics_dir.exists()


def test_the_processes_of_a_killed_supervisor_stop(
    tmp_path: Path, no_torchserve: list[str], started: list[Started]
) -> None:
    command = [sys.executable, "-m", "cnnserve.cli", "gateway", "--processes", "2", *listen_flags(tmp_path)]
    gateway = Started([*command, *no_torchserve], tmp_path)
    started.append(gateway)
    pids = gateway.ready()["pids"]
    gateway.process.send_signal(signal.SIGKILL)  # the supervisor alone, not its process group
    gateway.process.wait()

    def gone() -> bool | None:
        return True if not any(alive(pid) for pid in pids) else None

    wait_for("the orphaned processes to stop", gone, None, gateway.log)
    assert gateway.log.read_text().count("the gateway supervisor (pid") == 2


def test_processes_that_keep_dying_at_start_make_the_gateway_exit_1(
    tmp_path: Path, no_torchserve: list[str], started: list[Started]
) -> None:
    missing = str(tmp_path / "missing.pem")  # every child fails reading it, before it listens
    command = [sys.executable, "-m", "cnnserve.cli", "gateway", "--processes", "2", *listen_flags(tmp_path)]
    gateway = Started([*command, *no_torchserve, "--tls-cert", missing, "--tls-key", missing], tmp_path)
    started.append(gateway)
    returncode = gateway.process.wait(timeout=DEADLINE)
    output = gateway.log.read_text()
    assert returncode == 1, output
    assert "before it listened, 5 times in a row" in output
    assert not gateway.ready_file.exists()


# ---- children on the in-process backend: answers and a drain -------------------------------------------


class HoldingBackend:
    """The in-process backend, but a classify call that arrives while ``hold`` exists says so (a file
    ``arrived-<pid>``) and waits until this gateway's ready file is gone: until it has begun shutting down.
    So that call is in flight, by construction, while its process drains."""

    def __init__(self, inner: Backend, hold: Path, ready_file: Path) -> None:
        self.inner, self.hold, self.ready_file = inner, hold, ready_file

    async def call(self, model: str, version: str, request: Request[Reply], timeout: float | None) -> Reply:
        if request.op == "classify" and self.hold.exists():
            (self.hold.parent / f"arrived-{os.getpid()}").touch()
            deadline = time.monotonic() + DEADLINE
            while self.ready_file.exists():
                if time.monotonic() > deadline:
                    raise UnavailableError("the test's held call was never released")
                await asyncio.sleep(0.02)
        return await self.inner.call(model, version, request, timeout)

    async def models(self) -> list[ModelStatus]:
        return await self.inner.models()

    async def close(self) -> None:
        await self.inner.close()


def _script_main(argv: list[str]) -> int:
    """``supervise|child --export DIR --hold FILE GATEWAY-FLAGS``: the supervisor, whose children are
    ``child``: a gateway on the in-process LeNet."""
    import logging

    from cnnserve.gateway.processes import supervise
    from cnnserve.gateway.server import serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s: %(message)s")
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["supervise", "child"])
    parser.add_argument("--export", required=True)
    parser.add_argument("--hold", required=True)
    add_arguments(parser)
    args = parser.parse_args(argv)
    settings = settings_from_args(args)
    if args.mode == "supervise":
        script = [sys.executable, "-m", "tests.test_gateway_processes", "child"]
        own = ["--export", args.export, "--hold", args.hold]
        asyncio.run(
            supervise(settings, settings.processes, lambda child: [*script, *own, *settings_flags(child)])
        )
        return 0
    from cnnserve.gateway.inprocess import InProcessBackend
    from cnnserve.serving.service import ModelService, ServiceConfig

    inner = InProcessBackend({"lenet": ModelService(args.export, ServiceConfig())})
    backend = HoldingBackend(inner, Path(args.hold), Path(settings.ready_file))
    asyncio.run(serve(settings, backend=backend))
    return 0


def test_two_processes_answer_from_both_count_every_call_and_drain_on_sigterm(
    lenet_export: Any, digits: Any, tmp_path: Path, started: list[Started]
) -> None:
    from tests.helpers import png_bytes

    hold = tmp_path / "hold"
    command = [
        sys.executable, "-m", "tests.test_gateway_processes", "supervise",
        "--export", str(lenet_export.out), "--hold", str(hold),
        "--processes", "2", "--grace-period", "60", *listen_flags(tmp_path),
    ]  # fmt: skip
    gateway = Started(command, tmp_path)
    started.append(gateway)
    ready = gateway.ready()
    pids = ready["pids"]
    assert len(set(pids)) == 2 and all(parent_of(pid) == gateway.process.pid for pid in pids)
    image = png_bytes(digits.test_images[0][0].numpy())
    with ClassifierClient(ready["listen"], timeout=60) as client:
        expected = client.classify("lenet", [image]).predictions[0][0]
    calls = 1
    while len(per_pid(scrape(ready["metrics_listen"]), "Classify")) < 2:
        assert calls < 64, "64 connections all went to one process"
        with ClassifierClient(ready["listen"], timeout=60) as client:
            top = client.classify("lenet", [image]).predictions[0][0]
        assert top.index == expected.index and top.probability == pytest.approx(
            expected.probability, abs=1e-5
        )
        calls += 1
    samples = scrape(ready["metrics_listen"])
    assert set(per_pid(samples, "Classify")) == set(pids)
    assert sum(per_pid(samples, "Classify").values()) == calls
    assert rpcs(samples, "Classify", "OK") == calls  # aggregated over both processes
    batches = samples[("cnnserve_gateway_batch_inputs_count", (("model", "lenet"),))]
    assert batches == calls  # one lone call per batch, each process's batcher counted

    # A call held inside one process, then SIGTERM: it still gets its answer, and everything exits 0.
    hold.touch()
    answer: list[Any] = []

    def held_call() -> None:
        with ClassifierClient(ready["listen"], timeout=DEADLINE) as client:
            answer.append(client.classify("lenet", [image]))

    caller = threading.Thread(target=held_call)
    caller.start()
    wait_for("the held call", lambda: next(tmp_path.glob("arrived-*"), None), gateway.process, gateway.log)
    assert gateway.stop() == 0
    caller.join(DEADLINE)
    assert answer and answer[0].predictions[0][0].index == expected.index
    assert not any(alive(pid) for pid in pids)
    assert not gateway.ready_file.exists()


if __name__ == "__main__":
    sys.exit(_script_main(sys.argv[1:]))
