"""Gymnasium environments of rlpruner-ray. Importing this package registers
``rlpruner/LayerPruning-v0`` (``gymnasium.make(ENV_ID, config=...)``)."""
import gymnasium as gym

from .layer_pruning import LayerPruningEnv

ENV_ID = "rlpruner/LayerPruning-v0"

if ENV_ID not in gym.registry:
    gym.register(id=ENV_ID, entry_point="envs.layer_pruning:LayerPruningEnv", max_episode_steps=None)

__all__ = ["LayerPruningEnv", "ENV_ID"]
