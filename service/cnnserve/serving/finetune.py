"""One SGD step on a batch, as a plain function, and the trainable copy a worker keeps between steps."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["StepSettings", "StepResult", "sgd_step", "trainable_names"]


@dataclass(frozen=True)
class StepSettings:
    lr: float
    momentum: float = 0.9
    weight_decay: float = 0.0
    train_layers: str = "all"  # all | classifier


@dataclass(frozen=True)
class StepResult:
    loss_before: float  # eval-mode cross-entropy on the batch, before the step
    loss_after: float  # the same, after the step
    batch_accuracy: float  # eval-mode top-1 accuracy on the batch, before the step
    grad_norm: float  # L2 norm of the gradient over the trained parameters


def trainable_names(model: nn.Module, train_layers: str) -> list[str]:
    """Parameter names a step updates: all of them, or only the ``classifier`` head's."""
    names = [name for name, _ in model.named_parameters()]
    if train_layers == "classifier":
        return [name for name in names if name.startswith("classifier.")]
    return names


@torch.no_grad()
def _evaluate(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    model.eval()
    logits = model(inputs)
    return float(F.cross_entropy(logits, labels)), float((logits.argmax(1) == labels).float().mean())


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
    before and after are comparable. ``momentum_buffers`` (by parameter name) are continued and the updated
    ones returned. Never runs under ``torch.inference_mode``: autograd needs ordinary tensors.
    """
    loss_before, accuracy = _evaluate(model, inputs, labels)
    trained = set(trainable_names(model, settings.train_layers))
    parameters = dict(model.named_parameters())
    for name, parameter in parameters.items():
        parameter.requires_grad_(name in trained)
    ordered = [parameters[name] for name in parameters if name in trained]

    optimizer = torch.optim.SGD(
        ordered, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
    )
    if settings.momentum > 0:
        for name in trained:
            if name in momentum_buffers:
                buffer = momentum_buffers[name].to(parameters[name].device).clone()
                optimizer.state[parameters[name]]["momentum_buffer"] = buffer

    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(inputs), labels)
    loss.backward()  # type: ignore[no-untyped-call]
    grad_norm = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in ordered if p.grad is not None))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    loss_after, _ = _evaluate(model, inputs, labels)
    buffers = dict(momentum_buffers)
    for name in trained:
        state = optimizer.state.get(parameters[name], {})
        if state.get("momentum_buffer") is not None:
            buffers[name] = state["momentum_buffer"].detach().cpu()
    for parameter in parameters.values():
        parameter.requires_grad_(True)
    return StepResult(loss_before, loss_after, accuracy, grad_norm), buffers
