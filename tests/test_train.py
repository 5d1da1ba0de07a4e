"""Training on real data: accuracy, the steps it records, reproducibility, a self-describing checkpoint."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from cnnserve.card import load_card
from cnnserve.errors import InvalidInputError
from cnnserve.weights import sha256_file
from cnnserve_export.config import TrainConfig
from cnnserve_export.data import ImageData
from cnnserve_export.train import TrainResult, train
from tests.helpers import torch_threads


def test_lenet_on_digits_reaches_90_percent(lenet_checkpoint: TrainResult) -> None:
    card = lenet_checkpoint.card
    assert card.training["test_accuracy"] >= 0.90
    assert card.dataset == {
        "name": "digits",
        "source": card.dataset["source"],
        "train_size": 1347,
        "test_size": 450,
        "seed": 0,
    }


def test_checkpoint_describes_itself(lenet_checkpoint: TrainResult) -> None:
    out = lenet_checkpoint.out
    card = load_card(out)
    assert card.architecture == "lenet" and card.arch_args == {"num_classes": 10, "in_channels": 1}
    assert card.input_shape == (1, 32, 32) and card.labels == [str(i) for i in range(10)]
    assert card.weights_sha256 == sha256_file(out / "weights.safetensors")
    assert 0.0 < card.normalization.mean[0] < 0.5 and card.normalization.std[0] > 0.1
    for key in ("final_train_loss", "test_accuracy", "wall_seconds", "device", "torch_version", "steps"):
        assert key in card.training
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == list(range(1, 13))
    assert rows[-1]["test_accuracy"] == card.training["test_accuracy"]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_alexnet_trains_on_a_small_subset(tmp_path: Path, digits: ImageData) -> None:
    """Six steps run, record finite losses, and move the weights. Whether six SGD steps lower AlexNet's loss
    is up to the kernels (and dropout); LeNet's accuracy above shows that training learns."""
    subset = digits.subset(train=32, test=32, seed=0)
    config = TrainConfig(
        model="alexnet",
        dataset="digits",
        out=str(tmp_path / "six"),
        epochs=6,
        batch_size=32,  # one step per epoch: the same 32 images each time
        lr=0.01,
        augment=False,
        lr_schedule="constant",
        device="cpu",
        progress=False,
    )
    result = train(config, data=subset, log=lambda _: None)
    losses = [row["train_loss"] for row in result.history]
    assert [row["step"] for row in result.history] == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(loss) for loss in losses + [row["test_loss"] for row in result.history])
    # An untrained 10-class network is near uniform: its first cross-entropy is about ln 10.
    assert losses[0] == pytest.approx(math.log(10), abs=0.05)
    assert result.card.training["final_train_loss"] == losses[-1] and result.card.training["steps"] == 6
    assert result.card.arch_args["num_classes"] == 10
    # The same seed and first step as a dry run (one step): the five steps after it changed the weights.
    one = train(replace(config, out=str(tmp_path / "one"), dry_run=True), data=subset, log=lambda _: None)
    assert one.card.training["steps"] == 1 and one.card.weights_sha256 != result.card.weights_sha256


def test_training_is_reproducible(tmp_path: Path, digits: ImageData) -> None:
    """Bit-identical weights need the same kernels and thread count: pinned here (CPU, one thread)."""
    subset = digits.subset(train=200, test=64)
    shas = []
    with torch_threads(1):
        for run in ("a", "b"):
            config = TrainConfig(out=str(tmp_path / run), epochs=2, device="cpu", progress=False)
            shas.append(train(config, data=subset, log=lambda _: None).card.weights_sha256)
    assert shas[0] == shas[1]


def test_each_epoch_logs_the_learning_rate_its_last_step_used(tmp_path: Path, digits: ImageData) -> None:
    """Cosine decay over 3 epochs of 2 steps: the row of the epoch ending at step s logs step s-1's rate
    (the last one applied), not step s's; the final epoch's is above zero, which a cosine reaches only after
    the last step."""
    subset = digits.subset(train=128, test=32, seed=0)
    config = TrainConfig(out=str(tmp_path), epochs=3, batch_size=64, lr=0.05, device="cpu", progress=False)
    result = train(config, data=subset, log=lambda _: None)
    assert [row["step"] for row in result.history] == [2, 4, 6]
    for row in result.history:
        used = 0.5 * config.lr * (1.0 + math.cos(math.pi * (row["step"] - 1) / 6))
        assert row["lr"] == pytest.approx(used, rel=1e-12)
    assert result.history[-1]["lr"] > 0.0
    logged = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged == [row["lr"] for row in result.history]


def test_dry_run_takes_one_step(tmp_path: Path, digits: ImageData) -> None:
    result = train(
        TrainConfig(out=str(tmp_path), dry_run=True, progress=False), data=digits, log=lambda _: None
    )
    assert result.card.training["steps"] == 1
    assert (tmp_path / "weights.safetensors").exists()


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"lr": 0.0}, "lr"),
        ({"lr": float("nan")}, "lr"),
        ({"num_classes": 5}, "num_classes"),
        ({"model": "lenet", "dataset": "cifar10"}, "dataset"),
        ({"device": "tpu"}, "device"),
    ],
)
def test_bad_settings_are_refused(
    tmp_path: Path, digits: ImageData, overrides: dict[str, object], field: str
) -> None:
    config = TrainConfig(out=str(tmp_path), progress=False, **overrides)  # type: ignore[arg-type]
    data = digits if overrides.get("dataset") != "cifar10" else ImageData(
        "cifar10", "test", digits.labels, digits.train_images, digits.train_targets,
        digits.test_images, digits.test_targets,
    )  # fmt: skip
    with pytest.raises(InvalidInputError) as caught:
        train(config, data=data, log=lambda _: None)
    assert caught.value.violations[0].field == field
