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
                    rounds: int = 20, warmup: int = 3, min_seconds: float = 0.0,
                    max_rounds: int = 2000) -> dict[str, dict]:
    """Time several models in alternation: each round runs every model once, in an
    order that reverses every round, so load from other processes falls on all of
    them alike. After ``warmup`` untimed rounds, at least ``rounds`` timed ones, and
    more (an even number, so each model leads as often) until ``min_seconds`` of
    timing or ``max_rounds``: a fast model's millisecond passes need hundreds of
    repeats before their median, and the ratio of two medians, stop moving.
    Per model: median, quartiles (q1, q3) and all times, in ms; per model after the
    first, ``ratio``: the median over rounds of its time over the first model's
    (paired within a round, so a slow spell of the machine cancels)."""
    device = torch.device(device)
    x = torch.randn(batch_size, *input_shape, device=device)
    prepared = {name: m.eval().to(device) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in prepared}
    names = list(prepared)
    began = time.perf_counter()
    with torch.inference_mode():
        r = 0
        while True:
            timed = r - warmup
            if timed >= rounds and (timed >= max_rounds or timed % 2 == 0
                                    and time.perf_counter() - began >= min_seconds):
                break
            if r == warmup:
                began = time.perf_counter()     # (the warm-up's time does not count)
            for name in (names if r % 2 == 0 else names[::-1]):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                start = time.perf_counter()
                prepared[name](x)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if r >= warmup:
                    times[name].append((time.perf_counter() - start) * 1000.0)
            r += 1
    out = {}
    first = times[names[0]]
    for name, t in times.items():
        q1, median, q3 = statistics.quantiles(t, n=4) if len(t) > 1 else (t[0], t[0], t[0])
        out[name] = {"median": statistics.median(t), "q1": q1, "q3": q3, "times": t}
        if name != names[0]:
            out[name]["ratio"] = statistics.median(a / b for a, b in zip(t, first) if b > 0)
    return out
