"""The one contract between the gateway and the TorchServe worker: typed requests and replies.

Both sides use this module, so one field, default or check of an operation is written here once:

- the gateway builds a request (its ``__post_init__`` runs the operation's checks before the hop), sends it
  with :func:`envelope` and reads the worker's answer back with :func:`read_reply`, which gives the request's
  own reply type (or raises the worker's error);
- the worker parses what TorchServe hands it with :func:`parse_request` (the encodings below), which builds
  the same request types and so runs the same checks on arrival, and answers with a reply's ``to_json``
  (or, for a classify request that asked for it, :func:`pack_classify`).

These encodings reach the worker (``docs/handler-protocol.md``):

1. **Raw bytes** (``curl -T digit.png``): TorchServe hands us ``{"body": <bytes>}``: classify one image.
2. **JSON** (``Content-Type: application/json``): ``{"op": ..., "inputs": [...], ...}``. Images travel as
   ``{"image_b64": ...}``, tensors as ``{"shape": [...], "data": [floats]}`` or with ``data_b64``.
   A bare ``{"shape": ..., "data": ...}`` is one tensor to classify.
3. **Packed envelope** (the gateway, over TorchServe's gRPC ``input`` map): ``op`` and ``meta`` (JSON, the
   same fields as 2 with inputs described as ``{"kind": "image", "bytes": n}`` or ``{"kind": "tensor",
   "shape": [...], "bytes": n}``), and every input's raw bytes concatenated under ``inputs``: one entry, no
   base64; the worker takes each input as a view into it. :func:`envelope` writes it.
4. **Envelope** (older gateways): the same ``op`` and ``meta``, with input *i*'s bytes under ``input.<i>``
   (:func:`legacy_envelope`).

Replies are JSON objects; a failed request's is ``{"error": {"code", "message", "field_violations"}}``. A
classify request with ``"reply": "packed"`` (the gateway's) is answered with a binary body instead
(``ClassifyReply.to_packed`` / ``from_packed``: ``PACKED_MAGIC``, a version byte, a JSON header, then
``int32 [N, k]`` class indices and ``float32 [N, k]`` probabilities); :func:`read_reply` reads both.
The module is torch-free and Python 3.9-compatible: it ships inside the archives with the worker code.

The package: :mod:`.defaults` (every default and bound, once), :mod:`.requests` (request types and their
checks), :mod:`.replies` (reply types and the error body), :mod:`.wire` (the encodings). Import from here.
"""

from cnnserve.contract.defaults import (
    DEFAULT_MOMENTUM,
    DEFAULT_TOP_K,
    DEFAULT_TRAIN_LAYERS,
    DEFAULT_WEIGHT_DECAY,
    MAX_REQUEST_ID_CHARS,
    MAX_TOP_K,
    OPS,
    PACKED_REPLY,
    REPLY_FORMATS,
    TRAIN_LAYERS,
)
from cnnserve.contract.replies import (
    PACKED_MAGIC,
    PACKED_VERSION,
    ClassifyReply,
    ClassScore,
    FineTuneReply,
    ModelInfo,
    Prediction,
    RevisionChangeReply,
    RevisionInfo,
    RevisionsReply,
    ShapesReply,
    WorkerTiming,
    error_from_json,
    error_json,
    is_packed,
    pack_classify,
)
from cnnserve.contract.requests import (
    ClassifyRequest,
    FineTuneRequest,
    InfoRequest,
    Operation,
    RawInput,
    Request,
    ResetRequest,
    RevisionsRequest,
    RollbackRequest,
    ShapesRequest,
    check_image,
    check_tensor,
)
from cnnserve.contract.wire import encode_json, envelope, legacy_envelope, parse_request, read_reply

__all__ = [
    "OPS",
    "TRAIN_LAYERS",
    "DEFAULT_TOP_K",
    "MAX_TOP_K",
    "DEFAULT_MOMENTUM",
    "DEFAULT_WEIGHT_DECAY",
    "DEFAULT_TRAIN_LAYERS",
    "MAX_REQUEST_ID_CHARS",
    "PACKED_REPLY",
    "REPLY_FORMATS",
    "PACKED_MAGIC",
    "PACKED_VERSION",
    "RawInput",
    "check_image",
    "check_tensor",
    "ClassifyRequest",
    "ShapesRequest",
    "FineTuneRequest",
    "InfoRequest",
    "RevisionsRequest",
    "RollbackRequest",
    "ResetRequest",
    "Operation",
    "Request",
    "ClassScore",
    "Prediction",
    "WorkerTiming",
    "ClassifyReply",
    "ShapesReply",
    "FineTuneReply",
    "ModelInfo",
    "RevisionInfo",
    "RevisionsReply",
    "RevisionChangeReply",
    "parse_request",
    "envelope",
    "legacy_envelope",
    "read_reply",
    "pack_classify",
    "is_packed",
    "encode_json",
    "error_json",
    "error_from_json",
]
