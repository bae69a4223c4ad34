"""Torch-Pruning's own pruner as external baselines: ``tp-uniform`` (every group
loses the same ratio) and ``tp-global`` (one global threshold over group
importances), both with ``GroupMagnitudeImportance(p=1)`` and the classifier
ignored, the ratio bisected until the step's target (filters, MACs or params)
is met.

The channels Torch-Pruning picks are what the step scores (its one evaluation,
budget counted like any one-shot baseline) and applies (``Candidate.indices``),
exactly as the searches' Torch-Pruning starting candidate. The plans themselves
are :func:`rlpruner_ray.plans.tp_plan`.
"""
from __future__ import annotations

from ..plans import exact_plan, tp_plan
from .base import Candidate, Evaluator, SearchAlgorithm, StepContext


class _TorchPruningSearch(SearchAlgorithm):
    global_pruning = False

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        chosen = evaluate([exact_plan(*tp_plan(ctx.graph, ctx.extras, self.global_pruning))], 0)[0]
        chosen.source = "torch-pruning"
        return chosen


class TorchPruningUniform(_TorchPruningSearch):
    name = "tp-uniform"


class TorchPruningGlobal(_TorchPruningSearch):
    name = "tp-global"
    global_pruning = True
