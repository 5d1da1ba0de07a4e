"""Training and archive settings, kept free of heavy imports so the CLI can show their defaults instantly."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TrainConfig", "ArchiveSettings", "default_settings", "small_config"]


# The int8 export's calibration and accuracy gate (cnnserve export --precision int8; docs/precision.md).
DEFAULT_CALIBRATION_SIZE = 256  # training images; "a few hundred" (digits has 1347)
DEFAULT_MAX_ACCURACY_DROP = 0.5  # points of test accuracy below eager fp32
DEFAULT_MIN_AGREEMENT = 0.99  # top-1 agreement with eager fp32 on the clear held-out samples


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


def small_config(model: str, out: str, lenet_epochs: int = 12) -> TrainConfig:
    """A model trained in seconds on CPU from the bundled digits: LeNet for ``lenet_epochs`` (12: > 90 % test
    accuracy), AlexNet (10 classes) for 4 SGD steps on 64 images (real weights, not trained far). What the
    tests' fixtures and the GPU check serve."""
    if model == "alexnet":
        return TrainConfig(
            model="alexnet",
            out=out,
            max_steps=4,
            batch_size=16,
            lr=0.01,
            train_subset=64,
            eval_subset=64,
            device="cpu",
            progress=False,
        )
    return TrainConfig(model=model, out=out, epochs=lenet_epochs, device="cpu", progress=False)


@dataclass(frozen=True)
class ArchiveSettings:
    """What goes into ``model-config.yaml``: TorchServe's batching and workers, and the handler's settings."""

    name: str | None = None  # default: the model card's name
    format: str = "onnx"  # CPU, one thread: LeNet 2-4x faster than TorchScript; AlexNet even (docs/bench)
    # TorchServe's own batching is off by default: the gateway micro-batches, and behind it TorchServe's
    # batch delay only adds latency. Benchmarked here, gateway in front of LeNet with TorchServe batch 1 vs
    # batch 16 / 5 ms: p50 at 1 client 7.7 vs 12.6 ms; 8 clients 512 vs 335 img/s; 64 clients 1314 vs 1208.
    # Direct HTTP clients who want TorchServe batching: `cnnserve archive --batch-size 16
    # --max-batch-delay-ms 5`. (A delay of 0 makes TorchServe 0.12 wait about 100 ms instead.)
    batch_size: int = 1  # TorchServe batch: requests handed to one handle() call
    max_batch_delay_ms: int = 5
    min_workers: int = 2
    max_workers: int = 2
    response_timeout_s: int = 120
    device: str = "cpu"  # cpu | gpu (TorchServe assigns cuda:<id> to each worker)
    precision: str = "fp32"  # fp32 | int8 (the export's int8 graph, ONNX only: docs/precision.md)
    # Intra-op threads per worker; None: the worker's rule (serving/threads.py: the CPU quota's cores over the
    # workers, at most max_threads). LeNet is overhead-bound: 1 thread a worker (default_settings).
    threads: int | None = None
    max_threads: int | None = None
    max_inputs: int = 64
    max_finetune_batch: int = 256
    retention: int = 10
    runtime_cache: int = 4


def default_settings(architecture: str) -> ArchiveSettings:
    """Per-architecture defaults for a 2-core machine: AlexNet is heavy, so one worker (which takes the cores:
    no thread cap) and fewer revisions; LeNet two workers of one thread each."""
    if architecture == "alexnet":
        return ArchiveSettings(min_workers=1, max_workers=1, runtime_cache=2, max_finetune_batch=64)
    return ArchiveSettings(max_threads=1)
