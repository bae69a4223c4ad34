"""LayerPruningEnv: the pruning problem as a Gymnasium environment.

**Action** ``Box(-1, 1, (G,))``, one entry per prunable group. It maps to the
distribution ``d_g ∝ c_g * exp(action_scale * a_g)`` where the centre ``c`` is
the paper's initial distribution (each group's share of the channels), or the
one :meth:`LayerPruningEnv.set_centre` gave (a search around its incumbent sets
the incumbent's; budgeted envs take it from the store's step): action 0 is that
distribution, ±1 multiply a group's weight by ``exp(±action_scale)``.
Actions outside the box are clipped; NaN entries count as 0.

**Observation** ``G * 5 + 4`` floats: per group the fraction of its original
channels left after the episode's cuts so far, its share of the model's MACs
and params, and two scale-free importance statistics (coefficient of
variation; share of channels scoring under half the group mean); then the
episode's last reward (0 at its start), the sparsity reached, the step's
progress through the run, and the sub-step's progress through the episode (so
with ``horizon`` above 1 the observation changes within an episode: the widths,
the reward and the target left).

**Episode** ``horizon`` sub-steps (default 1, the paper's setting); sub-step t
removes the next ``1/horizon`` of the step's filters with the action's
distribution and is rewarded with the score of everything removed so far.

The base model comes from a payload (see ``rlpruner_ray.model_store``):
given directly (``config["payload"]``) or fetched from a named Ray actor
(``config["store"]``) whose version is checked on every ``reset`` — so an env
runner that Ray restarts picks up the current base model by itself.
"""
from __future__ import annotations

import os
import time

import gymnasium as gym
import numpy as np

from rlpruner_ray.compute import SCORED_KEYS
from rlpruner_ray.data import load_dataset
from rlpruner_ray.scoring import StepScorer
from rlpruner_ray.model_store import CLOSED, SPENT

FEATURES_PER_GROUP = 5
GLOBAL_FEATURES = 4


class LayerPruningEnv(gym.Env):
    metadata = {"render_modes": []}

    def __init__(self, config: dict | None = None, **options):
        """``config``: the settings dict the pipeline and RLlib pass. Without it,
        ``options`` (``model=``, ``dataset=``, ``base_checkpoint=``, ``sparsity=``,
        ... see ``envs.defaults.ENV_OPTIONS``) describe a problem built here;
        none at all gives a small default one (``envs/defaults.py``)."""
        if config is None:
            from .defaults import standalone_settings
            config = standalone_settings(**options)
        elif options:
            raise TypeError(f"LayerPruningEnv takes config= or keyword options, not both "
                            f"(got {', '.join(sorted(options))})")
        config = dict(config)
        self.settings = config
        if config.get("threads"):
            import torch
            torch.set_num_threads(int(config["threads"]))
        data = load_dataset(**config["dataset"])
        self.data = data                     # (an evaluation actor also fine-tunes on it: halving)
        self.scorer = StepScorer(config, data)
        self._store = None
        payload = config.get("payload")
        if payload is None:
            payload = self._store_actor().get.remote()
            import ray
            payload = ray.get(payload)
        self._adopt(payload)
        g = self.scorer.graph.num_groups
        self.action_space = gym.spaces.Box(-1.0, 1.0, (g,), np.float32)
        low = np.zeros(g * FEATURES_PER_GROUP + GLOBAL_FEATURES, np.float32)
        low[-GLOBAL_FEATURES] = -np.inf                  # the last reward (a cost-weighted one can be < 0)
        self.observation_space = gym.spaces.Box(low, np.full_like(low, np.inf), dtype=np.float32)
        self.horizon = int(config.get("horizon", 1))
        self._t = 0
        self._removed = np.zeros(g, np.int64)
        self._last_reward = 0.0

    # ------------------------------------------------------------------ base model
    def _store_actor(self):
        if self._store is None:
            import ray
            self._store = ray.get_actor(self.settings["store"], namespace=self.settings.get("namespace"))
        return self._store

    def _adopt(self, payload: dict) -> None:
        self.scorer.load(payload)
        graph = self.scorer.graph
        ctx = payload["context"]
        original = np.array([ctx["original"]["channels"][k] for k in graph.keys], dtype=np.float64)
        self._init = graph.initial_distribution()
        features = graph.group_features()
        self._channels, self._original_channels = graph.channels.astype(np.float64), original
        self._static_obs = np.concatenate([
            graph.macs_share, graph.params_share, features[:, 0], features[:, 1]]).astype(np.float32)
        self._centre = None                  # a new base: its step sets its own
        self._ticket_centre = None           # the centre that came with the last tickets
        self._original_total = float(ctx["original"]["total_channels"])
        self._removed_before = float(ctx["original"]["total_channels"] - graph.total_channels)
        self._progress = ctx["step"] / max(ctx["num_steps"], 1)

    def set_base(self, payload: dict) -> None:
        """Replace the base model after an outer step, without rebuilding the env."""
        if (g := len(payload["keys"])) != self.action_space.shape[0]:
            raise ValueError(f"new base model has {g} groups, the env was built for {self.action_space.shape[0]}")
        self._adopt(payload)

    def sync(self) -> None:
        """Fetch the current base model from the store if it moved on."""
        if self.settings.get("store") is None:
            return
        import ray
        store = self._store_actor()
        if ray.get(store.version.remote()) != self.scorer.version:
            self._adopt(ray.get(store.get.remote()))

    # ------------------------------------------------------------------ gym API
    def _obs(self, t: int | None = None, removed: np.ndarray | None = None,
             last_reward: float | None = None) -> np.ndarray:
        """Observation of an episode at sub-step ``t`` having removed ``removed``, its
        last reward ``last_reward`` (default: this env's own episode)."""
        t = self._t if t is None else t
        removed = self._removed if removed is None else removed
        last_reward = self._last_reward if last_reward is None else last_reward
        done = self._removed_before + float(removed.sum())
        left = np.maximum(self._channels - removed, 0.0) / self._original_channels
        extra = [last_reward, done / self._original_total, self._progress, t / self.horizon]
        return np.concatenate([left, np.maximum(self._static_obs, 0.0), extra]).astype(np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.sync()
        self._t, self._last_reward = 0, 0.0
        self._removed = np.zeros(self.scorer.graph.num_groups, np.int64)
        return self._obs(), {"version": self.scorer.version}

    def set_centre(self, distribution) -> None:
        """Make ``distribution`` (one share per group) what action 0 stands for, until
        the base model changes; None: the initial distribution again."""
        if distribution is None:
            self._centre = None
            return
        d = np.asarray(distribution, dtype=np.float64).reshape(-1)
        if d.shape[0] != self._init.shape[0] or not np.isfinite(d).all() or (d < 0).any() or d.sum() <= 0:
            raise ValueError(f"a centre needs {self._init.shape[0]} finite non-negative shares with a positive sum")
        d = np.maximum(d / d.sum(), 1e-5)          # a group at 0 could never be pruned again by any action
        self._centre = d / d.sum()

    def action_to_distribution(self, action) -> np.ndarray:
        a = np.nan_to_num(np.asarray(action, dtype=np.float64).reshape(-1), nan=0.0)
        if a.shape[0] != self._init.shape[0]:
            raise ValueError(f"action has {a.shape[0]} entries, expected {self._init.shape[0]}")
        a = np.clip(a, -1.0, 1.0)
        centre = self._init if self._centre is None else self._centre
        w = centre * np.exp(float(self.settings.get("action_scale", 3.0)) * a)
        return w / w.sum()

    def evaluate_distribution(self, distribution, *, fraction: float = 1.0, already_removed=None) -> dict:
        """Plan and score one distribution on the current base model (the code path
        every search algorithm shares)."""
        return self.evaluate_distributions([distribution], fraction=fraction, already_removed=already_removed)[0]

    def evaluate_distributions(self, distributions: list, *, fraction: float = 1.0,
                               already_removed=None) -> list[dict]:
        """Plan each distribution, then score them together (K per forward pass on
        the scorer's batched path)."""
        return self.evaluate_plans([self.plan_distribution(d, fraction, already_removed) for d in distributions])

    def plan_distribution(self, distribution, fraction: float = 1.0, already_removed=None) -> np.ndarray:
        """The counts scored for ``distribution``: everything removed so far included."""
        counts = self.scorer.plan(distribution, fraction=fraction, already_removed=already_removed)
        return counts if already_removed is None else counts + already_removed

    def evaluate_plans(self, plans: list) -> list[dict]:
        """Score per-group counts (or exact plans naming their channels, see
        ``StepScorer.score_many``)."""
        results = self.scorer.score_many(plans)
        for plan, result in zip(plans, results):
            counts = np.asarray(plan["counts"]) if isinstance(plan, dict) else plan
            result.update(counts=counts, version=self.scorer.version)
        return results

    def _take_tickets(self, n: int):
        """Budgeted mode (RLlib env runners): one ticket per evaluation, up to ``n``
        at once; wait while the step's budget is spent, and follow the base model
        when it moves on. CLOSED: the search is over (the algorithm is being
        stopped); SPENT: the step's budget is recorded but a synchronous
        ``train()`` wants more samples. With tickets comes the step's centre (kept
        for ``advance``), in the same call."""
        import ray
        store = self._store_actor()
        while True:
            got, self._ticket_centre = ray.get(store.take_tickets_and_centre.remote(self.scorer.version, n))
            if got is not None:
                return got
            if ray.get(store.version.remote()) != self.scorer.version:
                self._adopt(ray.get(store.get.remote()))
                self._base_changed = True           # running episodes restart on the new base
            time.sleep(0.05)

    def advance(self, episodes: list[tuple[int, np.ndarray]], actions) -> list[tuple]:
        """One sub-step of several episodes ``(t, removed)`` on this env's scorer,
        their candidates scored together. Returns per episode
        ``(t, removed, reward, terminated, info)``. The single env steps its own
        episode through here; the vector env steps all of its sub-envs at once."""
        self._base_changed = False
        n = len(actions)
        tickets = self._take_tickets(n) if self.settings.get("budgeted") else [None] * n
        if tickets == CLOSED:      # search over: answer at once so the env runner can shut down
            return [(*e, 0.0, True, {"closed": True}) for e in episodes]
        if self._base_changed:     # a ticket wait adopted a new base model: episodes start over on it
            episodes = [(0, np.zeros(self.scorer.graph.num_groups, np.int64))] * n
        spent = tickets == SPENT
        tickets = [] if spent else tickets
        if tickets and tickets[0] is not None:     # budgeted: the step's centre, as the driver set it
            self.set_centre(self._ticket_centre)
        started = time.perf_counter()
        distributions = [self.action_to_distribution(a) for a in actions[:len(tickets)]]
        plans = [self.plan_distribution(d, (episodes[i][0] + 1) / self.horizon, episodes[i][1])
                 for i, d in enumerate(distributions)]
        results = self.evaluate_plans(plans)
        seconds = (time.perf_counter() - started) / max(len(plans), 1)
        out = []
        for i, (distribution, result) in enumerate(zip(distributions, results)):
            if tickets[i] is not None:
                row = {k: result[k] for k in ("reward", "accuracy", "macs", "params", "version", *SCORED_KEYS)}
                row.update(counts=result["counts"].tolist(), distribution=distribution.tolist(),
                           seconds=seconds, pid=os.getpid(), channels=self.scorer.graph.channels.tolist())
                self._store_actor().record.remote(tickets[i], row)
            t = episodes[i][0] + 1
            # (compute and timings go to the run's records through the store, not into the
            # step's info: an env steps the same way for the same action)
            info = {k: v for k, v in result.items() if k not in SCORED_KEYS}
            out.append((t, result["counts"], float(result["reward"]), t >= self.horizon,
                        dict(info, distribution=distribution)))
        if len(out) < n:
            # no ticket for these: unscored, worth the step's mean reward (advantage near 0): the
            # mean recorded so far when the budget is spent, else the mean of what was just scored
            if spent:
                import ray
                reward = float(ray.get(self._store_actor().mean_reward.remote()))
            else:
                reward = float(np.mean([o[2] for o in out]))
            out += [(*episodes[i], reward, True, {"unscored": True}) for i in range(len(out), n)]
        return out

    def step(self, action):
        t, removed, reward, terminated, info = self.advance([(self._t, self._removed)], [action])[0]
        self._t, self._removed, self._last_reward = t, removed, reward
        return self._obs(), reward, terminated, False, info
