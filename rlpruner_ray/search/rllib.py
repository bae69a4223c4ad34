"""Any RLlib algorithm with continuous (Box) actions as a search algorithm.

RLlib's env runners each hold ``LayerPruningEnv`` copies (CPU or a GPU
fraction) that prune and score the current base model; the policy learns the
distribution from those rewards. The algorithm is built once per run and keeps
learning across pruning steps: after each step the new base model is published
to the :class:`ModelStore` and every environment picks it up on ``reset``
(also an env runner that Ray restarted).

The evaluation budget is enforced with *tickets*: the driver gives the store
``budget - 1`` tickets per step, an environment takes one before each scoring
(waiting if none is left, so asynchronous algorithms cannot overspend), and
the last evaluation scores the policy's deterministic action on the driver.
A ticket held by an env runner that dies is handed out again after
``TICKET_TIMEOUT_S``; a late result for it is dropped, so no row is lost or
counted twice. RLlib also drops the steps the dead runner had taken and asks
the others for more than the tickets left: once the whole budget is recorded,
the environments of synchronous algorithms answer those with an unscored step
worth the step's mean reward instead of waiting (see ``ModelStore.take_ticket``). A vector
env takes its sub-envs' tickets at once (``take_tickets``), so two runners never
wait on each other holding part of what each needs.
The applied distribution is the best of the step's sampled candidates and the
deterministic action.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import ray

from ..config import ALGORITHMS_NATIVE, CompressConfig
from ..errors import ConfigError
from .base import Candidate, Evaluator, SearchAlgorithm, StepContext, candidate_from, plans_for

log = logging.getLogger("rlpruner_ray")

# RLlib algorithms (new API stack) that accept continuous Box actions.
CONTINUOUS = {"ppo": "PPO", "appo": "APPO", "sac": "SAC", "impala": "IMPALA"}
# Their env runners sample in the background, between train() calls, so an
# environment must wait for the next step rather than answer unscored.
ASYNCHRONOUS = ("appo", "impala")
TICKET_TIMEOUT_S = 120.0


def check_rllib_algorithm(name: str) -> None:
    if name in CONTINUOUS:
        return
    try:
        from ray.rllib.algorithms.registry import ALGORITHMS
        known = {k.lower() for k in ALGORITHMS}
    except ImportError:
        known = set()
    if name in known:
        raise ConfigError(f"RLlib algorithm {name!r} does not support online learning with continuous (Box) "
                          f"actions here; use one of {', '.join(sorted(CONTINUOUS))}")
    raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(sorted(ALGORITHMS_NATIVE))} "
                      f"or an RLlib algorithm: {', '.join(sorted(CONTINUOUS))}")


def env_runner_layout(config: CompressConfig) -> tuple[int, int]:
    runners = config.num_workers if config.rl_num_env_runners is None else config.rl_num_env_runners
    return runners, config.rl_envs_per_env_runner


def rllib_bundles(config: CompressConfig) -> list[dict]:
    """Placement-group bundles: the driver (which learns when there are no learner
    actors), one per env runner, one per learner."""
    runners, _ = env_runner_layout(config)
    driver_gpu = config.rl_gpus_per_learner if config.rl_num_learners == 0 else 0.0
    bundles = [{"CPU": 1.0, "GPU": driver_gpu}]
    bundles += [{"CPU": config.cpus_per_worker, "GPU": config.gpus_per_worker}] * runners
    bundles += [{"CPU": 1.0, "GPU": config.rl_gpus_per_learner}] * config.rl_num_learners
    return bundles


def actor_bundles(config: CompressConfig) -> list[dict]:
    """The bundles of the env runner and learner actors: :func:`rllib_bundles` but
    the driver's own."""
    return rllib_bundles(config)[1:]


@dataclass(frozen=True)
class BatchPlan:
    """How one step's env-runner evaluations are spent on training iterations."""
    batches: tuple[int, ...]   # env steps per training iteration; only the last may be shorter
    tickets: int               # evaluations the env runners score (whole rounds of all environments)
    round: int                 # environments sampled in parallel: one round is one step of each
    full: int                  # rl_batch_size rounded up to whole rounds

    @property
    def fragment(self) -> int:
        """Rollout fragment (steps per environment per sample call): the largest that
        divides every batch, so no sample call runs past a batch's end."""
        return math.gcd(*(b // self.round for b in self.batches))


def next_batch(plan: BatchPlan, tickets_left: int) -> int:
    """The next training iteration's batch with ``tickets_left`` tickets not yet taken:
    a full batch, or what is left, in whole rounds (after an env runner was lost the
    tickets handed out again need not fill a round; RLlib answers the rest unscored)."""
    rounds_left = -(-tickets_left // plan.round)
    return min(plan.full, rounds_left * plan.round)


def batch_plan(config: CompressConfig) -> BatchPlan:
    """The env runners spend ``budget - 1`` evaluations, rounded down to whole rounds
    of all environments (the rest go to extra policy samples on the driver), in
    batches of ``rl_batch_size`` rounded up to whole rounds; only the last batch is
    shorter, to spend what is left (40 evaluations, 2 environments, batch 20: 20 + 18)."""
    runners, envs = env_runner_layout(config)
    n_envs = max(1, runners) * envs
    tickets = ((config.evaluations_per_step - 1) // n_envs) * n_envs
    if tickets == 0:
        raise ConfigError(f"evaluations_per_step must be at least {n_envs + 1} for {config.algo} with "
                          f"{n_envs} environments (one round of samples plus the policy's own action)")
    plan = BatchPlan((), tickets, n_envs, -(-config.rl_batch_size // n_envs) * n_envs)
    batches, left = [], tickets
    while left:
        batches.append(next_batch(plan, left))
        left -= batches[-1]
    return replace(plan, batches=tuple(batches))


def _training_settings(config: CompressConfig, batch: int) -> dict:
    """The settings that follow one iteration's train batch (its size, PPO's minibatch)."""
    learners = max(1, config.rl_num_learners)
    settings = {"train_batch_size_per_learner": -(-batch // learners)}
    if config.algo.lower() in ("ppo", "appo"):
        settings["minibatch_size"] = max(1, min(batch, 32))
    return settings


def build_algorithm_config(config: CompressConfig, env_config: dict):
    """The RLlib AlgorithmConfig for ``config`` (not built)."""
    from ray.rllib.algorithms.registry import ALGORITHMS
    from ray.rllib.core.rl_module.default_model_config import DefaultModelConfig
    name = config.algo.lower()
    check_rllib_algorithm(name)
    algo_cls, _ = ALGORITHMS[CONTINUOUS[name]]()
    runners, envs = env_runner_layout(config)
    plan = batch_plan(config)
    # built with the first iteration's batch: RLlib checks the batch against the rollout
    # fragment at build time, and where the budget leaves less than one full batch
    # (11 evaluations, 3 of them starting candidates) the full size is never sampled
    batch, fragment = plan.batches[0], plan.fragment
    cfg = (algo_cls.get_default_config()
           .api_stack(enable_rl_module_and_learner=True, enable_env_runner_and_connector_v2=True)
           .environment("rlpruner/LayerPruning-v0", env_config=env_config)
           .env_runners(num_env_runners=runners, num_envs_per_env_runner=envs,
                        num_cpus_per_env_runner=config.cpus_per_worker,
                        num_gpus_per_env_runner=config.gpus_per_worker,
                        rollout_fragment_length=fragment, sample_timeout_s=600.0,
                        # the env's own vector env scores all of a runner's envs in one batched call
                        gym_env_vectorize_mode="vector_entry_point",
                        batch_mode="complete_episodes" if config.horizon > 1 else "truncate_episodes")
           .learners(num_learners=config.rl_num_learners, num_gpus_per_learner=config.rl_gpus_per_learner)
           .rl_module(model_config=DefaultModelConfig(fcnet_hiddens=[config.rl_hidden, config.rl_hidden]))
           .fault_tolerance(restart_failed_env_runners=True, max_num_env_runner_restarts=1000,
                            delay_between_env_runner_restarts_s=1.0)
           .debugging(seed=config.seed, log_level="ERROR")
           .reporting(min_time_s_per_iteration=0, min_sample_timesteps_per_iteration=0,
                      metrics_num_episodes_for_smoothing=1))
    training = {"lr": config.rl_lr, "gamma": 0.99, **_training_settings(config, batch)}
    if name in ("ppo", "appo"):
        training.update(num_epochs=4)
    if name == "sac":   # SAC has one learning rate per network instead of `lr`
        training.update(lr=None, actor_lr=config.rl_lr, critic_lr=config.rl_lr, alpha_lr=config.rl_lr,
                        num_steps_sampled_before_learning_starts=batch,
                        replay_buffer_config={"type": "PrioritizedEpisodeReplayBuffer", "capacity": 10000,
                                              "alpha": 0.6, "beta": 0.4})
    cfg = cfg.training(**training)
    return cfg


def _register_env():
    from ray.tune.registry import register_env

    def make(env_config):
        import envs
        from ..runtime import actor_device
        config = {**dict(env_config), "device": actor_device(env_config["device"])}
        if "num_envs" in config:      # RLlib's vector entry point: one scorer for all sub-envs
            from envs.vector import LayerPruningVectorEnv
            return LayerPruningVectorEnv(config, config.pop("num_envs"))
        return envs.LayerPruningEnv(config)
    register_env("rlpruner/LayerPruning-v0", make)


class RLlibSearch(SearchAlgorithm):
    uses_pool = False

    def __init__(self, config: CompressConfig, *, store_name: str, **kwargs):
        super().__init__(config, **kwargs)
        from ..cluster_offer import wait_for_request
        from ..problem import env_settings
        from ..runtime import NAMESPACE
        self.store = ray.get_actor(store_name, namespace=NAMESPACE)
        # RLlib would wait without end for actors an autoscaler never adds
        wait_for_request(actor_bundles(config), f"{config.algo}'s env runners and learners",
                         timeout_s=config.autoscale_timeout)
        runner_settings = env_settings(config, store=store_name, device=config.device)
        runner_settings["budgeted"] = True
        _register_env()
        # the env runners share what the starting candidates (scored on the driver) leave
        searched = config.replace(evaluations_per_step=self.search_budget(config))
        self.plan = batch_plan(searched)
        # (batch asked, env steps RLlib sampled) per training iteration, for the record and tests
        self.batches: list[tuple[int, int]] = []
        # RLlib's own log folder goes under the run's folder, not ~/ray_results
        logdir = Path(config.out_dir).resolve() / "rllib"
        algo_config = build_algorithm_config(searched, runner_settings)
        self.algo = _in_folder(algo_config.algo_class, logdir)(config=algo_config)
        import envs
        # the policy's own actions are scored on the driver, on the run's device
        self.local_env = envs.LayerPruningEnv(env_settings(config, store=store_name,
                                                          device=config.resolved_device()))
        self.iteration = 0

    # ------------------------------------------------------------------ search
    searches = True

    def search(self, ctx: StepContext, evaluate: Evaluator) -> Candidate:
        version = ctx.step
        start = self.starting_candidates(ctx, evaluate)      # scored on the driver (``score``)
        # around the incumbent: action 0 is the best starting candidate's distribution
        centre = self.proposal_centre(start)
        centre = None if centre is None else centre.tolist()
        tickets = min(self.plan.tickets, evaluate.remaining - 1)
        ray.get(self.store.begin_step.remote(version, tickets, TICKET_TIMEOUT_S,
                                             release_when_spent=self.config.algo.lower() not in ASYNCHRONOUS,
                                             centre=centre))
        received = 0
        while received < tickets:
            status = ray.get(self.store.status.remote())
            if status["available"] > 0:
                batch = self._next_batch(status["available"])
                result = self.algo.train()
                self.iteration += 1
                self.batches.append((batch, _sampled_steps(result)))
                stats = _learner_stats(result)
            else:
                time.sleep(0.05)          # stragglers: wait for results (or expired tickets)
                stats = None
            for row in ray.get(self.store.drain.remote()):
                self._record(evaluate, row, stats)
                received += 1
        self.local_env.sync()
        self.local_env.set_centre(centre)
        # the rest of the budget: the policy's deterministic action, then (when the
        # env-runner rounds did not divide the budget) more samples of the policy
        obs, _ = self.local_env.reset()
        for i in range(evaluate.remaining):
            distribution = self.local_env.action_to_distribution(self._policy_action(obs, explore=i > 0))
            result = self.local_env.evaluate_distribution(distribution)
            evaluate.record(candidate_from(distribution, result, self.iteration,
                                           "policy" if i == 0 else "policy-sample"))
        return max(evaluate.candidates, key=lambda c: c.reward)

    def score(self, items: list) -> list[dict]:
        """Starting candidates, scored by the driver's env on the step's base model."""
        self.local_env.sync()
        return self.local_env.evaluate_plans(plans_for(self.local_env, items))

    def _next_batch(self, available: int) -> int:
        """Set the coming iteration's train batch from the tickets not yet taken (a
        synchronous algorithm takes all of an iteration's tickets within train(), so
        this walks ``self.plan.batches``: full batches, then the shorter last one)."""
        if self.config.algo.lower() in ASYNCHRONOUS:
            return self.plan.batches[0]   # sampling runs between train() calls: keep one batch size
        batch = next_batch(self.plan, available)
        # RLlib reads these from the built algorithm's config at every training_step;
        # the last batch of a step is shorter than the one it was built with, so the
        # frozen config is opened (RLlib lets `_is_frozen` itself be set) and closed again
        algo_config = self.algo.config
        algo_config._is_frozen = False
        try:
            for key, value in _training_settings(self.config, batch).items():
                setattr(algo_config, key, value)
        finally:
            algo_config.freeze()
        return batch

    def _record(self, evaluate: Evaluator, row: dict, stats) -> None:
        evaluate.record(candidate_from(row["distribution"], row, self.iteration, "sample", stats),
                        row.get("seconds", 0.0))

    def _policy_action(self, obs, *, explore: bool) -> np.ndarray:
        import torch
        from ray.rllib.core.columns import Columns
        module = self.algo.get_module()
        # the module sits on the learner's device (a GPU when the driver learns on one)
        device = next(iter(module.parameters())).device
        batch = {Columns.OBS: torch.as_tensor(obs[None], dtype=torch.float32, device=device)}
        with torch.no_grad():
            out = module.forward_exploration(batch) if explore else module.forward_inference(batch)
        dist_cls = module.get_exploration_action_dist_cls() if explore else module.get_inference_action_dist_cls()
        dist = dist_cls.from_logits(out[Columns.ACTION_DIST_INPUTS])
        if not explore:
            dist = dist.to_deterministic()
        return np.clip(dist.sample().cpu().numpy()[0], -1.0, 1.0)

    # ------------------------------------------------------------------ state
    def save_extra(self, folder) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        self.algo.save_to_path(str(Path(folder).resolve()))

    def load_extra(self, folder) -> None:
        if Path(folder).exists():
            self.algo.restore_from_path(str(Path(folder).resolve()))

    def state_dict(self) -> dict:
        return {"iteration": self.iteration}

    def load_state_dict(self, state: dict) -> None:
        self.iteration = int(state.get("iteration", 0))

    def close(self) -> None:
        ray.get(self.store.close.remote())   # release env runners blocked on a ticket
        self.algo.stop()


def _in_folder(algo_cls, logdir: Path):
    """The algorithm class with its log folder at ``logdir`` (RLlib otherwise makes
    one under ~/ray_results, outside the run's folder)."""
    def _setup_logdir(self):
        logdir.mkdir(parents=True, exist_ok=True)
        self._logdir = str(logdir)
    return type(algo_cls.__name__, (algo_cls,), {"_setup_logdir": _setup_logdir})


def _sampled_steps(result: dict) -> int:
    """Env steps RLlib sampled in one training iteration."""
    runners = result.get("env_runners", {}) if isinstance(result, dict) else {}
    return int(runners.get("num_env_steps_sampled", 0) or 0)


def _learner_stats(result: dict) -> dict:
    """Flat numeric learner statistics of one training iteration."""
    learners = result.get("learners", {}) if isinstance(result, dict) else {}
    stats = {}
    for module_id, values in learners.items():
        if not isinstance(values, dict):
            continue
        for k, v in values.items():
            if isinstance(v, (int, float)) and math.isfinite(v):
                stats[k if module_id == "default_policy" else f"{module_id}/{k}"] = float(v)
    return stats
