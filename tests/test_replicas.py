"""Two replicas behind haproxy sharing one revision store, for real (cnnserve.cluster_smoke)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from cnnserve.cluster_smoke import (
    SERVING_MESSAGE,
    SmokeReport,
    SmokeSettings,
    grpc_health_probe,
    haproxy_config,
    run_smoke,
)
from cnnserve_export.export import ExportResult

REQUIRED = os.environ.get("CNNSERVE_REQUIRE_DATASETS") == "1"  # CI: a missing haproxy fails, never skips


def test_health_probe_is_one_grpc_health_call_over_h2c() -> None:
    probe = grpc_health_probe()
    assert probe.startswith(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert b"/grpc.health.v1.Health/Check" in probe and b"application/grpc" in probe
    # the last frame: DATA (type 0), END_STREAM, stream 1, the empty HealthCheckRequest with its 5-byte prefix
    assert probe[-14:] == bytes.fromhex("000005000100000001") + bytes(5)
    # what haproxy expects back is the framed HealthCheckResponse{status: SERVING}, as grpc encodes it
    from grpc_health.v1 import health_pb2

    response = health_pb2.HealthCheckResponse
    serving = response(status=response.SERVING).SerializeToString()
    assert bytes([0]) + len(serving).to_bytes(4, "big") + serving == SERVING_MESSAGE


def test_haproxy_config_checks_every_replica_actively(tmp_path: Path) -> None:
    config = haproxy_config(5000, tmp_path / "s.sock", [("a", 5001), ("b", 5002)], inter_ms=250, fall=2)
    assert "bind 127.0.0.1:5000 proto h2" in config
    assert "server a 127.0.0.1:5001 proto h2 check" in config
    assert "server b 127.0.0.1:5002 proto h2 check" in config
    assert "default-server inter 250ms fall 2 rise 1" in config
    assert f"tcp-check send-binary {grpc_health_probe().hex()}" in config
    if shutil.which("haproxy"):  # haproxy itself accepts it
        path = tmp_path / "haproxy.cfg"
        path.write_text(config)
        checked = subprocess.run(["haproxy", "-c", "-q", "-f", str(path)], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr


@pytest.fixture
def lenet_one_worker(tmp_path_factory: pytest.TempPathFactory, lenet_export: ExportResult) -> Path:
    """LeNet alone with one worker per TorchServe: two replicas on a small machine."""
    from dataclasses import replace

    from cnnserve_export.archive import build_archive
    from cnnserve_export.config import default_settings

    store = tmp_path_factory.mktemp("replica_store")
    build_archive(lenet_export.out, store, replace(default_settings("lenet"), min_workers=1, max_workers=1))
    return store


@pytest.mark.torchserve
@pytest.mark.slow
def test_two_replicas_behind_haproxy_share_one_revision_store(lenet_one_worker: Path) -> None:
    if shutil.which("haproxy") is None:
        message = "haproxy is not installed (make setup installs it where apt can)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    # Not under tmp_path: TorchServe's worker sockets live in each state dir and a Unix socket path is short.
    work_dir = Path(tempfile.mkdtemp(prefix="cnnserve-cluster-"))
    try:
        report: SmokeReport = run_smoke(SmokeSettings(lenet_one_worker, work_dir), log=print)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    print(report.text())
    # run_smoke raised on any failed check; what the report says must agree with them
    assert set(report.steps_by_replica) == {"a", "b"} and min(report.steps_by_replica.values()) >= 2
    assert report.revisions == list(range(report.revisions[0], report.revisions[0] + report.steps))
    assert report.replayed_revision == report.revisions[0]
    assert report.min_revision_served >= report.min_revision_asked > 0
    assert report.pinned_max_abs_diff <= 1e-6
    assert report.haproxy_check.startswith("L4")  # the dead gateway's port refuses the connection
    assert "Server replicas/b is DOWN" in report.haproxy_log
    assert report.failures_before_kill == 0 and report.failures_after_detection == 0
    assert report.survivor_steps == [report.revisions[-1] + 1, report.revisions[-1] + 2]
    assert report.classify_calls > report.failures_during_outage
