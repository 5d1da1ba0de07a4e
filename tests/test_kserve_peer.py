"""The KServe peer of ``cnnserve bench`` without KServe: its request -> response logic as plain functions (on
a tiny ONNX model written here), the venv builder's commands and stamp, and every way it ends up skipped with
a reason instead of failing the run.

Nothing here installs anything or reaches the network; the real peer runs in ``cnnserve bench`` only.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cnnserve.bench.kserve_peer import KIND, KServePeer, PeerUnavailableError, ensure_venv
from cnnserve.bench.kserve_peer import server as peer_server
from cnnserve.bench.kserve_peer.peer import SERVER_SCRIPT, server_command
from cnnserve.bench.kserve_peer.venv import (
    KSERVE_REQUIREMENT,
    STAMP_FILE,
    VENV_DIR,
    build_commands,
    requirements,
    venv_python,
)
from cnnserve.bench.report import evaluate_targets, render, write_results
from cnnserve.bench.results import Row

ITEM = (1, 4, 4)  # (C, H, W) of the test model
CLASSES = 3


def _write_model(path: Path, weights: np.ndarray, item: tuple[int | str, ...] = ITEM) -> None:
    """``input`` (batch, *item) float32 -> Flatten -> MatMul ``weights`` -> ``logits`` (batch, classes)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["input"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "weights"], ["logits"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *item])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", CLASSES])],
        [numpy_helper.from_array(weights, "weights")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by any onnxruntime this project supports
    path.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path / peer_server.ONNX_FILE))


@pytest.fixture
def weights() -> np.ndarray:
    return np.random.default_rng(0).normal(size=(int(np.prod(ITEM)), CLASSES)).astype(np.float32)


def _softmax64(logits: np.ndarray) -> np.ndarray:
    wide = logits.astype(np.float64)
    shifted = np.exp(wide - wide.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


# ---- the server's request -> response logic -------------------------------------------------------------


def test_the_session_is_loaded_as_our_workers_load_theirs(tmp_path: Path, weights: np.ndarray) -> None:
    import onnxruntime as ort

    options = peer_server.session_options(2)
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    assert options.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with pytest.raises(ValueError, match="at least 1"):
        peer_server.session_options(0)

    _write_model(tmp_path / "export", weights)
    session, input_name, item = peer_server.load_session(tmp_path / "export", threads=1)
    assert (input_name, item) == ("input", ITEM)
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_a_model_without_fixed_item_dims_is_refused(tmp_path: Path, weights: np.ndarray) -> None:
    _write_model(tmp_path / "export", weights, item=(1, "height", 4))
    with pytest.raises(ValueError, match="no fixed"):
        peer_server.load_session(tmp_path / "export", threads=1)


def test_a_batch_is_answered_with_one_probability_row_per_input(tmp_path: Path, weights: np.ndarray) -> None:
    _write_model(tmp_path / "export", weights)
    session, input_name, _ = peer_server.load_session(tmp_path / "export", threads=1)
    batch = np.random.default_rng(1).normal(size=(5, *ITEM)).astype(np.float32)
    # The request's raw_input_contents, decoded as KServe decodes them (np.frombuffer + reshape).
    decoded = np.frombuffer(batch.astype("<f4").tobytes(), dtype=np.float32).reshape(5, *ITEM)

    answered = peer_server.run_model(session, input_name, decoded)

    assert answered.dtype == np.float32 and answered.shape == (5, CLASSES)
    expected = _softmax64(batch.reshape(5, -1).astype(np.float64) @ weights.astype(np.float64))
    np.testing.assert_allclose(answered, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(answered.sum(axis=1), 1.0, atol=1e-6)


def test_probabilities_never_overflow() -> None:
    logits = np.array([[1000.0, 0.0, -1000.0], [-5.0, -5.0, -5.0]], dtype=np.float32)
    rows = peer_server.probabilities(logits)
    assert np.isfinite(rows).all() and rows.dtype == np.float32
    np.testing.assert_allclose(rows[0], [1.0, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(rows[1], [1 / 3] * 3, atol=1e-6)
    with pytest.raises(ValueError, match="must be"):
        peer_server.probabilities(np.zeros(3, dtype=np.float32))


@pytest.mark.parametrize(
    ("datatype", "shape", "message"),
    [
        ("FP64", [2, 1, 4, 4], "datatype must be FP32, not FP64"),
        ("FP32", [2, 16], r"shape must be \[N, 1, 4, 4\] with N >= 1, not \[2, 16\]"),
        ("FP32", [2, 1, 4, 5], r"not \[2, 1, 4, 5\]"),
        ("FP32", [0, 1, 4, 4], r"not \[0, 1, 4, 4\]"),
    ],
)
def test_inputs_the_model_cannot_take_are_refused(datatype: str, shape: list[int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        peer_server.check_input(datatype, shape, ITEM)


def test_an_input_the_model_takes_passes() -> None:
    assert peer_server.check_input("FP32", [7, 1, 4, 4], ITEM) == (7, 1, 4, 4)


def test_name_value_flags() -> None:
    assert peer_server.parse_pairs(["lenet=/a=b", "alexnet=2"], "--model") == {
        "lenet": "/a=b",
        "alexnet": "2",
    }
    for bad in ("lenet", "=x", "lenet="):
        with pytest.raises(ValueError, match="--model wants NAME=VALUE"):
            peer_server.parse_pairs([bad], "--model")


def test_the_server_command_names_every_model_with_its_threads(tmp_path: Path) -> None:
    python = tmp_path / "venv" / "bin" / "python"
    exports = {"lenet": tmp_path / "l", "alexnet": tmp_path / "a"}
    command = server_command(python, exports, {"lenet": 1, "alexnet": 2}, 5001, 5002)
    assert command[:2] == [str(python), str(SERVER_SCRIPT)] and SERVER_SCRIPT.is_file()
    assert command[2:] == [
        "--model", f"lenet={(tmp_path / 'l').resolve()}", "--threads", "lenet=1",
        "--model", f"alexnet={(tmp_path / 'a').resolve()}", "--threads", "alexnet=2",
        "--grpc-port", "5001", "--http-port", "5002",
    ]  # fmt: skip


# ---- the venv builder -----------------------------------------------------------------------------------


def test_the_venv_gets_kserve_and_the_projects_onnxruntime() -> None:
    from importlib import metadata

    assert requirements() == (KSERVE_REQUIREMENT, f"onnxruntime=={metadata.version('onnxruntime')}", "numpy")
    assert KSERVE_REQUIREMENT == "kserve==0.21.*"


def test_the_build_commands(tmp_path: Path) -> None:
    venv = tmp_path / VENV_DIR
    make, install = build_commands(venv, ("kserve==0.21.*", "onnxruntime==1.2.3", "numpy"), python="/py")
    assert make == ["/py", "-m", "venv", "--clear", str(venv)]
    assert install[:4] == [str(venv / "bin" / "python"), "-m", "pip", "install"]
    assert install[-3:] == ["kserve==0.21.*", "onnxruntime==1.2.3", "numpy"]


class _Runner:
    """Stands in for subprocess.run: records the commands; the venv step makes ``bin/python``."""

    def __init__(self, returncode: int = 0, stderr: str = "", timeout: bool = False) -> None:
        self.commands: list[list[str]] = []
        self.returncode, self.stderr, self.timeout = returncode, stderr, timeout

    def __call__(self, command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        self.commands.append(command)
        if command[1:3] == ["-m", "venv"]:
            python = venv_python(Path(command[-1]))
            python.parent.mkdir(parents=True, exist_ok=True)
            python.write_text("")
            return subprocess.CompletedProcess(command, 0, "", "")
        if self.timeout:
            raise subprocess.TimeoutExpired(command, kwargs["timeout"])
        return subprocess.CompletedProcess(command, self.returncode, "", self.stderr)


def test_the_venv_is_built_once_and_rebuilt_when_what_it_needs_changes(tmp_path: Path) -> None:
    runner = _Runner()
    python = ensure_venv(tmp_path, lambda _: None, onnxruntime_version="1.2.3", run=runner)
    assert python == tmp_path / VENV_DIR / "bin" / "python"
    assert len(runner.commands) == 2 and (tmp_path / VENV_DIR / STAMP_FILE).is_file()

    again = _Runner()
    assert ensure_venv(tmp_path, lambda _: None, onnxruntime_version="1.2.3", run=again) == python
    assert again.commands == []  # the stamp matches: nothing runs

    other = _Runner()
    ensure_venv(tmp_path, lambda _: None, onnxruntime_version="9.9.9", run=other)
    assert [c[-1] for c in other.commands] == [str(tmp_path / VENV_DIR), "numpy"]
    assert "onnxruntime==9.9.9" in other.commands[1]


def test_a_venv_that_cannot_be_built_says_why_and_leaves_nothing_behind(tmp_path: Path) -> None:
    failing = _Runner(
        1, "Collecting kserve==0.21.*\nERROR: No matching distribution found for kserve==0.21.*"
    )
    with pytest.raises(PeerUnavailableError) as raised:
        ensure_venv(tmp_path, lambda _: None, onnxruntime_version="1.2.3", run=failing)
    assert "exited 1" in raised.value.reason and "No matching distribution" in raised.value.reason
    assert not (tmp_path / VENV_DIR).exists()  # the next run tries again

    with pytest.raises(PeerUnavailableError, match="took over 5 s"):
        ensure_venv(
            tmp_path, lambda _: None, onnxruntime_version="1.2.3", run=_Runner(timeout=True), timeout=5
        )
    assert not (tmp_path / VENV_DIR).exists()


# ---- skipped with a reason ------------------------------------------------------------------------------


def test_a_peer_that_exits_at_start_is_unavailable_with_its_log(tmp_path: Path) -> None:
    """The project's python has no kserve: the server script exits at once, and the peer says so."""
    _write_model(tmp_path / "export", np.zeros((16, CLASSES), dtype=np.float32))
    log = tmp_path / "kserve.log"
    with pytest.raises(PeerUnavailableError) as raised:
        KServePeer(Path(sys.executable), {"tiny": tmp_path / "export"}, {"tiny": 1}, log, ready_timeout=60)
    assert "exited with 1" in raised.value.reason and "No module named 'kserve'" in raised.value.reason


def test_the_harness_records_a_peer_it_cannot_build_as_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cnnserve.bench import harness, kserve_peer

    def unavailable(work_dir: Path, log: Any) -> Path:
        raise PeerUnavailableError("no network")

    monkeypatch.setattr(kserve_peer, "ensure_venv", unavailable)
    monkeypatch.setattr(harness, "_worker_threads", lambda export: 1)
    logged: list[str] = []
    peer, why = harness._start_kserve(tmp_path, {"lenet": tmp_path}, tmp_path / "state", logged.append)
    assert peer is None and why == "no network"
    assert logged == ["kserve-oip skipped: no network"]

    # A venv whose python is gone since its stamp was written: skipped too, not a failed run.
    monkeypatch.setattr(kserve_peer, "ensure_venv", lambda work_dir, log: tmp_path / "gone" / "python")
    peer, why = harness._start_kserve(tmp_path, {"lenet": tmp_path}, tmp_path / "state", logged.append)
    assert peer is None and why.startswith("could not start the KServe ModelServer: ") and "gone" in why


def test_the_twin_points_of_each_model() -> None:
    from cnnserve.bench.harness import oip_twin_points

    assert oip_twin_points("lenet", (1, 8, 64)) == [(1, 1), (8, 1), (64, 1), (1, 64), (8, 64)]
    assert oip_twin_points("alexnet", (1, 8, 64)) == [(1, 1), (8, 1), (1, 32)]  # fewer: ~25 ms an image


def _twin(name: str, throughput: float, concurrency: int, per_call: int = 1, **fields: Any) -> Row:
    return Row(
        name=name,
        model="lenet",
        concurrency=concurrency,
        images_per_call=per_call,
        throughput_img_s=throughput,
        p50_ms=fields.pop("p50_ms", 1.0),
        p99_ms=5.0,
        inputs="tensor",
        **fields,
    )


def test_kserve_targets_compare_same_run_twins() -> None:
    gateway = {"backend": "torchserve", "batching": "off"}
    rows = [
        _twin(
            "oip-grpc", 3_000.0, 64, extra={"cpu_ms_per_call": {"gateway": 0.2, "torchserve": 0.3}}, **gateway
        ),
        _twin("kserve-oip", 1_000.0, 64, extra={"cpu_ms_per_call": {"kserve": 0.9}}),
        _twin("oip-grpc", 720.0, 8, machine_cpu_percent=100.0, mean_ms=11.0, **gateway),
        _twin("kserve-oip", 1_000.0, 8, machine_cpu_percent=100.0),
        _twin("oip-grpc", 6_000.0, 1, 64, **gateway),
        _twin("kserve-oip", 10_000.0, 1, 64),
        _twin("oip-grpc", 100.0, 1, p50_ms=3.0, **gateway),
        _twin("kserve-oip", 100.0, 1, p50_ms=1.0),
    ]
    targets = {t.key: t for t in evaluate_targets(rows, cores=2)}
    assert targets["kserve-lenet-c64-1"].met is True and targets["kserve-lenet-c64-1"].measured == 3.0
    assert targets["kserve-lenet-c1-batched"].met is True  # 0.6x required, 0.6x measured
    assert "64 images per call" in targets["kserve-lenet-c1-batched"].description

    missed = targets["kserve-lenet-c8-1"]
    assert missed.met is False and missed.measured == pytest.approx(0.72)
    assert "10 % short" in missed.shortfall
    # 800 img/s from 8 closed-loop clients: a mean call of 10 ms at most, against 11 now.
    assert any("<= 10.00 ms (now 11.00)" in close for close in missed.close)

    latency = targets["kserve-lenet-p50-c1"]
    assert (
        latency.met is False
        and latency.measured == pytest.approx(3.0)
        and "1.00 ms over" in latency.shortfall
    )
    assert targets["kserve-lenet-c8-batched"].met is None  # no twins at that point in these rows
    assert not any(key.startswith("kserve-alexnet") for key in targets)  # AlexNet lists measured points only


def test_skipped_targets_and_readme_say_why(tmp_path: Path) -> None:
    from tests.test_bench import _meta

    rows = [_twin("oip-grpc", 3_000.0, 64, backend="torchserve", batching="off")]
    skipped = {KIND: "`pip install kserve==0.21.*` exited 1: no network"}
    targets = evaluate_targets(rows, skipped=skipped)
    kserve = [t for t in targets if t.key.startswith("kserve-")]
    assert kserve and all(t.met is None and "skipped: `pip install" in t.figures for t in kserve)

    results = write_results(tmp_path, rows, targets, _meta(skipped=skipped))
    render(results)
    readme = (tmp_path / "README.md").read_text()
    assert "### Not run" in readme and "- `kserve-oip`: `pip install kserve==0.21.*` exited 1" in readme


def test_the_readme_tabulates_cpu_per_call(tmp_path: Path) -> None:
    from tests.test_bench import _meta

    gateway_cpu = {"cpu_ms_per_call": {"gateway": 0.3, "torchserve": 0.5}, "client_cpu_ms_per_call": 0.2}
    rows = [
        Row(
            "gateway",
            "lenet",
            64,
            1,
            500.0,
            9.0,
            20.0,
            backend="torchserve",
            batching="off",
            extra=gateway_cpu,
        ),
        Row("grpc-echo", "lenet", 64, 1, 900.0, 2.0, 5.0, extra={"cpu_ms_per_call": {"echo": 0.1}}),
        _twin("oip-grpc", 600.0, 64, backend="torchserve", batching="off", extra=gateway_cpu),
        _twin("kserve-oip", 1_000.0, 64, extra={"cpu_ms_per_call": {"kserve": 0.4}}),
    ]
    render(write_results(tmp_path, rows, evaluate_targets(rows), _meta()))
    readme = (tmp_path / "README.md").read_text()
    assert "## CPU per call" in readme
    assert "| 64 | 0.300 | 0.500 | 0.100 | 3.00x | 0.200 | - |" in readme  # gateway / echo
    # ours: gateway + TorchServe 0.8 ms against KServe's 0.4 ms
    assert "| LeNet | 1 | 64 | 0.300 | 0.500 | 0.800 | 0.400 | 2.00x | 600.0 | 1,000.0 |" in readme
    assert "| kserve-oip | lenet | tensors | 64 | 1 |" in readme
