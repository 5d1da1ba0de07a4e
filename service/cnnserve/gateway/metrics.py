"""Prometheus metrics of the gateway, on their own registry (several gateways can share a process).

With ``--processes N`` (N > 1) each gateway process writes its values to files in the supervisor's
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client picks that value class at import, from the environment), and
the registry every process serves aggregates all of them the Prometheus way
(:class:`~prometheus_client.multiprocess.MultiProcessCollector`): counters and histograms summed over the
processes, alive or dead; gauges as their ``multiprocess_mode`` says. ``cnnserve_gateway_process_rpcs``
adds the one per-process view counters lose there: RPCs answered by each pid.
"""

from __future__ import annotations

import asyncio
import glob
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric

from cnnserve.errors import OverloadedError
from cnnserve.gateway.limits import ConcurrencyLimit
from cnnserve.gateway.status import code_name

__all__ = ["GatewayMetrics", "ProcessRpcsCollector", "observed"]

T = TypeVar("T")

_LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
_RPCS = "cnnserve_gateway_rpcs"


class ProcessRpcsCollector:
    """``cnnserve_gateway_process_rpcs_total{pid, method}``: the RPCs each gateway process answered, read from
    its own counter file in ``path`` (a dead process's stays: its calls were answered). It shows how the
    kernel spread the connections over the processes sharing a port, which the summed counters cannot."""

    def __init__(self, path: str) -> None:
        self._path = path

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        family = CounterMetricFamily(
            "cnnserve_gateway_process_rpcs",
            "RPCs answered by each gateway process, by pid and method (--processes > 1)",
            labels=["pid", "method"],
        )
        for path in sorted(glob.glob(os.path.join(self._path, "counter_*.db"))):
            pid = os.path.basename(path)[len("counter_") : -len(".db")]
            totals: dict[str, float] = {}
            for metric in MultiProcessCollector.merge([path]):  # type: ignore[no-untyped-call]
                if metric.name != _RPCS:
                    continue
                for sample in metric.samples:
                    if sample.name == _RPCS + "_total":
                        method = sample.labels.get("method", "")
                        totals[method] = totals.get(method, 0.0) + sample.value
            for method, total in sorted(totals.items()):
                family.add_metric([pid, method], total)
        yield family


class GatewayMetrics:
    """The gateway's metrics. ``multiprocess_dir``: this process is one of several gateway processes whose
    values live in that directory (its ``PROMETHEUS_MULTIPROC_DIR``); :attr:`registry` then serves all of
    them. Without it, the metrics are this instance's alone, on ``registry`` (default: a new one)."""

    def __init__(
        self, registry: CollectorRegistry | None = None, multiprocess_dir: str | None = None
    ) -> None:
        self.registry = registry or CollectorRegistry()
        own: CollectorRegistry | None = self.registry
        if multiprocess_dir:
            from prometheus_client import values
            from prometheus_client.multiprocess import MultiProcessCollector

            if values.ValueClass.__name__ != "MmapedValue":
                raise RuntimeError(
                    "prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR was set: this process's "
                    "metrics would never reach the files the other gateway processes read"
                )
            MultiProcessCollector(self.registry, path=multiprocess_dir)  # type: ignore[no-untyped-call]
            self.registry.register(ProcessRpcsCollector(multiprocess_dir))
            own = None  # the values are in the files: registering them too would count this process twice
        self.rpcs = Counter(
            _RPCS,
            "RPCs answered, by method and status code",
            ["method", "code"],
            registry=own,
        )
        self.latency = Histogram(
            "cnnserve_gateway_rpc_latency_seconds",
            "Time from receipt to reply, by method",
            ["method"],
            buckets=_LATENCY_BUCKETS,
            registry=own,
        )
        self.batch_inputs = Histogram(
            "cnnserve_gateway_batch_inputs",
            "Inputs per micro-batch sent to TorchServe",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=own,
        )
        self.shed = Counter(
            "cnnserve_gateway_shed",
            "RPCs refused with RESOURCE_EXHAUSTED (over the concurrency limit)",
            ["method"],
            registry=own,
        )
        # Across processes: the calls in progress add up (each process has its own limit).
        self.in_flight = Gauge(
            "cnnserve_gateway_in_flight_rpcs", "RPCs in progress", registry=own, multiprocess_mode="livesum"
        )
        # Every process reads the same TorchServe: the most recent reading of any live one is the truest.
        self.model_serving = Gauge(
            "cnnserve_gateway_model_serving",
            "1 when TorchServe has a READY worker for the model",
            ["model"],
            registry=own,
            multiprocess_mode="livemostrecent",
        )
        # Only ever set to 1, per device seen: 1 where any live process saw it.
        self.model_device = Gauge(
            "cnnserve_gateway_model_device",
            "1 for the device and provider a model's worker really uses (from its last GetModel)",
            ["model", "requested_device", "device", "provider"],
            registry=own,
            multiprocess_mode="livemax",
        )
        # Labelled children, looked up once: ``labels()`` validates and locks on every call, on the hottest
        # path of every transport.
        self._rpc_children: dict[tuple[str, str], Any] = {}
        self._latency_children: dict[str, Any] = {}

    def count_rpc(self, method: str, code: str, seconds: float) -> None:
        """One answered RPC: ``cnnserve_gateway_rpcs{method, code}`` and its latency."""
        counter = self._rpc_children.get((method, code))
        if counter is None:
            counter = self._rpc_children[(method, code)] = self.rpcs.labels(method, code)
        counter.inc()
        histogram = self._latency_children.get(method)
        if histogram is None:
            histogram = self._latency_children[method] = self.latency.labels(method)
        histogram.observe(seconds)


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
    try:
        if shed:
            try:
                limit.enter()
            except OverloadedError:  # shed here (TorchServe's full queue is an OverloadedError too, later)
                metrics.shed.labels(method).inc()
                raise
            try:
                return await work()
            finally:
                limit.leave()
        return await work()
    except asyncio.CancelledError:
        code = "CANCELLED"
        raise
    except BaseException as error:
        code = code_name(error)
        raise
    finally:
        metrics.count_rpc(method, code, time.perf_counter() - started)
