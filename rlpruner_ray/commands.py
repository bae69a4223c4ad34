"""The one-shot commands: ``rlpruner train``, ``rlpruner evaluate`` and
``rlpruner prune`` (a non-learned strategy in one step). They share the base
model's handling and the measurements with :func:`rlpruner_ray.pipeline.compress`.
"""
from __future__ import annotations

import time

import numpy as np

from . import checkpoint as ckpt
from . import compute
from .config import CompressConfig
from .errors import ConfigError
from .measure import latency_ms, macs_params
from .pipeline import (RunFolder, base_source, finetune_epochs, measure_model, measure_pair, open_base,
                       original_macs, prepare_base)
from .plans import apply_plan, global_plan, plan_for_step, tp_plan
from .problem import check_fits, check_model, load_data, score_graph, train_settings
from .train import evaluate, finetune_kd


def train_command(config: CompressConfig) -> dict:
    """``rlpruner train``: train a base model, save ``base_model.pt`` in out_dir."""
    run = RunFolder(config.out_dir)
    if run.base.exists() and not config.overwrite:
        raise ConfigError(f"{run.base} exists; pass --overwrite to replace it")
    data = load_data(config)
    device = config.resolved_device()
    run.base.unlink(missing_ok=True)
    model = prepare_base(config, data, run, device, open_base(config, data, None), None)
    m = measure_model(model, data, device, test=False)
    return {"model_file": str(run.base), **m}


def evaluate_command(path, config: CompressConfig, *, split: str) -> dict:
    """``rlpruner evaluate``: accuracy, MACs, params and CPU latency of a model file."""
    model = ckpt.load_pruned(path, allow_import=config.model)
    data = load_data(config)
    check_fits(model, data, path)
    device = config.resolved_device()
    r = evaluate(model, data, split, device=device)
    macs, params = macs_params(model.cpu(), data.example_inputs(1))
    shape = tuple(data.example_inputs(1).shape[1:])
    return {"split": split, "top1": r["top1"], "top5": r["top5"], "macs": macs, "params": params,
            "latency_ms_cpu_b1": latency_ms(model, shape, batch_size=1)}


def prune_command(config: CompressConfig, *, export: str | None = None) -> dict:
    """``rlpruner prune``: one-shot pruning with a non-learned strategy, then
    optional KD fine-tuning; writes ``pruned_model.pt`` and ``summary.json``."""
    run = RunFolder(config.out_dir)
    if (run.model.exists() or run.summary.exists()) and not config.overwrite:
        raise ConfigError(f"{run.root} already holds results; pass --overwrite to replace them")
    # the file's and Torch-Pruning's refusals come before the data's lines and before training
    source = base_source(config, run)
    given = ckpt.load_pruned(source, allow_import=config.model) if source is not None else None
    started = time.perf_counter()
    ledger = compute.Ledger()
    device = config.resolved_device()
    data = load_data(config)
    model = given if given is not None else open_base(config, data, None)
    graph = check_model(config, data, model, source)      # the base model's graph, built once
    # (a file's model is used as it is: prune copies no base model into its folder)
    base = (model if source is not None else prepare_base(config, data, run, device, model, None, ledger))
    base = base.to(device).eval()
    graph = score_graph(config, graph.to(device), data, device, ledger)
    original = {"macs": graph.base_macs, "params": graph.base_params}
    rng = np.random.default_rng(config.seed)
    if config.target == "filters":
        context = {"num_filters": int(round(config.sparsity * graph.total_channels))}
    else:
        context = {"cost_target": {"kind": config.target, "value": original[config.target] * (1 - config.sparsity)}}
    indices = None
    if config.algo == "global":          # the global threshold itself, not rescaled by a plan
        counts = global_plan(graph, context)
    elif config.algo in ("tp-uniform", "tp-global"):
        counts, indices = tp_plan(graph, context, global_pruning=config.algo == "tp-global")
    else:
        distribution = (rng.dirichlet(graph.initial_distribution() * graph.num_groups + 1e-3)
                        if config.algo == "random" else graph.initial_distribution())
        counts = plan_for_step(graph, distribution, context, round_to=config.round_to)
    small = apply_plan(graph, counts, indices)
    before = evaluate(small, data, "val", device=device, ledger=ledger)["top1"]
    ft = finetune_kd(small, base, data, train_settings(config, epochs=finetune_epochs(config, data),
                                                       lr=config.finetune_lr, seed=config.seed, device=device,
                                                       finetune=True, label="fine-tuning"),
                     temperature=config.kd_temperature, alpha=config.kd_alpha, ledger=ledger)
    base_m, pruned_m = measure_pair(base, small, data, device, ledger)
    run.root.mkdir(parents=True, exist_ok=True)
    ckpt.save_pruned(small.cpu(), run.model, meta={"config": config.to_dict()})
    if export:
        ckpt.export_model(small, run.root / f"pruned_model.{'onnx' if export == 'onnx' else 'ts'}", export)
    summary = {"config": config.to_dict(), "strategy": config.algo, "counts": counts.tolist(),
               "base": base_m, "pruned": {**pruned_m, "val_top1_before_finetune": before},
               "reductions": {"filters": float(counts.sum() / graph.total_channels),
                              "macs": 1 - pruned_m["macs"] / base_m["macs"],
                              "params": 1 - pruned_m["params"] / base_m["params"]},
               "finetune_batches": ft.batches, "model_file": str(run.model)}
    summary["wall_seconds"] = time.perf_counter() - started
    summary["compute"] = ledger.summary(original_macs(graph.sizes()), summary["wall_seconds"])
    ckpt.atomic_write_json(run.summary, summary)
    return summary
