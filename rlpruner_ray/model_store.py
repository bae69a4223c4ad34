"""The model store: one small named Ray actor per run that holds the current base
model (a payload and its version) and the step's evaluation tickets.

Every environment, whether on an evaluation actor or an RLlib env runner, fetches
the base model from here, also after Ray restarts it, and environments that spend
a shared budget (RLlib's) take one ticket per evaluation. It sits below both the
environment (``envs``) and the worker pool (``search.workers``), which use it.
"""
from __future__ import annotations

import time
import uuid

import ray

from .checkpoint import model_to_bytes
from .runtime import NAMESPACE


def make_payload(model, graph, context: dict, version: int) -> dict:
    """Everything an environment needs to adopt a base model: the model file's
    bytes (weights-only format), the driver's importance scores (so every worker
    prunes exactly the channels the driver will), and the step's context."""
    return {
        "version": version,
        "model": model_to_bytes(model),
        "input_shape": list(graph.example_inputs.shape[1:]),
        "keys": graph.keys,
        "scores": [s.cpu().numpy() for s in graph.scores],
        "criterion": graph.criterion,
        "context": context,
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
        self._centre = None                   # the step's action-0 distribution (None: the initial one)

    def publish(self, payload: dict) -> int:
        self._version = payload["version"]
        self._payload = payload
        return self._version

    def version(self) -> int:
        return self._version

    def get(self) -> dict:
        return self._payload

    # ---- tickets: one per evaluation, so a budget is never overspent
    def begin_step(self, version: int, tickets: int, timeout_s: float, release_when_spent: bool = False,
                   centre: list | None = None) -> None:
        """``release_when_spent``: once every ticket of the step is recorded, answer
        SPENT instead of "wait" (synchronous algorithms, see ``take_ticket``).
        ``centre``: the distribution the step's action 0 stands for (the incumbent's),
        for every environment of base ``version``; None: each env's initial one."""
        self._closed = False                  # a new search may follow a closed one
        self._centre = (version, centre)
        self._tickets, self._timeout = tickets, timeout_s
        self._release_when_spent = release_when_spent
        self._reward_sum, self._reward_n = 0.0, 0
        self._out.clear()
        self._rows.clear()

    def centre(self, version: int) -> list | None:
        """The action-0 distribution of base ``version``'s step (None: not set for it)."""
        step_version, centre = self._centre or (None, None)
        return centre if step_version == version else None

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
        got = self.take_tickets(version, 1)
        return got[0] if isinstance(got, list) else got

    def take_tickets(self, version: int, n: int) -> list[int] | int | None:
        """Up to ``n`` tickets at once (a vector env's sub-envs), or what
        ``take_ticket`` answers when there is none. Taken atomically: two vector
        envs each holding part of what they need and waiting for the rest would
        wait for each other."""
        if self._closed:
            return CLOSED
        self._expire()
        if version != self._version:
            return None
        if self._tickets <= 0:
            return SPENT if self._release_when_spent and not self._out else None
        taken = []
        for _ in range(min(int(n), self._tickets)):
            self._next_ticket += 1
            self._out[self._next_ticket] = time.monotonic()
            taken.append(self._next_ticket)
        self._tickets -= len(taken)
        return taken

    def take_tickets_and_centre(self, version: int, n: int) -> tuple:
        """(what ``take_tickets`` answers, the step's centre when that is tickets):
        a budgeted env learns both in one call per step instead of two."""
        got = self.take_tickets(version, n)
        return got, (self.centre(version) if isinstance(got, list) else None)

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



def start_store() -> tuple[object, str]:
    name = f"model-store-{uuid.uuid4().hex[:8]}"
    store = ModelStore.options(name=name, namespace=NAMESPACE, max_restarts=0).remote()
    return store, name
