"""Torch-Pruning's own pruner as external baselines: ``tp-uniform`` (every group
loses the same ratio) and ``tp-global`` (one global threshold over group
importances), both with ``GroupMagnitudeImportance(p=1)`` and the classifier
ignored, the ratio bisected until the step's target (filters, MACs or params)
is met.

The channels Torch-Pruning picks are what the step applies (``Candidate.indices``);
the step's one evaluation (budget counted like any one-shot baseline) scores the
same per-group counts in the run's importance order, so its reward is close to,
not exactly, that of Torch-Pruning's channels.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from ..cost import cost_axis, smallest_meeting
from ..errors import ConfigError, PlanError, one_line
from ..scoring import give_back_overshoot
from .base import Candidate, Evaluator, SearchAlgorithm, StepContext, exact_plan, register

RATIO_TOLERANCE = 1e-4
# Highest ratio tried: near 1 Torch-Pruning skips every group it would empty, so the
# channels removed stop growing with the ratio (and the bisection needs them to)
MAX_RATIO = 0.9


def tp_channels(graph, ratio: float, global_pruning: bool, model=None, limits=None) -> list[list[int]]:
    """Root channel indices per group of ``graph`` that Torch-Pruning's pruner
    removes at ``ratio`` (read off its interactive step; nothing is pruned), at
    most ``limits[g]`` in group ``g`` (its least important by Torch-Pruning's own
    importance) when given."""
    model = model if model is not None else copy.deepcopy(graph.model)
    names = dict(model.named_modules())
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    importance = tp.importance.GroupMagnitudeImportance(p=1)
    with torch.enable_grad():   # torch-pruning traces with autograd
        pruner = tp.pruner.BasePruner(model, graph.example_inputs, importance=importance,
                                      global_pruning=global_pruning, pruning_ratio=ratio,
                                      ignored_layers=linears[-1:])
        module_name = {m: n for n, m in names.items()}
        position = {k: g for g, k in enumerate(graph.keys)}
        chosen = [[] for _ in graph.keys]
        for group in pruner.step(interactive=True):
            key = module_name.get(group[0].dep.target.module)
            if key in position:        # groups this graph does not prune are left alone
                chosen[position[key]] = sorted(int(i) for i in group[0].idxs)
    return [_within_limit(graph, g, idx, pruner, importance, names, None if limits is None else int(limits[g]))
            for g, idx in enumerate(chosen)]


def _within_limit(graph, g: int, idx: list[int], pruner, importance, names, limit: int | None) -> list[int]:
    """Torch-Pruning's one-shot global threshold can empty a group; the run's floors
    hold for every method, so such a group keeps its most important chosen channels.
    The same for a ``limit`` (channels handed back to land on the cost target)."""
    capacity = int(graph.channels[g] - graph.floors[g])
    if limit is not None:
        capacity = min(capacity, limit)
    if len(idx) <= capacity:
        return idx
    group = graph.groups[g]
    full = pruner.DG.get_pruning_group(names[group.key], group.pruning_fn, list(range(int(graph.channels[g]))))
    scores = importance(full).detach().cpu().numpy()
    return sorted(sorted(idx, key=lambda i: scores[i])[:capacity])


def tp_plan(graph, context: dict, global_pruning: bool) -> tuple[np.ndarray, list[list[int]]]:
    """(counts, indices) at the smallest ratio that meets the step's target; under a
    cost target, without the chosen channels that overshoot it (each group keeps
    its most important ones, see :func:`~rlpruner_ray.scoring.give_back_overshoot`)."""
    model = copy.deepcopy(graph.model)
    target = context.get("cost_target")

    plans = {}     # ratio -> (counts, indices): the bisection's answer is one it has tried

    def meets(ratio):
        indices = tp_channels(graph, ratio, global_pruning, model)
        counts = np.array([len(i) for i in indices], np.int64)
        plans[ratio] = counts, indices
        if target is None:
            return counts.sum() >= context["num_filters"]
        return graph.cost(counts)[cost_axis(target["kind"])] <= target["value"]

    hi = smallest_meeting(meets, 0.0, MAX_RATIO, tolerance=RATIO_TOLERANCE)
    if hi is None:
        raise PlanError("Torch-Pruning cannot reach the step's target within the group floors")
    best = plans[hi]
    if target is None:
        return best
    counts = give_back_overshoot(graph, best[0], cost_axis(target["kind"]), target["value"])
    if np.array_equal(counts, best[0]):
        return best
    return counts, tp_channels(graph, hi, global_pruning, model, limits=counts)


def check_tp_supported(graph, global_pruning: bool) -> None:
    """Refuse, before any work, a model Torch-Pruning's pruner fails on (a structure
    the third-party library does not handle): ``--algo tp-uniform`` / ``tp-global``
    could do nothing else with it. One interactive step at half the channels is
    enough to meet such a failure; nothing is pruned."""
    try:
        tp_channels(graph, 0.5, global_pruning)
    except Exception as exc:  # noqa: BLE001 - whatever the library raises, in its words
        name = "tp-global" if global_pruning else "tp-uniform"
        raise ConfigError(f"--algo {name}: Torch-Pruning's pruner fails on this model ({one_line(exc)[:200]}); "
                          "choose another --algo (rlpruner, global, uniform, ...)") from None


class _TorchPruningSearch(SearchAlgorithm):
    global_pruning = False

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        counts, indices = tp_plan(ctx.graph, ctx.extras, self.global_pruning)
        chosen = evaluate([exact_plan(counts)], 0)[0]
        chosen.indices, chosen.source = indices, "torch-pruning"   # the channels the step applies
        return chosen


@register
class TorchPruningUniform(_TorchPruningSearch):
    name = "tp-uniform"


@register
class TorchPruningGlobal(_TorchPruningSearch):
    name = "tp-global"
    global_pruning = True
