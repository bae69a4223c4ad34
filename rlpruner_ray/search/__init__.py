"""Search algorithms: one interface (``base``), the paper's algorithm
(``rlpruner``), non-learned baselines (``baselines``, ``tp_baselines``; CMA-ES:
``cmaes``), RLlib policies (``rllib``), the names they go by (``registry``) and
the Ray actors they evaluate on (``workers``). The plans they start from are in
:mod:`rlpruner_ray.plans`."""
from .base import Candidate, Evaluator, SearchAlgorithm, StepContext
from .registry import make_algorithm

__all__ = ["Candidate", "Evaluator", "SearchAlgorithm", "StepContext", "make_algorithm"]
