"""The model card: everything a trained model carries about itself, as one JSON file.

Training writes it, export adds the exported files and the parity report, archiving stamps the version, and
the TorchServe handler and the gateway read it. Nobody copies its constants anywhere else: the card plays the
role ``AlexNet_Weights.meta`` plays in torchvision.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from cnnserve.errors import FailedPreconditionError
from cnnserve.models.registry import build_model, get_spec

__all__ = ["CARD_FILE", "WEIGHTS_FILE", "Normalization", "ModelCard", "load_card", "save_card"]

CARD_FILE = "model_card.json"
WEIGHTS_FILE = "weights.safetensors"
CARD_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Normalization:
    """Per-channel constants measured on the training data: ``x = (pixel / 255 - mean) / std``."""

    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass
class ModelCard:
    name: str  # the serving name (TorchServe model name), e.g. "lenet"
    architecture: str  # registry key
    arch_args: dict[str, Any]  # constructor arguments, e.g. {"num_classes": 10, "in_channels": 1}
    input_shape: tuple[int, int, int]  # (C, H, W)
    resize: tuple[int, int]  # images are resized to this (H, W) ...
    pad: int  # ... then zero-padded by this much on each side
    labels: list[str]
    normalization: Normalization
    weights_file: str = WEIGHTS_FILE
    weights_sha256: str = ""
    version: str = "1.0"
    dataset: dict[str, Any] = field(default_factory=dict)  # name, source, train/test sizes, seed
    training: dict[str, Any] = field(default_factory=dict)  # recipe and results (test_accuracy, ...)
    exports: dict[str, str] = field(default_factory=dict)  # format -> file name
    parity: dict[str, Any] = field(default_factory=dict)  # the export parity report
    # What this directory serves: "fp32", or "int8" (an archive built with ``--precision int8``).
    precision: str = "fp32"
    # The precision report (``cnnserve export --precision``): per precision, accuracy on the held-out split,
    # top-1 agreement with eager fp32, the gate's verdict; the calibration set of int8.
    precisions: dict[str, Any] = field(default_factory=dict)
    schema_version: int = CARD_SCHEMA_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.labels)

    @property
    def channels(self) -> int:
        return self.input_shape[0]

    def build_model(self) -> nn.Module:
        """An untrained network with this card's architecture (load the weights separately)."""
        return build_model(self.architecture, **self.arch_args)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCard:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        try:
            values["input_shape"] = tuple(values["input_shape"])
            values["resize"] = tuple(values["resize"])
            norm = values["normalization"]
            values["normalization"] = Normalization(tuple(norm["mean"]), tuple(norm["std"]))
            card = cls(**values)
        except (KeyError, TypeError) as exc:
            raise FailedPreconditionError(f"model card is incomplete or malformed: {exc}") from None
        get_spec(card.architecture)  # unknown architecture -> NotFoundError
        return card


def load_card(directory: str | Path) -> ModelCard:
    path = Path(directory) / CARD_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise FailedPreconditionError(
            f"{path} not found: not a cnnserve checkpoint or export directory (run `cnnserve train` first)"
        ) from None
    except json.JSONDecodeError as exc:
        raise FailedPreconditionError(f"{path} is not valid JSON: {exc}") from None
    return ModelCard.from_dict(data)


def save_card(card: ModelCard, directory: str | Path) -> Path:
    path = Path(directory) / CARD_FILE
    path.write_text(json.dumps(card.to_dict(), indent=2) + "\n")
    return path
