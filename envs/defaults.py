"""A ready pruning problem for ``LayerPruningEnv`` made on its own.

``gymnasium.make("rlpruner/LayerPruning-v0")`` with no arguments gives
episodes of pruning 10% of the filters (in one go) of a small ResNet-8 trained
for a few seconds on scikit-learn's ``digits`` (offline). Keyword arguments change the
problem; they are :class:`~rlpruner_ray.CompressConfig` fields, validated the
same way as on the command line (see :data:`ENV_OPTIONS`). The trained model and
its payload are made once per process and set of options, so a second
environment (a vectorised env, a new seed) starts at once.
"""
from __future__ import annotations

import json

from rlpruner_ray.config import CompressConfig
from rlpruner_ray.errors import ConfigError

# what gym.make(ENV_ID, ...) accepts: the settings of the problem, not of a run
ENV_OPTIONS = ("model", "dataset", "data_dir", "download", "image_size", "val_fraction", "base_checkpoint",
               "train_epochs", "train_lr", "batch_size", "target", "sparsity", "min_channels",
               "max_group_sparsity", "round_to", "exclude", "criterion", "calibration_samples", "reward",
               "reward_coef", "reward_samples", "reward_batch_size", "bn_recalibration_batches", "horizon",
               "action_scale", "seed")
# a model trained in seconds on 2 CPU cores, scored on the whole val split (144 images)
ENV_DEFAULTS = {"train_epochs": 5, "batch_size": 64, "reward_samples": 144, "sparsity": 0.1}

_cache: dict[str, dict] = {}


def standalone_settings(**options) -> dict:
    """The environment config (settings and base-model payload) for ``options``."""
    unknown = sorted(set(options) - set(ENV_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown LayerPruningEnv argument(s) {', '.join(unknown)}; "
                          f"known: {', '.join(ENV_OPTIONS)}")
    if isinstance(options.get("exclude"), list):
        options["exclude"] = tuple(options["exclude"])
    values = {**ENV_DEFAULTS, **options}
    # one episode removes the whole sparsity: a single pruning step (the config's
    # meaning of an unset step fraction)
    values["step_fraction"] = None
    config = CompressConfig(**values).validate()
    key = json.dumps(config.to_dict(), sort_keys=True)
    if key not in _cache:
        import torch
        threads = torch.get_num_threads()
        torch.set_num_threads(1)     # a tiny model: more threads only wait on each other on a busy machine
        try:
            _cache[key] = _build(config)
        finally:
            torch.set_num_threads(threads)
    return dict(_cache[key])


def _build(config: CompressConfig) -> dict:
    import torch

    from rlpruner_ray import checkpoint as ckpt
    from rlpruner_ray.model_store import make_payload
    from rlpruner_ray.models import build_model, model_spec
    from rlpruner_ray.problem import StepTargets, build_graph, env_settings, load_data, train_settings
    from rlpruner_ray.train import train_base

    data = load_data(config)           # (refuses a bad model name before loading anything)
    if config.base_checkpoint:
        model = ckpt.load_pruned(config.base_checkpoint, allow_import=config.model)
    else:
        torch.manual_seed(config.seed)
        model = build_model(config.model, data.num_classes, data.in_channels)
        ckpt.tag_model(model, model_spec(config.model, data.num_classes, data.in_channels),
                       data.example_inputs(1).shape[1:])
        settings = train_settings(config, epochs=config.train_epochs, lr=config.train_lr, seed=config.seed,
                                  device="cpu")
        settings.augment = False       # digits' 16x16 images: a few epochs without augmentation fit better
        train_base(model, data, settings)
    model.eval()
    graph = build_graph(config, model, data, "cpu")
    original = graph.sizes()
    context = StepTargets.of(config, original["total_channels"]).context(0, original, graph)
    settings = env_settings(config)
    settings.update(payload=make_payload(model, graph, context, version=0),
                    threads=None)       # the caller's process: leave its torch threads alone
    return settings
