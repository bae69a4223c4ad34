"""CMA-ES (the maintained ``cma`` package) as a search: a null baseline for the
learned searches, with the same budget, starting candidates and action
parametrisation as they have.

A point ``x`` (one coordinate per prunable group) is the distribution
``initial * exp(x)``, renormalised: log-multipliers of the initial distribution,
the parametrisation RLlib's actions use (``initial * exp(scale * a)``), with
``x = 0`` the initial distribution itself. The search starts there, or at the
best of the starting candidates (:meth:`SearchAlgorithm.starting_candidates`)
when they are scored; each generation asks ``samples_per_iteration`` points,
scores them through the step's :class:`Evaluator` (which counts the budget)
and tells CMA-ES their rewards. A generation the budget cuts short is scored
but not told (CMA-ES updates on whole generations only). The best candidate
scored wins, as for ``random``.
"""
from __future__ import annotations

import numpy as np

from .base import Candidate, Evaluator, SearchAlgorithm, StepContext

# a group's share never reaches 0 in log space (an exact plan may leave a group unpruned)
FLOOR = 1e-5


def to_distribution(initial: np.ndarray, x: np.ndarray) -> np.ndarray:
    d = np.maximum(initial * np.exp(x), FLOOR)
    return d / d.sum()


def to_point(initial: np.ndarray, distribution: np.ndarray) -> np.ndarray:
    """The ``x`` whose distribution is ``distribution`` (its inverse, up to the floor)."""
    d = np.maximum(np.asarray(distribution, dtype=np.float64), FLOOR)
    return np.log(d / d.sum() / initial)


class CMAESSearch(SearchAlgorithm):
    name = "cmaes"
    searches = True

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        import cma
        initial = ctx.initial
        start = self.starting_candidates(ctx, evaluate)
        x0 = np.zeros(len(initial))
        if start:
            x0 = to_point(initial, max(start, key=lambda c: c.reward).distribution)
        # CMA-ES needs two points a generation; cma seeds numpy's global generator from
        # ``seed`` (0 would mean the clock), so the seed comes from the step's own rng
        popsize = max(2, self.config.samples_per_iteration)
        es = cma.CMAEvolutionStrategy(x0, self.config.cmaes_sigma,
                                      {"popsize": popsize, "seed": int(ctx.rng.integers(1, 2 ** 31 - 1)),
                                       "verbose": -9})
        iteration = 1 if start else 0
        while evaluate.remaining > 0:
            points = es.ask()
            results = evaluate([to_distribution(initial, x) for x in points], iteration)
            iteration += 1
            if len(results) == len(points):
                es.tell(points, [-c.reward for c in results])      # cma minimises
        return evaluate.best
