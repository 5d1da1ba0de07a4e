"""The Open Inference Protocol (KServe v2 / Triton) on the gateway: two thin transports over the same core.

- :mod:`.messages`: the OIP protobuf messages, in a descriptor pool of their own.
- :mod:`.tensors`: the tensor codec (raw, typed, JSON and binary tensors <-> the core's inputs and results).
- :mod:`.plane`: what both transports do with the core: infer, metadata, config, readiness, the index, and
  the per-call metrics and load shedding.
- :mod:`.servicer`: ``inference.GRPCInferenceService`` on the gateway's gRPC port.
- :mod:`.rest`: the OIP REST API (aiohttp) on its own port, with Triton's binary-tensor extension.
"""
