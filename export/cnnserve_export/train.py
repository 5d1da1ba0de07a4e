"""Train LeNet or AlexNet on real data and write a self-describing checkpoint.

The recipe is the tutorial's: SGD with momentum and cross-entropy, plus a cosine learning-rate decay and, for
the 28x28 datasets, light augmentation (random shifts; horizontal flips for Fashion-MNIST). A checkpoint
directory holds:

- ``weights.safetensors``   the trained weights
- ``model_card.json``       architecture, input, labels, normalisation, data, recipe, results, sha256
- ``metrics.jsonl``         one line per epoch (loss, accuracy, the learning rate of its last step, seconds)
- ``curves.png``            loss and accuracy curves
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnserve.card import WEIGHTS_FILE, ModelCard, Normalization, save_card
from cnnserve.errors import InvalidInputError
from cnnserve.models import ModelSpec, get_spec
from cnnserve.preprocess import Preprocessing, prepare_images
from cnnserve.weights import save_weights
from cnnserve_export.config import TrainConfig
from cnnserve_export.data import ImageData, load_dataset

__all__ = [
    "TrainConfig",
    "TrainResult",
    "EpochStats",
    "train",
    "train_epoch",
    "evaluate",
    "resolve_device",
    "measure_normalization",
]

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"


@dataclass(frozen=True)
class TrainResult:
    out: Path
    card: ModelCard
    history: list[dict[str, float]]


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise InvalidInputError.for_field("device", f"{requested}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError.for_field("device", f"{requested} was asked for but CUDA is not available")
    return device


def measure_normalization(images: torch.Tensor, pre: Preprocessing, chunk: int = 2048) -> Normalization:
    """Per-channel mean and std of the preprocessed (resized, padded) training images."""
    total = torch.zeros(pre.channels, dtype=torch.float64)
    squares = torch.zeros(pre.channels, dtype=torch.float64)
    count = 0
    for start in range(0, len(images), chunk):
        batch = prepare_images(images[start : start + chunk], pre, normalize=False).double()
        total += batch.sum(dim=(0, 2, 3))
        squares += batch.square().sum(dim=(0, 2, 3))
        count += batch.numel() // pre.channels
    mean = total / count
    std = (squares / count - mean.square()).clamp_min(1e-12).sqrt()
    return Normalization(tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std))


def _augment(images: torch.Tensor, generator: torch.Generator, flip: bool) -> torch.Tensor:
    """Random shifts of up to 2 pixels (and horizontal flips) on uint8 ``(N, C, H, W)`` images."""
    n, _, height, width = images.shape
    padded = F.pad(images, (2, 2, 2, 2))
    dy, dx = torch.randint(0, 5, (2,), generator=generator).tolist()
    shifted = padded[:, :, dy : dy + height, dx : dx + width]
    if flip:
        mask = torch.rand(n, generator=generator) < 0.5
        shifted = torch.where(mask.view(-1, 1, 1, 1), shifted.flip(-1), shifted)
    return shifted.contiguous()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    images: torch.Tensor,
    targets: torch.Tensor,
    pre: Preprocessing,
    device: torch.device,
    batch_size: int = 256,
    max_batches: int | None = None,
) -> tuple[float, float]:
    """Mean cross-entropy and top-1 accuracy of ``model`` on uint8 images."""
    was_training = model.training
    model.eval()
    loss_sum, correct, seen = 0.0, 0, 0
    for index, start in enumerate(range(0, len(images), batch_size)):
        if max_batches is not None and index >= max_batches:
            break
        batch = prepare_images(images[start : start + batch_size], pre).to(device)
        labels = targets[start : start + batch_size].to(device)
        logits = model(batch)
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(dim=1) == labels).sum())
        seen += len(labels)
    model.train(was_training)
    return loss_sum / max(seen, 1), correct / max(seen, 1)


def _learning_rate(config: TrainConfig, step: int, total_steps: int) -> float:
    if config.lr_schedule == "constant" or total_steps <= 1:
        return config.lr
    return 0.5 * config.lr * (1.0 + math.cos(math.pi * step / total_steps))


def _validate(config: TrainConfig, data: ImageData) -> int:
    spec = get_spec(config.model)
    if config.batch_size <= 0:
        raise InvalidInputError.for_field("batch_size", "must be positive")
    if not (config.lr > 0 and math.isfinite(config.lr)):
        raise InvalidInputError.for_field("lr", "must be a positive finite number")
    if config.epochs <= 0 or (config.max_steps is not None and config.max_steps <= 0):
        raise InvalidInputError.for_field("epochs", "epochs and max_steps must be positive")
    if config.lr_schedule not in ("cosine", "constant"):
        raise InvalidInputError.for_field("lr_schedule", "expected cosine or constant")
    base = data.name.split(":")[0]
    if base not in spec.datasets:
        raise InvalidInputError.for_field(
            "dataset", f"{config.model} does not train on {base} (it fits: {', '.join(spec.datasets)})"
        )
    num_classes = config.num_classes or data.num_classes
    if num_classes < data.num_classes:
        raise InvalidInputError.for_field(
            "num_classes", f"{num_classes} is fewer than the {data.num_classes} classes of {data.name}"
        )
    return num_classes


@dataclass(frozen=True)
class _Schedule:
    """How many optimizer steps a run takes, over how many epochs, and the learning rate of each step."""

    config: TrainConfig
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def of(cls, config: TrainConfig, train_size: int) -> _Schedule:
        steps_per_epoch = math.ceil(train_size / config.batch_size)
        total_steps = 1 if config.dry_run else (config.max_steps or steps_per_epoch * config.epochs)
        return cls(config, steps_per_epoch, total_steps)

    @property
    def epochs(self) -> int:
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def lr(self, step: int) -> float:
        """The learning rate of optimizer step ``step`` (0-based)."""
        return _learning_rate(self.config, step, self.total_steps)


@dataclass(frozen=True)
class _Setup:
    """What every phase of one run reads: the data, its preprocessing, the model and its optimizer."""

    spec: ModelSpec
    device: torch.device
    data: ImageData
    labels: list[str]
    normalization: Normalization
    pre: Preprocessing
    arch_args: dict[str, Any]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # the data order and augmentation draws, seeded apart from the weights
    schedule: _Schedule
    augment: bool
    flip: bool


@dataclass(frozen=True)
class EpochStats:
    step: int  # optimizer steps taken by the end of the epoch
    loss: float  # mean training cross-entropy over the epoch's images (at each batch's pre-step weights)
    accuracy: float
    lr: float  # the learning rate of the epoch's last step (nan if it took none)


def _setup(config: TrainConfig, data: ImageData | None, log: Callable[[str], None]) -> _Setup:
    """Load and check the data, measure its normalization, seed, and build the model and optimizer."""
    spec = get_spec(config.model)
    device = resolve_device(config.device)
    if data is None:
        data = load_dataset(
            config.dataset,
            data_dir=config.data_dir,
            download=config.download,
            channels=spec.in_channels,
            folder_size=spec.resize,
            seed=config.seed,
        )
    num_classes = _validate(config, data)
    if config.train_subset or config.eval_subset:
        data = data.subset(config.train_subset, config.eval_subset, seed=config.seed)

    # The global seed decides the initial weights (and dropout); the generator decides order and augmentation.
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    labels = data.labels + [f"class_{i}" for i in range(data.num_classes, num_classes)]
    pre_raw = Preprocessing(spec.in_channels, spec.resize, spec.pad, spec.default_mean, spec.default_std)
    normalization = measure_normalization(data.train_images, pre_raw)
    pre = replace(pre_raw, mean=normalization.mean, std=normalization.std)
    log(
        f"{config.model} on {data.name}: {len(data.train_targets)} train / {len(data.test_targets)} test "
        f"images, {num_classes} classes, device {device}, mean {normalization.mean} std {normalization.std}"
    )
    arch_args = {**spec.default_args, "num_classes": num_classes}
    model = spec.builder(**arch_args).to(device)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    return _Setup(
        spec=spec,
        device=device,
        data=data,
        labels=labels,
        normalization=normalization,
        pre=pre,
        arch_args=arch_args,
        model=model,
        optimizer=optimizer,
        generator=generator,
        schedule=_Schedule.of(config, len(data.train_targets)),
        augment=config.augment and data.train_images.shape[-1] >= 28,  # digits at 8x8 are too small to shift
        flip=config.augment and data.name == "fashion-mnist",
    )


def train_epoch(run: _Setup, config: TrainConfig, epoch: int, step: int, show_progress: bool) -> EpochStats:
    """One pass over the shuffled training images (epoch ``epoch``, 1-based), stopping at the schedule's last
    step; ``step`` is the number of optimizer steps taken before it."""
    from tqdm import tqdm

    model, optimizer, data, schedule = run.model, run.optimizer, run.data, run.schedule
    model.train()
    order = torch.randperm(len(data.train_targets), generator=run.generator)
    loss_sum, correct, seen = 0.0, 0, 0
    lr = float("nan")
    batches = range(0, len(order), config.batch_size)
    bar = tqdm(batches, desc=f"epoch {epoch}/{schedule.epochs}", disable=not show_progress, leave=False)
    for start in bar:
        if step >= schedule.total_steps:
            break
        index = order[start : start + config.batch_size]
        raw = data.train_images[index]
        if run.augment:
            raw = _augment(raw, run.generator, run.flip)
        inputs = prepare_images(raw, run.pre).to(run.device)
        targets = data.train_targets[index].to(run.device)
        lr = schedule.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        optimizer.step()
        step += 1
        loss_sum += loss.item() * len(targets)
        correct += int((logits.argmax(dim=1) == targets).sum())
        seen += len(targets)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    return EpochStats(step, loss_sum / max(seen, 1), correct / max(seen, 1), lr)


def _fit(
    config: TrainConfig, run: _Setup, metrics_path: Path, log: Callable[[str], None]
) -> list[dict[str, float]]:
    """Every epoch: train, evaluate on the test images, append the epoch's row to ``metrics_path``."""
    epochs = run.schedule.epochs
    show_progress = sys.stdout.isatty() if config.progress is None else config.progress
    eval_batches = 1 if config.dry_run else None
    history: list[dict[str, float]] = []
    metrics_path.write_text("")
    step = 0
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        stats = train_epoch(run, config, epoch, step, show_progress)
        step = stats.step
        test_loss, test_accuracy = evaluate(
            run.model,
            run.data.test_images,
            run.data.test_targets,
            run.pre,
            run.device,
            config.eval_batch_size,
            eval_batches,
        )
        row = {
            "epoch": epoch,
            "step": step,
            "lr": stats.lr,
            "train_loss": round(stats.loss, 6),
            "train_accuracy": round(stats.accuracy, 6),
            "test_loss": round(test_loss, 6),
            "test_accuracy": round(test_accuracy, 6),
            "seconds": round(time.perf_counter() - started, 3),
        }
        history.append(row)
        with metrics_path.open("a") as stream:
            stream.write(json.dumps(row) + "\n")
        log(
            f"epoch {epoch}/{epochs} step {step}: train loss {stats.loss:.4f}, "
            f"test loss {test_loss:.4f}, test accuracy {test_accuracy:.2%}"
        )
    return history


def _save_checkpoint(
    config: TrainConfig, run: _Setup, history: list[dict[str, float]], out: Path, wall_seconds: float
) -> ModelCard:
    """The weights and the model card that describes them."""
    run.model.eval()
    sha256 = save_weights(run.model.state_dict(), out / WEIGHTS_FILE)
    last = history[-1]
    card = ModelCard(
        name=config.name or config.model,
        architecture=config.model,
        arch_args=run.arch_args,
        input_shape=run.spec.input_shape,
        resize=run.spec.resize,
        pad=run.spec.pad,
        labels=run.labels,
        normalization=run.normalization,
        weights_sha256=sha256,
        version=config.version,
        dataset={
            "name": run.data.name,
            "source": run.data.source,
            "train_size": len(run.data.train_targets),
            "test_size": len(run.data.test_targets),
            "seed": config.seed,
        },
        training={
            **{k: v for k, v in asdict(config).items() if k not in ("out", "progress", "data_dir", "name")},
            "steps": int(last["step"]),
            "epochs_run": len(history),
            "final_train_loss": last["train_loss"],
            "test_loss": last["test_loss"],
            "test_accuracy": last["test_accuracy"],
            "wall_seconds": round(wall_seconds, 2),
            "device": str(run.device),
            "torch_version": torch.__version__,
        },
    )
    save_card(card, out)
    return card


def train(
    config: TrainConfig,
    data: ImageData | None = None,
    log: Callable[[str], None] = lambda message: print(message, file=sys.stderr),
) -> TrainResult:
    """Train as ``config`` says and write the checkpoint to ``config.out``.

    ``data`` may be given to skip loading (tests pass a small in-memory subset).
    """
    run = _setup(config, data, log)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    history = _fit(config, run, out / METRICS_FILE, log)
    wall_seconds = time.perf_counter() - started
    card = _save_checkpoint(config, run, history, out, wall_seconds)
    _plot_curves(history, out / CURVES_FILE, title=f"{config.model} on {run.data.name}")
    return TrainResult(out=out, card=card, history=history)


def _plot_curves(history: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    figure, (loss_axis, accuracy_axis) = plt.subplots(1, 2, figsize=(10, 4))
    loss_axis.plot(epochs, [row["train_loss"] for row in history], marker="o", label="train")
    loss_axis.plot(epochs, [row["test_loss"] for row in history], marker="o", label="test")
    loss_axis.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    loss_axis.legend()
    accuracy_axis.plot(epochs, [row["train_accuracy"] for row in history], marker="o", label="train")
    accuracy_axis.plot(epochs, [row["test_accuracy"] for row in history], marker="o", label="test")
    accuracy_axis.set(xlabel="epoch", ylabel="top-1 accuracy", title="accuracy")
    accuracy_axis.legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
