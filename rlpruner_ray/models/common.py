"""What the zoo's models share: their weight initialisation."""

from __future__ import annotations

from torch import nn

# how each model treats its linear layers (the zoo's recipes differ here only)
LINEAR_INITS = ("keep", "zero-bias", "normal")


def init_weights(model: nn.Module, *, linear: str = "keep") -> None:
    """Kaiming-normal convolutions (fan-out, ReLU gain) with zero biases, BatchNorm
    at scale 1 and shift 0, and the linear layers per ``linear``: ``"keep"``
    PyTorch's default, ``"zero-bias"`` that with a zero bias, ``"normal"`` weights
    drawn from N(0, 0.01) with a zero bias. Modules are visited in order, so a
    seed gives the same weights as every model's own loop did before."""
    if linear not in LINEAR_INITS:
        raise ValueError(f"linear must be one of {LINEAR_INITS}, got {linear!r}")
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear != "keep":
            if linear == "normal":
                nn.init.normal_(m.weight, 0, 0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
