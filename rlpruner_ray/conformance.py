"""Conformance of one model with the pruning contract, as one table row.

For a model name (zoo, ``tv:<name>`` or ``pkg.module:factory``): build it untrained
at the smallest input it accepts, trace it, plan at a random distribution and
check that the scored model (masked, or physical where masking is not exact)
equals the physically pruned one, the output shape is unchanged, MACs and params
fall, every group keeps the planned width, and the model file round-trips
through ``torch.load(weights_only=True)``. A model the project refuses gets its
one-line reason instead. ``scripts/conformance.py`` runs it over every
torchvision classifier; the tests run it over a fast subset and, marked slow,
over the whole list.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp

from .checkpoint import load_pruned, model_to_bytes
from .errors import RLPrunerError
from .graph import PruningGraph, group_widths
from .models import build_model

NUM_CLASSES = 10
SIZES = (32, 64, 96, 128, 224, 299)   # tried in order; the first the model accepts is used
SHARE = 0.3                           # of the channels removed by the test plan
TOLERANCE = 1e-4


def smallest_input(model: nn.Module, in_channels: int = 3) -> torch.Tensor:
    """One random sample at the smallest of SIZES the model's forward accepts."""
    gen = torch.Generator().manual_seed(0)
    for size in SIZES:
        x = torch.randn(1, in_channels, size, size, generator=gen)
        try:
            with torch.no_grad():
                model(x)
            return x
        except (RuntimeError, AssertionError, ValueError):   # (ViT asserts its image size)
            continue
    raise RLPrunerError(f"the model accepts none of the input sizes {SIZES}")


def randomise_normalisation(model: nn.Module, seed: int = 0) -> None:
    """Random normalisation parameters, BN running statistics and constant scales
    (an untrained model's are 1, 0, 0, 1 or 1e-6, under which a zeroed channel and
    a missing one can look the same)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                n = m.num_features
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    m.bias.copy_(torch.randn(n, generator=gen) * 0.2)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                    m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            elif isinstance(m, (nn.LayerNorm, nn.GroupNorm)) and getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.2)
            for name, p in m.named_parameters(recurse=False):
                # constant-initialised scales (ConvNeXt's layer scale is 1e-6: its blocks
                # would hardly change the output, and no mismatch would show)
                if name not in ("weight", "bias") and p.numel() > 1 and bool((p == p.flatten()[0]).all()):
                    p.copy_(torch.rand(p.shape, generator=gen) + 0.5)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return float("inf")
    return float((a - b).abs().max()) / max(float(b.abs().max()), 1.0)


def check_model(name: str, *, seed: int = 0) -> dict:
    """The conformance row of ``name`` (``status`` "ok", "refused" or "FAILED")."""
    start = time.perf_counter()
    row = {"model": name, "status": "ok", "input": None, "groups": 0, "prunable_channels": 0,
           "masked_vs_physical": None, "exact_path": "", "macs_reduction": None,
           "params_reduction": None, "seconds": None, "reason": ""}
    try:
        torch.manual_seed(seed)
        model = build_model(name, NUM_CLASSES).eval()
        randomise_normalisation(model, seed)
        x = smallest_input(model)
        row["input"] = f"{x.shape[-2]}x{x.shape[-1]}"
        # (no build-time self-check: the checks below compare the same two models and more)
        graph = PruningGraph(model, x, self_check=False)
        row.update(groups=graph.num_groups, prunable_channels=graph.max_removable)
        _check_plan(graph, x, row, seed)
    except RLPrunerError as exc:
        row.update(status="refused", reason=str(exc).splitlines()[0])
    except AssertionError as exc:
        row.update(status="FAILED", reason=str(exc).splitlines()[0] if str(exc) else "assertion")
    row["seconds"] = round(time.perf_counter() - start, 1)
    return row


def _check_plan(graph: PruningGraph, x: torch.Tensor, row: dict, seed: int) -> None:
    rng = np.random.default_rng(seed)
    graph.compute_scores("random", seed=seed)
    n = min(int(SHARE * graph.total_channels), graph.max_removable)
    plan = graph.plan(rng.dirichlet(np.ones(graph.num_groups)), n)
    with torch.no_grad():
        reference = graph.model(x)
        pruned = graph.prune(plan).eval()
        physical = pruned(x)
        with graph.scored(plan) as model:
            scored = model(x)
    diff = _relative(scored, physical)
    assert diff <= TOLERANCE, f"scored model differs from the pruned one by {diff:.1e}"
    physical_groups = [g.key for g, k in zip(graph.groups, plan) if k and g.inexact]
    if physical_groups:   # masking still serves the other groups: compare it there
        exact_plan = plan * np.array([not g.inexact for g in graph.groups])
        with torch.no_grad(), graph.masked(exact_plan) as model:
            diff = _relative(model(x), graph.prune(exact_plan).eval()(x))
        assert diff <= TOLERANCE, f"masking differs from pruning by {diff:.1e} on its exact groups"
    row["masked_vs_physical"] = float(f"{diff:.1e}")
    row["exact_path"] = f"physical ({len(physical_groups)} groups)" if physical_groups else "masked"
    assert physical.shape == reference.shape, f"output shape {tuple(physical.shape)} != {tuple(reference.shape)}"
    widths = group_widths(pruned, graph.keys)
    wrong = [k for k, c, p in zip(graph.keys, graph.channels, plan) if widths[k] != c - p]
    assert not wrong, f"groups not at their planned width: {', '.join(wrong[:3])}"
    macs, params = tp.utils.count_ops_and_params(pruned, x)
    row["macs_reduction"] = round(1 - float(macs) / graph.base_macs, 3)
    row["params_reduction"] = round(1 - float(params) / graph.base_params, 3)
    if plan.sum():
        assert macs < graph.base_macs and params < graph.base_params, "MACs or params did not fall"
    loaded = load_pruned(model_to_bytes(pruned), allow_import=row["model"])
    with torch.no_grad():
        again = loaded(x)
    assert _relative(again, physical) <= TOLERANCE, "the saved model does not reproduce the pruned one"


# The default `rlpruner compress` (rlpruner, one step to 50% of the filters, L1, BN-recalibrated
# reward, the uniform / global / Torch-Pruning starting candidates, KD fine-tuning, the final
# report) with budgets small enough to run a model through it in seconds, on the embedded digits
END_TO_END = {"train_epochs": 1, "max_batches_per_epoch": 2, "evaluations_per_step": 4,
              "samples_per_iteration": 2, "finetune_epochs": 1, "num_workers": 1, "reward_samples": 64,
              "bn_recalibration_batches": 1, "image_size": 12}


def end_to_end_flags() -> list[str]:
    """:data:`END_TO_END` as ``rlpruner compress`` flags."""
    return [a for k, v in END_TO_END.items() for a in ("--" + k.replace("_", "-"), str(v))]


def end_to_end(name: str, out_dir) -> dict:
    """Run the default compress (small budgets, :data:`END_TO_END`) on ``name`` into
    ``out_dir``: ``{"end_to_end": "ok"}`` when it finishes with a smaller model whose
    file loads, else ``"refused"`` or ``"FAILED"`` with the one-line reason."""
    from .config import CompressConfig
    from .errors import StepFailed, one_line
    from .pipeline import compress
    try:
        summary = compress(CompressConfig(model=name, out_dir=str(out_dir), **END_TO_END).validate())
    except RLPrunerError as exc:
        return {"end_to_end": "refused", "end_to_end_reason": one_line(exc)[:200]}
    except StepFailed as exc:
        return {"end_to_end": "FAILED", "end_to_end_reason": str(exc)[:200]}
    small = load_pruned(f"{out_dir}/pruned_model.pt", allow_import=name)
    params = sum(p.numel() for p in small.parameters())
    if not summary["pruned"]["macs"] < summary["base"]["macs"] or params != summary["pruned"]["params"]:
        return {"end_to_end": "FAILED", "end_to_end_reason": "the pruned model is not the smaller one reported"}
    skipped = "; ".join(f"{s['candidate']} skipped" for s in summary.get("skipped", []))
    return {"end_to_end": "ok", "end_to_end_reason": skipped}


def torchvision_names() -> list[str]:
    """Every torchvision classification model, as ``tv:<name>``."""
    import torchvision
    return [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]
