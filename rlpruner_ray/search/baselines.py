"""Non-learned baselines with the same interface and budget as the learned ones.

* ``uniform``: every group loses the same fraction of its channels (the
  paper's initial distribution); one evaluation, to report its reward.
* ``global``: Torch-Pruning-style global pruning with the run's importance:
  one ranking of all channels by importance normalised within each group, and
  one threshold moved down that ranking until the step's target (filters, MACs
  or params) is met; no search, one evaluation.
* ``random``: random search — the whole budget (after the starting candidates
  every search shares, :func:`~rlpruner_ray.plans.baseline_plans`) on distributions drawn from a
  Dirichlet whose mean is the initial distribution (with ``around_incumbent``:
  rlpruner's log-space samples around the incumbent's distribution, which
  rlpruner's proposal is without its updates); the best one wins.

``tp-uniform`` and ``tp-global`` (Torch-Pruning's own pruner) are in
``tp_baselines``.
"""
from __future__ import annotations

from ..plans import exact_plan, global_plan
from .base import Candidate, Evaluator, SearchAlgorithm, StepContext
from .rlpruner import sample_around


class UniformSearch(SearchAlgorithm):
    name = "uniform"

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        return evaluate([ctx.initial], 0)[0]


class GlobalSearch(SearchAlgorithm):
    name = "global"

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        counts = global_plan(ctx.graph, ctx.extras, step_fraction=self.config.step_share)
        return evaluate([exact_plan(counts)], 0)[0]


class RandomSearch(SearchAlgorithm):
    name = "random"
    searches = True

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        alpha = ctx.initial * len(ctx.initial) + 1e-3
        start = self.starting_candidates(ctx, evaluate)
        iteration = 1 if start else 0
        centre = self.proposal_centre(start)
        while evaluate.remaining > 0:
            n = min(self.config.samples_per_iteration, evaluate.remaining)
            evaluate(list(ctx.rng.dirichlet(alpha, size=n)) if centre is None
                     else sample_around(centre, n, ctx.rng, self.config), iteration)
            iteration += 1
        return evaluate.best
