"""Which algorithm a name means, and what it asks of Ray: the native algorithms
by name, the rest of the names are RLlib's. It stands above every algorithm (it
imports them), so no algorithm module needs it."""
from __future__ import annotations

from ..config import CompressConfig
from ..errors import ConfigError
from .base import SearchAlgorithm
from .baselines import GlobalSearch, RandomSearch, UniformSearch
from .cmaes import CMAESSearch
from .rlpruner import RLPrunerSearch
from .tp_baselines import TorchPruningGlobal, TorchPruningUniform

NATIVE: dict[str, type[SearchAlgorithm]] = {
    cls.name: cls for cls in (RLPrunerSearch, UniformSearch, GlobalSearch, RandomSearch, CMAESSearch,
                              TorchPruningUniform, TorchPruningGlobal)}


def search_budget(config: CompressConfig) -> int:
    """Evaluations per step left to the search of ``config`` after its starting
    candidates (see :meth:`SearchAlgorithm.search_budget`)."""
    cls = NATIVE.get(config.algo.lower())
    if cls is None:       # an RLlib algorithm: it searches
        from .rllib import RLlibSearch as cls
    return cls.search_budget(config)


def native_names() -> list[str]:
    return sorted(NATIVE)


def make_algorithm(config: CompressConfig, **kwargs) -> SearchAlgorithm:
    name = config.algo.lower()
    if name in NATIVE:
        return NATIVE[name](config, **kwargs)
    try:
        from .rllib import RLlibSearch, check_rllib_algorithm
    except ImportError:   # same answer as check_algorithm_name when RLlib support is unavailable
        raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(native_names())}") from None
    check_rllib_algorithm(name)
    return RLlibSearch(config, **kwargs)


def planned_bundles(config: CompressConfig) -> list[dict[str, float]]:
    """What the search of ``config`` asks Ray for, one resource dict per actor
    (evaluation actors, or RLlib env runners and learners); a Tune trial
    reserves exactly these."""
    if config.algo.lower() in NATIVE:
        return [{"CPU": config.cpus_per_worker, "GPU": config.gpus_per_worker}] * config.num_workers
    from .rllib import actor_bundles
    return actor_bundles(config)


def planned_resources(config: CompressConfig) -> dict[str, float]:
    """The total of :func:`planned_bundles`."""
    from ..cluster_offer import total
    return {"CPU": 0.0, "GPU": 0.0, **total(planned_bundles(config))}


def check_algorithm(config: CompressConfig) -> None:
    """Refuse an unknown algorithm, or settings it cannot run with, before any work."""
    name = config.algo.lower()
    if name in NATIVE:
        return
    try:
        from .rllib import batch_plan, check_rllib_algorithm
    except ImportError:
        raise ConfigError(f"unknown algorithm {name!r}; choose one of {', '.join(native_names())}") from None
    check_rllib_algorithm(name)
    budget = search_budget(config)
    start = config.evaluations_per_step - budget
    if start:       # the env runners get what the starting candidates leave: say so in the refusal
        from .rllib import env_runner_layout
        runners, envs = env_runner_layout(config)
        n_envs = max(1, runners) * envs
        if budget < n_envs + 1:
            raise ConfigError(f"evaluations_per_step must be at least {n_envs + 1 + start} for {name} with {n_envs} "
                              f"environments: one round of samples, the policy's own action and {start} baseline "
                              f"candidates (--no-include-baselines: {n_envs + 1})")
    batch_plan(config.replace(evaluations_per_step=budget))


def check_algorithm_name(name: str) -> None:
    """Refuse an unknown algorithm name (settings are checked by check_algorithm)."""
    if name.lower() not in NATIVE:
        from .rllib import check_rllib_algorithm
        check_rllib_algorithm(name.lower())
