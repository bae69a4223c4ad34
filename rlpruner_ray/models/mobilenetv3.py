"""MobileNetV3-Small and -Large (Howard et al. 2019), CIFAR variant.

Block tables follow the paper. For 32x32 inputs the stem conv and the first
strided block run at stride 1, so the total downsampling is 8 instead of 32
and the last blocks still see 4x4 maps rather than 1x1.
"""

from __future__ import annotations

import torch
from torch import nn

from .common import init_weights


def _make_divisible(v: float, divisor: int = 8) -> int:
    # Round to a multiple of 8 (hardware-friendly) without losing >10% width.
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _conv_bn_act(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1,
                 act: type[nn.Module] | None = nn.ReLU) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if act is not None:
        layers.append(act())
    return nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    """Returns per-channel gates in [0, 1]; the caller multiplies (x * se(x)).

    1x1 convs instead of nn.Linear keep the tensor 4-D and keep the model's
    only nn.Linear layers in the classifier head.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        squeeze = _make_divisible(channels // 4, 8)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.relu = nn.ReLU()
        self.fc2 = nn.Conv2d(squeeze, channels, 1)
        self.gate = nn.Hardsigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gate(self.fc2(self.relu(self.fc1(self.pool(x)))))


class InvertedResidual(nn.Module):
    """Expand (1x1) -> depthwise (kxk) -> [SE] -> project (1x1, linear)."""

    def __init__(self, cin: int, kernel: int, expanded: int, cout: int,
                 use_se: bool, act: type[nn.Module], stride: int) -> None:
        super().__init__()
        self.use_res = stride == 1 and cin == cout
        # When the expansion ratio is 1 there is nothing to expand.
        self.expand = _conv_bn_act(cin, expanded, 1, act=act) if expanded != cin else nn.Identity()
        self.depthwise = _conv_bn_act(expanded, expanded, kernel, stride, groups=expanded, act=act)
        self.se = SqueezeExcite(expanded) if use_se else None
        self.project = _conv_bn_act(expanded, cout, 1, act=None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.depthwise(self.expand(x))
        if self.se is not None:
            out = out * self.se(out)
        out = self.project(out)
        return out + x if self.use_res else out


_RE, _HS = nn.ReLU, nn.Hardswish

# (kernel, expanded, out, SE, activation, stride); strides are the CIFAR ones,
# the paper's value is in the comment where it differs.
_SMALL = [
    (3, 16, 16, True, _RE, 1),  # paper: 2
    (3, 72, 24, False, _RE, 2),
    (3, 88, 24, False, _RE, 1),
    (5, 96, 40, True, _HS, 2),
    (5, 240, 40, True, _HS, 1),
    (5, 240, 40, True, _HS, 1),
    (5, 120, 48, True, _HS, 1),
    (5, 144, 48, True, _HS, 1),
    (5, 288, 96, True, _HS, 2),
    (5, 576, 96, True, _HS, 1),
    (5, 576, 96, True, _HS, 1),
]
_LARGE = [
    (3, 16, 16, False, _RE, 1),
    (3, 64, 24, False, _RE, 1),  # paper: 2
    (3, 72, 24, False, _RE, 1),
    (5, 72, 40, True, _RE, 2),
    (5, 120, 40, True, _RE, 1),
    (5, 120, 40, True, _RE, 1),
    (3, 240, 80, False, _HS, 2),
    (3, 200, 80, False, _HS, 1),
    (3, 184, 80, False, _HS, 1),
    (3, 184, 80, False, _HS, 1),
    (3, 480, 112, True, _HS, 1),
    (3, 672, 112, True, _HS, 1),
    (5, 672, 160, True, _HS, 2),
    (5, 960, 160, True, _HS, 1),
    (5, 960, 160, True, _HS, 1),
]


class MobileNetV3(nn.Module):
    def __init__(self, config: list, last_channels: int, num_classes: int = 10,
                 in_channels: int = 3, dropout: float = 0.2) -> None:
        super().__init__()
        # CIFAR: stride-1 stem (paper: stride 2).
        layers: list[nn.Module] = [_conv_bn_act(in_channels, 16, 3, 1, act=_HS)]
        cin = 16
        for kernel, expanded, cout, use_se, act, stride in config:
            layers.append(InvertedResidual(cin, kernel, expanded, cout, use_se, act, stride))
            cin = cout
        last_conv = 6 * cin
        layers.append(_conv_bn_act(cin, last_conv, 1, act=_HS))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv, last_channels),
            nn.Hardswish(),
            nn.Dropout(dropout),
            nn.Linear(last_channels, num_classes),
        )
        init_weights(self, linear="normal")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


def mobilenetv3_small(num_classes: int = 10, in_channels: int = 3) -> MobileNetV3:
    return MobileNetV3(_SMALL, 1024, num_classes, in_channels)


def mobilenetv3_large(num_classes: int = 10, in_channels: int = 3) -> MobileNetV3:
    return MobileNetV3(_LARGE, 1280, num_classes, in_channels)
