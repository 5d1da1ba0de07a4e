"""The layer table :func:`cnnserve.shapes.layer_shapes` returns, as plain data: no torch needed to read,
print or send one (the CLI's ``shapes --remote`` and the gateway use it without torch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from cnnserve.errors import InvalidInputError

__all__ = ["LayerInfo", "LayerTable", "parse_shape", "check_dims", "format_shape"]


@dataclass(frozen=True)
class LayerInfo:
    """One leaf layer. Shapes are per sample: the batch dimension is left out."""

    name: str
    type: str
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    parameters: int
    trainable: bool
    macs: int


@dataclass(frozen=True)
class LayerTable:
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    layers: tuple[LayerInfo, ...]
    total_parameters: int
    trainable_parameters: int
    total_macs: int
    parameter_bytes: int
    # Sum of every leaf layer's output at batch 1, in the parameters' dtype: what a forward pass holds.
    activation_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def format(self) -> str:
        """A torchsummary-like text table."""
        header = f"{'Layer':<16}{'Type':<12}{'Input':>18}{'Output':>18}{'Params':>14}{'MACs':>16}"
        rule = "-" * len(header)
        lines = [rule, header, rule]
        for layer in self.layers:
            lines.append(
                f"{layer.name:<16}{layer.type:<12}{format_shape(layer.input_shape):>18}"
                f"{format_shape(layer.output_shape):>18}{layer.parameters:>14,}{layer.macs:>16,}"
            )
        lines += [
            rule,
            f"Input: {format_shape(self.input_shape)}   Output: {format_shape(self.output_shape)}",
            f"Total params: {self.total_parameters:,}",
            f"Trainable params: {self.trainable_parameters:,}",
            f"Non-trainable params: {self.total_parameters - self.trainable_parameters:,}",
            f"MACs (batch 1): {self.total_macs:,}",
            f"Params size (MiB): {self.parameter_bytes / 2**20:.2f}",
            f"Activations size, batch 1 (MiB): {self.activation_bytes / 2**20:.2f}",
            rule,
        ]
        return "\n".join(lines)


def format_shape(shape: Sequence[int]) -> str:
    return "x".join(str(d) for d in shape)


def parse_shape(text: str) -> tuple[int, ...]:
    """Parse ``"3,224,224"`` (or ``3x224x224``) into a tuple of positive ints."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise InvalidInputError.for_field(
            "input_shape", f"{text!r} is not a shape; expected C,H,W such as 3,224,224"
        ) from None
    check_dims(shape)
    return shape


def check_dims(shape: Sequence[int]) -> None:
    if len(shape) != 3 or any(d <= 0 for d in shape):
        raise InvalidInputError.for_field(
            "input_shape", f"{tuple(shape)} is not a shape; expected three positive sizes C,H,W"
        )
    if math.prod(shape) > 2**31:
        raise InvalidInputError.for_field("input_shape", f"{tuple(shape)} is too large")
