"""Prometheus metrics of the gateway, on their own registry (several gateways can share a process)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from cnnserve.errors import OverloadedError
from cnnserve.gateway.limits import ConcurrencyLimit
from cnnserve.gateway.status import code_name

__all__ = ["GatewayMetrics", "observed"]

T = TypeVar("T")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.rpcs = Counter(
            "cnnserve_gateway_rpcs",
            "RPCs answered, by method and status code",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "cnnserve_gateway_rpc_latency_seconds",
            "Time from receipt to reply, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_inputs = Histogram(
            "cnnserve_gateway_batch_inputs",
            "Inputs per micro-batch sent to TorchServe",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.shed = Counter(
            "cnnserve_gateway_shed",
            "RPCs refused with RESOURCE_EXHAUSTED (over the concurrency limit)",
            ["method"],
            registry=self.registry,
        )
        self.in_flight = Gauge("cnnserve_gateway_in_flight_rpcs", "RPCs in progress", registry=self.registry)
        self.model_serving = Gauge(
            "cnnserve_gateway_model_serving",
            "1 when TorchServe has a READY worker for the model",
            ["model"],
            registry=self.registry,
        )
        self.model_device = Gauge(
            "cnnserve_gateway_model_device",
            "1 for the device and provider a model's worker really uses (from its last GetModel)",
            ["model", "requested_device", "device", "provider"],
            registry=self.registry,
        )


async def observed(
    metrics: GatewayMetrics,
    limit: ConcurrencyLimit,
    method: str,
    work: Callable[[], Awaitable[T]],
    shed: bool = True,
) -> T:
    """Run one call of any transport under the gateway's one concurrency limit, and count it:
    ``cnnserve_gateway_rpcs{method, code}``, its latency, and ``shed`` when the limit refused it. ``method``
    names the transport's call (``Classify``, ``oip.grpc/ModelInfer``, ``oip.http/ModelInfer``). Errors
    propagate for the transport to map. Health checks pass ``shed=False``: a probe refused under load would
    take a busy gateway out of its balancer."""
    started = time.perf_counter()
    code = "OK"
    admitted = False
    try:
        if not shed:
            admitted = True
            return await work()
        with limit.admit():
            admitted = True
            return await work()
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except BaseException as error:
        if not admitted and isinstance(error, OverloadedError):  # shed here, not TorchServe's full queue
            metrics.shed.labels(method).inc()
        code = code_name(error)
        raise
    finally:
        metrics.rpcs.labels(method, code).inc()
        metrics.latency.labels(method).observe(time.perf_counter() - started)
