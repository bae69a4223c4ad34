"""Small user models written with functional code, one pattern each (plus the
issue's ``usernet2``), for the end-to-end ``compress`` checks of
tests/test_user_models.py and ``scripts/conformance.py --models``.
Each is ``tests.user_models:<name>``, called with ``num_classes=`` and ``in_channels=``."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _head(x, linear):
    return linear(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class UserNet2(nn.Module):
    """The model of issue 30, as the user wrote it: chunk, a grouped conv after a
    cat, a depthwise conv with channel multiplier 2, dilation, interpolate, a mean
    over H and W, one activation feeding both an add and a cat."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 32, 3, padding=1, bias=False); self.bn0 = nn.BatchNorm2d(32)
        self.left = nn.Conv2d(16, 16, 3, padding=2, dilation=2); self.right = nn.Conv2d(16, 16, 1)
        self.grp = nn.Conv2d(32, 64, 3, padding=1, groups=4, bias=False); self.bn1 = nn.BatchNorm2d(64)
        self.dw = nn.Conv2d(64, 128, 3, stride=2, padding=1, groups=64, bias=False); self.bn2 = nn.BatchNorm2d(128)
        self.pw = nn.Conv2d(128, 48, 1); self.up = nn.Conv2d(48, 48, 3, padding=1)
        self.head = nn.Sequential(nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, num_classes))

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        a, b = torch.chunk(x, 2, dim=1)
        x = torch.cat([F.relu(self.left(a)) + a, self.right(b)], dim=1)
        x = F.relu(self.bn1(self.grp(x)))
        x = F.relu(self.bn2(self.dw(x)))
        y = F.relu(self.pw(x))
        u = F.interpolate(self.up(F.max_pool2d(y, 2)), size=y.shape[-2:], mode="nearest")
        return self.head(torch.cat([y + u, y], dim=1).mean(dim=(2, 3)))


class Split(nn.Module):
    """Tensor.split into halves sized from the tensor itself, each through its own conv."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 24, 3, padding=1)
        self.a = nn.Conv2d(12, 12, 3, padding=1)
        self.b = nn.Conv2d(12, 16, 1)
        self.head = nn.Linear(28, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        a, b = x.split(x.shape[1] // 2, dim=1)
        return _head(torch.cat([F.relu(self.a(a)), F.relu(self.b(b))], dim=1), self.head)


class GroupedAfterCat(nn.Module):
    """A grouped conv (4 groups) reading the cat of two branches."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.a = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.b = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.grp = nn.Conv2d(32, 32, 3, padding=1, groups=4)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], dim=1)
        return _head(F.relu(self.grp(x)), self.head)


class DepthwiseMultiplier(nn.Module):
    """A depthwise conv with channel multiplier 2 (groups = in channels, out = 2 x in)."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(32, 24, 1)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        return _head(F.relu(self.pw(F.relu(self.dw(x)))), self.head)


class Dilated(nn.Module):
    """Dilated convs in a residual block."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.d1 = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.d2 = nn.Conv2d(16, 16, 3, padding=3, dilation=3)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        return _head(F.relu(x + self.d2(F.relu(self.d1(x)))), self.head)


class Interpolated(nn.Module):
    """A downsampled branch brought back with F.interpolate and added."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.low = nn.Conv2d(16, 16, 3, padding=1)
        self.mix = nn.Conv2d(16, 20, 1)
        self.head = nn.Linear(20, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        low = F.interpolate(self.low(F.avg_pool2d(x, 2)), scale_factor=2, mode="bilinear", align_corners=False)
        return _head(F.relu(self.mix(x + low)), self.head)


class MeanPooled(nn.Module):
    """A mean over H and W instead of a pooling layer."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.c1 = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 24, 3, stride=2, padding=1)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        return self.head(F.relu(self.c2(F.relu(self.c1(x)))).mean(dim=(2, 3)))


class AddAndCat(nn.Module):
    """One tensor feeding both an add and a cat."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.branch = nn.Conv2d(16, 16, 3, padding=1)
        self.fuse = nn.Conv2d(32, 24, 1)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.branch(x)) + x
        return _head(F.relu(self.fuse(torch.cat([y, x], dim=1))), self.head)


class Shuffled(nn.Module):
    """A channel shuffle between two grouped 1x1 convs (ShuffleNet's pattern)."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.g1 = nn.Conv2d(16, 16, 1, groups=2)
        self.g2 = nn.Conv2d(16, 24, 1, groups=2)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        x = F.relu(self.g1(F.relu(self.stem(x))))
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)
        return _head(F.relu(self.g2(x)), self.head)


class SEGated(nn.Module):
    """A squeeze-and-excitation gate: x * sigmoid(fc(mean(x)))."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv = nn.Conv2d(16, 24, 3, padding=1)
        self.fc1 = nn.Linear(24, 6)
        self.fc2 = nn.Linear(6, 24)
        self.head = nn.Linear(24, num_classes)

    def forward(self, x):
        x = F.relu(self.conv(F.relu(self.stem(x))))
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return _head(x * gate[:, :, None, None], self.head)


def usernet2(num_classes=10, in_channels=3):
    return UserNet2(num_classes, in_channels)


def split(num_classes=10, in_channels=3):
    return Split(num_classes, in_channels)


def grouped_after_cat(num_classes=10, in_channels=3):
    return GroupedAfterCat(num_classes, in_channels)


def depthwise_multiplier(num_classes=10, in_channels=3):
    return DepthwiseMultiplier(num_classes, in_channels)


def dilated(num_classes=10, in_channels=3):
    return Dilated(num_classes, in_channels)


def interpolated(num_classes=10, in_channels=3):
    return Interpolated(num_classes, in_channels)


def mean_pooled(num_classes=10, in_channels=3):
    return MeanPooled(num_classes, in_channels)


def add_and_cat(num_classes=10, in_channels=3):
    return AddAndCat(num_classes, in_channels)


def shuffled(num_classes=10, in_channels=3):
    return Shuffled(num_classes, in_channels)


def se_gated(num_classes=10, in_channels=3):
    return SEGated(num_classes, in_channels)


# every factory above, for the end-to-end family test and the conformance script
FAMILY = ("usernet2", "split", "grouped_after_cat", "depthwise_multiplier", "dilated", "interpolated",
          "mean_pooled", "add_and_cat", "shuffled", "se_gated")
