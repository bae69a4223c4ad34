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
