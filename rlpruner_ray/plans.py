"""Plans: per-group counts of channels to remove, made without a search. Every
algorithm and the one-shot ``prune`` command take their plans from here, so
what a search scores and what a command applies are planned the same way.

* :func:`plan_for_step`: a distribution over groups -> counts for the step's
  target (filters, MACs or params), as scored and as applied;
* :func:`global_plan`: one global importance threshold (the ``global`` baseline);
* :func:`tp_plan`: Torch-Pruning's own pruner (``tp-uniform`` / ``tp-global``),
  its ratio bisected to the target;
* :func:`baseline_plans`: the uniform, global and Torch-Pruning plans every
  search starts from;
* :func:`give_back_overshoot`: the channels handed back so that methods compared
  at one cost target land on it alike;
* :func:`apply_plan`: the network a plan (counts, or explicit channels) stands for.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from .cost import cost_axis, smallest_meeting
from .errors import ConfigError, PlanError, one_line
from .graph import PruningGraph
from .importance import tp_importance


def exact_plan(counts, indices=None) -> dict:
    """An item for an :class:`~rlpruner_ray.search.base.Evaluator` scored as these counts,
    not re-planned from a distribution (a threshold's plan, Torch-Pruning's). With
    ``indices`` (root channels per group, ``len(indices[g]) == counts[g]``) it is
    scored, and applied, as exactly those channels rather than each group's least
    important ``counts[g]`` in the run's importance order: Torch-Pruning's plan
    carries Torch-Pruning's channels."""
    counts = np.asarray(counts, dtype=np.int64)
    if indices is None:
        return {"counts": counts}
    indices = [sorted(int(i) for i in idx) for idx in indices]
    if [len(i) for i in indices] != counts.tolist():
        raise PlanError("an exact plan's channel lists do not match its counts")
    return {"counts": counts, "indices": indices}


def apply_plan(graph: PruningGraph, counts, indices=None):
    """The physically pruned copy of ``graph``'s model that a plan stands for: its
    explicit channels when it has them, else each group's least important
    ``counts``. The one place a chosen candidate becomes a network (the step
    applies it, the incumbent rule re-scores it)."""
    return graph.prune(counts) if indices is None else graph.prune_channels(indices)


def removed_channels(graph: PruningGraph, counts, indices=None) -> list[list[int]]:
    """Root channels per group that :func:`apply_plan` removes."""
    return graph.pruned_indices(counts) if indices is None else [list(i) for i in indices]


def plan_for_step(graph: PruningGraph, distribution, context: dict, *, round_to: int = 1,
                  fraction: float = 1.0, already_removed=None) -> np.ndarray:
    """Per-group counts for this step. ``context["num_filters"]`` fixes the count
    (the paper's filter sparsity); ``context["cost_target"]`` (hard budget mode)
    instead asks for the fewest filters, in this distribution, that bring MACs or
    params down to the target. ``fraction`` < 1 plans part of the step (sub-steps
    of a multi-step episode); ``already_removed`` is what earlier sub-steps took."""
    done = np.zeros(graph.num_groups, np.int64) if already_removed is None else np.asarray(already_removed)
    target = context.get("cost_target")
    if target is None:
        n = int(round(context["num_filters"] * fraction)) - int(done.sum())
        n = min(max(n, 0), int(np.maximum(graph.channels - graph.floors - done, 0).sum()))
        return graph.plan(distribution, n, round_to=round_to, already_removed=done)
    kind = cost_axis(target["kind"])
    start = graph.cost(np.zeros(graph.num_groups), done)[kind]
    goal = start - (start - target["value"]) * fraction
    capacity = int(np.maximum(graph.channels - graph.floors - done, 0).sum())

    def meets(n):
        return graph.cost(graph.plan(distribution, n, round_to=round_to, already_removed=done), done)[kind] <= goal

    n = smallest_meeting(meets, 0, capacity)   # cost falls with n; all of it when even that misses the goal
    counts = graph.plan(distribution, capacity if n is None else n, round_to=round_to, already_removed=done)
    return give_back_overshoot(graph, counts, kind, goal, already_removed=done, round_to=round_to)


def give_back_overshoot(graph: PruningGraph, counts, kind: int, goal: float, *, already_removed=None,
                        round_to: int = 1) -> np.ndarray:
    """``counts`` with channels handed back while the cost (``kind``: 0 MACs, 1
    params) stays within ``goal``: the smallest overshoot the plan's granularity
    allows. The fewest filters that meet a cost target can overshoot it by one
    expensive channel (a residual-coupled channel of ResNet-20's first stage is
    about 2.4% of its MACs), and methods compared at one target must land on it
    alike. Each round hands back, from the group where it costs the most while
    the target still holds, one step of that group (its channel unit, and a
    multiple of ``round_to`` so kept widths stay aligned); a plan that misses the
    goal is returned as it is."""
    counts = np.array(counts, dtype=np.int64)
    if graph.cost(counts, already_removed)[kind] > goal:
        return counts
    steps = np.lcm(graph.units, int(round_to))
    while True:
        best = None
        for g in np.nonzero(counts >= steps)[0]:
            counts[g] -= steps[g]
            c = graph.cost(counts, already_removed)[kind]
            counts[g] += steps[g]
            if c <= goal and (best is None or c > best[0]):
                best = (c, g)
        if best is None:
            return counts
        counts[best[1]] -= steps[best[1]]


def global_order(graph) -> np.ndarray:
    """Group of each removable channel, in global order (least important first).
    Scores are comparable across groups because each group's are divided by their
    mean; a group offers at most its capacity (channels above its floor)."""
    scores, groups = [], []
    for g, s in enumerate(graph.scores):
        s = s.cpu().double().numpy()          # host copy: the scores live on the model's device
        mean = float(s.mean()) or 1.0
        capacity = int(graph.channels[g] - graph.floors[g])
        scores.append(np.sort(s / mean, kind="stable")[:capacity])
        groups.append(np.full(capacity, g, np.int64))
    scores, groups = np.concatenate(scores), np.concatenate(groups)
    return groups[np.argsort(scores, kind="stable")]


def global_counts(graph, num_filters: int, order: np.ndarray | None = None) -> np.ndarray:
    """Per-group counts when the ``num_filters`` globally least important channels go."""
    order = global_order(graph) if order is None else order
    return np.bincount(order[:num_filters], minlength=graph.num_groups).astype(np.int64)


def global_plan(graph, context: dict, *, step_fraction: float = 0.1) -> np.ndarray:
    """The global threshold for this step: a filter count (``num_filters``), or the
    fewest globally ranked channels that bring MACs / params down to
    ``cost_target`` (cost falls as the threshold moves, so bisect it), less the
    channels that overshoot it (:func:`give_back_overshoot`)."""
    order = global_order(graph)
    target = context.get("cost_target")
    if target is None:
        n = context.get("num_filters") or int(round(step_fraction * graph.total_channels))
        return global_counts(graph, max(1, min(n, len(order))), order)
    kind = cost_axis(target["kind"])
    n = smallest_meeting(lambda n: graph.cost(global_counts(graph, n, order))[kind] <= target["value"],
                         0, len(order))     # the fewest channels whose cost meets the target, else all
    n = len(order) if n is None else n
    return give_back_overshoot(graph, global_counts(graph, max(n, 1), order), kind, target["value"])


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
    importance = tp_importance()        # the same importance as the tp-magnitude criterion
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
    its most important ones, see :func:`give_back_overshoot`)."""
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


# the source names of the baseline plans among a search's starting candidates, in order
BASELINE_SOURCES = ("uniform", "global", "tp-global")


def baseline_plans(ctx, config) -> list[tuple[str, object]]:
    """(source, item) of the uniform, global-threshold and Torch-Pruning global plans
    of the step of ``ctx`` (a :class:`~rlpruner_ray.search.base.StepContext`): the
    starting candidates of every search. Torch-Pruning's plan carries Torch-Pruning's
    own channels (:func:`exact_plan` with indices): its reward is that of
    ``tp-global``'s network and applying it gives exactly that network, whatever
    ``--criterion`` orders the other candidates' channels by. It is optional: where Torch-Pruning cannot reach the step's target,
    or its pruner fails on the model (a third-party library meeting a structure it
    does not handle), it is left out and the reason goes to ``ctx.skipped`` (the
    log, the step's record and summary.json)."""
    plans = [ctx.initial, exact_plan(global_plan(ctx.graph, ctx.extras, step_fraction=config.step_share))]
    try:
        plans.append(exact_plan(*tp_plan(ctx.graph, ctx.extras, global_pruning=True)))
    except Exception as exc:  # noqa: BLE001 - any failure of the optional candidate only skips it
        ctx.skipped.append({"candidate": BASELINE_SOURCES[2], "reason": one_line(exc)})
    return list(zip(BASELINE_SOURCES, plans))
