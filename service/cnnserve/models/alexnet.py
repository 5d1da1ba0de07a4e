"""AlexNet (the one-GPU variant torchvision ships), with the channel count and classes as arguments."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["AlexNet"]


class AlexNet(nn.Module):
    """Five conv layers and three fully connected layers; 61,100,840 parameters at 1000 classes.

    Expects ``(N, in_channels, 224, 224)`` inputs. Pooling is 2x2 as the project's spec says (torchvision
    uses overlapping 3x3/2 pooling; both give 55 -> 27 -> 13 -> 6 at 224x224 and the same parameters).
    There is no adaptive pooling: the fully connected head is sized for the 256x6x6 map that a 224x224 input
    gives, so other sizes fail at ``classifier.1``, which ``layer_shapes`` reports by name.
    """

    def __init__(self, num_classes: int = 1000, in_channels: int = 3, dropout: float = 0.5) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 64, kernel_size=11, stride=4, padding=2),  # (N, 64, 55, 55)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),  # (N, 64, 27, 27)
            nn.Conv2d(64, 192, kernel_size=5, padding=2),  # (N, 192, 27, 27)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),  # (N, 192, 13, 13)
            nn.Conv2d(192, 384, kernel_size=3, padding=1),  # (N, 384, 13, 13)
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),  # (N, 256, 13, 13)
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),  # (N, 256, 13, 13)
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),  # (N, 256, 6, 6)
        )
        self.classifier = nn.Sequential(
            nn.Dropout(p=dropout),
            nn.Linear(256 * 6 * 6, 4096),
            nn.ReLU(inplace=True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(inplace=True),
            nn.Linear(4096, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)  # (N, 9216)
        return self.classifier(x)  # type: ignore[no-any-return]
