"""The gRPC gateway: cnnserve's front door, in front of TorchServe.

Layers, outermost first (protobuf types never pass below the first):

- :mod:`.server` and :mod:`.servicer`: grpc.aio server, an auth interceptor, thin servicers that shed load
  (:mod:`.limits`) and count metrics, health and reflection. :mod:`.converters` turns messages into
  :mod:`.types` and back.
- :mod:`.core`: :class:`~cnnserve.gateway.core.Gateway`, transport-agnostic: validation, micro-batching
  (:mod:`.batching`), routing, retries, model health.
- :mod:`.backend`: :class:`~cnnserve.gateway.backend.TorchServeBackend` (TorchServe's gRPC API, with the
  token) behind the :class:`~cnnserve.gateway.backend.Backend` protocol.

Nothing here imports torch: the gateway image does not carry it.
"""
