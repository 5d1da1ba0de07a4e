"""One benchmark result row, and the statistics every scenario reports the same way.

Two kinds of points:

- *timed calls* (in-process runtimes, fine-tune steps, cold starts): every repetition is one call; the row
  gives per-call latency percentiles and the throughput at the median call;
- *load points* (a load generator keeping ``concurrency`` calls open for a few seconds, several times): the
  throughput is the median repetition's (min and max beside it); latency percentiles pool every call of every
  repetition.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "SCENARIOS",
    "Row",
    "percentile",
    "quantiles",
    "timed_row",
    "load_row",
]

# Every row name the harness writes, in report order.
SCENARIOS = (
    "ort-inprocess",
    "torchscript-inprocess",
    "service-inprocess",
    "torchserve-grpc",
    "torchserve-http",
    "gateway",
    "gateway-processes",
    "oip-grpc",
    "kserve-oip",
    "grpc-echo",
    "finetune-inprocess",
    "finetune-sgd-step",
    "finetune-gateway",
    "cold-start",
)

# Latency CDFs are stored as this many evenly spaced quantiles (0 %, 1 %, ..., 100 %).
CDF_POINTS = 101


@dataclass
class Row:
    name: str  # one of SCENARIOS
    model: str  # lenet | alexnet
    concurrency: int  # calls kept open at once
    images_per_call: int
    throughput_img_s: float | None  # images per second (None where it means nothing: cold start)
    p50_ms: float  # per-call latency percentiles
    p99_ms: float
    p90_ms: float = 0.0
    mean_ms: float = 0.0
    min_ms: float = 0.0
    calls: int = 0  # calls measured (warm-up excluded)
    errors: int = 0
    reps: int = 0  # repetitions behind the throughput figure
    throughput_min: float | None = None  # over repetitions
    throughput_max: float | None = None
    rep_throughputs: list[float] = field(default_factory=list)
    batching: str | None = None  # TorchServe batching of the registration called: on | off
    backend: str | None = None  # gateway rows: torchserve, or inprocess (smoke runs)
    inputs: str = "png"  # what a call carries: PNG images, or preprocessed float32 tensors
    client_cpu_percent: float | None = None  # the load generator's CPU, % of one core
    server_cpu_percent: dict[str, float] = field(default_factory=dict)  # per server process tree
    machine_cpu_percent: float | None = None  # all cores together, 100 % per core
    latency_cdf_ms: list[float] = field(default_factory=list)  # CDF_POINTS quantiles
    extra: dict[str, Any] = field(default_factory=dict)  # scenario-specific figures

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Row:
        return cls(**data)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100), linearly interpolated; 0.0 for no values."""
    if not values:
        return 0.0
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def quantiles(values: Sequence[float], points: int = CDF_POINTS) -> list[float]:
    if not values:
        return []
    levels = np.linspace(0.0, 1.0, points)
    return [round(float(v), 4) for v in np.quantile(np.asarray(values, dtype=np.float64), levels)]


def _latency_fields(latencies_ms: Sequence[float]) -> dict[str, Any]:
    return {
        "p50_ms": round(percentile(latencies_ms, 50), 4),
        "p90_ms": round(percentile(latencies_ms, 90), 4),
        "p99_ms": round(percentile(latencies_ms, 99), 4),
        "mean_ms": round(float(np.mean(latencies_ms)), 4) if latencies_ms else 0.0,
        "min_ms": round(min(latencies_ms), 4) if latencies_ms else 0.0,
        "latency_cdf_ms": quantiles(latencies_ms),
    }


def timed_row(name: str, model: str, images_per_call: int, latencies_ms: Sequence[float], **more: Any) -> Row:
    """A row for calls timed one by one (one repetition = one call)."""
    latency = _latency_fields(latencies_ms)
    per_call = [images_per_call * 1000.0 / ms for ms in latencies_ms if ms > 0]
    return Row(
        name=name,
        model=model,
        concurrency=1,
        images_per_call=images_per_call,
        throughput_img_s=round(images_per_call * 1000.0 / latency["p50_ms"], 2) if latency["p50_ms"] else 0.0,
        calls=len(latencies_ms),
        reps=len(latencies_ms),
        throughput_min=round(min(per_call), 2) if per_call else None,
        throughput_max=round(max(per_call), 2) if per_call else None,
        **latency,
        **more,
    )


def load_row(
    name: str,
    model: str,
    concurrency: int,
    images_per_call: int,
    rep_throughputs: Sequence[float],
    latencies_ms: Sequence[float],
    errors: int,
    **more: Any,
) -> Row:
    """A row for a load point: throughput per repetition, latencies pooled over repetitions."""
    return Row(
        name=name,
        model=model,
        concurrency=concurrency,
        images_per_call=images_per_call,
        throughput_img_s=round(percentile(rep_throughputs, 50), 2),
        calls=len(latencies_ms),
        errors=errors,
        reps=len(rep_throughputs),
        throughput_min=round(min(rep_throughputs), 2) if rep_throughputs else None,
        throughput_max=round(max(rep_throughputs), 2) if rep_throughputs else None,
        rep_throughputs=[round(t, 2) for t in rep_throughputs],
        **_latency_fields(latencies_ms),
        **more,
    )
