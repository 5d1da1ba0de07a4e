"""Per-layer shapes and parameter counts for any input size, like torchsummary.

:func:`layer_shapes` runs the network on a *meta* tensor: shapes propagate exactly as they would on real data,
but nothing is computed or allocated, so a 3x2048x2048 query on AlexNet costs as little as 3x224x224.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cnnserve.errors import ShapeMismatchError
from cnnserve.layer_table import LayerInfo, LayerTable, check_dims, format_shape, parse_shape

__all__ = ["LayerInfo", "LayerTable", "layer_shapes", "parse_shape"]


def _macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kernel_h, kernel_w = module.kernel_size
        per_output = (module.in_channels // module.groups) * kernel_h * kernel_w
        return output[0].numel() * per_output
    if isinstance(module, nn.Linear):
        return output[0].numel() * module.in_features
    return 0


def layer_shapes(model: nn.Module, input_shape: Sequence[int]) -> LayerTable:
    """Describe every leaf layer of ``model`` in forward order for one ``(C, H, W)`` input.

    Raises :class:`ShapeMismatchError` naming the first layer that cannot take what it is given (AlexNet at
    3x32x32, LeNet at 1x8x8, a wrong channel count).
    """
    shape = tuple(int(d) for d in input_shape)
    check_dims(shape)
    leaves = {module: name for name, module in model.named_modules() if not list(module.children())}
    # Counted before the call: inside functional_call the modules hold the meta stand-ins instead.
    own_parameters = {
        module: (
            sum(p.numel() for p in module.parameters(recurse=False)),
            any(p.requires_grad for p in module.parameters(recurse=False)),
        )
        for module in leaves
    }
    rows: list[LayerInfo] = []
    entered: list[tuple[str, nn.Module, tuple[int, ...]]] = []

    def before(module: nn.Module, args: tuple[Any, ...]) -> None:
        got = tuple(args[0].shape[1:])
        entered.append((leaves[module], module, got))
        # Say plainly what the layer wanted; the meta kernels' own messages are terse.
        if isinstance(module, nn.Conv2d) and got[0] != module.in_channels:
            raise ValueError(f"expects {module.in_channels} input channels, got {got[0]}")
        if isinstance(module, nn.Linear) and got[-1] != module.in_features:
            raise ValueError(f"expects {module.in_features} input features, got {got[-1]}")

    def after(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
        name, _, in_shape = entered[-1]
        parameters, trainable = own_parameters[module]
        rows.append(
            LayerInfo(
                name=name,
                type=type(module).__name__,
                input_shape=in_shape,
                output_shape=tuple(output.shape[1:]),
                parameters=parameters,
                trainable=trainable,
                macs=_macs(module, output),
            )
        )

    handles = []
    for module in leaves:
        handles.append(module.register_forward_pre_hook(before))
        handles.append(module.register_forward_hook(after))
    # Meta stand-ins for every tensor the module owns: the real weights are neither read nor moved.
    meta_state = {
        name: torch.empty_like(tensor, device="meta")
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]
    }
    dtype = next(model.parameters()).dtype
    sample = torch.empty((1, *shape), dtype=dtype, device="meta")
    try:
        with torch.no_grad():
            output = torch.func.functional_call(model, meta_state, (sample,))
    except (RuntimeError, ValueError) as exc:
        if not entered:
            raise
        name, module, in_shape = entered[-1]
        reason = str(exc).strip().splitlines()[0]
        raise ShapeMismatchError(
            f"input {format_shape(shape)} does not fit layer {name} ({type(module).__name__}), "
            f"which got {format_shape(in_shape)}: {reason}",
            layer=name,
            input_shape=shape,
        ) from None
    finally:
        for handle in handles:
            handle.remove()

    parameters = list(model.parameters())
    element_size = sample.element_size()
    return LayerTable(
        input_shape=shape,
        output_shape=tuple(output.shape[1:]),
        layers=tuple(rows),
        total_parameters=sum(p.numel() for p in parameters),
        trainable_parameters=sum(p.numel() for p in parameters if p.requires_grad),
        total_macs=sum(row.macs for row in rows),
        parameter_bytes=sum(p.numel() * p.element_size() for p in parameters),
        activation_bytes=sum(math.prod(row.output_shape) for row in rows) * element_size,
    )
