"""Parallel evaluation on Ray actors (the base model they evaluate comes from the
:mod:`rlpruner_ray.model_store`).

* :class:`EvalWorker` — an actor holding one ``LayerPruningEnv``; scores lists
  of distributions through the env's code path.
* :class:`EvaluationPool` — N workers; splits a batch of distributions across
  them and returns results in submission order (deterministic).
"""
from __future__ import annotations

import numpy as np
import ray

from ..cluster_offer import wait_for_request
from ..config import CompressConfig
from ..errors import RLPrunerError
# re-exported: the store's names were long imported from here
from ..model_store import CLOSED, SPENT, ModelStore, make_payload, start_store  # noqa: F401
from ..problem import env_settings
from ..runtime import actor_device
from .base import plans_for


class EvalWorker:
    """Ray actor body: one environment, many evaluations."""

    def __init__(self, settings: dict):
        import envs  # registers the env; importable on every node
        self.env = envs.LayerPruningEnv({**settings, "device": actor_device(settings["device"])})

    def evaluate(self, items: list, version: int) -> list[dict]:
        """Score distributions, or exact plans (``plans.exact_plan``)."""
        if self.env.scorer.version != version:
            self.env.sync()
        return self.env.evaluate_plans(plans_for(self.env, items))

    def short_finetunes(self, plans: list, teacher_bytes: bytes, config_values: dict, seed: int, label: str,
                        version: int) -> list[dict]:
        """Successive halving's short KD fine-tunes of ``plans`` (``halving.finetune_on_actor``)."""
        from ..halving import finetune_on_actor
        if self.env.scorer.version != version:
            self.env.sync()
        return finetune_on_actor(self.env, plans, teacher_bytes, config_values, seed, label)

    def describe(self) -> dict:
        import os
        g = self.env.scorer.graph
        return {"version": self.env.scorer.version, "channels": g.channels.tolist(), "pid": os.getpid(),
                "scoring": self.env.scorer.choice, "device": str(self.env.scorer.device),
                "node_id": ray.get_runtime_context().get_node_id()}


class EvaluationPool:
    def __init__(self, config: CompressConfig, store_name: str):
        n, cpus, gpus = config.num_workers, config.cpus_per_worker, config.gpus_per_worker
        # on an autoscaled cluster this waits for the nodes (a Tune trial's placement
        # group already holds them)
        wait_for_request([{"CPU": cpus, "GPU": gpus}] * n, f"{n} evaluation actors",
                         timeout_s=config.autoscale_timeout)
        settings = env_settings(config, store=store_name, device=config.device)
        actor = ray.remote(EvalWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=-1,
                                               max_task_retries=-1)
        self.workers = [actor.remote(settings) for _ in range(n)]

    def evaluate(self, distributions: list[np.ndarray], version: int) -> list[dict]:
        n = len(self.workers)
        chunks = np.array_split(np.arange(len(distributions)), min(n, max(1, len(distributions))))
        refs = [w.evaluate.remote([distributions[i] for i in idx], version)
                for w, idx in zip(self.workers, chunks) if len(idx)]
        try:
            parts = ray.get(refs)
        except ray.exceptions.RayTaskError as exc:
            # bad input (e.g. a PlanError for a NaN distribution) reaches the caller as
            # itself, one clear line, not wrapped in the worker's traceback; the worker
            # is unaffected and keeps serving
            if isinstance(getattr(exc, "cause", None), RLPrunerError):
                raise exc.cause from None
            raise
        return [r for part in parts for r in part]

    def short_finetunes(self, plans: list, teacher_bytes: bytes, config_values: dict, seed: int, label: str,
                        version: int) -> list[dict]:
        """Fine-tune ``plans`` briefly across the workers, in parallel (successive
        halving's stage 2); results in submission order."""
        chunks = np.array_split(np.arange(len(plans)), min(len(self.workers), max(1, len(plans))))
        teacher = ray.put(teacher_bytes)
        refs = [w.short_finetunes.remote([plans[i] for i in idx], teacher, config_values, seed, label, version)
                for w, idx in zip(self.workers, chunks) if len(idx)]
        return [r for part in ray.get(refs) for r in part]

    def describe(self) -> list[dict]:
        return ray.get([w.describe.remote() for w in self.workers])

    def scoring_choice(self) -> dict:
        """How the first worker scores candidates (every worker of a pool has the
        same device and settings): flat keys for a step record."""
        choice = self.describe()[0]["scoring"]
        return {"scoring_path": choice.get("path"), "candidates_per_pass": choice.get("candidates_per_pass")}

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)
