"""A group of coupled channels and its members: the unit a pruning distribution is over.

The types :class:`~rlpruner_ray.graph.PruningGraph` builds from torch-pruning's
groups and the modules reading them (the cost model, batched scoring,
importance), with the few facts about a module's channel axes they share.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.out_channels


@dataclass
class Slice:
    """One coupled member of a group: a module, the axis its channels live on,
    and its channel indices ordered by the group's importance (least first)."""

    module: nn.Module
    layer: int            # index into PruningGraph.layers (for MACs/params bookkeeping)
    side: str             # "out" or "in": which of the layer's dimensions shrinks
    weight_dim: int       # axis of ``module.weight`` that holds the channels
    has_bias: bool        # whether ``module.bias`` shrinks too (channels on its axis 0)
    idx: torch.Tensor     # item channel indices, in the module's own index space
    root: torch.Tensor    # for each entry of ``idx``, the group's root channel
    multiplicity: int     # item indices per root channel (H*W after a flatten, else 1)
    ordered: torch.Tensor | None = None  # ``idx`` reordered by root importance rank
    rank: torch.Tensor | None = None     # importance rank of each ``idx`` entry's root (0 = least)
    fold: int = 0         # grouped conv's input side: weight column = channel % fold (channels per conv group)
    param: nn.Parameter | None = None    # a bare parameter of a module (layer scale) instead of ``module.weight``

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor whose ``weight_dim`` holds the channels."""
        return self.param if self.param is not None else self.module.weight

    def weight_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Channel indices -> positions on the weight's axis (they differ only on a
        grouped conv's input side, whose weight holds one conv group's columns)."""
        return idx % self.fold if self.fold else idx


@dataclass
class Group:
    key: str              # name of the root module (stable across pruning steps)
    channels: int
    slices: list[Slice]
    root_module: nn.Module
    pruning_fn: object
    unit: int = 1         # channels go in multiples of this (the conv groups of a grouped conv member)
    extra: list = field(default_factory=list)  # bare-parameter slices (zeroed by ``masked``, not scored or costed)
    inexact: str = ""     # why zeroing weights does not reproduce physical pruning ("" when it does)


def weight_dim(module: nn.Module, side: str) -> int:
    """Axis of ``module.weight`` that holds the channels of its ``side`` ("out" / "in")."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if is_depthwise(module):      # in and out channels are the same axis
            return 0
        return 0 if side == "out" else 1
    if isinstance(module, nn.Linear):
        return 0 if side == "out" else 1
    return 0                           # BN, PReLU: one per-channel vector


def is_grouped_not_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not is_depthwise(module)
