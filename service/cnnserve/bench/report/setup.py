"""What a run was set up with, beyond its settings: the archives it served and how its clients called them.

``results.json`` records this as ``"setup"`` so that the report states the run's own values. Each value is
read from the module that defines it (nothing is restated here).
"""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["describe_setup"]


def describe_setup() -> dict[str, Any]:
    """``{"archives": {model: ...}, "batched_twins": {model: ...}, "loadgen_channels", "finetune_lr"}``."""
    from cnnserve.bench.loadgen import LoadSpec
    from cnnserve.bench.scenarios import FINETUNE_LR
    from cnnserve.bench.servers import MODELS, TWIN_BATCHING
    from cnnserve_export.config import default_settings

    archives = {}
    for model in MODELS:
        settings = default_settings(model)
        archives[model] = {
            "batch_size": settings.batch_size,
            "max_batch_delay_ms": settings.max_batch_delay_ms,
            "min_workers": settings.min_workers,
            "max_workers": settings.max_workers,
            "threads": settings.threads,
            "format": settings.format,
        }
    channels = next(f.default for f in dataclasses.fields(LoadSpec) if f.name == "channels")
    return {
        "archives": archives,
        # The -batched twins: the same archive with TorchServe batching on.
        "batched_twins": {
            model: {"batch_size": size, "max_batch_delay_ms": delay}
            for model, (size, delay) in TWIN_BATCHING.items()
        },
        "loadgen_channels": channels,
        "finetune_lr": FINETUNE_LR,
    }
