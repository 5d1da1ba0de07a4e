"""Model registry: architecture name -> how to build it and what it expects.

The registry holds what is true of an *architecture* (constructor, default input, datasets it fits). What is
true of a *trained model* (its classes, normalisation measured on its training data, its weights) lives in the
model card (:mod:`cnnserve.card`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from cnnserve.errors import NotFoundError
from cnnserve.models.alexnet import AlexNet
from cnnserve.models.lenet import LeNet

__all__ = ["ModelSpec", "MODELS", "get_spec", "build_model"]


@dataclass(frozen=True)
class ModelSpec:
    """What cnnserve knows about one architecture."""

    name: str
    builder: Callable[..., nn.Module]
    input_shape: tuple[int, int, int]  # (C, H, W) the network is sized for
    # Images are resized to `resize` and zero-padded by `pad` on each side to reach input_shape.
    resize: tuple[int, int]
    pad: int
    # Used until a model card supplies constants measured on the training data.
    default_mean: tuple[float, ...]
    default_std: tuple[float, ...]
    datasets: tuple[str, ...]
    default_args: Mapping[str, Any] = field(default_factory=dict)

    @property
    def in_channels(self) -> int:
        return self.input_shape[0]


MODELS: dict[str, ModelSpec] = {
    "lenet": ModelSpec(
        name="lenet",
        builder=LeNet,
        input_shape=(1, 32, 32),
        resize=(28, 28),  # 28x28 digits padded to 32x32, as in the tutorial
        pad=2,
        default_mean=(0.5,),
        default_std=(0.5,),
        datasets=("digits", "fashion-mnist", "mnist", "folder"),
        default_args={"num_classes": 10, "in_channels": 1},
    ),
    "alexnet": ModelSpec(
        name="alexnet",
        builder=AlexNet,
        input_shape=(3, 224, 224),
        resize=(224, 224),
        pad=0,
        default_mean=(0.485, 0.456, 0.406),
        default_std=(0.229, 0.224, 0.225),
        datasets=("digits", "fashion-mnist", "mnist", "cifar10", "folder"),
        default_args={"num_classes": 1000, "in_channels": 3, "dropout": 0.5},
    ),
}


def get_spec(architecture: str) -> ModelSpec:
    try:
        return MODELS[architecture]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise NotFoundError(f"unknown model architecture {architecture!r} (known: {known})") from None


def build_model(architecture: str, **overrides: Any) -> nn.Module:
    """Build an untrained network; ``overrides`` replace the registry's constructor defaults."""
    spec = get_spec(architecture)
    args = {**spec.default_args, **overrides}
    return spec.builder(**args)
