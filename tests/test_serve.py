"""The deployment (``cnnserve.deployment``), ``cnnserve serve`` and ``cnnserve stop``: the gateway wired to
its TorchServe, the supervisor, its clients of the gateway (TLS, token), and recovery from a dead TorchServe
or gateway.

The first tests need no TorchServe (the wiring, the supervisor over stand-in processes, the client wiring,
refusals); the rest start a real deployment, most by running ``cnnserve serve`` as a user does, on free
ports with their own state directory, and most on a LeNet-only store to keep TorchServe's start-ups short.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cnnserve.client import ClassifierClient
from cnnserve.deployment import (
    Deployment,
    RestartPolicy,
    Supervisor,
    gateway_client,
    gateway_flags,
    served_models,
    wire_gateway,
)
from cnnserve.errors import (
    CnnserveError,
    FailedPreconditionError,
    InvalidInputError,
    UnauthenticatedError,
    UnavailableError,
)
from cnnserve.gateway.settings import GatewaySettings
from cnnserve.processes import alive, describe_exit, free_ports, read_pid, tail
from cnnserve.torchserve import TorchServeSettings
from cnnserve_export.data import ImageData
from cnnserve_export.export import ExportResult
from tests.helpers import cnnserve, make_certificate, png_bytes


def digit_png(digits: ImageData, index: int = 0) -> bytes:
    return png_bytes(digits.test_images[index, 0].numpy())


# ---- without TorchServe ---------------------------------------------------------------------------------


def test_describe_exit_names_the_signal() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9) == "was killed by signal 9 (SIGKILL)"
    assert describe_exit(-15) == "was killed by signal 15 (SIGTERM)"


def test_tail_gives_whole_lines_only(tmp_path: Path) -> None:
    log = tmp_path / "ts_log.log"
    log.write_text("".join(f"2026-12-01 MODEL_LOG - line {i} " + "x" * 200 + "\n" for i in range(2000)))
    last = tail(log, 3).splitlines()
    assert len(last) == 3 and all(line.startswith("2026-12-01 MODEL_LOG - line 19") for line in last)
    assert tail(log, 10**6).splitlines()[0].startswith("2026-12-01 MODEL_LOG")  # never half a line
    size = log.stat().st_size
    with open(log, "a") as stream:
        stream.write("after the start\n")
    assert tail(log, 5, since=size) == "after the start"
    assert tail(tmp_path / "missing.log") == ""


def test_gateway_client_follows_tls_token_and_the_certificate_names(tmp_path: Path) -> None:
    both, key = make_certificate(tmp_path, "IP:127.0.0.1,DNS:localhost", "both")
    by_name, _ = make_certificate(tmp_path, "DNS:localhost", "by-name")
    elsewhere, _ = make_certificate(tmp_path, "DNS:gateway.example.com", "elsewhere")

    assert gateway_client(GatewaySettings(listen="0.0.0.0:50051")) == {
        "target": "127.0.0.1:50051",
        "token": None,
        "tls_ca": None,
    }
    tls = GatewaySettings(listen="0.0.0.0:50051", tls_cert=str(both), tls_key=str(key), token="t0k")
    assert gateway_client(tls) == {"target": "127.0.0.1:50051", "token": "t0k", "tls_ca": str(both)}
    assert gateway_client(tls, tls_ca="/etc/ca.pem")["tls_ca"] == "/etc/ca.pem"
    # gRPC verifies the name it dials: a certificate for localhost only is dialled as localhost.
    named = GatewaySettings(listen="127.0.0.1:7000", tls_cert=str(by_name), tls_key=str(key))
    assert gateway_client(named)["target"] == "localhost:7000"
    assert gateway_client(named, target="127.0.0.1:7001")["target"] == "localhost:7001"
    # A CA given without the gateway's certificate at hand (a client elsewhere): TLS, the target as given.
    assert gateway_client(GatewaySettings(), tls_ca="/etc/ca.pem", target="[::1]:9")["target"] == "[::1]:9"
    with pytest.raises(
        FailedPreconditionError, match=r"gateway\.example\.com.*subjectAltName for 127\.0\.0\.1"
    ):
        gateway_client(GatewaySettings(listen="0.0.0.0:1", tls_cert=str(elsewhere), tls_key=str(key)))


def torchserve_on(tmp_path: Path, store: Path | None = None, **overrides: object) -> TorchServeSettings:
    """TorchServe settings on made-up ports 7001-7005 (nothing here starts it)."""
    store = store or tmp_path / "store"
    return TorchServeSettings.with_ports(
        store, tmp_path / "torchserve", tmp_path / "revisions", [7001, 7002, 7003, 7004, 7005], **overrides
    )


@pytest.mark.parametrize("token_auth", [True, False])
def test_a_deployment_wires_its_gateway_to_its_torchserve_and_keeps_the_rest(
    tmp_path: Path, token_auth: bool
) -> None:
    torchserve = torchserve_on(tmp_path, token_auth=token_auth)
    user = GatewaySettings(
        listen="0.0.0.0:50051",
        metrics_listen="off",
        torchserve="elsewhere:1",  # what a user's environment may say: the deployment's TorchServe wins
        torchserve_management="elsewhere:2",
        torchserve_key_file="/nowhere/key_file.json",
        token="s3cret",
        max_batch=7,
    )
    deployment = Deployment(torchserve, user, tmp_path / "state")
    assert deployment.gateway is not None
    wired = deployment.gateway.settings
    key_file = str((tmp_path / "torchserve" / "key_file.json").resolve()) if token_auth else ""
    assert wired == wire_gateway(user, torchserve)
    assert (wired.torchserve, wired.torchserve_management, wired.torchserve_key_file) == (
        "127.0.0.1:7004",
        "127.0.0.1:7005",
        key_file,
    )
    assert (wired.listen, wired.metrics_listen, wired.token, wired.max_batch) == (
        "0.0.0.0:50051",
        "off",
        "s3cret",
        7,
    )
    # The gateway process gets these as flags, but the token: it travels in the environment.
    flags = gateway_flags(wired)
    assert flags[flags.index("--torchserve") + 1] == "127.0.0.1:7004"
    assert flags[flags.index("--max-batch") + 1] == "7"
    assert "--token" not in flags and "s3cret" not in flags
    assert deployment.gateway_client == {"target": "127.0.0.1:50051", "token": "s3cret", "tls_ca": None}
    assert deployment.gateway_target == "127.0.0.1:50051"
    assert (deployment.grpc_target, deployment.http_url) == ("127.0.0.1:7004", "http://127.0.0.1:7001")
    assert [child.name for child in deployment.children] == ["TorchServe", "the gateway"]
    assert deployment.pids() == {}  # nothing started
    deployment.stop()  # stopping what never started does nothing
    assert not (tmp_path / "state").exists()


def test_a_deployment_without_a_gateway_is_torchserve_alone(tmp_path: Path) -> None:
    deployment = Deployment(torchserve_on(tmp_path), None, tmp_path / "state")
    assert deployment.gateway is None and deployment.gateway_client is None
    assert deployment.gateway_target is None
    assert [child.name for child in deployment.children] == ["TorchServe"]


def test_a_deployment_refuses_a_gateway_on_port_0(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="fixed port") as caught:
        Deployment(torchserve_on(tmp_path), GatewaySettings(listen="127.0.0.1:0"), tmp_path / "state")
    assert caught.value.violations[0].field == "listen"


def test_a_deployment_waits_for_the_models_its_torchserve_loads(tmp_path: Path) -> None:
    store = tmp_path / "store"
    store.mkdir()
    for name in ("lenet", "alexnet", "lenet-batched"):
        (store / f"{name}.mar").write_bytes(b"")
    (store / "notes.txt").write_text("not an archive")
    everything = torchserve_on(tmp_path, store)
    assert served_models(everything) == ("alexnet", "lenet", "lenet-batched")
    assert served_models(torchserve_on(tmp_path, store, models=("lenet",))) == ("lenet",)
    deployment = Deployment(everything, None, tmp_path / "state")
    assert deployment.models == ("alexnet", "lenet", "lenet-batched")
    (store / "mnist.mar").write_bytes(b"")  # read at each start, as TorchServe reads its store
    assert list(deployment.models) == ["alexnet", "lenet", "lenet-batched", "mnist"]
    assert Deployment(everything, None, tmp_path / "state", models=["lenet"]).models == ("lenet",)


def test_the_benchmark_runs_a_deployment_with_its_gateway_args(tmp_path: Path) -> None:
    from cnnserve.bench.servers import Artifacts, ServerStack

    artifacts = Artifacts({}, bench_store=tmp_path / "bench_store")
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "old-revision").write_text("from the last run")
    stack = ServerStack(artifacts, tmp_path / "state", ["--max-in-flight=4", "--torchserve=elsewhere:1"])
    assert not (tmp_path / "state").exists()  # every run starts from the trained base
    deployment = stack.deployment
    assert deployment.gateway is not None
    wired = deployment.gateway.settings
    assert wired.max_in_flight == 4 and wired.torchserve == stack.grpc_target  # wired, whatever was given
    assert stack.gateway_target == wired.listen and stack.gateway_client["target"] == wired.listen
    assert stack.metrics_url == f"http://{wired.metrics_listen}/metrics"
    assert stack.models == ("lenet", "lenet-batched", "alexnet", "alexnet-batched")
    with pytest.raises(InvalidInputError, match="not a `cnnserve gateway` flag: --warp-drive"):
        ServerStack(artifacts, tmp_path / "state", ["--warp-drive"])


def test_restart_policy_backs_off_up_to_a_cap() -> None:
    policy = RestartPolicy()
    assert [policy.delay(n) for n in range(1, 8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


class SleepChild:
    """A stand-in for TorchServe or the gateway: ``sleep`` in its own session, ready at once."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        self.process = subprocess.Popen(["sleep", "300"], start_new_session=True)
        self.starts += 1

    def wait_ready(self, timeout: float, stop: threading.Event) -> bool:
        return True

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def where_logs(self) -> str:
        return f"logs in /var/log/{self.name}"

    def last_lines(self) -> str:
        return ""


def wait_for(condition: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.parametrize("max_restarts", [0, 2])
def test_supervisor_restarts_the_dead_child_alone_then_gives_up(
    max_restarts: int, caplog: pytest.LogCaptureFixture
) -> None:
    backend, front = SleepChild("backend"), SleepChild("front")
    policy = RestartPolicy(max_restarts=max_restarts, first_delay=0.01, max_delay=0.02)
    supervisor = Supervisor([backend, front], policy, ready_timeout=5, poll_interval=0.01)
    assert supervisor.start()
    assert front.process is not None
    front_pid = front.process.pid
    failure: list[BaseException] = []

    def run() -> None:
        try:
            supervisor.run()
        except BaseException as error:
            failure.append(error)

    watcher = threading.Thread(target=run)
    watcher.start()
    try:
        for restart in range(1, max_restarts + 1):
            assert backend.process is not None
            backend.process.send_signal(signal.SIGKILL)
            wait_for(lambda starts=restart + 1: backend.starts == starts and backend.process is not None)
            assert front.process is not None and front.process.pid == front_pid  # untouched
        assert backend.process is not None
        backend.process.send_signal(signal.SIGKILL)
        watcher.join(timeout=20)
        assert not watcher.is_alive()
    finally:
        supervisor.stopping.set()
        watcher.join(timeout=20)
    assert len(failure) == 1 and isinstance(failure[0], UnavailableError)
    message = str(failure[0])
    assert message.startswith("backend was killed by signal 9 (SIGKILL); ")
    assert message.endswith("; logs in /var/log/backend")
    if max_restarts == 0:
        assert "; restarts are off (--no-restart); " in message
    else:
        assert f"; gave up after {max_restarts} restarts in a row; " in message
    assert backend.process is None and front.process is None  # everything stopped
    assert "backend was killed by signal 9 (SIGKILL); logs in /var/log/backend" in caplog.text


def test_supervisor_stops_everything_when_asked() -> None:
    children = [SleepChild("backend"), SleepChild("front")]
    supervisor = Supervisor(children, RestartPolicy(), ready_timeout=5, poll_interval=0.01)
    assert supervisor.start()
    supervisor.stopping.set()
    supervisor.run()
    assert all(child.process is None and child.starts == 1 for child in children)


def test_serve_refuses_a_certificate_it_cannot_verify_before_starting_anything(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path, "DNS:gateway.example.com")
    state = tmp_path / "state"
    result = cnnserve(
        "serve", "--model-store", str(tmp_path / "empty"), "--state-dir", str(state), "--no-build",
        "--tls-cert", str(cert), "--tls-key", str(key), "--detach",
    )  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "is for gateway.example.com" in result.stderr and "subjectAltName for 127.0.0.1" in result.stderr
    assert not (state / "serve.pid").exists() and not (state / "torchserve").exists()


def test_stop_without_a_supervisor_stops_from_the_pid_files(tmp_path: Path) -> None:
    """A stack whose supervisor is gone (killed, or an older cnnserve's --detach): stop still ends both."""
    (tmp_path / "torchserve").mkdir()
    started = {}
    for name, pid_file in (("gateway", "gateway.pid"), ("torchserve", "torchserve/torchserve.pid")):
        started[name] = subprocess.Popen(["sleep", "300"], start_new_session=True)
        (tmp_path / pid_file).write_text(f"{started[name].pid}\n")
    result = cnnserve("stop", "--state-dir", str(tmp_path), "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"stopped": ["gateway", "torchserve"], "supervisor": False}
    assert all(process.wait(timeout=10) == -signal.SIGTERM for process in started.values())
    assert (
        not (tmp_path / "gateway.pid").exists() and not (tmp_path / "torchserve" / "torchserve.pid").exists()
    )


def test_stop_with_nothing_running(tmp_path: Path) -> None:
    result = cnnserve("stop", "--state-dir", str(tmp_path), "--json")
    assert result.returncode == 0 and json.loads(result.stdout) == {"stopped": [], "supervisor": False}


# ---- cnnserve serve for real ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lenet_store(tmp_path_factory: pytest.TempPathFactory, lenet_export: ExportResult) -> Path:
    """LeNet alone, archived with the defaults (`cnnserve archive`): TorchServe is ready in ~10-20 s."""
    from cnnserve_export.archive import build_archive
    from cnnserve_export.config import default_settings

    store = tmp_path_factory.mktemp("lenet_store")
    build_archive(lenet_export.out, store, default_settings("lenet"))
    return store


def serve_flags(model_store: Path, state: Path, *extra: str) -> tuple[list[str], str]:
    """``cnnserve serve`` flags on free ports (and the gateway's address)."""
    ports = [str(port) for port in free_ports(8)]
    target = f"127.0.0.1:{ports[5]}"
    flags = [
        "--model-store", str(model_store),
        "--state-dir", str(state),
        "--inference-port", ports[0],
        "--management-port", ports[1],
        "--metrics-port", ports[2],
        "--grpc-inference-port", ports[3],
        "--grpc-management-port", ports[4],
        "--listen", target,
        "--metrics-listen", f"127.0.0.1:{ports[6]}",
        "--http-listen", f"127.0.0.1:{ports[7]}",
        "--no-build",
        *extra,
    ]  # fmt: skip
    return flags, target


@pytest.fixture
def stopped_afterwards(tmp_path: Path) -> Iterator[Path]:
    """A state directory whose stack is stopped after the test, whatever happened."""
    state = tmp_path / "state"
    yield state
    cnnserve("stop", "--state-dir", str(state))


def java_frontend(state: Path) -> int:
    """The pid of TorchServe's Java frontend under ``cnnserve serve``."""
    import psutil  # type: ignore[import-untyped]

    wrapper = read_pid(state / "torchserve" / "torchserve.pid")
    assert wrapper is not None
    (java,) = [p for p in psutil.Process(wrapper).children() if p.name() == "java"]
    return int(java.pid)


def classify_within(client: ClassifierClient, image: bytes, deadline: float) -> float:
    """Seconds until a Classify succeeds (retrying what a restart answers), failing at ``deadline``."""
    started = time.monotonic()
    while True:
        try:
            client.classify("lenet", [image], timeout=5)
            return time.monotonic() - started
        except CnnserveError as error:
            if time.monotonic() > deadline:
                raise AssertionError(f"no Classify by the deadline: {error}") from error
            time.sleep(0.1)


@pytest.mark.torchserve
@pytest.mark.slow
def test_a_deployment_starts_both_answers_through_the_gateway_and_stops_both(
    lenet_store: Path, tmp_path: Path, digits: ImageData
) -> None:
    """What the benchmark runs (and serve supervises): started once, both processes up, then both gone."""
    ports = free_ports(6)
    torchserve = TorchServeSettings.with_ports(
        lenet_store, tmp_path / "torchserve", tmp_path / "revisions", ports[:5]
    )
    gateway = GatewaySettings(
        listen=f"127.0.0.1:{ports[5]}", metrics_listen="off", http_listen="off", token="t0k"
    )
    state = tmp_path / "state"
    with Deployment(torchserve, gateway, state) as deployment:
        assert deployment.start(ready_timeout=300)
        pids = deployment.pids()
        assert set(pids) == {"torchserve", "gateway"} and all(alive(pid) for pid in pids.values())
        assert read_pid(state / "gateway.pid") == pids["gateway"]
        assert read_pid(tmp_path / "torchserve" / "torchserve.pid") == pids["torchserve"]
        assert deployment.gateway_client is not None
        with ClassifierClient(**deployment.gateway_client, timeout=60) as client:
            assert client.classify("lenet", [digit_png(digits)]).model == "lenet"
    assert deployment.pids() == {}
    assert not any(alive(pid) for pid in pids.values())
    assert not (state / "gateway.pid").exists() and not (tmp_path / "torchserve" / "torchserve.pid").exists()


@pytest.mark.torchserve
@pytest.mark.slow
def test_serve_detach_refuses_a_second_start_and_stop_ends_both(
    model_store: Path, stopped_afterwards: Path, digits: ImageData
) -> None:
    """`cnnserve serve --detach` as a user runs it (its own TorchServe and gateway), then `cnnserve stop`."""
    state = stopped_afterwards
    flags, target = serve_flags(model_store, state, "--detach", "--json")
    grpc_inference = flags[flags.index("--grpc-inference-port") + 1]
    served = cnnserve("serve", *flags)
    try:
        assert served.returncode == 0, served.stderr[-3000:]
        info = json.loads(served.stdout)
        assert info["models"] == ["alexnet", "lenet"] and info["grpc_gateway"] == target
        assert info["key_file"] == str(state / "torchserve" / "key_file.json")
        assert info["torchserve_grpc"] == f"127.0.0.1:{grpc_inference}"
        supervisor = info["supervisor_pid"]
        assert read_pid(state / "serve.pid") == supervisor and alive(supervisor)
        with ClassifierClient(target, timeout=60) as served_client:
            result = served_client.classify("lenet", [digit_png(digits)])
        assert result.predictions[0][0].label in [str(i) for i in range(10)]
        again = cnnserve("serve", *flags)
        assert again.returncode != 0 and "already serving" in again.stderr
    finally:
        stopped = cnnserve("stop", "--state-dir", str(state), "--json")
    assert stopped.returncode == 0, stopped.stderr
    assert json.loads(stopped.stdout) == {"stopped": ["gateway", "torchserve"], "supervisor": True}
    assert not (state / "gateway.pid").exists() and not (state / "torchserve" / "torchserve.pid").exists()
    assert not (state / "serve.pid").exists() and not alive(supervisor)
    assert "cnnserve serve: stopped" in (state / "serve.log").read_text()


@pytest.mark.torchserve
@pytest.mark.slow
def test_serve_detach_with_tls_and_a_token(
    lenet_store: Path, stopped_afterwards: Path, tmp_path: Path, digits: ImageData
) -> None:
    """The README's TLS: serve's own readiness check, the probe and clients all speak TLS to it."""
    state = stopped_afterwards
    cert, key = make_certificate(tmp_path, "IP:127.0.0.1,DNS:localhost")
    token = "t0ken-for-the-test"
    flags, target = serve_flags(lenet_store, state, "--tls-cert", str(cert), "--tls-key", str(key))
    served = cnnserve(
        "serve", *flags, "--detach", "--json", env={**os.environ, "CNNSERVE_GATEWAY_TOKEN": token}
    )
    assert served.returncode == 0, served.stderr[-3000:]
    info = json.loads(served.stdout)
    assert info["grpc_gateway"] == target and info["gateway_tls_ca"] == str(cert)
    assert info["gateway_token_required"] is True
    assert token not in served.stdout
    supervisor = info["supervisor_pid"]
    with ClassifierClient(target, tls_ca=str(cert), token=token, timeout=60) as client:
        assert client.classify("lenet", [digit_png(digits)]).model == "lenet"
    # serve's own readiness checks spoke TLS: no failed handshakes in the gateway's log (the bug it had).
    assert "WRONG_VERSION_NUMBER" not in (state / "gateway.log").read_text()
    with ClassifierClient(target, tls_ca=str(cert), timeout=10) as tokenless:
        assert tokenless.health() == "SERVING"  # health checks are open
        with pytest.raises(UnauthenticatedError):
            tokenless.classify("lenet", [digit_png(digits)])
    with ClassifierClient(target, timeout=3) as plaintext, pytest.raises(UnavailableError):
        plaintext.classify("lenet", [digit_png(digits)])
    # The token never reaches a command line, where `ps` would show it.
    import psutil

    for process in (psutil.Process(supervisor), psutil.Process(read_pid(state / "gateway.pid"))):
        assert token not in " ".join(process.cmdline())
    # The container probe follows the gateway's own settings from its environment.
    port = target.rsplit(":", 1)[1]
    gateway_env = {
        **os.environ,
        "CNNSERVE_GATEWAY_LISTEN": f"0.0.0.0:{port}",
        "CNNSERVE_GATEWAY_TLS_CERT": str(cert),
        "CNNSERVE_GATEWAY_TLS_KEY": str(key),
        "CNNSERVE_GATEWAY_TOKEN": token,
    }
    command = [sys.executable, "-m", "cnnserve.gateway.probe", "--service", "cnnserve.v1.Classifier/lenet"]
    probed = subprocess.run(command, capture_output=True, text=True, timeout=60, env=gateway_env)
    assert probed.returncode == 0 and probed.stdout.strip() == "SERVING", probed.stderr
    stopped = cnnserve("stop", "--state-dir", str(state), "--json")
    assert json.loads(stopped.stdout) == {"stopped": ["gateway", "torchserve"], "supervisor": True}
    assert not alive(supervisor)


@pytest.mark.torchserve
@pytest.mark.slow
def test_serve_brings_torchserve_and_the_gateway_back_after_kill_9(
    lenet_store: Path, stopped_afterwards: Path, digits: ImageData
) -> None:
    """kill -9 of TorchServe's Java frontend, then of the gateway: serve says how each died, restarts it, and
    Classify through the same address works again without anyone touching the rest."""
    state = stopped_afterwards
    flags, target = serve_flags(lenet_store, state, "--detach", "--json")
    served = cnnserve("serve", *flags)
    assert served.returncode == 0, served.stderr[-3000:]
    supervisor = json.loads(served.stdout)["supervisor_pid"]
    gateway = read_pid(state / "gateway.pid")
    old_key = json.loads((state / "torchserve" / "key_file.json").read_text())["inference"]["key"]
    image = digit_png(digits)
    with ClassifierClient(target, timeout=30) as client:
        client.classify("lenet", [image])
        os.kill(java_frontend(state), signal.SIGKILL)
        recovery = classify_within(client, image, time.monotonic() + 180)
        print(f"\nClassify again {recovery:.1f} s after kill -9 of TorchServe's Java frontend")
        log = (state / "serve.log").read_text()
        assert f"TorchServe was killed by signal 9 (SIGKILL); logs in {state / 'torchserve' / 'logs'}" in log
        # The gateway may answer a moment before the supervisor's own readiness poll sees TorchServe back.
        wait_for(lambda: "TorchServe is back (restart 1 of 5" in (state / "serve.log").read_text(), 30)
        new_key = json.loads((state / "torchserve" / "key_file.json").read_text())["inference"]["key"]
        assert new_key != old_key  # the gateway re-read TorchServe's new token by itself
        assert read_pid(state / "gateway.pid") == gateway and alive(gateway)  # the gateway kept running

        assert gateway is not None
        os.kill(gateway, signal.SIGKILL)
        recovery = classify_within(client, image, time.monotonic() + 60)
        print(f"Classify again {recovery:.1f} s after kill -9 of the gateway")
        log = (state / "serve.log").read_text()
        assert f"the gateway was killed by signal 9 (SIGKILL); log in {state / 'gateway.log'}" in log
        wait_for(lambda: "the gateway is back (restart 1 of 5" in (state / "serve.log").read_text(), 30)
        assert read_pid(state / "gateway.pid") != gateway
    assert alive(supervisor) and read_pid(state / "serve.pid") == supervisor
    stopped = cnnserve("stop", "--state-dir", str(state), "--json")
    assert json.loads(stopped.stdout) == {"stopped": ["gateway", "torchserve"], "supervisor": True}


@pytest.mark.torchserve
@pytest.mark.slow
def test_serve_without_restarts_stops_everything_and_says_why(
    lenet_store: Path, stopped_afterwards: Path
) -> None:
    """Foreground `cnnserve serve --no-restart`: TorchServe killed, all stopped, exit 1 and one true line."""
    state = stopped_afterwards
    flags, target = serve_flags(lenet_store, state, "--no-restart")
    command = [sys.executable, "-m", "cnnserve.cli", "serve", *flags]
    serve = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert serve.stdout is not None
        first = serve.stdout.readline()  # printed once ready
        assert first.startswith("serving lenet"), first
        gateway = read_pid(state / "gateway.pid")
        os.kill(java_frontend(state), signal.SIGKILL)
        _, stderr = serve.communicate(timeout=120)
    finally:
        if serve.poll() is None:
            serve.terminate()
            serve.communicate(timeout=120)
    assert serve.returncode == 1, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("cnnserve: error:")]
    logs = state / "torchserve" / "logs"
    assert errors == [
        f"cnnserve: error: TorchServe was killed by signal 9 (SIGKILL); restarts are off (--no-restart); "
        f"logs in {logs}"
    ], stderr
    assert not alive(gateway) and not (state / "gateway.pid").exists() and not (state / "serve.pid").exists()
    with ClassifierClient(target, timeout=3) as client, pytest.raises(UnavailableError):
        client.health()


@pytest.mark.torchserve
@pytest.mark.slow
def test_serve_detach_says_why_the_stack_did_not_become_ready(
    lenet_store: Path, stopped_afterwards: Path
) -> None:
    """The detached supervisor fails before it is ready: `serve --detach` says why, and nothing is left."""
    state = stopped_afterwards
    flags, _ = serve_flags(lenet_store, state, "--detach", "--ready-timeout", "1")
    served = cnnserve("serve", *flags)
    assert served.returncode == 1 and "Traceback" not in served.stderr
    assert served.stderr.startswith("cnnserve: error: TorchServe: no READY worker for lenet in 1 s; logs in ")
    assert f"(log: {state / 'serve.log'})" in served.stderr
    assert not (state / "serve.pid").exists() and not (state / "torchserve" / "torchserve.pid").exists()
    stopped = cnnserve("stop", "--state-dir", str(state), "--json")
    assert json.loads(stopped.stdout) == {"stopped": [], "supervisor": False}  # nothing was left running
