"""``cnnserve bench``: the harness's statistics and target ratios, and a seconds-long smoke run end to end.

The smoke run measures nothing worth keeping (tiny durations, no TorchServe): it checks that the harness
runs every scenario that needs no TorchServe, writes a well-formed ``results.json``, a README with the
target table, and real PNG plots. The full benchmark is ``make bench``, never a test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from cnnserve.bench.loadgen import LoadSpec, proc_cpu_seconds
from cnnserve.bench.report import PLOTS, evaluate_targets, render, write_results
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
    metered = replace(spec, cpu_pids={"gateway": (11, 12), "echo": (13,)})
    assert LoadSpec.from_json(metered.to_json()) == metered


def test_cpu_seconds_come_from_proc_stat(tmp_path: Path) -> None:
    ticks = os.sysconf("SC_CLK_TCK")
    # comm may hold spaces and ")": the fields are counted after the last ")".
    (tmp_path / "42").mkdir()
    fields = ["S", "1", "42", "42", "0", "-1", "0", "5", "0", "0", "0", str(3 * ticks), str(ticks), "0"]
    (tmp_path / "42" / "stat").write_text(f"42 (a) b (c) {' '.join(fields)}\n")
    assert proc_cpu_seconds(42, proc=tmp_path) == pytest.approx(4.0)
    assert proc_cpu_seconds(43, proc=tmp_path) is None  # gone

    before = proc_cpu_seconds(os.getpid())
    deadline = time.process_time() + 0.2
    while time.process_time() < deadline:  # burn CPU until the kernel has counted 0.2 s of it
        pass
    after = proc_cpu_seconds(os.getpid())
    assert before is not None and after is not None and after - before >= 0.1


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
    targets = {t.key: t for t in evaluate_targets(rows, cores=2)}

    missed = targets["gateway-vs-torchserve-grpc"]
    assert missed.met is False and missed.measured == pytest.approx(0.8)
    assert "20 % short" in missed.shortfall and "200 img/s more" in missed.shortfall
    assert any("gateway 100" in why for why in missed.why)  # 80 % of a core at 800 img/s = 100 µs per image
    # 198 % of a 2-core machine is saturated: the budget is CPU per image, from this point's own CPU.
    assert any("saturated (198 % of 200 %, at least 85 %)" in why for why in missed.why)
    assert any("<= " in close and "µs CPU per image" in close for close in missed.close)

    met = targets["gateway-vs-grpc-echo"]
    assert met.met is True and met.measured == pytest.approx(0.8) and not met.shortfall

    assert targets["lenet-batched-call"].met is None  # only the in-process-backend gateway measured it
    assert targets["cold-start"].met is None and targets["cold-start"].verdict == "not measured"


def test_saturation_is_judged_against_the_recorded_core_count() -> None:
    """198 % busy saturates 2 cores but not 16; with no core count recorded nothing is said about it."""
    rows = [
        _row(
            "gateway",
            800.0,
            concurrency=8,
            backend="torchserve",
            batching="off",
            mean_ms=10.0,
            server_cpu_percent={"gateway": 80.0},
            machine_cpu_percent=198.0,
            extra={"mean_gateway_server_ms": 9.0, "mean_backend_ms": 7.0},
        ),
        _row("torchserve-grpc", 1000.0, concurrency=8, batching="on", machine_cpu_percent=198.0),
    ]

    def explained(cores: int | None) -> tuple[list[str], list[str]]:
        (target,) = [t for t in evaluate_targets(rows, cores=cores) if t.key == "gateway-vs-torchserve-grpc"]
        assert target.met is False
        return target.why, target.close

    why, close = explained(16)
    assert any("not saturated (198 % of 1600 %, under 85 %)" in line for line in why)
    # 1000 img/s from 8 closed-loop clients leaves 8 ms per call; the gateway's took 10.
    assert close == ["the calls' waiting, not their CPU: 1000 img/s from 8 closed-loop clients means a mean "
                     "call of <= 8.00 ms (now 10.00)"]  # fmt: skip
    why, close = explained(None)
    assert not any("saturated" in line or "200 %" in line for line in why) and close == []


def test_gateway_cpu_per_call_is_judged_against_the_echo_servers_at_each_concurrency() -> None:
    def gateway(concurrency: int, ms: float) -> Row:
        extra = {"cpu_ms_per_call": {"gateway": ms, "torchserve": 0.5}, "client_cpu_ms_per_call": 0.1}
        return _row(
            "gateway", 100.0, concurrency=concurrency, backend="torchserve", batching="off", extra=extra
        )

    def echo(concurrency: int, ms: float) -> Row:
        return _row("grpc-echo", 100.0, concurrency=concurrency, extra={"cpu_ms_per_call": {"echo": ms}})

    rows = [gateway(1, 0.24), echo(1, 0.2), gateway(64, 0.3), echo(64, 0.1), echo(8, 0.1)]
    targets = {t.key: t for t in evaluate_targets(rows, cores=2)}
    met, missed = targets["gateway-cpu-per-call-c1"], targets["gateway-cpu-per-call-c64"]
    assert met.met is True and met.measured == pytest.approx(1.2) and met.required == "<= 1.30x"
    assert missed.met is False and missed.measured == pytest.approx(3.0)
    assert "0.170 CPU ms per call over" in missed.shortfall  # 0.3 - 1.3 x 0.1
    assert any("TorchServe behind the gateway 0.500 ms" in why for why in missed.why)
    assert targets["gateway-cpu-per-call-c8"].met is None  # no gateway row at 8 clients


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


def _results_json(out: Path, meta: dict[str, Any]) -> Path:
    rows = [
        _row("ort-inprocess", 40_000.0, images_per_call=64, calls=123, extra={"threads": 3}),
        _row(
            "gateway", 5_000.0, images_per_call=64, backend="torchserve", batching="off", calls=77, errors=2
        ),
        _row("finetune-inprocess", 2_000.0, images_per_call=64, p50_ms=30.0),
    ]
    out.mkdir()
    return write_results(out, rows, evaluate_targets(rows), meta)


def _meta(**more: Any) -> dict[str, Any]:
    machine = {
        "date": "2026-01-02T03:04:05+00:00",
        "cpu_model": "Test CPU",
        "cores": 12,
        "memory_gib": 31.0,
        "python": "3.11.0",
        "torch": "t",
        "onnxruntime": "o",
        "torchserve": "s",
        "grpcio": "g",
        "load_average": [0.5, 0.5, 0.5],
    }
    settings = {"smoke": False, "duration_s": 7.0, "warmup_s": 1.5, "reps": 5, "finetune_steps": 11}
    return {"machine": machine, "settings": settings, "duration_s": 90.0, **more}


def test_render_takes_every_figure_from_results_json(tmp_path: Path) -> None:
    setup = {
        "archives": {"lenet": {"batch_size": 1, "max_batch_delay_ms": 5, "min_workers": 3, "max_workers": 3}},
        "batched_twins": {"lenet": {"batch_size": 24, "max_batch_delay_ms": 9}},
        "loadgen_channels": 6,
        "finetune_lr": 0.125,
    }
    results = _results_json(tmp_path / "run", _meta(setup=setup))
    before = results.read_bytes()
    files = render(results, tmp_path / "out")
    assert results.read_bytes() == before  # the run's record is left as it was
    readme = (tmp_path / "out" / "README.md").read_text()
    assert files[0] == tmp_path / "out" / "README.md" and all(path.exists() for path in files)
    for text in (
        "Test CPU, 12 cores, 31.0 GiB",
        "in 1.5 min",
        "1.5 s warm-up, then 5 repetitions of 7.0 s",
        "at least 5 calls (11 for fine-tune steps)",
        "threads=3",
        "workers: LeNet 3",
        "LeNet batch 24 / 9 ms",
        "or several (LeNet 64)",
        "up to 6 connections",
        "lr 0.125",
        "| 77 (2 failed) |",
        "| 123 |",
    ):
        assert text in readme, text
    assert "does not record its setup" not in readme
    assert not re.search(r"\b2 cores|\b200 %", readme)  # nothing assumes another machine


def test_render_of_a_run_without_its_setup_says_whose_values_it_shows(tmp_path: Path) -> None:
    from cnnserve.bench.report import describe_setup

    results = _results_json(tmp_path / "run", _meta())
    render(results)
    readme = (tmp_path / "run" / "README.md").read_text()
    assert "does not record its setup" in readme
    assert f"up to {describe_setup()['loadgen_channels']} connections" in readme


def test_report_entry_point_renders_a_directory(tmp_path: Path) -> None:
    _results_json(tmp_path / "run", _meta())
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "cnnserve.bench.report", str(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "run" / "README.md").exists()
    assert all((tmp_path / "run" / name).read_bytes().startswith(PNG_MAGIC) for name in PLOTS)
    missing = subprocess.run([*command[:-1], str(tmp_path / "nowhere")], capture_output=True, text=True)
    assert missing.returncode == 1 and "no " in missing.stderr and "Traceback" not in missing.stderr


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
    assert 1 <= data["machine"]["usable_cores"] <= data["machine"]["cores"]
    # What the README's "How it is measured" states is recorded with the run.
    assert {"archives", "batched_twins", "loadgen_channels", "finetune_lr"} <= set(data["setup"])
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
    oip = rows("oip-grpc")  # the same loads over the Open Inference Protocol, in the same run
    assert {(r["concurrency"], r["images_per_call"]) for r in oip if r["inputs"] == "png"} == {
        (1, 1),
        (8, 1),
        (1, 64),
    }
    # FP32 tensors: the points a full run also sends to the KServe peer, which smoke runs skip with a reason.
    tensors = {(r["concurrency"], r["images_per_call"]) for r in oip if r["inputs"] == "tensor"}
    assert tensors == {(1, 1), (8, 1), (1, 64), (8, 64)}
    assert all(r["backend"] == "inprocess" and r["errors"] == 0 for r in oip)
    assert not rows("kserve-oip") and "smoke runs" in data["skipped"]["kserve-oip"]
    # CPU per call from /proc over the timed repetitions: every load row has it for every server tree.
    for row in echo + gateway + oip:
        assert set(row["extra"]["cpu_ms_per_call"]) == {"echo"}, row["extra"]
        assert row["extra"]["client_cpu_ms_per_call"] > 0
    assert all(r["extra"]["cpu_ms_per_call"]["echo"] > 0 for r in echo)
    assert rows("finetune-inprocess") and rows("finetune-sgd-step") and rows("finetune-gateway")

    # Smoke runs have no TorchServe: no target may claim a verdict from the in-process-backend gateway.
    assert {t["key"] for t in data["targets"]} >= {"gateway-vs-torchserve-grpc", "cold-start", "finetune"}
    assert all(t["met"] is None for t in data["targets"])

    readme = (out / "README.md").read_text()
    assert "| target | measured | required |" in readme and "## All results" in readme
    assert "does not record its setup" not in readme
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
