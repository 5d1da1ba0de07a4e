"""The Open Inference Protocol as a load target: ``inference.GRPCInferenceService/ModelInfer`` on the gateway.

The load generator's ``oip-grpc`` kind (:mod:`cnnserve.bench.loadgen`). Requests are built once and kept as
serialized ``ModelInferRequest`` bytes, the way the other gRPC clients keep their protos, so a caller only
sends: ``images_per_call`` PNGs as the ``image`` input (``BYTES [n]``, raw: a 4-byte little-endian length
before each), or preprocessed tensors as ``input`` (``FP32 [n, C, H, W]``, raw little-endian), asking for
``probabilities`` (``FP32 [n, classes]``, in ``raw_output_contents``). Replies are decoded as tritonclient
decodes them, and each is checked to carry ``n`` rows of probabilities.

This module imports grpc and the gateway's OIP messages only (its own descriptor pool): no torch.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from cnnserve.bench.loadgen import _GrpcPool, _images_for
from cnnserve.gateway.types import Timing

if TYPE_CHECKING:
    from cnnserve.bench.loadgen import LoadSpec

__all__ = ["KIND", "MODEL_INFER", "infer_requests", "OipGrpcClient"]

KIND = "oip-grpc"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
_LENGTH = struct.Struct("<I")
_FLOAT32_BYTES = 4


def infer_requests(spec: LoadSpec) -> list[bytes]:
    """Serialized ModelInferRequests, one per distinct window of ``spec.images`` (call i sends i's window)."""
    from cnnserve.gateway.oip.messages import pb

    count = spec.images_per_call

    def request(window: list[bytes]) -> bytes:
        if spec.tensor_shape:
            name, datatype, shape = "input", "FP32", [count, *spec.tensor_shape]
            raw = b"".join(window)  # (n, C, H, W) float32, the items back to back
        else:
            name, datatype, shape = "image", "BYTES", [count]
            raw = b"".join(_LENGTH.pack(len(image)) + image for image in window)
        message = pb.ModelInferRequest(
            model_name=spec.model,
            inputs=[pb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape)],
            outputs=[pb.ModelInferRequest.InferRequestedOutputTensor(name="probabilities")],
            raw_input_contents=[raw],
        )
        return bytes(message.SerializeToString())

    # Tensor calls are megabytes each: one request, sent again and again, keeps memory flat.
    distinct = 1 if spec.tensor_shape else max(1, min(len(spec.images), 64))
    return [request(_images_for(spec, i)) for i in range(distinct)]


class OipGrpcClient(_GrpcPool):
    """ModelInfer over the shared channel pool, with the gateway's token and TLS as the gateway kind has."""

    def __init__(self, spec: LoadSpec) -> None:
        from cnnserve.gateway.oip.messages import pb

        super().__init__(spec)
        self._rows = spec.images_per_call
        self._methods = [
            channel.unary_unary(MODEL_INFER, response_deserializer=pb.ModelInferResponse.FromString)
            for channel in self._channel_list
        ]
        self._payloads = infer_requests(spec)
        self.request_bytes = len(self._payloads[0])

    async def call(self, caller: int, index: int) -> Timing:
        method = self._methods[caller % len(self._methods)]
        reply: Any = await method(
            self._payloads[index % len(self._payloads)], timeout=self._timeout, metadata=self._metadata
        )
        (output,) = reply.outputs
        (raw,) = reply.raw_output_contents
        if output.datatype != "FP32" or list(output.shape)[:1] != [self._rows] or not raw:
            raise RuntimeError(f"a ModelInfer reply without {self._rows} rows of probabilities: {output}")
        if len(raw) != _FLOAT32_BYTES * self._rows * output.shape[1]:
            raise RuntimeError(f"{len(raw)} bytes of probabilities for shape {list(output.shape)}")
        return Timing()
