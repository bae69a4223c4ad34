"""A pruning problem, set up from a :class:`CompressConfig`: its data, its base
model's :class:`PruningGraph` with importance scores, its per-step targets, the
refusals that need the model, and the settings of an environment that scores it.

It stands below both the orchestrator (:mod:`rlpruner_ray.pipeline`) and the
environments (:mod:`envs`), which set up the same problem: ``envs`` builds one on
its own (``envs/defaults.py``), the pipeline one per run.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import checkpoint as ckpt
from . import compute
from .config import CompressConfig
from .cost import cost_axis
from .data import Dataset, load_dataset
from .errors import ConfigError, ModelError
from .graph import PruningGraph
from .models import build_model, check_model_name
from .runtime import NAMESPACE
from .train import TrainSettings


def load_data(config: CompressConfig) -> Dataset:
    """The dataset, after the model name is known to be good (a refusal comes
    before any line about loading data)."""
    check_model_name(config.model)
    data = load_dataset(config.dataset, config.data_dir, val_fraction=config.val_fraction, seed=config.data_seed,
                        download=config.download, image_size=config.image_size)
    return data.with_selection(config.selection_fraction)


@dataclass(frozen=True)
class StepTargets:
    """What each step of a run removes: the cumulative filters removed after each
    step (filters target), or a share of the base model's MACs or params."""

    config: CompressConfig
    filters: tuple[int, ...]

    @classmethod
    def of(cls, config: CompressConfig, original_total: int) -> StepTargets:
        """The targets of a run whose base model has ``original_total`` filters."""
        final = int(round(config.sparsity * original_total))
        per = config.step_share * original_total
        return cls(config, tuple(min(final, int(round(per * (k + 1)))) if k + 1 < config.num_steps else final
                                 for k in range(config.num_steps)))

    def context(self, step: int, original: dict, graph: PruningGraph) -> dict:
        """The step's context for planning (``scoring.plan_for_step``): the filters
        still to remove from ``graph`` (the step's base model), or the cost target.
        A plain dict: it travels to the environments in the base model's payload."""
        config = self.config
        ctx = {"step": step, "num_steps": config.num_steps, "original": original}
        if config.target == "filters":
            removed = original["total_channels"] - graph.total_channels
            ctx["num_filters"] = max(0, self.filters[step] - removed)
        else:
            frac = config.sparsity * (step + 1) / config.num_steps
            ctx["cost_target"] = {"kind": config.target, "value": original[config.target] * (1 - frac)}
            ctx["num_filters"] = None
        return ctx


def train_settings(config: CompressConfig, *, epochs: int, lr: float, seed: int, device: str,
                   finetune: bool = False, label: str = "") -> TrainSettings:
    batch = (config.finetune_batch_size or config.batch_size) if finetune else config.batch_size
    return TrainSettings(epochs=epochs, batch_size=batch, lr=lr, seed=seed, device=device,
                         max_batches_per_epoch=config.max_batches_per_epoch, precision=config.precision,
                         channels_last=config.channels_last, label=label,
                         max_batches=config.finetune_batches if finetune else None)


def calibration_batch(config: CompressConfig, data: Dataset, device: str):
    """A fixed batch of training images for the taylor criterion."""
    x, y = next(data.batches("train", config.calibration_samples, device=device))
    return x, y


def new_graph(config: CompressConfig, model, example_inputs) -> PruningGraph:
    """``model``'s PruningGraph under the run's floors and exclusions (traced, with
    its masking check), importance not yet scored."""
    return PruningGraph(model, example_inputs, exclude=config.exclude, min_channels=config.min_channels,
                        max_group_sparsity=config.max_group_sparsity)


def score_graph(config: CompressConfig, graph: PruningGraph, data: Dataset, device: str,
                ledger: compute.Ledger | None = None) -> PruningGraph:
    """Score ``graph``'s filters by the run's criterion (its compute charged to ``ledger``)."""
    x, y = calibration_batch(config, data, device)
    with (ledger or compute.Ledger()).timed("importance"), \
            compute.counting_forwards(graph.model, int(round(graph.base_macs))) as forward:
        graph.compute_scores(config.criterion, x, y, seed=config.seed)
    if ledger is not None:      # a criterion that runs the model (taylor) takes gradients of that pass
        ledger.add("importance", forward[0] * (1 + compute.BACKWARD_FACTOR))
    return graph


def build_graph(config: CompressConfig, model, data: Dataset, device: str,
                ledger: compute.Ledger | None = None) -> PruningGraph:
    """``model``'s PruningGraph, scored: what one step searches over."""
    return score_graph(config, new_graph(config, model, data.example_inputs(1).to(device)), data, device, ledger)


def check_fits(model, data: Dataset, source) -> None:
    """Refuse a model file made for other classes or input channels than ``data``'s."""
    spec = getattr(model, ckpt.SPEC_ATTR)
    if spec["num_classes"] != data.num_classes or spec["in_channels"] != data.in_channels:
        raise ModelError(f"{source} is for {spec['num_classes']} classes / {spec['in_channels']} channels, "
                         f"the dataset has {data.num_classes} / {data.in_channels}")


def check_reachable(config: CompressConfig, graph: PruningGraph, original: dict) -> None:
    """Refuse a target the floors (min_channels, max_group_sparsity) cannot reach."""
    if config.target == "filters":
        need = int(round(config.sparsity * graph.total_channels))
        if need > graph.max_removable:
            raise ConfigError(f"sparsity {config.sparsity:g} needs {need} filters removed but the floors "
                              f"(min_channels, max_group_sparsity) allow {graph.max_removable}")
        if need < 1:
            raise ConfigError(f"sparsity {config.sparsity:g} removes no filter of {graph.total_channels}")
    else:
        floor = graph.cost(graph.channels - graph.floors)[cost_axis(config.target)]
        goal = original[config.target] * (1 - config.sparsity)
        if floor > goal:
            raise ConfigError(f"{config.target} sparsity {config.sparsity:g} is unreachable: the floors keep "
                              f"{1 - floor / original[config.target]:.1%} reduction at most")


def check_model(config: CompressConfig, data: Dataset, probe=None, source=None) -> PruningGraph:
    """Refusals that need the model, before any work: it fits the data, the graph
    can be built, the target is reachable within the floors, and Torch-Pruning's
    pruner handles it when ``--algo`` is one of its baselines. ``probe``: the base
    model (loaded from the file ``source``, or about to be trained), else an
    untrained model of the same structure is built. Returns the probe's graph,
    unscored (a run builds its base model's graph once, here)."""
    if probe is not None:
        check_fits(probe, data, source)
    else:
        probe = build_model(config.model, data.num_classes, data.in_channels)
    graph = new_graph(config, probe, data.example_inputs(1))
    check_reachable(config, graph, {"macs": graph.base_macs, "params": graph.base_params})
    if config.algo in ("tp-uniform", "tp-global"):
        from .plans import check_tp_supported      # (Torch-Pruning is imported only for its baselines)
        check_tp_supported(graph, global_pruning=config.algo == "tp-global")
    return graph


def env_settings(config: CompressConfig, *, store: str | None = None, device: str = "cpu") -> dict:
    """The plain-dict environment config derived from the run's config. An actor
    resolves ``device`` where it runs (``runtime.actor_device``)."""
    return {
        "dataset": {"name": config.dataset, "data_dir": config.data_dir, "val_fraction": config.val_fraction,
                    "seed": config.data_seed, "image_size": config.image_size},
        "reward": config.reward, "reward_coef": config.reward_coef, "reward_metric": config.reward_metric,
        "reward_samples": config.reward_samples, "reward_batch_size": config.reward_batch_size,
        "bn_recalibration_batches": config.bn_recalibration_batches, "horizon": config.horizon,
        "action_scale": config.action_scale, "min_channels": config.min_channels,
        "max_group_sparsity": config.max_group_sparsity, "exclude": list(config.exclude),
        "round_to": config.round_to, "device": device, "store": store, "namespace": NAMESPACE,
        "scoring": config.scoring, "candidates_per_pass": config.candidates_per_pass,
        "precision": config.precision, "channels_last": config.channels_last,
        "threads": max(1, int(config.cpus_per_worker)),
    }
