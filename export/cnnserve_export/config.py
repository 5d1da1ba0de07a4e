"""Training settings, kept free of heavy imports so the CLI can show their defaults instantly."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainConfig"]


@dataclass(frozen=True)
class TrainConfig:
    model: str = "lenet"
    dataset: str = "digits"
    out: str = "checkpoints/lenet"
    name: str | None = None  # serving name; defaults to the architecture name
    data_dir: str | None = None
    download: bool = False
    epochs: int = 40
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    batch_size: int = 64
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # cosine | constant
    augment: bool = True
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    num_classes: int | None = None  # defaults to the dataset's class count
    train_subset: int | None = None  # train on a seeded subset of this many images
    eval_subset: int | None = None  # evaluate on a seeded subset of this many test images
    eval_batch_size: int = 256
    dry_run: bool = False  # one batch of training and one of evaluation: a smoke test
    progress: bool | None = None  # tqdm bars; None: only when stdout is a terminal
    version: str = "1.0"
