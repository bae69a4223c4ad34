"""GoogLeNet (Inception v1, Szegedy et al. 2015), CIFAR variant.

The ImageNet stem (7x7/2 conv, pools, LRN) is replaced by one 3x3 conv to 192
channels at full resolution; the nine inception blocks keep their original
widths. Every conv is followed by BN + ReLU, the 5x5 branch is built from two
3x3 convs, and the auxiliary classifiers are dropped so the only nn.Linear is
the final classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import init_weights


def _conv_bn_relu(cin: int, cout: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class Inception(nn.Module):
    """Four parallel branches whose outputs are concatenated on channels."""

    def __init__(
        self,
        in_planes: int,
        n1x1: int,
        n3x3_reduce: int,
        n3x3: int,
        n5x5_reduce: int,
        n5x5: int,
        pool_planes: int,
    ) -> None:
        super().__init__()
        self.b1 = _conv_bn_relu(in_planes, n1x1, 1)
        self.b2 = nn.Sequential(
            _conv_bn_relu(in_planes, n3x3_reduce, 1),
            _conv_bn_relu(n3x3_reduce, n3x3, 3),
        )
        # Two stacked 3x3 convs see a 5x5 window with fewer weights.
        self.b3 = nn.Sequential(
            _conv_bn_relu(in_planes, n5x5_reduce, 1),
            _conv_bn_relu(n5x5_reduce, n5x5, 3),
            _conv_bn_relu(n5x5, n5x5, 3),
        )
        self.b4 = nn.Sequential(
            nn.MaxPool2d(3, stride=1, padding=1),
            _conv_bn_relu(in_planes, pool_planes, 1),
        )
        self.out_channels = n1x1 + n3x3 + n5x5 + pool_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], dim=1)


class GoogLeNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.pre_layers = _conv_bn_relu(in_channels, 192, 3)
        self.a3 = Inception(192, 64, 96, 128, 16, 32, 32)
        self.b3 = Inception(256, 128, 128, 192, 32, 96, 64)
        # padding=1 lets the pools work down to 1x1 maps (inputs >= 8x8 and smaller).
        self.pool3 = nn.MaxPool2d(3, stride=2, padding=1)
        self.a4 = Inception(480, 192, 96, 208, 16, 48, 64)
        self.b4 = Inception(512, 160, 112, 224, 24, 64, 64)
        self.c4 = Inception(512, 128, 128, 256, 24, 64, 64)
        self.d4 = Inception(512, 112, 144, 288, 32, 64, 64)
        self.e4 = Inception(528, 256, 160, 320, 32, 128, 128)
        self.pool4 = nn.MaxPool2d(3, stride=2, padding=1)
        self.a5 = Inception(832, 256, 160, 320, 32, 128, 128)
        self.b5 = Inception(832, 384, 192, 384, 48, 128, 128)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(self.b5.out_channels, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_layers(x)
        x = self.pool3(self.b3(self.a3(x)))
        x = self.e4(self.d4(self.c4(self.b4(self.a4(x)))))
        x = self.b5(self.a5(self.pool4(x)))
        return self.linear(torch.flatten(self.avgpool(x), 1))


def googlenet(num_classes: int = 10, in_channels: int = 3) -> GoogLeNet:
    return GoogLeNet(num_classes, in_channels)
