"""The one interface every search algorithm implements, and the one place the
evaluation budget is counted, so comparisons are fair by construction."""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import numpy as np

from ..config import CompressConfig
from ..incumbent import hold_to_incumbent, incumbent_of
from ..plans import BASELINE_SOURCES, baseline_plans


@dataclass
class Candidate:
    """One evaluated distribution. ``counts`` is the exact plan that was scored:
    applying a candidate means pruning ``counts``."""

    distribution: np.ndarray
    counts: np.ndarray
    reward: float
    accuracy: float
    macs: int                     # exact counts of the plan (PruningGraph.cost)
    params: int
    iteration: int
    index: int                    # evaluation number within the step
    source: str = "sample"        # "sample" (the search's own), "policy" (RLlib's deterministic action),
                                  # or the starting candidate it is: "uniform", "global", "tp-global"
    learner_stats: dict | None = None   # RLlib's learner statistics of the iteration
    indices: list | None = None   # explicit root channels per group to prune instead of
                                  # the importance order's first ``counts`` (Torch-Pruning's)
    # compute its scoring executed (``compute.SCORED_KEYS``, from ``scoring.StepScorer``)
    macs_executed: int = 0
    bn_recalibration_macs: int = 0
    worker_s: float = 0.0
    bn_recalibration_s: float = 0.0


class BudgetExhausted(RuntimeError):
    pass


class Evaluator:
    """Scores distributions for a search algorithm, never more than ``budget`` in a
    step. ``score_fn(list_of_distributions) -> list_of_result_dicts`` does the work
    (an :class:`EvaluationPool`, or a local env in tests); ``on_candidate`` sees
    every candidate (the pipeline streams them to history)."""

    def __init__(self, score_fn: Callable, budget: int, on_candidate: Callable | None = None):
        self.score_fn = score_fn
        self.budget = int(budget)
        self.used = 0
        self.on_candidate = on_candidate
        self.best: Candidate | None = None
        self.candidates: list[Candidate] = []

    @property
    def remaining(self) -> int:
        return self.budget - self.used

    def __call__(self, distributions, iteration: int, source: str | list[str] = "sample") -> list[Candidate]:
        """Score distributions (or :func:`~rlpruner_ray.plans.exact_plan` items) and
        record them, all under one ``source`` name or each under its own (a list,
        one per item)."""
        items = [d if isinstance(d, dict) else np.asarray(d, dtype=np.float64)
                 for d in distributions][: self.remaining]
        if not items:
            raise BudgetExhausted("evaluation budget used up")
        sources = [source] * len(items) if isinstance(source, str) else list(source)[: len(items)]
        started = time.perf_counter()
        results = self.score_fn(items)
        seconds = (time.perf_counter() - started) / len(items)
        out = []
        for d, r, name in zip(items, results, sources):
            indices = None
            if isinstance(d, dict):
                indices = d.get("indices")     # explicit channels: what the step applies if chosen
                d = d["counts"] / max(d["counts"].sum(), 1)
            c = candidate_from(d, r, iteration, name)
            c.indices = indices
            out.append(self.record(c, seconds))
        return out

    def record(self, c: Candidate, seconds: float = 0.0) -> Candidate:
        """Count one evaluation (made here or by RLlib's env runners) against the budget."""
        if self.remaining <= 0:
            raise BudgetExhausted("evaluation budget used up")
        c.index = self.used
        self.used += 1
        self.candidates.append(c)
        if self.best is None or c.reward > self.best.reward:
            self.best = c
        if self.on_candidate is not None:
            self.on_candidate(c, seconds)
        return c


def plans_for(env, items: list) -> list:
    """What to score for each item: exact plans as counts, or as the plan itself
    when it names its channels (the scorer prunes exactly those); distributions
    planned by ``env`` for its step."""
    return [(d if d.get("indices") is not None else np.asarray(d["counts"])) if isinstance(d, dict)
            else env.plan_distribution(d) for d in items]


def candidate_from(distribution, result: dict, iteration: int, source: str = "sample",
                   learner_stats: dict | None = None) -> Candidate:
    """A Candidate from an environment's result dict (index set when recorded)."""
    return Candidate(np.asarray(distribution, dtype=np.float64), np.asarray(result["counts"]),
                     float(result["reward"]), float(result["accuracy"]), int(result["macs"]),
                     int(result["params"]), iteration, -1, source, learner_stats,
                     macs_executed=int(result["macs_executed"]),
                     bn_recalibration_macs=int(result["bn_recalibration_macs"]),
                     worker_s=float(result["worker_s"]), bn_recalibration_s=float(result["bn_recalibration_s"]))


@dataclass
class StepContext:
    step: int                     # 0-based pruning step
    num_steps: int
    graph: object                 # the driver's PruningGraph of the current base model
    rng: np.random.Generator      # seeded from (seed, step): resumable, reproducible
    reference_accuracy: float | None = None   # the previous step's chosen accuracy (drop guard)
    extras: dict = field(default_factory=dict)
    # optional candidates the search could not build, {"candidate": name, "reason": one line}:
    # the pipeline logs them and keeps them in the step's record
    skipped: list = field(default_factory=list)
    # the incumbent rule's re-score, ``rescore(candidates) -> (per-image correctness, info)``
    # (``incumbent.Rescorer`` on the step's graph); None: the rule is not applied
    rescore: Callable | None = None
    # the rule's decision and re-score figures (``incumbent.hold_to_incumbent``), for the step's record
    incumbent: dict | None = None

    @property
    def initial(self) -> np.ndarray:
        return self.graph.initial_distribution()


class SearchAlgorithm(ABC):
    """Given the step's context and an evaluator with a budget, return the
    candidate to apply. State that must survive a resume goes in ``state_dict``.

    A search (``searches``: it spends the step's budget choosing among many
    candidates, unlike the one-shot baselines) starts from the same candidates
    whatever the algorithm, through :meth:`starting_candidates`, so that two
    searches compared differ in the search alone."""

    name: ClassVar[str]
    uses_pool: ClassVar[bool] = True   # scores through the evaluation actors (RLlib brings its own)
    searches: ClassVar[bool] = False

    def __init__(self, config: CompressConfig, **_):
        self.config = config

    @abstractmethod
    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate: ...

    @property
    def holds_incumbent(self) -> bool:
        """Whether :meth:`keep_incumbent` re-scores (a search with starting candidates
        and ``incumbent_rule``): the pipeline builds the re-score only then."""
        c = self.config
        return self.searches and c.include_baselines and c.incumbent_rule

    @property
    def selects_by_halving(self) -> bool:
        """Whether the step's plan is chosen by successive halving (``halving``, a
        search): the pipeline runs :func:`rlpruner_ray.halving.select` instead of
        :meth:`keep_incumbent`."""
        return self.searches and self.config.halving

    def keep_incumbent(self, ctx: StepContext, evaluate: Evaluator, chosen: Candidate) -> Candidate:
        """The candidate the step applies, for every search alike: with
        ``incumbent_rule`` the best starting candidate stays unless the search's
        ``chosen`` wins the re-score (:mod:`rlpruner_ray.incumbent`); the decision
        and its figures go to ``ctx.incumbent``. One-shot methods, a run without
        starting candidates or without a re-score apply ``chosen``."""
        if not self.holds_incumbent or ctx.rescore is None:
            return chosen
        applied, ctx.incumbent = hold_to_incumbent(evaluate.candidates, chosen, ctx.rescore,
                                                   self.config.rescore_z)
        return applied

    def starting_candidates(self, ctx: StepContext, evaluate: Evaluator) -> list[Candidate]:
        """With ``include_baselines``: the step's baseline plans (uniform, global
        threshold, Torch-Pruning global), scored first as iteration 0 and recorded
        under their own names, so every search starts no worse (by its reward)
        than any of them. Counted in the budget like any candidate."""
        if not (self.searches and self.config.include_baselines) or evaluate.remaining <= 0:
            return []
        sources, items = zip(*baseline_plans(ctx, self.config))
        return evaluate(list(items), 0, source=list(sources))

    def proposal_centre(self, start: list[Candidate]) -> np.ndarray | None:
        """With ``around_incumbent``, the distribution a search proposes around: the
        incumbent's (the best of the scored ``start``ing candidates); else None (the
        search's own centre, the uniform distribution)."""
        if not (self.config.around_incumbent and start):
            return None
        best = incumbent_of(start)
        return best.distribution / best.distribution.sum()

    @classmethod
    def search_budget(cls, config: CompressConfig) -> int:
        """Evaluations per step left to the search proper after its starting candidates
        (one per baseline plan; a plan that cannot be made leaves its evaluation to
        the search)."""
        start = len(BASELINE_SOURCES) if cls.searches and config.include_baselines else 0
        return config.evaluations_per_step - start

    def score(self, items: list) -> list[dict]:
        """Score items on the driver (an algorithm without evaluation actors:
        ``uses_pool`` False) for the step's :class:`Evaluator`."""
        raise NotImplementedError(f"{self.name} scores through the evaluation actors")

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def on_new_base(self, step: int) -> None:
        """Called after the pipeline published a new base model."""

    def save_extra(self, folder) -> None:
        """Write state that is not plain data (an RLlib checkpoint) into ``folder``."""

    def load_extra(self, folder) -> None:
        pass

    def close(self) -> None:
        pass
