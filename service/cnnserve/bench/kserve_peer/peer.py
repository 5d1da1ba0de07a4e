"""The KServe peer's process: :mod:`.server` run by the peer venv's python, on free loopback ports, ready when
its OIP gRPC ``ServerReady`` and every model's ``ModelReady`` say so; stopped with its process group.

KServe 0.21 binds its gRPC listener to ``[::]:PORT`` and its HTTP one to ``0.0.0.0:PORT`` (both hard-coded
in ``kserve.protocol``); the benchmark calls it on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

from cnnserve.bench.kserve_peer.venv import PeerUnavailableError

__all__ = ["SERVER_SCRIPT", "server_command", "installed_versions", "KServePeer"]

SERVER_SCRIPT = Path(__file__).with_name("server.py")
READY_TIMEOUT_S = 120.0  # importing kserve (pandas, fastapi, kubernetes) takes ~10 s on 2 busy cores


def server_command(
    python: Path, exports: Mapping[str, Path], threads: Mapping[str, int], grpc_port: int, http_port: int
) -> list[str]:
    """``python server.py --model NAME=DIR ... --threads NAME=N ... --grpc-port P --http-port Q``."""
    command = [str(python), str(SERVER_SCRIPT)]
    for name, export in exports.items():
        command += [
            "--model",
            f"{name}={Path(export).resolve()}",
            "--threads",
            f"{name}={threads.get(name, 1)}",
        ]
    return [*command, "--grpc-port", str(grpc_port), "--http-port", str(http_port)]


def installed_versions(
    python: Path, packages: tuple[str, ...] = ("kserve", "onnxruntime", "numpy")
) -> dict[str, str]:
    """``{package: version}`` as installed in the venv of ``python`` ("unknown" where it cannot say)."""
    script = (
        "import json, sys\nfrom importlib.metadata import version\n"
        "print(json.dumps({name: version(name) for name in sys.argv[1:]}))"
    )
    try:
        done = subprocess.run(
            [str(python), "-c", script, *packages], capture_output=True, text=True, timeout=60, check=True
        )
        found = json.loads(done.stdout)
    except (OSError, ValueError, subprocess.SubprocessError):
        found = {}
    return {name: str(found.get(name, "unknown")) for name in packages}


def _ready(target: str, models: list[str], timeout: float) -> bool:
    """One round of ServerReady and ModelReady for every model (False on any failure or 'not ready')."""
    import grpc

    from cnnserve.gateway.oip.messages import pb

    service = "/inference.GRPCInferenceService/"
    with grpc.insecure_channel(target) as channel:
        try:
            server = channel.unary_unary(
                service + "ServerReady", response_deserializer=pb.ServerReadyResponse.FromString
            )
            if not server(pb.ServerReadyRequest().SerializeToString(), timeout=timeout).ready:
                return False
            model = channel.unary_unary(
                service + "ModelReady", response_deserializer=pb.ModelReadyResponse.FromString
            )
            return all(
                model(pb.ModelReadyRequest(name=name).SerializeToString(), timeout=timeout).ready
                for name in models
            )
        except grpc.RpcError:
            return False


class KServePeer:
    """``kserve.ModelServer`` serving ``exports`` (model -> export dir), ``threads`` intra-op threads each.

    Raises :class:`PeerUnavailableError` when it exits or is not ready within ``ready_timeout`` (with its
    log's last lines).
    """

    def __init__(
        self,
        python: Path,
        exports: Mapping[str, Path],
        threads: Mapping[str, int],
        log_file: Path,
        ready_timeout: float = READY_TIMEOUT_S,
        host: str = "127.0.0.1",
    ) -> None:
        from cnnserve.processes import free_ports, tail

        self.threads = dict(threads)
        self.versions = installed_versions(python)
        grpc_port, http_port = free_ports(2)
        self.target = f"{host}:{grpc_port}"
        self.models = list(exports)
        self.log_file = log_file
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "ab") as log:
            self.process = subprocess.Popen(
                server_command(python, exports, threads, grpc_port, http_port),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() takes every child with it
            )
        deadline = time.monotonic() + ready_timeout
        while not _ready(self.target, self.models, timeout=2.0):
            code = self.process.poll()
            if code is not None or time.monotonic() > deadline:
                self.stop()
                said = tail(log_file, 8).replace("\n", " | ") or "nothing"
                state = f"exited with {code}" if code is not None else f"not ready in {ready_timeout:.0f} s"
                raise PeerUnavailableError(
                    f"the KServe ModelServer {state}; its log ({log_file}) says: {said}"
                )
            time.sleep(0.2)  # a poll interval while it imports, not a synchronisation

    def describe(self) -> dict[str, object]:
        """What ``results.json`` records about the peer: its packages and each session's threads."""
        return {**self.versions, "intra_op_threads": self.threads, "graph_optimization": "extended"}

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        from cnnserve.processes import stop_process_group

        if self.process.poll() is None:
            stop_process_group(self.process.pid, timeout=15)
        self.process.wait()

    def __enter__(self) -> KServePeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
