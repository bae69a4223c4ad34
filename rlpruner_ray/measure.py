"""Size and speed of a model: MACs and parameters (torch-pruning's counter, the
paper's "FLOPs"), and latency as the median of repeated timed runs."""
from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn
import torch_pruning as tp


def macs_params(model: nn.Module, example_inputs: torch.Tensor) -> tuple[float, float]:
    """(MACs per sample, parameter count)."""
    was_training = model.training
    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_inputs[:1])
    model.train(was_training)
    return float(macs), float(params)


def latency_ms(model: nn.Module, input_shape, *, batch_size: int = 1, device: str = "cpu",
               repeats: int = 20, warmup: int = 3) -> float:
    """Median wall time of one forward pass in milliseconds."""
    device = torch.device(device)
    model = model.eval().to(device)
    x = torch.randn(batch_size, *input_shape, device=device)
    times = []
    with torch.inference_mode():
        for i in range(warmup + repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            model(x)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000.0)
    return statistics.median(times)
