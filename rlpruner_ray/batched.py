"""Scoring K candidate plans in one forward pass (the GPU path).

One candidate is a small forward pass plus many tiny indexing kernels; on a GPU
the kernels dominate and processes sharing the GPU only time-slice it. Here the
reward images are repeated K times and each copy carries its own candidate's
channel masks, applied to *activations* where :meth:`PruningGraph.masked`
zeroes *weights*:

* an output-side member (a conv's or linear's output channels, and any
  one-axis layer: BN, depthwise conv) has its weight and bias slices zeroed
  there, so its output channel is exactly 0: multiply that output by the mask;
* an input-side member (a conv's or linear's input channels) has its weight
  columns zeroed, so the channel contributes nothing: multiply its input.

Each is the same arithmetic, so K candidates scored here equal K weight-masked
passes (and so K physically pruned models), checked for every zoo model.

Masks whose channels are already zero are skipped (each is a full read and write
of an activation): a conv's output mask when its only consumer is a BN masked on
the same channels, and a layer's input mask when its input comes from a layer
masked on the same channels through zero-preserving activations (ReLU,
hardswish, ...) and residual adds only. About two thirds of the multiplies go
on a ResNet.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn as nn

from .graph import PruningGraph


def _two_sided(module: nn.Module) -> bool:
    """Layers whose input and output channels are different axes of the weight."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.groups == 1 or not (module.groups == module.in_channels == module.out_channels)
    return isinstance(module, nn.Linear)


class CandidateMasks:
    """Activation masks for a batch of plans of one :class:`PruningGraph`.

    ``with masks.applied(plans) as model:`` runs ``model`` on an input of
    ``K * N`` rows (candidate-major: rows ``[k*N, (k+1)*N)`` belong to plan k).
    """

    def __init__(self, graph: PruningGraph):
        self.graph = graph
        # module -> [(group index, slice)] per side; built once per graph
        self._inputs: dict[nn.Module, list] = {}
        self._outputs: dict[nn.Module, list] = {}
        for g, group in enumerate(graph.groups):
            for s in group.slices:
                table = self._inputs if (s.side == "in" and _two_sided(s.module)) else self._outputs
                table.setdefault(s.module, []).append((g, s))
        self._drop_redundant()

    # ------------------------------------------------------------------ redundancy
    def _drop_redundant(self) -> None:
        nodes = self.graph.dg.module2node
        sig_out = {m: _signature(members) for m, members in self._outputs.items()}
        # input masks first: they rely on the producers' output masks, some of which go next
        for module in list(self._inputs):
            sources = _zero_sources(nodes.get(module))
            wanted = _signature(self._inputs[module])
            if sources and all(sig_out.get(m) == wanted for m in sources):
                del self._inputs[module]
        for module in list(self._outputs):
            node = nodes.get(module)
            if node is None or len(node.outputs) != 1:
                continue
            consumer = node.outputs[0].module
            if (isinstance(consumer, nn.modules.batchnorm._BatchNorm) and consumer in self._outputs
                    and sig_out[consumer] == sig_out[module] and _two_sided(module)):
                del self._outputs[module]
                # (a BN's output mask zeroes those channels whatever its input held)

    def _module_masks(self, table: dict, counts: torch.Tensor, axis: str) -> dict[nn.Module, torch.Tensor]:
        masks = {}
        for module, members in table.items():
            width = _width(module, axis)
            mask = torch.ones(counts.shape[0], width, device=counts.device)
            for g, s in members:
                # a channel goes when its root's importance rank is below the plan's count
                keep = (s.rank[None, :] >= counts[:, g:g + 1]).to(mask.dtype)
                mask[:, s.idx] = mask[:, s.idx] * keep
            masks[module] = mask
        return masks

    def check_exact(self, inputs: torch.Tensor, plans, tolerance: float = 1e-4) -> float:
        """Largest difference between batched and weight-masked outputs for ``plans``
        on ``inputs``; raises AssertionError above ``tolerance`` (relative to the
        output's scale). The scorer runs it once before trusting the batched path."""
        k, n = len(plans), inputs.shape[0]
        with torch.no_grad():
            with self.applied(plans) as model:
                batched = model(inputs.repeat(k, *([1] * (inputs.dim() - 1)))).float()
            worst = 0.0
            for i, plan in enumerate(plans):
                with self.graph.masked(plan) as model:
                    reference = model(inputs).float()
                scale = max(float(reference.abs().max()), 1.0)
                worst = max(worst, float((batched[i * n:(i + 1) * n] - reference).abs().max()) / scale)
        if worst > tolerance:
            raise AssertionError(f"batched scoring differs from weight masking by {worst:.2e}")
        return worst

    @contextlib.contextmanager
    def applied(self, plans):
        plans = np.atleast_2d(np.asarray([self.graph._check_plan(p) for p in np.atleast_2d(plans)]))
        self.graph._follow_model()
        counts = torch.as_tensor(plans, dtype=torch.long, device=self.graph.device)
        in_masks = self._module_masks(self._inputs, counts, "in")
        out_masks = self._module_masks(self._outputs, counts, "out")
        handles = []
        try:
            for module, mask in in_masks.items():
                handles.append(module.register_forward_pre_hook(_pre_hook(mask, isinstance(module, nn.Linear))))
            for module, mask in out_masks.items():
                handles.append(module.register_forward_hook(_post_hook(mask, isinstance(module, nn.Linear))))
            yield self.graph.model
        finally:
            for h in handles:
                h.remove()


# autograd functions (and modules) that map a zero channel to a zero channel, one input
# (pooling keeps a channel's position, and a channel of zeros pools to zeros)
_ZERO_PRESERVING_FNS = ("ReluBackward", "HardswishBackward", "HardtanhBackward", "SiluBackward",
                        "GeluBackward", "LeakyReluBackward", "EluBackward", "MaxPool2DWithIndicesBackward",
                        "AvgPool2DBackward", "AdaptiveAvgPool2DBackward")
_ZERO_PRESERVING_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.GELU, nn.LeakyReLU, nn.ELU,
                            nn.Identity, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d,
                            nn.AdaptiveMaxPool2d, nn.Dropout)


def _signature(members) -> tuple:
    """What a module's mask zeroes: per group, the channel positions and their roots."""
    return tuple(sorted((g, tuple(s.idx.tolist()), tuple(s.root.tolist())) for g, s in members))


def _zero_sources(node, depth: int = 0):
    """The weighted layers whose output channels reach ``node``'s input unchanged in
    position, through zero-preserving activations and residual adds only; None
    when anything else is on the way (a concat, a reshape, a sigmoid gate ...).
    If every source zeroes a channel, the input's channel is zero."""
    if node is None or not node.inputs or depth > 64:
        return None
    sources = []
    for current in node.inputs:
        module = current.module
        fn = getattr(module, "_grad_fn", None)      # torch-pruning keeps the autograd function's name
        fn_name = fn if isinstance(fn, str) else type(fn).__name__
        if isinstance(module, nn.Module) and _has_weight(module):
            sources.append(module)
        elif (isinstance(module, _ZERO_PRESERVING_MODULES) or fn_name.startswith(_ZERO_PRESERVING_FNS)
              or fn_name.startswith("AddBackward")):
            found = _zero_sources(current, depth + 1)
            if found is None:
                return None
            sources += found
        else:
            return None
    return sources


def _has_weight(module: nn.Module) -> bool:
    return isinstance(getattr(module, "weight", None), torch.Tensor)


def _width(module: nn.Module, axis: str) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels if axis == "out" else module.in_channels
    if isinstance(module, nn.Linear):
        return module.out_features if axis == "out" else module.in_features
    return module.weight.numel()      # one-axis layers: BN, PReLU


def _apply(x: torch.Tensor, mask: torch.Tensor, last: bool) -> torch.Tensor:
    """``x`` (K*N, C, ...) times the per-candidate channel mask (K, C); channels on
    the last axis instead for ``last`` (a linear layer's features)."""
    k, c = mask.shape
    shaped = x.reshape(k, x.shape[0] // k, *x.shape[1:])
    if last or x.dim() == 2:
        m = mask.view(k, *([1] * (x.dim() - 1)), c)
    else:
        m = mask.view(k, 1, c, *([1] * (x.dim() - 2)))
    return (shaped * m.to(x.dtype)).reshape(x.shape)


def _pre_hook(mask, last):
    def hook(module, args):
        return (_apply(args[0], mask, last), *args[1:])
    return hook


def _post_hook(mask, last):
    def hook(module, args, output):
        return _apply(output, mask, last)
    return hook
