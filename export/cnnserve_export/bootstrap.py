"""Build the default model store from the embedded data, so a fresh clone can serve without downloads.

LeNet is trained fully on scikit-learn's digits (seconds); AlexNet gets a short step budget (about two
minutes on two CPU cores) — enough to serve and fine-tune real weights, not to be a good digit classifier.
Only archives that are missing are built.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from cnnserve_export.archive import build_archive
from cnnserve_export.config import TrainConfig, default_settings
from cnnserve_export.export import export_checkpoint
from cnnserve_export.train import train

__all__ = ["DEFAULT_MODELS", "missing_models", "build_default_store"]

DEFAULT_MODELS: dict[str, TrainConfig] = {
    "lenet": TrainConfig(model="lenet", dataset="digits", epochs=40),
    # From scratch, AlexNet idles near chance for ~60 steps at this learning rate, then starts to learn:
    # 120 constant-rate steps reached 45 % on digits in our runs (about 2 minutes on two cores).
    "alexnet": TrainConfig(
        model="alexnet",
        dataset="digits",
        max_steps=150,
        batch_size=32,
        lr=0.01,
        lr_schedule="constant",
        weight_decay=0.0,
        augment=False,
        eval_subset=200,
    ),
}


def missing_models(model_store: str | Path) -> list[str]:
    return [name for name in DEFAULT_MODELS if not (Path(model_store) / f"{name}.mar").exists()]


def build_default_store(
    model_store: str | Path,
    work_dir: str | Path,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
    force: bool = False,
) -> list[Path]:
    """Train, export and archive each default model missing from ``model_store``; returns the new archives."""
    names = list(DEFAULT_MODELS) if force else missing_models(model_store)
    built = []
    for name in names:
        base = DEFAULT_MODELS[name]
        checkpoint = Path(work_dir) / name / "checkpoint"
        export_dir = Path(work_dir) / name / "export"
        log(f"building {name}: training on {base.dataset} (embedded data) ...")
        config = replace(base, out=str(checkpoint), name=name, progress=False)
        result = train(config, log=log)
        log(f"{name}: test accuracy {result.card.training['test_accuracy']:.2%}; exporting ...")
        export_checkpoint(checkpoint, export_dir)
        archive = build_archive(export_dir, model_store, default_settings(name))
        log(f"{name}: wrote {archive}")
        built.append(archive)
    return built
