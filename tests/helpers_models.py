"""Factories used by tests/test_models.py through 'tests.helpers_models:<name>' paths."""

from torch import nn


def tiny(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A minimal conv-BN-ReLU-pool-linear CNN."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, num_classes),
    )


def raises(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    raise RuntimeError("boom from factory")


def not_a_module(num_classes: int = 10, in_channels: int = 3):
    return {"num_classes": num_classes}


NOT_CALLABLE = 42


# ---------------------------------------------------------------- functional user models
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def _shuffle(x, groups):
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


class FunctionalNet(nn.Module):
    """Written the way users write models: torch.cat, x + y, an SE gate x * gate,
    F.relu, F.adaptive_avg_pool2d, torch.flatten, a channel shuffle, a depthwise block."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.left = nn.Conv2d(16, 12, 3, padding=1)
        self.right = nn.Conv2d(16, 12, 1)
        self.dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False)
        self.dw_bn = nn.BatchNorm2d(24)
        self.pw = nn.Conv2d(24, 32, 1)
        self.skip = nn.Conv2d(24, 32, 1)
        self.se_reduce = nn.Conv2d(32, 8, 1)
        self.se_expand = nn.Conv2d(8, 32, 1)
        self.expand = nn.Conv2d(32, 48, 3, padding=1)
        self.head = nn.Linear(48, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        y = torch.cat([F.relu(self.left(x)), self.right(x)], dim=1)
        y = _shuffle(y, 2)
        y = F.relu(self.dw_bn(self.dw(y)))
        z = self.pw(y) + self.skip(y)
        gate = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(F.adaptive_avg_pool2d(z, 1)))))
        z = F.relu(self.expand(z * gate))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def functional(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return FunctionalNet(num_classes, in_channels)


class ConvHead(nn.Module):
    """Ends in a 1x1 conv classifier whose output is summed with a second conv's
    (squeezenet-like): neither may lose output channels."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.body = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.classifier = nn.Conv2d(16, num_classes, 1)
        self.side = nn.Conv2d(16, num_classes, 1)

    def forward(self, x):
        x = F.relu(self.bn(self.body(x)))
        return torch.flatten(F.adaptive_avg_pool2d(self.classifier(x) + self.side(x), 1), 1)


def conv_head(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ConvHead(num_classes, in_channels)


class Grouped(nn.Module):
    """A ResNeXt-style block: a grouped 3x3 conv (4 groups) between two 1x1 convs."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 32, 3, padding=1)
        self.reduce = nn.Conv2d(32, 16, 1)
        self.bn1 = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.bn2 = nn.BatchNorm2d(16)
        self.restore = nn.Conv2d(16, 32, 1)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = F.relu(self.bn2(self.grouped(F.relu(self.bn1(self.reduce(x))))))
        x = F.relu(x + self.restore(y))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def grouped(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return Grouped(num_classes, in_channels)


class ChannelCentred(nn.Module):
    """Subtracts the mean over channels: zeroing a channel's weights changes the
    others (masking is not removal), in a way no layer type announces."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.conv(x) + 1.0
        x = x - x.mean(dim=1, keepdim=True)
        x = F.relu(self.conv2(x))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def channel_centred(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ChannelCentred(num_classes, in_channels)


class ChannelFold(nn.Module):
    """Folds channels into the spatial axes (not a flatten, not a shuffle)."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 8, 3, padding=1)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x):
        x = self.conv(x)
        b, c, h, w = x.shape
        x = F.relu(self.conv2(x.reshape(b, 4, 2 * h, 2 * w)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def channel_fold(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ChannelFold(num_classes, in_channels)


class WithAttention(nn.Module):
    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        t = self.conv(x).flatten(2).transpose(1, 2)
        t, _ = self.attn(t, t, t)
        return self.head(t.mean(1))


def with_attention(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return WithAttention(num_classes, in_channels)


class ChannelNorm(nn.Module):
    """A LayerNorm over the channels (ConvNeXt's pattern): zeroing a channel still
    changes the statistics of the others, so masking is not exact there."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1)
        self.norm = nn.LayerNorm(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = self.norm(self.conv(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        x = F.relu(self.conv2(F.relu(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def channel_norm(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ChannelNorm(num_classes, in_channels)


class ConcatDepthwise(nn.Module):
    """Two branches concatenated, then a depthwise conv: the depthwise conv couples
    the concatenation into one group of which each branch holds a part."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.a = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.b = nn.Conv2d(in_channels, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 12, 1)
        self.head = nn.Linear(12, num_classes)

    def forward(self, x):
        x = F.relu(self.bn(torch.cat([self.a(x), self.b(x)], 1)))
        x = F.relu(self.pw(F.relu(self.dw(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def concat_depthwise(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ConcatDepthwise(num_classes, in_channels)
