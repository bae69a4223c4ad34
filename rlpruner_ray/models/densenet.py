"""DenseNet-BC-121 (Huang et al. 2017), CIFAR variant.

Growth rate 32, dense blocks of 6/12/24/16 bottleneck layers, transitions that
halve both channels (compression 0.5) and resolution. The ImageNet stem
(7x7/2 conv + max pool) becomes a single 3x3 stride-1 conv so 32x32 inputs
reach the last block at 4x4.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .common import init_weights


class Bottleneck(nn.Module):
    """Pre-activation BN-ReLU-Conv1x1 (4k) then BN-ReLU-Conv3x3 (k); the k new
    feature maps are concatenated in front of the input."""

    def __init__(self, in_planes: int, growth: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.relu2 = nn.ReLU()
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu1(self.bn1(x)))
        out = self.conv2(self.relu2(self.bn2(out)))
        return torch.cat([out, x], dim=1)


class Transition(nn.Module):
    """BN-ReLU-Conv1x1 to compress channels, then 2x2 average pool."""

    def __init__(self, in_planes: int, out_planes: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU()
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)
        # ceil_mode keeps odd/1x1 maps valid so small inputs (>= 8x8) work.
        self.pool = nn.AvgPool2d(2, ceil_mode=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.conv(self.relu(self.bn(x))))


class DenseNet(nn.Module):
    def __init__(
        self,
        block_sizes: tuple[int, ...] = (6, 12, 24, 16),
        growth: int = 32,
        reduction: float = 0.5,
        num_classes: int = 10,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        planes = 2 * growth
        self.conv1 = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, n in enumerate(block_sizes):
            layers = []
            for _ in range(n):
                layers.append(Bottleneck(planes, growth))
                planes += growth
            stages.append(nn.Sequential(*layers))
            if i < len(block_sizes) - 1:
                out_planes = int(math.floor(planes * reduction))
                stages.append(Transition(planes, out_planes))
                planes = out_planes
        self.features = nn.Sequential(*stages)
        # Blocks are pre-activation, so the last block's output still needs BN-ReLU.
        self.bn = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(planes, num_classes)
        init_weights(self, linear="zero-bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(self.conv1(x))
        x = self.pool(self.relu(self.bn(x)))
        return self.linear(torch.flatten(x, 1))


def densenet121(num_classes: int = 10, in_channels: int = 3) -> DenseNet:
    return DenseNet((6, 12, 24, 16), 32, 0.5, num_classes, in_channels)
