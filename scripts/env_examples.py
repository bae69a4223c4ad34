"""The pruning problem on its own, as a Gymnasium environment, driven by three
kinds of training loop (no Ray needed):

    python scripts/env_examples.py random      # a plain loop: random actions, best kept
    python scripts/env_examples.py reinforce   # a minimal CleanRL-style policy gradient in torch
    python scripts/env_examples.py sb3         # stable-baselines3's PPO, if it is installed

Each episode is one pruning step: the action sets how the filters to remove are
spread over the model's layer groups, the reward is the pruned model's accuracy.
Options of the problem go to ``gym.make`` (``model=``, ``dataset=``,
``base_checkpoint=``, ``sparsity=``, ...; see ``envs/defaults.py``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout too
import envs  # noqa: E402  (registers rlpruner/LayerPruning-v0)


def random_search(env: gym.Env, episodes: int) -> None:
    best = -np.inf
    for episode in range(episodes):
        env.reset(seed=episode)
        action = env.action_space.sample()
        _, reward, *_ = env.step(action)
        best = max(best, reward)
        print(f"episode {episode + 1}: reward {reward:.4f} (best {best:.4f})")


def reinforce(env: gym.Env, episodes: int, lr: float = 0.05, batch: int = 8) -> None:
    """A Gaussian policy over the action box, updated with REINFORCE and a mean
    baseline every ``batch`` episodes (one-step episodes: the return is the reward)."""
    obs_size, act_size = env.observation_space.shape[0], env.action_space.shape[0]
    policy = torch.nn.Sequential(torch.nn.Linear(obs_size, 64), torch.nn.Tanh(), torch.nn.Linear(64, act_size))
    log_std = torch.nn.Parameter(torch.full((act_size,), -1.0))
    optimizer = torch.optim.Adam([*policy.parameters(), log_std], lr=lr)
    log_probs, rewards = [], []
    for episode in range(episodes):
        obs, _ = env.reset(seed=episode)
        dist = torch.distributions.Normal(policy(torch.as_tensor(obs)), log_std.exp())
        action = dist.sample()
        _, reward, *_ = env.step(action.clamp(-1, 1).numpy())
        log_probs.append(dist.log_prob(action).sum())
        rewards.append(reward)
        if len(rewards) == batch:
            returns = torch.tensor(rewards)
            loss = -((returns - returns.mean()) * torch.stack(log_probs)).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            print(f"episodes {episode + 2 - batch}-{episode + 1}: mean reward {returns.mean():.4f}, "
                  f"best {returns.max():.4f}")
            log_probs, rewards = [], []


def _stable_baselines3_ppo():
    try:
        from stable_baselines3 import PPO
    except ImportError:
        raise SystemExit("stable-baselines3 is not installed (pip install stable-baselines3); "
                         "the other examples need nothing more") from None
    return PPO


def sb3_ppo(env: gym.Env, episodes: int) -> None:
    PPO = _stable_baselines3_ppo()
    model = PPO("MlpPolicy", env, n_steps=16, batch_size=16, n_epochs=4, verbose=1)
    model.learn(total_timesteps=episodes)
    obs, _ = env.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    print(f"PPO's deterministic action: reward {env.step(action)[1]:.4f}")


def build_parser() -> argparse.ArgumentParser:
    # the whole docstring: its first line alone stops mid-sentence
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("loop", choices=("random", "reinforce", "sb3"),
                        help="random: random actions, best kept; reinforce: a policy gradient in torch; "
                             "sb3: stable-baselines3's PPO")
    parser.add_argument("--episodes", type=int, default=32,
                        help="episodes to run, each one pruning step scored on the validation split (default: 32)")
    parser.add_argument("--sparsity", type=float, default=0.2,
                        help="fraction of the model's filters each episode removes (default: 0.2)")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.loop == "sb3":
        _stable_baselines3_ppo()            # refuse before the environment is made
    torch.manual_seed(0)
    env = gym.make(envs.ENV_ID, sparsity=args.sparsity)
    {"random": random_search, "reinforce": reinforce, "sb3": sb3_ppo}[args.loop](env, args.episodes)


if __name__ == "__main__":
    main()
