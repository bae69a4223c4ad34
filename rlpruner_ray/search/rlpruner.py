"""RL-Pruner's search (Wang & Kindratenko, arXiv 2411.06463), top to bottom.

The policy is one global vector, the pruning distribution (PD) over groups,
carried from step to step. Each iteration:

1. sample Q candidates ``PD + randn * noise * U(0, 1)``, clamp at 1e-5, renormalise;
2. score them in parallel (masked pruning, reward on validation batches);
3. keep the ``buffer_size`` best (reward, candidate) of the step;
4. if the iteration's best beats the step's best so far, move PD toward it by
   ``step_length`` and clip each element's ratio new/old to [1 - clip, 1 + clip]
   (the PPO-style trust region), renormalise;
5. drop guard: if the step's best accuracy so far falls more than ``drop_guard``
   (relative) below the previous step's, reset PD to the initial distribution —
   the reference code redoes the step; we continue with the step's remaining
   budget so every algorithm spends the same number of evaluations.

The step's candidate is chosen epsilon-greedily from the buffer, epsilon
starting at ``epsilon`` and cosine-decayed to 0 over the first
``epsilon_decay_fraction`` of the steps. There are no gradients: it is a
hill-climb toward elite samples.
"""
from __future__ import annotations

import math

import numpy as np

from .base import Candidate, Evaluator, SearchAlgorithm, StepContext, register


def epsilon_at(step: int, num_steps: int, epsilon: float, decay_fraction: float) -> float:
    decay_steps = max(1, math.ceil(decay_fraction * num_steps))
    if step >= decay_steps:
        return 0.0
    return epsilon * 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))


def _normalise(d: np.ndarray) -> np.ndarray:
    d = np.maximum(d, 1e-5)
    return d / d.sum()


@register
class RLPrunerSearch(SearchAlgorithm):
    name = "rlpruner"

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.pd: np.ndarray | None = None

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        c = self.config
        rng = ctx.rng
        if self.pd is None or len(self.pd) != ctx.graph.num_groups:
            self.pd = ctx.initial.copy()
        buffer: list[Candidate] = []
        step_best = -math.inf
        iteration = 0
        while evaluate.remaining > 0:
            n = min(c.samples_per_iteration, evaluate.remaining)
            noise = rng.standard_normal((n, len(self.pd))) * c.noise * rng.uniform(0, 1, (n, 1))
            samples = [_normalise(self.pd + z) for z in noise]
            results = evaluate(samples, iteration)
            buffer = sorted(buffer + results, key=lambda r: -r.reward)[: c.buffer_size]
            best = max(results, key=lambda r: r.reward)
            if best.reward > step_best:
                step_best = best.reward
                moved = self.pd + c.step_length * (best.distribution - self.pd)
                ratio = np.clip(moved / self.pd, 1.0 - c.clip, 1.0 + c.clip)
                self.pd = _normalise(self.pd * ratio)
            if (c.drop_guard > 0 and ctx.reference_accuracy is not None
                    and buffer[0].accuracy < (1.0 - c.drop_guard) * ctx.reference_accuracy):
                self.pd = ctx.initial.copy()
            iteration += 1
        eps = epsilon_at(ctx.step, ctx.num_steps, c.epsilon, c.epsilon_decay_fraction)
        if len(buffer) > 1 and rng.uniform() < eps:
            return buffer[int(rng.integers(1, len(buffer)))]   # explore: another elite sample
        return buffer[0]

    def state_dict(self) -> dict:
        return {"pd": None if self.pd is None else self.pd.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.pd = None if state.get("pd") is None else np.asarray(state["pd"], dtype=np.float64)
