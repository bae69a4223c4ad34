"""Non-learned baselines with the same interface and budget as the learned ones.

* ``uniform``: every group loses the same fraction of its channels (the
  paper's initial distribution); one evaluation, to report its reward.
* ``global``: Torch-Pruning-style global pruning with the run's importance:
  one ranking of all channels by importance normalised within each group, and
  one threshold moved down that ranking until the step's target (filters, MACs
  or params) is met; no search, one evaluation.
* ``random``: random search — the whole budget (after the starting candidates
  every search shares, :func:`baseline_plans`) on distributions drawn from a
  Dirichlet whose mean is the initial distribution; the best one wins.

``tp-uniform`` and ``tp-global`` (Torch-Pruning's own pruner) are in
``tp_baselines``.
"""
from __future__ import annotations

import numpy as np

from ..cost import cost_axis, smallest_meeting
from ..scoring import give_back_overshoot
from .base import Candidate, Evaluator, SearchAlgorithm, StepContext, exact_plan, register


@register
class UniformSearch(SearchAlgorithm):
    name = "uniform"

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        return evaluate([ctx.initial], 0)[0]


@register
class GlobalSearch(SearchAlgorithm):
    name = "global"

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        counts = global_plan(ctx.graph, ctx.extras, step_fraction=self.config.step_share)
        return evaluate([exact_plan(counts)], 0)[0]


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
    channels that overshoot it (:func:`~rlpruner_ray.scoring.give_back_overshoot`)."""
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


# the source names of the baseline plans among a search's starting candidates, in order
BASELINE_SOURCES = ("uniform", "global", "tp-global")


def baseline_plans(ctx: StepContext, config) -> list[tuple[str, object]]:
    """(source, item) of the uniform, global-threshold and Torch-Pruning global plans
    of this step: the starting candidates of every search. Torch-Pruning's plan is
    scored as its per-group counts in the run's importance order, like every other
    candidate. It is optional: where Torch-Pruning cannot reach the step's target,
    or its pruner fails on the model (a third-party library meeting a structure it
    does not handle), it is left out and the reason goes to ``ctx.skipped`` (the
    log, the step's record and summary.json)."""
    from ..errors import one_line
    from .tp_baselines import tp_plan
    plans = [ctx.initial, exact_plan(global_plan(ctx.graph, ctx.extras, step_fraction=config.step_share))]
    try:
        plans.append(exact_plan(tp_plan(ctx.graph, ctx.extras, global_pruning=True)[0]))
    except Exception as exc:  # noqa: BLE001 - any failure of the optional candidate only skips it
        ctx.skipped.append({"candidate": BASELINE_SOURCES[2], "reason": one_line(exc)})
    return list(zip(BASELINE_SOURCES, plans))


@register
class RandomSearch(SearchAlgorithm):
    name = "random"
    searches = True

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        alpha = ctx.initial * len(ctx.initial) + 1e-3
        iteration = 1 if self.starting_candidates(ctx, evaluate) else 0
        while evaluate.remaining > 0:
            n = min(self.config.samples_per_iteration, evaluate.remaining)
            evaluate(list(ctx.rng.dirichlet(alpha, size=n)), iteration)
            iteration += 1
        return evaluate.best
