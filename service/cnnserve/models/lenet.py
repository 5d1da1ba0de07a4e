"""LeNet-5 as in PyTorch's "Neural Networks" tutorial, written the torchvision way."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["LeNet"]


class LeNet(nn.Module):
    """Two conv blocks and three fully connected layers; 61,706 parameters at 10 classes.

    Expects ``(N, in_channels, 32, 32)`` inputs (28x28 digits padded to 32x32).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5),  # (N, 6, 28, 28)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),  # (N, 6, 14, 14)
            nn.Conv2d(6, 16, kernel_size=5),  # (N, 16, 10, 10)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),  # (N, 16, 5, 5)
        )
        self.classifier = nn.Sequential(
            nn.Linear(16 * 5 * 5, 120),
            nn.ReLU(inplace=True),
            nn.Linear(120, 84),
            nn.ReLU(inplace=True),
            nn.Linear(84, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)  # (N, 400)
        return self.classifier(x)  # type: ignore[no-any-return]
