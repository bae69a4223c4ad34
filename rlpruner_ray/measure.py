"""Size and speed of a model: MACs and parameters (torch-pruning's counter, the
paper's "FLOPs"), and latency as the median of repeated timed runs (models compared
are timed in alternation)."""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn
import torch_pruning as tp

from .tracing import inspection_mode


def macs_params(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """(MACs per sample, parameter count), counted on one sample: whole numbers."""
    with torch.no_grad(), inspection_mode(model):
        macs, params = tp.utils.count_ops_and_params(model, example_inputs[:1])
    return int(round(macs)), int(params)


def latency_ms(model: nn.Module, input_shape, *, batch_size: int = 1, device: str = "cpu",
               repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass in milliseconds."""
    timed = compare_latency({"model": model}, input_shape, batch_size=batch_size, device=device,
                            rounds=repeats, warmup=warmup)
    return timed["model"]["median"]


def compare_latency(models: dict[str, nn.Module], input_shape, *, batch_size: int = 1, device: str = "cpu",
                    rounds: int = 20, warmup: int = 3) -> dict[str, dict]:
    """Time several models in alternation: each round runs every model once, in an
    order that reverses every round, so load from other processes falls on all of
    them alike. Per model: median, quartiles (q1, q3) and all times, in ms."""
    device = torch.device(device)
    x = torch.randn(batch_size, *input_shape, device=device)
    prepared = {name: m.eval().to(device) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in prepared}
    names = list(prepared)
    with torch.inference_mode():
        for r in range(warmup + rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                prepared[name](x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if r >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000.0)
    out = {}
    for name, t in times.items():
        q1, median, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (t[0], t[0], t[0])
        out[name] = {"median": statistics.median(t), "q1": q1, "q3": q3, "times": t}
    return out
