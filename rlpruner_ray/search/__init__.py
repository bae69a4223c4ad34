"""Search algorithms: one interface (``base``), the paper's algorithm
(``rlpruner``), non-learned baselines (``baselines``; CMA-ES: ``cmaes``), RLlib policies
(``rllib``) and the Ray actors they evaluate on (``workers``)."""
from .base import Candidate, Evaluator, SearchAlgorithm, StepContext, make_algorithm

__all__ = ["Candidate", "Evaluator", "SearchAlgorithm", "StepContext", "make_algorithm"]
