"""MACs and params of a plan in closed form, and the one bisection to a cost target.

A :class:`CostModel` is built once per :class:`~rlpruner_ray.graph.PruningGraph`
from torch-pruning's per-layer count of the base model and the groups' coupled
slices: how many channels of each layer side one removed root channel takes
away. The cost of any plan then follows without touching the model, as exact
integers equal to torch-pruning's count on the physically pruned model.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from torch.overrides import TorchFunctionMode

from .groups import is_depthwise
from .tracing import inspection_mode

# the layers whose cost scales with the channels removed on their sides
PARAM_TYPES = (nn.Conv2d, nn.Conv1d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.PReLU)
# the two costs a target can name, in the order ``cost`` returns them
COST_KINDS = ("macs", "params")


def cost_axis(kind: str) -> int:
    """Position of a cost target's kind in ``cost``'s (MACs, params): 0 for
    ``"macs"``, else 1 (params)."""
    return 0 if kind == COST_KINDS[0] else 1


def smallest_meeting(meets, lo, hi, *, tolerance: float = 0):
    """The smallest x in [lo, hi] for which ``meets(x)`` holds, where ``meets``
    turns from False to True once as x grows (a cost falls as more is removed):
    bisected over the integers (``tolerance`` 0) or over the reals until the
    interval is at most ``tolerance`` wide (the upper end is returned). ``hi``
    is tried first; None when not even it meets the target."""
    if not meets(hi):
        return None
    if tolerance:
        while hi - lo > tolerance:
            mid = (lo + hi) / 2
            if meets(mid):
                hi = mid
            else:
                lo = mid
        return hi
    while lo < hi:
        mid = (lo + hi) // 2
        if meets(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo


def parametrised_layers(model: nn.Module) -> list[nn.Module]:
    """The model's layers with per-channel parameters, in module order (the
    layer index of a group's slice points into this list)."""
    return [m for m in model.modules() if isinstance(m, PARAM_TYPES)]


class CostModel:
    """(MACs, params) of the model after removing a plan's channels.

    Args:
        model, example_inputs: the base model and the batch its MACs are counted on.
        layers: :func:`parametrised_layers` of the model.
        groups: the graph's groups; each slice names its ``layer`` (index into
            ``layers``), ``side`` ("out" / "in") and ``multiplicity``.
    """

    def __init__(self, model: nn.Module, example_inputs, layers: list[nn.Module], groups):
        self.layers = layers
        self._count_base(model, example_inputs)
        self._build_tables(groups)
        self._trace_weightless(model, example_inputs, len(groups))
        channels = np.array([g.channels for g in groups], dtype=np.int64)
        removed_all = np.diag(channels.astype(float))
        # each group's share of the base MACs / params when it loses every channel
        self.macs_share = (self._cost_of(removed_all, self._layer_macs, self._bias_macs)
                           + self._weightless_cost(removed_all)) / max(self.base_macs, 1.0)
        self.params_share = (self._cost_of(removed_all, self._layer_params, self._bias_params)
                             / max(self.base_params, 1.0))

    def cost(self, plan, already_removed=None) -> tuple[int, int]:
        """(MACs, params) of the model after removing ``plan`` (and ``already_removed``)."""
        removed = np.asarray(plan, dtype=float)
        if already_removed is not None:
            removed = removed + np.asarray(already_removed, dtype=float)
        macs = (self.base_macs - self._cost_of(removed, self._layer_macs, self._bias_macs)[0]
                - self._weightless_cost(removed)[0])
        params = self.base_params - self._cost_of(removed, self._layer_params, self._bias_params)[0]
        return int(round(macs)), int(round(params))

    def _count_base(self, model, example_inputs):
        with inspection_mode(model):
            macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(
                model, example_inputs, layer_wise=True)
        self.base_macs, self.base_params = int(round(macs)), int(params)
        # Parametrised layers scale with the channels removed on their two sides;
        # the counter's weightless layers (activation and pooling modules) are traced
        # call by call in _trace_weightless (the cost of a plan is then exact)
        batch = example_inputs.shape[0] if torch.is_tensor(example_inputs) else 1
        # per-layer counts are summed over the batch, the totals are per sample
        self._layer_macs = np.array([float(layer_macs.get(m) or 0.0) / batch for m in self.layers])
        self._layer_params = np.array([float(sum(p.numel() for p in m.parameters(recurse=False)))
                                       for m in self.layers])
        # the bias's share of a conv's or linear's count, which only its output side scales
        self._bias_macs = np.array([_bias_share(m, batch) for m in self.layers])
        self._bias_params = np.array([_bias_share(m, 1) for m in self.layers])

    def _build_tables(self, groups):
        """Per (group, layer) coefficients: how many channels of each layer side one
        removed root channel takes away. MACs/params of a plan follow in closed form."""
        n_layers = len(self.layers)
        self._out_coef = np.zeros((len(groups), n_layers))
        self._in_coef = np.zeros((len(groups), n_layers))
        for g, group in enumerate(groups):
            seen = set()
            for s in group.slices:
                if (s.layer, s.side) in seen:
                    continue
                seen.add((s.layer, s.side))
                table = self._out_coef if s.side == "out" else self._in_coef
                table[g, s.layer] += s.multiplicity
        self._out_size = np.zeros(n_layers)
        self._in_size = np.ones(n_layers)
        self._single_axis = np.zeros(n_layers, dtype=bool)  # BN, depthwise, PReLU
        for i, m in enumerate(self.layers):
            if isinstance(m, nn.modules.conv._ConvNd):
                self._out_size[i], self._in_size[i] = m.out_channels, m.in_channels
                self._single_axis[i] = is_depthwise(m)
            elif isinstance(m, nn.Linear):
                self._out_size[i], self._in_size[i] = m.out_features, m.in_features
            else:
                self._out_size[i] = self._in_size[i] = m.weight.numel() if m.weight is not None else 1
                self._single_axis[i] = True

    def _trace_weightless(self, model, example_inputs, n_groups: int) -> None:
        """The counter's weightless layers (ReLU, pooling, upsampling modules: their
        MACs are the elements of a feature map), one row per call: its MACs and how
        many of its channels one removed root channel of each group takes away,
        followed from the parametrised layers' outputs through element-wise ops and
        concatenations on one forward pass (a map reached through anything else,
        e.g. a reshape, keeps its cost)."""
        counted = tuple(t for t in tp.utils.op_counter.MODULES_MAPPING if not issubclass(t, PARAM_TYPES))
        coef: dict[int, np.ndarray] = {}      # id(feature map) -> channels lost per removed root channel
        keep = []                             # the maps stay alive so their ids stay unique
        rows: list[tuple[float, float, np.ndarray]] = []
        layer_id = {m: i for i, m in enumerate(self.layers)}

        def known(t):
            return coef.get(id(t)) if torch.is_tensor(t) and t.dim() >= 2 else None

        class Follow(TorchFunctionMode):
            def __torch_function__(mode, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                if torch.is_tensor(out) and out.dim() >= 2:
                    flat = [a for a in args if torch.is_tensor(a)] + \
                        [t for a in args if isinstance(a, (list, tuple)) for t in a if torch.is_tensor(t)]
                    found = None
                    if func in (torch.cat, torch.concat) and (kwargs or {}).get("dim", args[1] if len(args) > 1
                                                                                 else 0) in (1, -3):
                        parts = [known(t) for t in args[0]]
                        found = None if any(p is None for p in parts) else sum(parts)
                    else:
                        for t in flat:
                            if t.dim() == out.dim() and t.shape[1] == out.shape[1] and known(t) is not None:
                                found = known(t)
                                break
                    if found is not None:
                        coef[id(out)] = found
                        keep.append(out)
                return out

        def layer_out(module, inputs, output):
            i = layer_id[module]
            if torch.is_tensor(output) and output.dim() >= 2 and output.shape[1] == self._out_size[i]:
                coef[id(output)] = self._out_coef[:, i].copy()
                keep.append(output)

        def weightless(module, inputs, output):
            x = inputs[0] if inputs else None
            module.__flops__ = 0
            tp.utils.op_counter.MODULES_MAPPING[type(module)](module, inputs, output)
            macs = float(module.__flops__) / batch
            del module.__flops__
            c = known(x)
            if c is not None and macs:
                rows.append((macs, float(x.shape[1]), c))
            if torch.is_tensor(output) and c is not None and output.dim() == x.dim() \
                    and output.shape[1] == x.shape[1]:
                coef[id(output)] = c
                keep.append(output)

        batch = example_inputs.shape[0] if torch.is_tensor(example_inputs) else 1
        hooks = [m.register_forward_hook(layer_out) for m in self.layers]
        hooks += [m.register_forward_hook(weightless) for m in model.modules() if type(m) in counted]
        try:
            with inspection_mode(model), torch.no_grad(), Follow():
                model(example_inputs)
        finally:
            for h in hooks:
                h.remove()
        self._free_macs = np.array([r[0] for r in rows])
        self._free_size = np.array([r[1] for r in rows])
        self._free_coef = np.array([r[2] for r in rows]).reshape(len(rows), n_groups)

    def _weightless_cost(self, removed: np.ndarray) -> np.ndarray:
        removed = np.atleast_2d(removed)
        if not len(self._free_macs):
            return np.zeros(len(removed))
        frac = np.clip((removed @ self._free_coef.T) / self._free_size, 0, 1)
        return (frac * self._free_macs).sum(axis=1)

    def _cost_of(self, removed: np.ndarray, layer_cost: np.ndarray, bias_share=None) -> np.ndarray:
        """Cost of the parametrised layers removed by each row of ``removed`` (rows:
        plans, cols: groups): weights scale with both sides (one, for single-axis
        layers), a bias (``bias_share`` of the layer's cost) with the output side."""
        removed = np.atleast_2d(removed)
        out_frac = np.clip((removed @ self._out_coef) / self._out_size, 0, 1)
        in_frac = np.clip((removed @ self._in_coef) / self._in_size, 0, 1)
        kept = np.where(self._single_axis, 1 - np.maximum(out_frac, in_frac),
                        (1 - out_frac) * (1 - in_frac))
        bias = np.zeros(len(self.layers)) if bias_share is None else np.where(self._single_axis, 0.0, bias_share)
        return ((1 - kept) * (1 - bias) * layer_cost + out_frac * bias * layer_cost).sum(axis=1)


def _bias_share(module: nn.Module, batch: int) -> float:
    """The share of a conv's or linear's MACs (and parameters: the same ratio) that
    its bias takes: one per output element against the kernel's ``in/groups * k``
    (the counter counts a linear's bias once per batch, its weights once per sample:
    ``batch`` 1 gives the parameters' share)."""
    if getattr(module, "bias", None) is None or not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return 0.0
    if isinstance(module, nn.Linear):
        return 1.0 / (batch * module.in_features + 1)
    per_output = module.in_channels // module.groups * int(np.prod(module.kernel_size))
    return 1.0 / (per_output + 1)
