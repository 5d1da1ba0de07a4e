"""The plots ``README.md`` shows, drawn from the rows of one run (Agg backend: no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cnnserve.bench.report.readme import PLOTS, variant
from cnnserve.bench.report.targets import title
from cnnserve.bench.results import Row

__all__ = ["write_plots"]

# Each line drawn: (scenario, TorchServe batching of the registration called, what a call carries, legend).
_SYSTEMS: list[tuple[str, str | None, str, str]] = [
    ("gateway", "off", "png", "gateway, TorchServe batching off (its default archives)"),
    ("gateway", "on", "png", "gateway, TorchServe batching on"),
    ("gateway", None, "png", "gateway (in-process backend)"),
    ("torchserve-grpc", "on", "png", "TorchServe gRPC, batching on"),
    ("torchserve-grpc", "off", "png", "TorchServe gRPC, batching off"),
    ("torchserve-http", "on", "png", "TorchServe HTTP, batching on"),
    ("torchserve-http", "off", "png", "TorchServe HTTP, batching off"),
    ("oip-grpc", "off", "tensor", "gateway OIP gRPC, FP32 tensors"),
    ("kserve-oip", None, "tensor", "KServe OIP gRPC, FP32 tensors (same requests)"),
    ("grpc-echo", None, "png", "gRPC echo (transport floor)"),
]


def _single_image_rows(
    rows: Sequence[Row], name: str, batching: str | None, model: str, inputs: str = "png"
) -> list[Row]:
    return sorted(
        (
            r
            for r in rows
            if r.name == name
            and r.model == model
            and r.images_per_call == 1
            and r.batching == batching
            and r.inputs == inputs
            and r.throughput_img_s is not None
        ),
        key=lambda r: r.concurrency,
    )


def _legend(axis: Any) -> None:
    """A legend for the lines drawn; none on a panel this run has no rows for (``--only``)."""
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7)


def write_plots(out: Path, rows: Sequence[Row]) -> list[str]:
    """The PNGs (Agg backend, no display needed); returns their file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    models = [m for m in ("lenet", "alexnet") if any(r.model == m for r in rows)]
    written = []

    figure, axes = plt.subplots(1, max(1, len(models)), figsize=(6 * max(1, len(models)), 4.5), squeeze=False)
    for axis, model in zip(axes[0], models, strict=False):
        for name, batching, inputs, label in _SYSTEMS:
            points = _single_image_rows(rows, name, batching, model, inputs)
            if points:
                axis.plot(
                    [r.concurrency for r in points],
                    [r.throughput_img_s for r in points],
                    marker="o",
                    label=label,
                )
        axis.set(
            xscale="log", yscale="log", xlabel="concurrent clients", ylabel="images / s", title=title(model)
        )
        axis.grid(True, which="both", alpha=0.3)
        _legend(axis)
    figure.suptitle(PLOTS["throughput_vs_concurrency.png"])
    figure.tight_layout()
    figure.savefig(out / "throughput_vs_concurrency.png", dpi=110)
    plt.close(figure)
    written.append("throughput_vs_concurrency.png")

    levels = sorted({r.concurrency for r in rows if r.name == "gateway" and r.images_per_call == 1}) or [1]
    columns = sorted({levels[0], levels[-1]})
    figure, axes = plt.subplots(
        max(1, len(models)), len(columns), figsize=(6 * len(columns), 4 * max(1, len(models))), squeeze=False
    )
    for axes_row, model in zip(axes, models, strict=False):
        for axis, concurrency in zip(axes_row, columns, strict=True):
            for name, batching, inputs, label in _SYSTEMS:
                row = next(
                    (
                        r
                        for r in _single_image_rows(rows, name, batching, model, inputs)
                        if r.concurrency == concurrency
                    ),
                    None,
                )
                if row is not None and row.latency_cdf_ms:
                    fractions = [i / (len(row.latency_cdf_ms) - 1) for i in range(len(row.latency_cdf_ms))]
                    axis.plot(row.latency_cdf_ms, fractions, label=label)
            clients = f"{concurrency} client{'s' if concurrency > 1 else ''}"
            axis.set(
                xscale="log",
                xlabel="latency (ms)",
                ylabel="fraction of calls",
                title=f"{title(model)}, {clients}",
            )
            # Ticks at 1, 2 and 5 per decade, as plain numbers: labelled minor ticks collide on narrow ranges.
            axis.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
            axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
            axis.xaxis.set_minor_formatter(NullFormatter())
            axis.grid(True, which="both", alpha=0.3)
            _legend(axis)
    figure.suptitle(PLOTS["latency_cdf.png"])
    figure.tight_layout()
    figure.savefig(out / "latency_cdf.png", dpi=110)
    plt.close(figure)
    written.append("latency_cdf.png")

    figure, axes = plt.subplots(
        1, max(1, len(models)), figsize=(6.5 * max(1, len(models)), 3.8), squeeze=False
    )
    for axis, model in zip(axes[0], models, strict=False):
        bars = [
            (
                f"{r.name} {variant(r)} ({r.images_per_call}/call, {r.concurrency} cl.)",
                r.throughput_img_s or 0.0,
            )
            for r in rows
            if r.model == model
            and r.throughput_img_s
            and r.name
            in (
                "ort-inprocess",
                "torchscript-inprocess",
                "service-inprocess",
                "gateway",
                "oip-grpc",
                "kserve-oip",
            )
            and (r.images_per_call > 1 or r.concurrency == max(levels or [1]))
        ]
        drawn = axis.barh([label for label, _ in bars], [value for _, value in bars])
        axis.bar_label(drawn, fmt="%.0f", fontsize=7, padding=2)
        axis.set(xlabel="images / s", title=title(model))
        axis.xaxis.set_major_locator(MaxNLocator(5))  # wide numbers: fewer ticks, or the labels collide
        axis.tick_params(axis="y", labelsize=7)
        axis.grid(True, axis="x", alpha=0.3)
    figure.suptitle(PLOTS["batched_calls.png"])
    figure.tight_layout()
    figure.savefig(out / "batched_calls.png", dpi=110)
    plt.close(figure)
    written.append("batched_calls.png")
    return written
