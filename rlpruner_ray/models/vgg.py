"""VGG-11/13/16/19 with BatchNorm, CIFAR variant.

Same conv stacks as Simonyan & Zisserman (configs A/B/D/E), each conv followed
by BN and ReLU. The ImageNet 4096-wide classifier is replaced by a small
512 -> 512 -> num_classes head on globally pooled features, as is usual for
CIFAR-sized inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import init_weights

# Numbers are conv output channels, "M" is a 2x2 max pool.
_CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg13": [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
              512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
              512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


class VGG(nn.Module):
    def __init__(
        self,
        config: str,
        num_classes: int = 10,
        in_channels: int = 3,
        dropout: float = 0.5,
        classifier_bn: bool = False,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for v in _CONFIGS[config]:
            if v == "M":
                # ceil_mode keeps a 1x1 map at 1x1 instead of failing, so five
                # pools still work on inputs as small as 8x8.
                layers.append(nn.MaxPool2d(2, 2, ceil_mode=True))
            else:
                layers += [
                    nn.Conv2d(channels, int(v), 3, padding=1, bias=False),
                    nn.BatchNorm2d(int(v)),
                    nn.ReLU(),
                ]
                channels = int(v)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        head: list[nn.Module] = [nn.Linear(channels, 512)]
        if classifier_bn:
            head.append(nn.BatchNorm1d(512))
        head.append(nn.ReLU())
        if dropout > 0:
            head.append(nn.Dropout(dropout))
        head.append(nn.Linear(512, num_classes))
        self.classifier = nn.Sequential(*head)
        init_weights(self, linear="normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def vgg11(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG("vgg11", num_classes, in_channels)


def vgg13(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG("vgg13", num_classes, in_channels)


def vgg16(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG("vgg16", num_classes, in_channels)


def vgg19(num_classes: int = 10, in_channels: int = 3) -> VGG:
    return VGG("vgg19", num_classes, in_channels)
