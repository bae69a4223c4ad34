"""Parallel evaluation on Ray actors.

* :class:`ModelStore` — a small named actor holding the current base model
  payload and its version. Every environment (evaluation actor or RLlib env
  runner) fetches the base model from it, also after Ray restarts the actor.
* :class:`EvalWorker` — an actor holding one ``LayerPruningEnv``; scores lists
  of distributions through the env's code path.
* :class:`EvaluationPool` — N workers; splits a batch of distributions across
  them and returns results in submission order (deterministic).
"""
from __future__ import annotations

import time
import uuid

import numpy as np
import ray

from ..checkpoint import model_to_bytes
from ..config import CompressConfig
from ..errors import RLPrunerError
from ..cluster_offer import wait_for_request
from ..runtime import NAMESPACE, actor_device


def make_payload(model, graph, context: dict, version: int) -> dict:
    """Everything an environment needs to adopt a base model: the model file's
    bytes (weights-only format), the driver's importance scores (so every worker
    prunes exactly the channels the driver will), and the step's context."""
    return {
        "version": version,
        "model": model_to_bytes(model),
        "input_shape": list(graph.example_inputs.shape[1:]),
        "keys": graph.keys,
        "scores": [s.numpy() for s in graph.scores],
        "criterion": graph.criterion,
        "context": context,
    }


def env_settings(config: CompressConfig, *, store: str | None = None, device: str = "cpu") -> dict:
    """The plain-dict environment config derived from the run's config. An actor
    resolves ``device`` where it runs (``runtime.actor_device``)."""
    return {
        "dataset": {"name": config.dataset, "data_dir": config.data_dir, "val_fraction": config.val_fraction,
                    "seed": config.seed, "image_size": config.image_size},
        "reward": config.reward, "reward_coef": config.reward_coef,
        "reward_samples": config.reward_samples, "reward_batch_size": config.reward_batch_size,
        "bn_recalibration_batches": config.bn_recalibration_batches, "horizon": config.horizon,
        "action_scale": config.action_scale, "min_channels": config.min_channels,
        "max_group_sparsity": config.max_group_sparsity, "exclude": list(config.exclude),
        "round_to": config.round_to, "device": device, "store": store, "namespace": NAMESPACE,
        "threads": max(1, int(config.cpus_per_worker)),
    }


CLOSED, SPENT = -1, -2       # take_ticket's answers besides a ticket id and None (wait)


@ray.remote(num_cpus=0)
class ModelStore:
    """The current base model (payload + version), and the step's evaluation
    tickets for environments that spend a shared budget (RLlib env runners)."""

    def __init__(self):
        self._version = -1
        self._payload = None
        self._tickets = 0
        self._timeout = 120.0
        self._next_ticket = 0
        self._out: dict[int, float] = {}     # ticket -> time handed out
        self._rows: list[dict] = []
        self._closed = False
        self._release_when_spent = False
        self._reward_sum, self._reward_n = 0.0, 0

    def publish(self, payload: dict) -> int:
        self._version = payload["version"]
        self._payload = payload
        return self._version

    def version(self) -> int:
        return self._version

    def get(self) -> dict:
        return self._payload

    # ---- tickets: one per evaluation, so a budget is never overspent
    def begin_step(self, version: int, tickets: int, timeout_s: float, release_when_spent: bool = False) -> None:
        """``release_when_spent``: once every ticket of the step is recorded, answer
        SPENT instead of "wait" (synchronous algorithms, see ``take_ticket``)."""
        self._closed = False                  # a new search may follow a closed one
        self._tickets, self._timeout = tickets, timeout_s
        self._release_when_spent = release_when_spent
        self._reward_sum, self._reward_n = 0.0, 0
        self._out.clear()
        self._rows.clear()

    def _expire(self) -> None:
        now = time.monotonic()
        for ticket, since in list(self._out.items()):
            if now - since > self._timeout:   # its holder died: hand the evaluation out again
                del self._out[ticket]
                self._tickets += 1

    def close(self) -> None:
        """The search is over: environments waiting for a ticket stop waiting."""
        self._closed = True

    def take_ticket(self, version: int) -> int | None:
        """A ticket id, None (wait: budget spent or stale model), CLOSED or SPENT.

        SPENT: every ticket of the step is recorded, yet a synchronous algorithm's
        ``train()`` still wants samples. That happens after an env runner dies
        mid-fragment: RLlib drops the steps it had taken (their rows are already
        recorded) and asks the others for more. Waiting would block ``train()``
        until RLlib's sample timeout, so the environment answers without scoring.
        """
        if self._closed:
            return CLOSED
        self._expire()
        if version != self._version:
            return None
        if self._tickets <= 0:
            return SPENT if self._release_when_spent and not self._out else None
        self._tickets -= 1
        self._next_ticket += 1
        self._out[self._next_ticket] = time.monotonic()
        return self._next_ticket

    def record(self, ticket: int, row: dict) -> bool:
        if self._out.pop(ticket, None) is None:
            return False                      # expired and handed out again: drop, never count twice
        self._rows.append(row)
        self._reward_sum += float(row["reward"])
        self._reward_n += 1
        return True

    def mean_reward(self) -> float:
        """The step's mean recorded reward: what an unscored (SPENT) step returns,
        so its advantage is near zero and it barely moves the policy."""
        return self._reward_sum / self._reward_n if self._reward_n else 0.0

    def status(self) -> dict:
        self._expire()
        return {"available": self._tickets, "outstanding": len(self._out), "ready": len(self._rows)}

    def drain(self) -> list[dict]:
        rows, self._rows = self._rows, []
        return rows


class EvalWorker:
    """Ray actor body: one environment, many evaluations."""

    def __init__(self, settings: dict):
        import envs  # registers the env; importable on every node
        self.env = envs.LayerPruningEnv({**settings, "device": actor_device(settings["device"])})

    def evaluate(self, distributions: list, version: int) -> list[dict]:
        if self.env.scorer.version != version:
            self.env.sync()
        out = []
        for d in distributions:
            r = self.env.evaluate_distribution(np.asarray(d, dtype=np.float64))
            out.append(r)
        return out

    def describe(self) -> dict:
        import os
        g = self.env.scorer.graph
        return {"version": self.env.scorer.version, "channels": g.channels.tolist(), "pid": os.getpid()}


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

    def describe(self) -> list[dict]:
        return ray.get([w.describe.remote() for w in self.workers])

    def close(self) -> None:
        for w in self.workers:
            ray.kill(w)


def start_store() -> tuple[object, str]:
    name = f"model-store-{uuid.uuid4().hex[:8]}"
    store = ModelStore.options(name=name, namespace=NAMESPACE, max_restarts=0).remote()
    return store, name
