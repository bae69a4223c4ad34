"""RL-Pruner's search (Wang & Kindratenko, arXiv 2411.06463), top to bottom.

The policy is one global vector, the pruning distribution (PD) over groups,
carried from step to step. Each iteration:

1. sample Q candidates around PD (noise below), renormalise;
2. score them in parallel (masked pruning, reward on validation batches);
3. keep the ``buffer_size`` best (reward, candidate) of the step;
4. if the iteration's best beats the step's best so far, move PD toward it by
   ``step_length`` and clip each element's ratio new/old to [1 - clip, 1 + clip]
   (the PPO-style trust region), renormalise.

The step's candidate is chosen epsilon-greedily from the whole buffer, epsilon
starting at ``epsilon`` and cosine-decayed to 0 over the first
``epsilon_decay_fraction`` of the steps.

Drop guard, as the reference runs it: once per step, on the chosen candidate,
against the previous step's accuracy (the base model's at step 0). When the
chosen accuracy is more than ``drop_guard`` (relative) below it, the buffer is
cleared, PD reset to the initial distribution and the step redone. The redo
must fit in the step's budget (every algorithm spends the same number of
evaluations), so while the guard is armed the first attempt leaves
``guard_reserve`` of the budget; if the guard does not fire, the same attempt
goes on with it and chooses again. With ``guard_keep_best`` (the default;
off is the reference's rule) the step applies
the better of the tripping candidate and the redo's choice: a redo on a quarter
of the budget rarely finds a better one, and after large steps (where every
candidate is far below the previous accuracy until fine-tuned) the guard fires
every step, so the reference's rule throws the step's best candidate away.

Noise: ``additive`` is the paper's ``PD + randn * noise * U(0, 1)`` clamped at
1e-5, which barely moves large groups in relative terms and clamps small ones
to ~0 often; ``multiplicative`` perturbs log PD instead
(``PD * exp(randn * multiplicative_noise * U(0, 1))``), the same relative
exploration for small and large groups.

With ``around_incumbent`` the search proposes around the incumbent (the best
starting candidate, a one-shot plan): PD starts at its distribution and samples
are taken in log space. With ``guard_skip_hopeless`` the guard keeps no reserve
when every starting candidate already trips it: the redo would start from the
uniform distribution, one of them (after a large one-shot cut every candidate is
far below the previous accuracy until it is fine-tuned).

There are no gradients: it is a hill-climb toward elite samples.
"""
from __future__ import annotations

import math

import numpy as np

from .base import Candidate, Evaluator, SearchAlgorithm, StepContext


def epsilon_at(step: int, num_steps: int, epsilon: float, decay_fraction: float) -> float:
    decay_steps = max(1, math.ceil(decay_fraction * num_steps))
    if step >= decay_steps:
        return 0.0
    return epsilon * 0.5 * (1.0 + math.cos(math.pi * step / decay_steps))


def _normalise(d: np.ndarray) -> np.ndarray:
    d = np.maximum(d, 1e-5)
    return d / d.sum()


def sample_around(pd: np.ndarray, n: int, rng: np.random.Generator, config) -> list[np.ndarray]:
    """``n`` noisy variants of ``pd`` (see the module docstring for the two kinds;
    proposals around the incumbent are always in log space)."""
    z = rng.standard_normal((n, len(pd)))      # (this draw order keeps the paper's noise as it was)
    scale = rng.uniform(0, 1, (n, 1))
    if config.noise_type == "multiplicative" or config.around_incumbent:
        return [_normalise(pd * np.exp(row)) for row in z * config.multiplicative_noise * scale]
    return [_normalise(pd + row) for row in z * config.noise * scale]


class RLPrunerSearch(SearchAlgorithm):
    name = "rlpruner"
    searches = True

    def __init__(self, config, **kwargs):
        super().__init__(config, **kwargs)
        self.pd: np.ndarray | None = None

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        c = self.config
        if self.pd is None or len(self.pd) != ctx.graph.num_groups:
            self.pd = ctx.initial.copy()
        budget = evaluate.remaining
        state = {"buffer": [], "best": -math.inf, "iteration": 0}
        start = self.starting_candidates(ctx, evaluate)
        if start:                      # the first iteration: PD moves toward the best of them
            state["iteration"] += 1
            self._update(state, start)
            centre = self.proposal_centre(start)
            if centre is not None:
                self.pd = _normalise(centre)
        armed = c.drop_guard > 0 and ctx.reference_accuracy is not None
        if armed and start and c.guard_skip_hopeless:
            armed = any(not self._trips(ctx, s) for s in start)
        reserve = int(c.guard_reserve * budget) if armed else 0
        self._run(ctx, evaluate, state, evaluate.remaining - reserve)
        chosen = self._choose(ctx, state["buffer"])
        tripped = None
        if armed and self._trips(ctx, chosen) and evaluate.remaining:
            # redo the step from the initial distribution with what is left
            tripped = chosen
            self.pd = ctx.initial.copy()
            state.update(buffer=[], best=-math.inf)
        if evaluate.remaining:
            self._run(ctx, evaluate, state, evaluate.remaining)
            chosen = self._choose(ctx, state["buffer"])
        if tripped is not None and c.guard_keep_best and tripped.reward > chosen.reward:
            return tripped
        return chosen

    def _trips(self, ctx: StepContext, candidate: Candidate) -> bool:
        """Whether ``candidate``'s accuracy is more than ``drop_guard`` below the reference."""
        return candidate.accuracy < (1.0 - self.config.drop_guard) * ctx.reference_accuracy

    def _run(self, ctx: StepContext, evaluate: Evaluator, state: dict, budget: int) -> None:
        """Sample-score-update iterations until ``budget`` evaluations are spent."""
        stop_at = evaluate.remaining - budget
        while evaluate.remaining > stop_at:
            n = min(self.config.samples_per_iteration, evaluate.remaining - stop_at)
            self._iterate(state, evaluate, sample_around(self.pd, n, ctx.rng, self.config))

    def _iterate(self, state: dict, evaluate: Evaluator, samples: list) -> None:
        results = evaluate(samples, state["iteration"])
        state["iteration"] += 1
        self._update(state, results)

    def _update(self, state: dict, results: list[Candidate]) -> None:
        """Keep the elite buffer, and move PD toward the iteration's best when it
        beats the step's best so far (trust-region clipped)."""
        c = self.config
        state["buffer"] = sorted(state["buffer"] + results, key=lambda r: -r.reward)[: c.buffer_size]
        best = max(results, key=lambda r: r.reward)
        if best.reward > state["best"]:
            state["best"] = best.reward
            moved = self.pd + c.step_length * (best.distribution - self.pd)
            ratio = np.clip(moved / self.pd, 1.0 - c.clip, 1.0 + c.clip)
            self.pd = _normalise(self.pd * ratio)

    def _choose(self, ctx: StepContext, buffer: list[Candidate]) -> Candidate:
        c = self.config
        eps = epsilon_at(ctx.step, ctx.num_steps, c.epsilon, c.epsilon_decay_fraction)
        if len(buffer) > 1 and ctx.rng.uniform() < eps:
            return buffer[int(ctx.rng.integers(0, len(buffer)))]   # explore: any elite sample
        return buffer[0]

    def state_dict(self) -> dict:
        return {"pd": None if self.pd is None else self.pd.tolist()}

    def load_state_dict(self, state: dict) -> None:
        self.pd = None if state.get("pd") is None else np.asarray(state["pd"], dtype=np.float64)

