"""The KServe peer: a ``kserve.ModelServer`` serving our exported ``model.onnx`` files with ONNX Runtime in
its own process, over the Open Inference Protocol (gRPC ``inference.GRPCInferenceService/ModelInfer``).

Run by the peer venv's python (:mod:`.venv`), by path, never imported there as part of ``cnnserve``: only
numpy and onnxruntime at the top, kserve inside :func:`main`. The request -> response logic is plain
functions (:func:`session_options`, :func:`check_input`, :func:`probabilities`) that the project's tests call
without kserve installed.

What it answers, as our gateway's OIP service does for a preprocessed tensor: one input, ``FP32 [N, C, H, W]``
(C, H, W: the model's), and one output ``probabilities``, ``FP32 [N, classes]`` (softmax of the logits),
in ``raw_output_contents``. ``predict`` is synchronous, as KServe's own predictors are: KServe runs it on its
event loop, one call at a time.

    python server.py --model lenet=EXPORT_DIR --threads lenet=1 --grpc-port P --http-port Q
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ONNX_FILE",
    "OUTPUT_NAME",
    "session_options",
    "load_session",
    "check_input",
    "probabilities",
    "parse_pairs",
    "main",
]

ONNX_FILE = "model.onnx"
OUTPUT_NAME = "probabilities"
INPUT_DATATYPE = "FP32"
MAX_MESSAGE_BYTES = 64 * 2**20  # TorchServe's request limit in the benchmark, and the load generator's


def session_options(threads: int) -> Any:
    """The same ONNX Runtime options as our workers' sessions (``cnnserve.runtime.OnnxRuntime`` on the CPU):
    ``threads`` intra-op threads, one inter-op thread, EXTENDED graph optimizations, errors-only logging."""
    import onnxruntime as ort

    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.log_severity_level = 3
    return options


def load_session(export_dir: Path, threads: int) -> tuple[Any, str, tuple[int, ...]]:
    """``export_dir/model.onnx`` on the CPU: (session, input name, the model's (C, H, W))."""
    import onnxruntime as ort

    session = ort.InferenceSession(
        str(export_dir / ONNX_FILE), sess_options=session_options(threads), providers=["CPUExecutionProvider"]
    )
    first = session.get_inputs()[0]
    dims = tuple(first.shape[1:])
    if not all(isinstance(d, int) for d in dims):
        raise ValueError(
            f"{export_dir / ONNX_FILE}: input {first.name} has no fixed (C, H, W): {first.shape}"
        )
    return session, str(first.name), dims  # ints: checked above


def check_input(datatype: str, shape: Sequence[int], item_shape: Sequence[int]) -> tuple[int, ...]:
    """The request's input as the model takes it: ``FP32 [N, *item_shape]`` with N >= 1; else ValueError
    with what was wrong."""
    shape = tuple(int(d) for d in shape)
    if datatype != INPUT_DATATYPE:
        raise ValueError(f"input datatype must be {INPUT_DATATYPE}, not {datatype}")
    if len(shape) != 1 + len(item_shape) or tuple(shape[1:]) != tuple(item_shape) or shape[0] < 1:
        wanted = ", ".join(str(d) for d in item_shape)
        raise ValueError(f"input shape must be [N, {wanted}] with N >= 1, not {list(shape)}")
    return shape


def probabilities(logits: np.ndarray) -> np.ndarray:
    """float32 ``(N, classes)`` logits -> float32 ``(N, classes)`` softmax rows (max-shifted: no overflow)."""
    logits = np.asarray(logits, dtype=np.float32)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, classes), not {logits.shape}")
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    rows: np.ndarray = (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32, copy=False)
    return rows


def run_model(session: Any, input_name: str, batch: np.ndarray) -> np.ndarray:
    """One forward pass of an ``(N, C, H, W)`` float32 batch: ``(N, classes)`` probabilities."""
    (logits,) = session.run(None, {input_name: np.ascontiguousarray(batch, dtype=np.float32)})
    return probabilities(logits)


def parse_pairs(values: Sequence[str], flag: str) -> dict[str, str]:
    """``["a=1", "b=2"]`` -> ``{"a": "1", "b": "2"}``; ValueError naming ``flag`` otherwise."""
    pairs = {}
    for value in values:
        name, sep, rest = value.partition("=")
        if not sep or not name or not rest:
            raise ValueError(f"{flag} wants NAME=VALUE, not {value!r}")
        pairs[name] = rest
    return pairs


def _model_class() -> type:
    """The ``kserve.Model`` subclass (built here: kserve exists only in the peer's venv)."""
    # kserve lives in the peer's venv only: the project's type checker never sees it.
    import kserve  # type: ignore[import-not-found,unused-ignore]
    from kserve.errors import InvalidInput  # type: ignore[import-not-found,unused-ignore]
    from kserve.protocol.infer_type import (  # type: ignore[import-not-found,unused-ignore]
        InferOutput,
        InferRequest,
        InferResponse,
    )

    class OnnxModel(kserve.Model):  # type: ignore[misc,unused-ignore]  # a subclass of Any here
        def __init__(self, name: str, export_dir: Path, threads: int) -> None:
            super().__init__(name)
            self.export_dir, self.threads = export_dir, threads
            self.session: Any = None
            self.input_name = ""
            self.item_shape: tuple[int, ...] = ()

        def load(self) -> bool:
            self.session, self.input_name, self.item_shape = load_session(self.export_dir, self.threads)
            self.ready = True
            return True

        def predict(self, payload: InferRequest, headers: dict[str, str] | None = None) -> InferResponse:
            if len(payload.inputs) != 1:
                raise InvalidInput(f"{self.name} takes one input, not {len(payload.inputs)}")
            tensor = payload.inputs[0]
            try:
                check_input(tensor.datatype, tensor.shape, self.item_shape)
            except ValueError as error:
                raise InvalidInput(str(error)) from None
            result = run_model(self.session, self.input_name, tensor.as_numpy())
            output = InferOutput(name=OUTPUT_NAME, shape=list(result.shape), datatype="FP32", data=result)
            return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[output])

    return OnnxModel


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kserve-peer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="NAME=EXPORT_DIR (repeatable)")
    parser.add_argument("--threads", action="append", default=[], help="NAME=N intra-op threads (default 1)")
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    args = parser.parse_args(argv)
    exports = parse_pairs(args.model, "--model")
    threads = {name: int(n) for name, n in parse_pairs(args.threads, "--threads").items()}
    # kserve.model_server parses sys.argv when imported (its gRPC message limits are read only there): leave
    # it none of our flags, and raise its 8 MiB limits to what TorchServe and the gateway take here (a
    # ModelInfer of 32 AlexNet tensors is 19 MB).
    sys.argv = [
        sys.argv[0],
        f"--grpc_max_receive_message_length={MAX_MESSAGE_BYTES}",
        f"--grpc_max_send_message_length={MAX_MESSAGE_BYTES}",
    ]
    import kserve  # type: ignore[import-not-found,unused-ignore]

    model_class = _model_class()
    models = []
    for name, export_dir in exports.items():
        model = model_class(name, Path(export_dir), threads.get(name, 1))
        model.load()
        models.append(model)
    server = kserve.ModelServer(
        http_port=args.http_port,
        grpc_port=args.grpc_port,
        # A log line per request (KServe's default) is I/O our gateway does not do; TorchServe, likewise,
        # runs at INFO here rather than its default DEBUG.
        enable_latency_logging=False,
    )
    # KServe's gRPC LoggingInterceptor logs every call's method at INFO: warnings and errors only, from here.
    logging.getLogger("kserve").setLevel(logging.WARNING)
    server.start(models)


if __name__ == "__main__":
    main()
