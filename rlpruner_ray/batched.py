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

BatchNorm over K candidates (ghost batch norm with K groups): where a BN uses
batch statistics (while recalibrating, or a BN without running statistics) it
computes them per candidate slice of the batch, as the candidate's own pass
would; a recalibration pass over the K-times-repeated calibration images
leaves each candidate the running statistics that recalibrating it alone gives
(:func:`recalibrated`, the single path's), and the scoring pass then normalises
each slice with its own. Still one forward call per batch of K candidates.

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

    def check_exact(self, inputs: torch.Tensor, plans, tolerance: float = 1e-4, calibration=()) -> float:
        """Largest difference between batched and weight-masked outputs for ``plans``
        on ``inputs`` (both BN-recalibrated on ``calibration`` when given); raises
        AssertionError above ``tolerance`` (relative to the output's scale). The
        scorer runs it once before trusting the batched path."""
        k, n = len(plans), inputs.shape[0]
        with torch.no_grad():
            with self.applied(plans, calibration) as model:
                batched = model(repeat_rows(inputs, k)).float()
            worst = 0.0
            for i, plan in enumerate(plans):
                with self.graph.masked(plan) as model, recalibrated(model, calibration) as model:
                    reference = model(inputs).float()
                scale = max(float(reference.abs().max()), 1.0)
                worst = max(worst, float((batched[i * n:(i + 1) * n] - reference).abs().max()) / scale)
        if worst > tolerance:
            raise AssertionError(f"batched scoring differs from weight masking by {worst:.2e}")
        return worst

    @contextlib.contextmanager
    def applied(self, plans, calibration=(), forward_context=contextlib.nullcontext):
        """The model scoring ``plans`` at once. With ``calibration`` (batches of
        images), each candidate's BN statistics are first re-estimated on them,
        as :func:`recalibrated` does for one model: one pass per batch, under
        ``forward_context()`` (the scorer's autocast)."""
        plans = np.atleast_2d(np.asarray([self.graph._check_plan(p) for p in np.atleast_2d(plans)]))
        self.graph._follow_model()
        k = len(plans)
        counts = torch.as_tensor(plans, dtype=torch.long, device=self.graph.device)
        in_masks = self._module_masks(self._inputs, counts, "in")
        out_masks = self._module_masks(self._outputs, counts, "out")
        model = self.graph.model
        # BNs recalibrated per candidate (all of them, as the single path does), or
        # normalising with batch statistics anyway (no running statistics to use)
        norms = [_CandidateNorm(m, k) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                 and (calibration or not _tracks(m))]
        handles = []
        try:
            for module, mask in in_masks.items():
                handles.append(module.register_forward_pre_hook(_pre_hook(mask, isinstance(module, nn.Linear))))
            for module, mask in out_masks.items():
                handles.append(module.register_forward_hook(_post_hook(mask, isinstance(module, nn.Linear))))
            for norm in norms:
                norm.install()
            if calibration and any(n.tracks for n in norms):   # (else nothing to recalibrate)
                for norm in norms:
                    norm.calibrating = True
                with torch.no_grad(), forward_context():
                    for x in calibration:
                        model(repeat_rows(x, k))
                for norm in norms:
                    norm.calibrating = False
            yield model
        finally:
            for h in handles:
                h.remove()
            for norm in norms:
                norm.uninstall()


def repeat_rows(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` repeated ``k`` times along the batch (candidate-major rows)."""
    return x if k == 1 else x.repeat(k, *([1] * (x.dim() - 1)))


def _tracks(bn: nn.modules.batchnorm._BatchNorm) -> bool:
    return bn.track_running_stats and bn.running_mean is not None


@contextlib.contextmanager
def recalibrated(model: nn.Module, batches, forward_context=contextlib.nullcontext):
    """``model`` with its BN statistics re-estimated on ``batches`` (a cumulative
    average over them), restored on exit: accuracy right after pruning is a noisy
    stand-in for accuracy after fine-tuning, and stale statistics are much of the
    noise. The single path's recalibration; :meth:`CandidateMasks.applied` gives
    each of K candidates the same statistics. BNs without running statistics
    have nothing to re-estimate."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and _tracks(m)]
    if not batches or not bns:
        yield model
        return
    saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum, m.training)
             for m in bns]
    try:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None                    # cumulative average over the batches
            m.train()
        with torch.no_grad(), forward_context():
            for x in batches:
                model(x)
        for m in bns:
            m.eval()
        yield model
    finally:
        for m, (mean, var, n, momentum, training) in zip(bns, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
            m.momentum = momentum
            m.train(training)


class _CandidateNorm:
    """One BatchNorm's forward over K candidates (rows ``[k*N, (k+1)*N)`` are
    candidate k's), in place of its own while installed. It normalises with:

    * per-candidate batch statistics while calibrating, accumulated as the
      candidate's running statistics (what ``momentum=None`` accumulates), or
      always for a BN without running statistics;
    * afterwards, each candidate's accumulated statistics.

    Statistics are taken in fp32 at least (as the fused kernels do under autocast)."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, k: int):
        self.bn, self.k = bn, k
        self.tracks = _tracks(bn)
        self.calibrating = False
        self.mean = self.var = None           # (K, C) running statistics, once calibrated
        self.batches = 0
        self._before = None

    def install(self) -> None:
        self._before = self.bn.__dict__.get("forward")
        self.bn.forward = self.forward        # an instance attribute: nn.Module.__call__ (and its hooks) use it

    def uninstall(self) -> None:
        if self._before is None:
            self.bn.__dict__.pop("forward", None)
        else:
            self.bn.forward = self._before

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn, k = self.bn, self.k
        shaped = x.reshape(k, x.shape[0] // k, *x.shape[1:])          # (K, N, C, ...)
        dtype = torch.promote_types(x.dtype, torch.float32)             # fp32 at least (float64 stays)
        if self.calibrating or not self.tracks:
            dims = (1, *range(3, shaped.dim()))
            var, mean = torch.var_mean(shaped.to(dtype), dim=dims, correction=0)
            if self.calibrating and self.tracks:
                self._accumulate(mean, var, shaped.numel() // (k * shaped.shape[2]))
        elif self.mean is not None:
            mean, var = self.mean, self.var
        else:       # no calibration batch reached it: reset statistics, as on the single path
            mean = torch.zeros(k, shaped.shape[2], device=x.device, dtype=dtype)
            var = torch.ones_like(mean)
        view = (k, 1, shaped.shape[2], *([1] * (shaped.dim() - 3)))
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.to(dtype)
        shift = bn.bias.to(dtype).expand_as(mean) if bn.bias is not None else torch.zeros_like(mean)
        # (x - mean) * scale + bias, as BN computes it: folding the mean into the
        # shift would cancel digits on channels whose mean dwarfs their spread
        y = torch.addcmul(shift.view(view), shaped - mean.view(view), scale.view(view))
        return y.to(x.dtype).reshape(x.shape)

    def _accumulate(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        if n <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {n} per candidate")
        unbiased = var * (n / (n - 1))     # running statistics keep the unbiased variance
        self.batches += 1
        if self.mean is None:
            self.mean, self.var = mean, unbiased
        else:
            f = 1.0 / self.batches       # a cumulative average (momentum=None)
            self.mean = (1 - f) * self.mean + f * mean
            self.var = (1 - f) * self.var + f * unbiased


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
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features    # (one without affine parameters has no weight)
    return module.weight.numel()      # one-axis layers: PReLU


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
