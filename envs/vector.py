"""LayerPruningVectorEnv: N copies of the pruning problem behind one scorer.

Gymnasium's ``SyncVectorEnv`` would step N separate environments one after the
other: N model copies and N small forward passes. Here the N sub-environments
share one base model and one :class:`StepScorer`, and a vector step scores all
N candidates together (K per forward pass on the batched path, BN-recalibrated
rewards included: each candidate's statistics are taken inside the same passes),
which is what keeps a GPU env runner busy. RLlib builds it through the env's vector entry
point (``gym_env_vectorize_mode="vector_entry_point"``).

Autoreset follows Gymnasium's default (``NEXT_STEP``): the step after a
sub-environment's episode ends returns its reset observation, reward 0.
"""
from __future__ import annotations

import gymnasium as gym
import numpy as np
from gymnasium.vector.utils import batch_space

from .layer_pruning import LayerPruningEnv


class LayerPruningVectorEnv(gym.vector.VectorEnv):
    metadata = {"autoreset_mode": gym.vector.AutoresetMode.NEXT_STEP}

    def __init__(self, config: dict | None = None, num_envs: int = 1):
        if int(num_envs) < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        self.env = LayerPruningEnv(config)
        self.num_envs = int(num_envs)
        self.single_action_space = self.env.action_space
        self.single_observation_space = self.env.observation_space
        self.action_space = batch_space(self.single_action_space, self.num_envs)
        self.observation_space = batch_space(self.single_observation_space, self.num_envs)
        self._episodes = [self._fresh() for _ in range(self.num_envs)]
        self._needs_reset = np.zeros(self.num_envs, bool)

    def _fresh(self) -> tuple[int, np.ndarray]:
        return 0, np.zeros(self.env.scorer.graph.num_groups, np.int64)

    def reset(self, *, seed=None, options=None):
        self.env.reset(seed=seed)          # follows the store to the current base model
        self._episodes = [self._fresh() for _ in range(self.num_envs)]
        self._needs_reset[:] = False
        obs = np.stack([self.env._obs(*e, 0.0) for e in self._episodes])
        return obs, {}

    def step(self, actions):
        n = self.num_envs
        obs = np.zeros((n, *self.single_observation_space.shape), np.float32)
        rewards = np.zeros(n, np.float64)
        terminated = np.zeros(n, bool)
        if self._needs_reset.any():
            self.env.sync()
        for i in np.flatnonzero(self._needs_reset):
            self._episodes[i] = self._fresh()
            obs[i] = self.env._obs(*self._episodes[i], 0.0)
        active = [i for i in range(n) if not self._needs_reset[i]]
        self._needs_reset[:] = False
        steps = self.env.advance([self._episodes[i] for i in active], [actions[i] for i in active])
        for i, (t, removed, reward, done, _) in zip(active, steps):
            self._episodes[i] = (t, removed)
            obs[i] = self.env._obs(t, removed, reward)
            rewards[i], terminated[i] = reward, done
            self._needs_reset[i] = done
        return obs, rewards, terminated, np.zeros(n, bool), {}

    def close_extras(self, **kwargs):
        if getattr(self, "env", None) is not None:     # (also called on a half-built env)
            self.env.close()
