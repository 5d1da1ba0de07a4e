"""One SGD step on a batch, as a plain function, and the trainable copy a worker keeps between steps.

A step that diverges is refused, never applied: :func:`sgd_step` checks the loss, the gradient (before the
optimizer touches the weights), every updated parameter and momentum buffer, and the loss after; when any is
non-finite it puts the weights back as they were and raises :class:`DivergedStepError`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cnnserve.contract import DEFAULT_MOMENTUM, DEFAULT_TRAIN_LAYERS, DEFAULT_WEIGHT_DECAY

__all__ = [
    "DEFAULT_MAX_LR",
    "StepSettings",
    "StepResult",
    "DivergedStepError",
    "sgd_step",
    "trainable_names",
    "first_non_finite",
]

# The worker's default upper bound on a step's lr (``ServiceConfig.max_lr``, ``CNNSERVE_MAX_LR``). The
# models train at 0.05 and fine-tune at about 0.01; 10 is 200x the training rate, far past any useful SGD
# step on these cross-entropy classifiers, yet leaves room for experiments.
DEFAULT_MAX_LR = 10.0


@dataclass(frozen=True)
class StepSettings:
    lr: float
    momentum: float = DEFAULT_MOMENTUM
    weight_decay: float = DEFAULT_WEIGHT_DECAY
    train_layers: str = DEFAULT_TRAIN_LAYERS  # all | classifier
    max_grad_norm: float | None = None  # clip the gradient to this total L2 norm; None: no clipping


@dataclass(frozen=True)
class StepResult:
    loss_before: float  # eval-mode cross-entropy on the batch, before the step
    loss_after: float  # the same, after the step
    batch_accuracy: float  # eval-mode top-1 accuracy on the batch, before the step
    grad_norm: float  # L2 norm of the gradient over the trained parameters, before any clipping
    grad_clipped: bool = False  # the gradient was scaled down to max_grad_norm


class DivergedStepError(ArithmeticError):
    """The step produced a non-finite loss, gradient, parameter or momentum buffer; nothing was changed.

    ``reason`` says what, e.g. ``"loss after the step is nan"`` or ``"gradient norm is inf"``.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def trainable_names(model: nn.Module, train_layers: str) -> list[str]:
    """Parameter names a step updates: all of them, or only the ``classifier`` head's."""
    names = [name for name, _ in model.named_parameters()]
    if train_layers == "classifier":
        return [name for name in names if name.startswith("classifier.")]
    return names


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first tensor holding a NaN or an infinity, or None when all are finite."""
    for name, tensor in tensors:
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


@torch.no_grad()
def _evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(inputs)
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


def _check(value: float, what: str) -> None:
    if not math.isfinite(value):
        raise DivergedStepError(f"{what} is {value}")


def _grad_norm(parameters: list[nn.Parameter]) -> float:
    """Total L2 norm of the gradients, accumulated in float64 so a large finite norm does not overflow."""
    norms = [
        torch.linalg.vector_norm(p.grad.detach(), dtype=torch.float64)
        for p in parameters
        if p.grad is not None
    ]
    return float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0


def sgd_step(
    model: nn.Module,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    settings: StepSettings,
    momentum_buffers: dict[str, torch.Tensor],
) -> tuple[StepResult, dict[str, torch.Tensor]]:
    """Forward, cross-entropy, backward and one SGD step on ``model`` in place.

    ``inputs`` is a preprocessed float batch ``(N, C, H, W)``, ``labels`` int64 ``(N,)``. The gradient
    comes from a train-mode forward (dropout active); the losses and accuracy reported are eval-mode, so
    before and after are comparable. With ``settings.max_grad_norm`` the gradient is clipped to that total
    L2 norm (``torch.nn.utils.clip_grad_norm_``); the norm reported is the one before clipping.
    ``momentum_buffers`` (by parameter name) are continued and the updated ones returned; the given dict and
    its tensors are never modified. Never runs under ``torch.inference_mode``: autograd needs ordinary
    tensors.

    Raises :class:`DivergedStepError` when the loss before, the training loss, the gradient norm, an updated
    parameter or momentum buffer, or the loss after is non-finite; ``model`` then holds exactly the weights
    it had before the call.
    """
    loss_before, accuracy = _evaluate(model, inputs, labels)
    _check(loss_before, "loss before the step")
    trained = set(trainable_names(model, settings.train_layers))
    parameters = dict(model.named_parameters())
    ordered_names = [name for name in parameters if name in trained]
    ordered = [parameters[name] for name in ordered_names]
    saved = {name: parameters[name].detach().clone() for name in ordered_names}  # to undo a diverged step
    try:
        for name, parameter in parameters.items():
            parameter.requires_grad_(name in trained)
        optimizer = torch.optim.SGD(
            ordered, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
        if settings.momentum > 0:
            for name in ordered_names:
                if name in momentum_buffers:
                    buffer = momentum_buffers[name].to(parameters[name].device).clone()
                    optimizer.state[parameters[name]]["momentum_buffer"] = buffer

        model.train()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(inputs), labels)
        _check(float(loss.detach()), "training loss")
        loss.backward()  # type: ignore[no-untyped-call]
        grad_norm = _grad_norm(ordered)
        _check(grad_norm, "gradient norm")  # before optimizer.step(): a bad gradient never reaches a weight
        clipped = settings.max_grad_norm is not None and grad_norm > settings.max_grad_norm
        if settings.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(ordered, settings.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        bad = first_non_finite((name, parameters[name]) for name in ordered_names)
        if bad is not None:
            raise DivergedStepError(f"parameter {bad} has non-finite values after the update")
        buffers = dict(momentum_buffers)
        for name in ordered_names:
            state = optimizer.state.get(parameters[name], {})
            if state.get("momentum_buffer") is not None:
                buffers[name] = state["momentum_buffer"].detach().cpu()
        bad = first_non_finite((name, buffers[name]) for name in ordered_names if name in buffers)
        if bad is not None:
            raise DivergedStepError(f"momentum buffer of {bad} has non-finite values after the update")
        loss_after, _ = _evaluate(model, inputs, labels)
        _check(loss_after, "loss after the step")
    except BaseException:
        with torch.no_grad():
            for name, value in saved.items():
                parameters[name].copy_(value)
        raise
    finally:
        for parameter in parameters.values():
            parameter.requires_grad_(True)
            parameter.grad = None
    return StepResult(loss_before, loss_after, accuracy, grad_norm, clipped), buffers
