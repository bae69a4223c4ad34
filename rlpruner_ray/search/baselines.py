"""Non-learned baselines with the same interface and budget as the learned ones.

* ``uniform``: every group loses the same fraction of its channels (the
  paper's initial distribution); one evaluation, to report its reward.
* ``global``: one ranking of all channels by normalised importance across
  groups (torch-pruning's global pruning), no search; one evaluation.
* ``random``: random search — the whole budget on distributions drawn from a
  Dirichlet whose mean is the initial distribution; the best one wins.
"""
from __future__ import annotations

import numpy as np

from .base import Candidate, Evaluator, SearchAlgorithm, StepContext, register


@register
class UniformSearch(SearchAlgorithm):
    name = "uniform"

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        return evaluate([ctx.initial], 0)[0]


@register
class GlobalSearch(SearchAlgorithm):
    name = "global"

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        graph = ctx.graph
        n = ctx.extras.get("num_filters") or int(round(self.config.step_fraction * graph.total_channels))
        n = max(1, min(n, graph.max_removable))
        counts = global_counts(graph, n)
        return evaluate([counts / counts.sum()], 0)[0]


def global_counts(graph, num_filters: int) -> np.ndarray:
    """Remove the ``num_filters`` globally least important channels, respecting each
    group's floor. Scores are comparable across groups because each group's are
    normalised by their mean."""
    entries = []
    for g, s in enumerate(graph.scores):
        s = s.cpu().double()          # host copy: the scores live on the model's device
        mean = float(s.mean()) or 1.0
        order = np.argsort((s / mean).numpy(), kind="stable")
        capacity = int(graph.channels[g] - graph.floors[g])
        entries += [(float(s[i]) / mean, g) for i in order[:capacity]]
    entries.sort(key=lambda e: e[0])
    counts = np.zeros(graph.num_groups, np.int64)
    for _, g in entries[:num_filters]:
        counts[g] += 1
    return counts


@register
class RandomSearch(SearchAlgorithm):
    name = "random"

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        alpha = ctx.initial * len(ctx.initial) + 1e-3
        iteration = 0
        while evaluate.remaining > 0:
            n = min(self.config.samples_per_iteration, evaluate.remaining)
            evaluate(list(ctx.rng.dirichlet(alpha, size=n)), iteration)
            iteration += 1
        return evaluate.best
