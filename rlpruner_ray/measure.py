"""Size and speed of a model: MACs and parameters (torch-pruning's counter, the
paper's "FLOPs"), and latency as the median of repeated timed runs (models compared
are timed in alternation)."""
from __future__ import annotations

import contextlib
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


# How a run times its base and pruned models: (label, device, batch, at least these
# rounds, and repeated for at least these seconds). Batch-1 passes take a millisecond
# or less, and their median, and the pruned/base ratio, settle only after hundreds of
# rounds on a busy machine; at batch 64, 7 rounds moved the ratio by 80% between two
# timings on 2 cores under load, 3 s of rounds by 16%.
LATENCY_SETTINGS = (("cpu_b1", "cpu", 1, 30, 3.0), ("cpu_b64", "cpu", 64, 7, 3.0))
GPU_LATENCY_SETTING = ("gpu_b64", "cuda", 64, 20, 1.0)


def latency_ms(model: nn.Module, input_shape, *, batch_size: int = 1, device: str = "cpu",
               repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass in milliseconds (one CPU thread)."""
    timed = compare_latency({"model": model}, input_shape, batch_size=batch_size, device=device,
                            rounds=repeats, warmup=warmup)
    return timed["model"]["median"]


def time_against_base(base: nn.Module, pruned: nn.Module, input_shape, setting) -> dict[str, dict]:
    """:func:`compare_latency` of ``base`` and ``pruned`` with one of
    :data:`LATENCY_SETTINGS` (a run's summary and the benchmark time alike)."""
    _, device, batch, rounds, seconds = setting
    return compare_latency({"base": base, "pruned": pruned}, input_shape, batch_size=batch, device=device,
                           rounds=rounds, warmup=10 if batch == 1 else 3, min_seconds=seconds)


@contextlib.contextmanager
def _torch_threads(n: int | None):
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def compare_latency(models: dict[str, nn.Module], input_shape, *, batch_size: int = 1, device: str = "cpu",
                    rounds: int = 20, warmup: int = 3, min_seconds: float = 0.0,
                    max_rounds: int = 2000, threads: int | None = 1) -> dict[str, dict]:
    """Time several models in alternation: each round runs every model once, in an
    order that reverses every round, so load from other processes falls on all of
    them alike. After ``warmup`` untimed rounds, at least ``rounds`` timed ones, and
    more (an even number, so each model leads as often) until ``min_seconds`` of
    timing or ``max_rounds``: a fast model's millisecond passes need hundreds of
    repeats before their median, and the ratio of two medians, stop moving.
    Per model: median, quartiles (q1, q3), minimum and all times, in ms; per model
    after the first, ``ratio``: its fastest pass over the first model's fastest (the
    passes no other process slowed: on 2 cores at load 17 the ratio of minima of two
    timings of the same pair agreed within 3.4%, the median of per-round ratios only
    within 22%, and it did not settle with 1,700 rounds either).
    On the CPU the timing runs on ``threads`` torch threads (None: as set), one by
    default: with two threads on a machine whose cores are busy, torch's threads wait
    on each other and batch-1 medians moved 20-fold between two timings of the same
    pair (2026-12-07, 2 busy cores), while one thread agreed within 1%."""
    device = torch.device(device)
    x = torch.randn(batch_size, *input_shape, device=device)
    prepared = {name: m.eval().to(device) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in prepared}
    names = list(prepared)
    began = time.perf_counter()
    with torch.inference_mode(), _torch_threads(threads if device.type == "cpu" else None):
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
        out[name] = {"median": statistics.median(t), "q1": q1, "q3": q3, "min": min(t), "times": t}
        if name != names[0]:
            out[name]["ratio"] = min(t) / min(first)
    return out
