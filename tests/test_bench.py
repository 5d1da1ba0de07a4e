"""``cnnserve bench``: the harness's statistics and target ratios, and a seconds-long smoke run end to end.

The smoke run measures nothing worth keeping (tiny durations, no TorchServe): it checks that the harness
runs every scenario that needs no TorchServe, writes a well-formed ``results.json``, a README with the
target table, and real PNG plots. The full benchmark is ``make bench``, never a test.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from cnnserve.bench.loadgen import LoadSpec
from cnnserve.bench.report import PLOTS, evaluate_targets
from cnnserve.bench.results import CDF_POINTS, SCENARIOS, Row, load_row, percentile, quantiles, timed_row
from cnnserve_export.export import ExportResult
from tests.helpers import cnnserve as run_cnnserve

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW_FIELDS: dict[str, type | tuple[type, ...]] = {
    "name": str,
    "model": str,
    "concurrency": int,
    "images_per_call": int,
    "throughput_img_s": (int, float, type(None)),
    "p50_ms": (int, float),
    "p99_ms": (int, float),
    "reps": int,
    "errors": int,
    "client_cpu_percent": (int, float, type(None)),
    "server_cpu_percent": dict,
    "latency_cdf_ms": list,
    "extra": dict,
}


def cnnserve(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cnnserve(*args, timeout=120, env={**os.environ, "PYTHONWARNINGS": "ignore"})


# ---- statistics -------------------------------------------------------------------------------------


def test_percentiles_interpolate_and_quantiles_span_the_range() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile([], 50) == 0.0
    cdf = quantiles(values)
    assert len(cdf) == CDF_POINTS and cdf[0] == 1.0 and cdf[-1] == 100.0
    assert cdf == sorted(cdf)


def test_load_row_takes_the_median_repetition_and_pools_latencies() -> None:
    row = load_row("gateway", "lenet", 8, 1, [100.0, 300.0, 200.0], [1.0, 2.0, 3.0, 4.0], errors=1)
    assert (row.throughput_img_s, row.throughput_min, row.throughput_max) == (200.0, 100.0, 300.0)
    assert row.reps == 3 and row.calls == 4 and row.errors == 1
    assert row.p50_ms == pytest.approx(2.5)


def test_timed_row_throughput_is_at_the_median_call() -> None:
    row = timed_row("ort-inprocess", "lenet", 64, [2.0, 4.0, 8.0])
    assert row.throughput_img_s == pytest.approx(16_000.0)  # 64 images in 4 ms
    assert row.throughput_min == pytest.approx(8_000.0) and row.throughput_max == pytest.approx(32_000.0)


def test_load_spec_survives_the_pipe_to_the_load_generator() -> None:
    spec = LoadSpec("grpc-echo", "127.0.0.1:1", "lenet", (b"\x89PNG\x00\xff", b"x"), 8, 1.0, 0.5, 3)
    assert LoadSpec.from_json(spec.to_json()) == spec


# ---- target ratios ----------------------------------------------------------------------------------


def _row(name: str, throughput: float, *, p50_ms: float = 1.0, **fields: Any) -> Row:
    values = {"model": "lenet", "concurrency": 1, "images_per_call": 1} | fields
    return Row(name=name, throughput_img_s=throughput, p50_ms=p50_ms, p99_ms=2 * p50_ms, **values)


def test_targets_compare_rows_of_one_run_and_explain_a_miss() -> None:
    cpu = {"client_cpu_percent": 20.0, "machine_cpu_percent": 198.0}
    rows = [
        _row(
            "gateway",
            800.0,
            concurrency=64,
            backend="torchserve",
            batching="off",  # the default archive: TorchServe batch size 1, the gateway micro-batches
            server_cpu_percent={"gateway": 80.0, "torchserve": 95.0},
            extra={"mean_gateway_server_ms": 30.0, "mean_backend_ms": 20.0, "mean_micro_batch": 12.0},
            **cpu,
        ),
        _row(
            "torchserve-grpc",
            1000.0,
            concurrency=64,
            batching="on",
            server_cpu_percent={"torchserve": 170.0},
            **cpu,
        ),
        _row("grpc-echo", 1000.0, concurrency=64, server_cpu_percent={"echo": 60.0}, **cpu),
        # A gateway on the in-process backend (smoke runs) never stands in for the real one.
        _row("gateway", 9_999.0, images_per_call=64, backend="inprocess"),
        _row("ort-inprocess", 40_000.0, images_per_call=64),
    ]
    targets = {t.key: t for t in evaluate_targets(rows)}

    missed = targets["gateway-vs-torchserve-grpc"]
    assert missed.met is False and missed.measured == pytest.approx(0.8)
    assert "20 % short" in missed.shortfall and "200 img/s more" in missed.shortfall
    assert any("gateway 100" in why for why in missed.why)  # 80 % of a core at 800 img/s = 100 µs per image
    assert missed.close

    met = targets["gateway-vs-grpc-echo"]
    assert met.met is True and met.measured == pytest.approx(0.8) and not met.shortfall

    assert targets["lenet-64-per-call"].met is None  # only the in-process-backend gateway measured it
    assert targets["cold-start"].met is None and targets["cold-start"].verdict == "not measured"


def test_latency_and_finetune_targets_use_absolute_margins() -> None:
    rows = [
        _row("gateway", 100.0, backend="torchserve", batching="off", p50_ms=10.5),
        _row("torchserve-grpc", 100.0, batching="off", p50_ms=9.0),  # same registration as the gateway
        _row("finetune-gateway", 100.0, images_per_call=64, p50_ms=75.0),
        _row("finetune-inprocess", 100.0, images_per_call=64, p50_ms=30.0),
    ]
    targets = {t.key: t for t in evaluate_targets(rows)}
    assert targets["p50-c1-lenet"].met is False and targets["p50-c1-lenet"].measured == pytest.approx(1.5)
    assert "0.50 ms over" in targets["p50-c1-lenet"].shortfall
    assert targets["finetune"].met is False  # 75 ms > 2 x 30 + 10
    assert "5.0 ms over" in targets["finetune"].shortfall


# ---- the harness end to end ---------------------------------------------------------------------------


def test_smoke_run_writes_results_readme_and_plots(tmp_path: Path, lenet_export: ExportResult) -> None:
    work = tmp_path / "work"
    (work / "build" / "lenet").mkdir(parents=True)
    (work / "build" / "lenet" / "export").symlink_to(Path(lenet_export.out).resolve())
    out = tmp_path / "out"

    result = cnnserve("bench", "--smoke", "--work-dir", str(work), "--out", str(out), "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    printed = json.loads(result.stdout)
    data = json.loads((out / "results.json").read_text())
    assert printed["rows"] == data["rows"]

    assert {
        "cpu_model",
        "cores",
        "memory_gib",
        "python",
        "torch",
        "onnxruntime",
        "torchserve",
        "date",
    } <= set(data["machine"])
    assert data["settings"]["smoke"] is True and data["settings"]["reps"] >= 3
    for row in data["rows"]:
        for name, kind in ROW_FIELDS.items():
            assert isinstance(row[name], kind), (row["name"], name, row[name])
        assert row["name"] in SCENARIOS
        assert row["errors"] == 0, row
        assert row["throughput_img_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"], row
        assert len(row["latency_cdf_ms"]) == CDF_POINTS

    def rows(name: str) -> list[dict[str, Any]]:
        return [r for r in data["rows"] if r["name"] == name]

    assert sorted(r["images_per_call"] for r in rows("ort-inprocess")) == [1, 64]
    assert sorted(r["images_per_call"] for r in rows("torchscript-inprocess")) == [1, 64]
    echo = rows("grpc-echo")
    assert sorted(r["concurrency"] for r in echo) == [1, 8]
    assert all(
        r["reps"] == 3 and r["client_cpu_percent"] > 0 and "echo" in r["server_cpu_percent"] for r in echo
    )
    gateway = rows("gateway")
    assert {(r["concurrency"], r["images_per_call"]) for r in gateway} == {(1, 1), (8, 1), (1, 64)}
    assert all(r["backend"] == "inprocess" for r in gateway)
    assert [r["images_per_call"] for r in gateway if r["inputs"] == "tensor"] == [64]
    assert all(r["extra"]["mean_batch_inputs_per_call"] >= 1 for r in gateway)
    assert rows("finetune-inprocess") and rows("finetune-sgd-step") and rows("finetune-gateway")

    # Smoke runs have no TorchServe: no target may claim a verdict from the in-process-backend gateway.
    assert {t["key"] for t in data["targets"]} >= {"gateway-vs-torchserve-grpc", "cold-start", "finetune"}
    assert all(t["met"] is None for t in data["targets"])

    readme = (out / "README.md").read_text()
    assert "| target | measured | required |" in readme and "## All results" in readme
    for name in PLOTS:
        assert f"]({name})" in readme
        image = (out / name).read_bytes()
        assert image.startswith(PNG_MAGIC) and len(image) > 5_000, name


def test_smoke_run_without_an_export_says_how_to_get_one(tmp_path: Path) -> None:
    result = cnnserve("bench", "--smoke", "--work-dir", str(tmp_path), "--out", str(tmp_path / "out"))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "cnnserve: error: no LeNet export" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--reps", "2"], "at least 3 repetitions"), (["--concurrency", "0,8"], "at least 1")],
)
def test_bad_arguments_are_refused(args: list[str], message: str) -> None:
    result = cnnserve("bench", *args)
    assert result.returncode == 2 and message in result.stderr


def test_unknown_scenario_is_one_line(tmp_path: Path) -> None:
    result = cnnserve("bench", "--only", "gateway,warp-drive", "--work-dir", str(tmp_path))
    assert result.returncode == 1 and "unknown scenario 'warp-drive'" in result.stderr
