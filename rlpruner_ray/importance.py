"""Filter importance criteria, scored per group in its root channels' index space.

Each member (slice) of a group is scored per channel, its scores are divided by
their mean so that a conv's big weight sums and a BN's small gammas weigh the
same, and the members are averaged. The result ranks a group's channels; the
pruning code removes the lowest first.

``tp-magnitude`` is Torch-Pruning's own group magnitude importance, the one its
pruner ranks channels by in ``tp-uniform`` / ``tp-global``
(:func:`tp_importance`): raw L1 magnitudes summed over the coupled group's
members (a conv's weight sums dominate a BN's gammas), averaged over them and
divided by the group's mean. It is computed by Torch-Pruning's importance object
on the graph's own dependency group, so any method ranking channels with it
removes, within a group, the channels Torch-Pruning's pruner would.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from .config import CRITERIA
from .errors import ConfigError


def validate_criterion(name: str) -> None:
    if name not in CRITERIA:
        raise ConfigError(f"unknown importance criterion {name!r}; choose one of {', '.join(CRITERIA)}")


def tp_importance():
    """Torch-Pruning's importance as ``tp-uniform`` / ``tp-global`` use it: group L1
    magnitude (its default reduction, the mean over members, and its default
    normaliser, the group's mean). One object for the baselines and the
    ``tp-magnitude`` criterion, so the two cannot drift apart."""
    return tp.importance.GroupMagnitudeImportance(p=1)


def tp_group_scores(dg, group, importance=None) -> torch.Tensor | None:
    """Torch-Pruning's importance of every root channel of ``group`` (a
    :class:`~rlpruner_ray.graph.Group`), read on the dependency graph ``dg`` that
    holds its module; None for a group without weights it scores."""
    full = dg.get_pruning_group(group.root_module, group.pruning_fn, list(range(int(group.channels))))
    scores = (importance or tp_importance())(full)
    return None if scores is None else scores.detach()


def _per_channel(tensor: torch.Tensor, dim: int, reduce) -> torch.Tensor:
    moved = tensor.detach().movedim(dim, 0)
    return reduce(moved.reshape(moved.shape[0], -1)).sum(dim=1) if moved.dim() > 1 else reduce(moved)


def _slice_score(s, criterion: str) -> torch.Tensor | None:
    w = s.module.weight
    if w is None:
        return None       # a BN without affine parameters: no weights to judge its channels by
    if criterion == "l1":
        full = _per_channel(w, s.weight_dim, torch.abs)
    elif criterion == "l2":
        full = _per_channel(w, s.weight_dim, torch.square).sqrt()
    elif criterion == "taylor":
        # first-order Taylor estimate of the loss change: |w * dL/dw|, bias included
        if w.grad is None:
            return None
        full = _per_channel(w * w.grad, s.weight_dim, torch.abs)
        b = s.module.bias
        if s.has_bias and b is not None and b.grad is not None:
            full = full + (b.detach() * b.grad).abs()
    elif criterion == "fpgm":
        # geometric-median criterion: filters close to all others are redundant
        if s.side != "out" or not isinstance(s.module, (nn.modules.conv._ConvNd, nn.Linear)):
            return None
        flat = w.detach().flatten(1)
        full = torch.cdist(flat, flat).sum(dim=1)
    else:
        raise ConfigError(f"unknown importance criterion {criterion!r}")
    return full.double()[s.weight_index(s.idx)]


def channel_scores(graph, criterion: str, inputs=None, targets=None, *, seed: int = 0) -> list[torch.Tensor]:
    """One score vector per group of ``graph`` (higher = more important)."""
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed)
        return [torch.rand(int(c), generator=gen) for c in graph.channels]
    model = graph.model
    if criterion == "taylor":
        if inputs is None or targets is None:
            raise ConfigError("the taylor criterion needs a calibration batch (inputs and targets)")
        was_training = model.training
        model.eval()  # eval mode: BN running statistics are not disturbed
        model.zero_grad(set_to_none=True)
        with torch.enable_grad():
            F.cross_entropy(model(inputs), targets).backward()
        model.train(was_training)
    if criterion == "tp-magnitude":
        return _tp_scores(graph)
    scores = []
    for group in graph.groups:
        # fpgm scores filters only; a group without one (a BN-only tie) falls back to l2
        score = _group_score(group, criterion)
        scores.append(score if score is not None else _group_score(group, "l2"))
    if criterion == "taylor":
        model.zero_grad(set_to_none=True)
    return scores


def _tp_scores(graph) -> list[torch.Tensor]:
    importance = tp_importance()
    scores = []
    for group in graph.groups:
        try:
            score = tp_group_scores(graph.dg, group, importance)
        except Exception as exc:  # noqa: BLE001 - the third-party library's failure, in its words
            raise ConfigError(f"--criterion tp-magnitude: Torch-Pruning's importance fails on group "
                              f"{group.key!r} of this model ({type(exc).__name__}: {str(exc)[:160]}); "
                              "choose another criterion (l1, l2, ...)") from None
        # a group Torch-Pruning finds no weights to score in (its pruner skips it) ranks
        # by the project's l1, so every group still has an order
        scores.append(score.float() if score is not None else _group_score(group, "l1"))
    return scores


def _group_score(group, criterion: str) -> torch.Tensor | None:
    # sums live on the weights' device, beside the group's index tensors
    device = group.slices[0].idx.device if group.slices else None
    total = torch.zeros(group.channels, dtype=torch.float64, device=device)
    members = 0
    for s in group.slices:
        vals = _slice_score(s, criterion)
        if vals is None:
            continue
        per_root = torch.zeros(group.channels, dtype=torch.float64, device=vals.device).index_add_(0, s.root, vals)
        mean = per_root.mean()
        # (no host read of `mean`: a device-side choice keeps the GPU from syncing)
        total += torch.where(mean > 0, per_root / mean.clamp_min(1e-300), per_root)
        members += 1
    return (total / members).float() if members else None


def root_ranks(score: torch.Tensor, unit: int) -> torch.Tensor:
    """Rank of each root channel (0 = least important; ties broken by index). With
    ``unit`` conv groups, channels go by position within a conv group, in every
    conv group at once: a position ranks by its mean score over the conv groups,
    and its ``unit`` channels take consecutive ranks (so any multiple of ``unit``
    least-ranked channels is whole positions)."""
    per_group = len(score) // unit
    position_score = score.reshape(unit, per_group).mean(dim=0)
    order = torch.argsort(position_score, stable=True)
    position_rank = torch.empty_like(order)
    position_rank[order] = torch.arange(per_group, device=order.device)
    channel = torch.arange(len(score), device=score.device)
    return position_rank[channel % per_group] * unit + channel // per_group


def score_features(scores: list[torch.Tensor]) -> np.ndarray:
    """Per-group, scale-free importance statistics for an RL observation: the
    coefficient of variation of the scores and the share of channels scoring
    under half the group mean (how much is cheap to remove)."""
    feats = np.zeros((len(scores), 2), dtype=np.float32)
    for g, s in enumerate(scores):
        s = s.cpu().double().abs()
        mean = float(s.mean())
        if mean > 0:
            feats[g, 0] = float(s.std(unbiased=False) / mean)
            feats[g, 1] = float((s < 0.5 * mean).double().mean())
    return feats
