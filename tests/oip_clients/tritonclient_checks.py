"""tritonclient (2.73) against a cnnserve gateway's Open Inference Protocol, over gRPC or HTTP.

Runs in .venv-tritonclient (never in cnnserve's .venv: it needs protobuf < 7), started by
tests/test_oip_clients.py with the target and the inputs in files; prints one JSON object of what the client
saw, and the test checks it against cnnserve.v1 Classify on the same inputs. Every call uses tritonclient's
defaults (HTTP: binary tensor data on, for inputs and outputs). It asserts nothing itself beyond what it must
to go on: the test owns the checks, so that a failure names the figure.

    python tritonclient_checks.py --protocol grpc --url 127.0.0.1:50051 --model lenet \
        --fp32 batch.npy --png a.png --png b.png --revision 0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

UNKNOWN_MODEL = "no-such-model"


def _error(exc: InferenceServerException) -> dict[str, Any]:
    return {"type": type(exc).__name__, "status": exc.status(), "message": exc.message()}


def _attempt(call: Any, *args: Any) -> dict[str, Any]:
    """``{"value": call(*args)}``, or ``{"error": ...}`` where the client raised its own exception."""
    try:
        return {"value": call(*args)}
    except InferenceServerException as exc:
        return {"error": _error(exc)}


def _response(result: Any, protocol: str) -> dict[str, Any]:
    """The response without its tensors: model name, version, id, parameters (as JSON)."""
    response = result.get_response(as_json=True) if protocol == "grpc" else result.get_response()
    outputs = [
        {key: value for key, value in output.items() if key not in ("contents", "data")}
        for output in response.get("outputs", [])
    ]
    return {key: value for key, value in response.items() if key != "raw_output_contents"} | {
        "outputs": outputs
    }


def _parameters(response: dict[str, Any]) -> dict[str, Any]:
    """Response parameters as plain values: gRPC's JSON gives ``{"revision": {"int64_param": "3"}}``."""
    plain: dict[str, Any] = {}
    for key, value in response.get("parameters", {}).items():
        if isinstance(value, dict) and len(value) == 1:
            (kind, inner), *_ = value.items()
            plain[key] = int(inner) if kind in ("int64_param", "uint64_param") else inner
        else:
            plain[key] = value
    return plain


def _classes(array: Any) -> list[list[dict[str, Any]]]:
    """Triton's classification output, ``b"<score>:<index>[:<label>]"`` per entry, as dicts per row."""
    rows = []
    for row in np.asarray(array).reshape(np.asarray(array).shape[0], -1):
        entries = []
        for item in row:
            text = item.decode() if isinstance(item, bytes) else str(item)
            score, index, *label = text.split(":", 2)
            entries.append({"score": float(score), "index": int(index), "label": label[0] if label else None})
        rows.append(entries)
    return rows


def main(argv: list[str]) -> dict[str, Any]:
    parser = argparse.ArgumentParser()
    parser.add_argument("--protocol", choices=("grpc", "http"), required=True)
    parser.add_argument("--url", required=True, help="HOST:PORT (tritonclient's form: no scheme)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--fp32", type=Path, required=True, help=".npy float32 (N, C, H, W)")
    parser.add_argument("--png", type=Path, action="append", required=True, help="an encoded image")
    parser.add_argument("--revision", type=int, required=True, help="the revision every infer pins")
    args = parser.parse_args(argv)

    grpc = args.protocol == "grpc"
    module: Any = grpcclient if grpc else httpclient
    client = module.InferenceServerClient(url=args.url)
    model, pinned = args.model, {"revision": args.revision}
    seen: dict[str, Any] = {
        "live": client.is_server_live(),
        "ready": client.is_server_ready(),
        "model_ready": client.is_model_ready(model),
        # tritonclient's gRPC is_model_ready raises where the server answers an error status (NOT_FOUND).
        "unknown_model_ready": _attempt(client.is_model_ready, UNKNOWN_MODEL),
        "server_metadata": client.get_server_metadata(as_json=True) if grpc else client.get_server_metadata(),
        "metadata": client.get_model_metadata(model, as_json=True)
        if grpc
        else client.get_model_metadata(model),
    }
    config = client.get_model_config(model, as_json=True) if grpc else client.get_model_config(model)
    seen["config"] = config.get("config", config) if grpc else config  # gRPC wraps it in {"config": ...}
    if grpc:
        seen["repository_index"] = client.get_model_repository_index(as_json=True).get("models", [])
    else:
        seen["repository_index"] = client.get_model_repository_index()

    # The names come from the server's metadata, as a client that knows nothing else would find them: the
    # FP32 input, the BYTES input, the (one) output.
    by_type = {tensor["datatype"]: tensor["name"] for tensor in seen["metadata"]["inputs"]}
    tensor_name, image_name = by_type["FP32"], by_type["BYTES"]
    (output,) = seen["metadata"]["outputs"]
    output_name = output["name"]

    def infer(inputs: list[Any], outputs: list[Any] | None = None, name: str = model) -> Any:
        return client.infer(name, inputs, outputs=outputs, parameters=pinned)

    # FP32 (N, C, H, W): the model's preprocessed input.
    batch = np.load(args.fp32).astype(np.float32)
    fp32 = module.InferInput(tensor_name, list(batch.shape), "FP32")
    fp32.set_data_from_numpy(batch)
    result = infer([fp32], [module.InferRequestedOutput(output_name)])
    probabilities = result.as_numpy(output_name)
    seen["fp32"] = {
        "response": _response(result, args.protocol),
        "parameters": _parameters(_response(result, args.protocol)),
        "dtype": str(probabilities.dtype),
        "shape": list(probabilities.shape),
        "probabilities": probabilities.astype(np.float64).tolist(),
    }
    # No outputs named: the server answers every output.
    everything = infer([fp32])
    seen["fp32_all_outputs"] = everything.as_numpy(output_name).astype(np.float64).tolist()

    # BYTES (N,): encoded images, decoded and preprocessed by the model's worker.
    pngs = np.array([path.read_bytes() for path in args.png], dtype=np.object_)
    images = module.InferInput(image_name, [len(pngs)], "BYTES")
    images.set_data_from_numpy(pngs)
    result = infer([images], [module.InferRequestedOutput(output_name)])
    probabilities = result.as_numpy(output_name)
    seen["bytes"] = {
        "parameters": _parameters(_response(result, args.protocol)),
        "dtype": str(probabilities.dtype),
        "shape": list(probabilities.shape),
        "probabilities": probabilities.astype(np.float64).tolist(),
    }

    # The classification extension: the top 3 classes per image instead of the probabilities.
    result = infer([images], [module.InferRequestedOutput(output_name, class_count=3)])
    classes = result.as_numpy(output_name)
    seen["classification"] = {"shape": list(classes.shape), "rows": _classes(classes)}

    # Errors: each must be a clean InferenceServerException (anything else ends this script with a traceback).
    errors: dict[str, Any] = {}
    try:
        infer([fp32], name=UNKNOWN_MODEL)
    except InferenceServerException as exc:
        errors["unknown_model"] = _error(exc)
    try:
        client.get_model_metadata(UNKNOWN_MODEL)
    except InferenceServerException as exc:
        errors["unknown_model_metadata"] = _error(exc)
    # Three channels for a one-channel model: a shape the model cannot take.
    wrong = np.zeros((batch.shape[0], batch.shape[1] + 2, *batch.shape[2:]), dtype=np.float32)
    bad_shape = module.InferInput(tensor_name, list(wrong.shape), "FP32")
    bad_shape.set_data_from_numpy(wrong)
    try:
        infer([bad_shape])
    except InferenceServerException as exc:
        errors["bad_shape"] = _error(exc)
    seen["errors"] = errors
    client.close()
    return seen


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
