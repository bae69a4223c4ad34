"""PruningGraph: the coupled-channel groups of a model, and the two ways to prune them.

Built once per base model on torch-pruning's DependencyGraph (which traces the
model with autograd, so it must never be built under ``no_grad``). Each *group*
is one set of coupled channels (a conv with its BN, everything tied by a
residual add, concat offsets, depthwise convs, SE gates, the linear after a
flatten); a group is one entry of the pruning distribution.

Two ways to remove channels, with identical outputs:

* ``prune(plan)``: physical removal on a deep copy (once per outer step).
* ``masked(plan)``: zero every coupled slice of the original in place and
  restore it on exit. This is the search's hot path: no graph rebuild, no copy;
  each group's slices are precomputed in importance order, so a plan becomes
  a handful of ``index_fill_`` calls on index-tensor prefixes.

Masking is exact only where a zeroed channel is a removed one: a LayerNorm or
GroupNorm over the channels still counts the zeros. Such groups are named in
``inexact`` (``masking_exact`` is False) and ``scored(plan)`` prunes physically
when a plan touches them; at build, one random plan checks masked == physical
on the example input, so a structure nobody foresaw is an error, not a
silently different score. The model's output layers never lose channels, and
a grouped convolution's channels go in whole positions of every conv group.

Every tensor the graph keeps (index tensors, scores, the example input) lives
on the model's device, and follows the model when it moves (``graph.to`` or a
plain ``model.to``): indexing a CUDA weight with a CPU index tensor raises.
Reading values to the host (``pruned_indices``, ``group_features``) is
explicit, in those two places only.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch_pruning as tp
from torch.overrides import TorchFunctionMode

from .errors import ModelError, PlanError
from .importance import CRITERIA, channel_scores, validate_criterion
from .tracing import (all_groups, build_dependency, inexact_reason, inspection_mode, output_layers,
                      shuffle_nodes, split_nodes)

# Attribute on a pruned module holding torch-pruning's replayable history
# ([module_name, is_out_channel, indices] per group pruned). It travels with the
# module through deepcopy and lets checkpoints rebuild the exact architecture.
HISTORY_ATTR = "_rlpruner_history"
INPUT_ATTR = "_rlpruner_input_shape"

_PARAM_TYPES = (nn.Conv2d, nn.Conv1d, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.PReLU)


@dataclass
class _Slice:
    """One coupled member of a group: a module, the axis its channels live on,
    and its channel indices ordered by the group's importance (least first)."""

    module: nn.Module
    layer: int            # index into PruningGraph.layers (for MACs/params bookkeeping)
    side: str             # "out" or "in": which of the layer's dimensions shrinks
    weight_dim: int       # axis of ``module.weight`` that holds the channels
    has_bias: bool        # whether ``module.bias`` shrinks too (channels on its axis 0)
    idx: torch.Tensor     # item channel indices, in the module's own index space
    root: torch.Tensor    # for each entry of ``idx``, the group's root channel
    multiplicity: int     # item indices per root channel (H*W after a flatten, else 1)
    ordered: torch.Tensor | None = None  # ``idx`` reordered by root importance rank
    rank: torch.Tensor | None = None     # importance rank of each ``idx`` entry's root (0 = least)
    fold: int = 0         # grouped conv's input side: weight column = channel % fold (channels per conv group)
    param: nn.Parameter | None = None    # a bare parameter of a module (layer scale) instead of ``module.weight``

    @property
    def tensor(self) -> torch.Tensor:
        """The tensor whose ``weight_dim`` holds the channels."""
        return self.param if self.param is not None else self.module.weight

    def weight_index(self, idx: torch.Tensor) -> torch.Tensor:
        """Channel indices -> positions on the weight's axis (they differ only on a
        grouped conv's input side, whose weight holds one conv group's columns)."""
        return idx % self.fold if self.fold else idx


@dataclass
class Group:
    key: str              # name of the root module (stable across pruning steps)
    channels: int
    slices: list[_Slice]
    root_module: nn.Module
    pruning_fn: object
    unit: int = 1         # channels go in multiples of this (the conv groups of a grouped conv member)
    extra: list = field(default_factory=list)  # bare-parameter slices (zeroed by ``masked``, not scored or costed)
    inexact: str = ""     # why zeroing weights does not reproduce physical pruning ("" when it does)


def _weight_dim(module: nn.Module, side: str) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        if _is_depthwise(module):      # in and out channels are the same axis
            return 0
        return 0 if side == "out" else 1
    if isinstance(module, nn.Linear):
        return 0 if side == "out" else 1
    return 0                           # BN, PReLU: one per-channel vector


def _is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and module.groups == module.out_channels


def _is_grouped_not_depthwise(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1 and not _is_depthwise(module)


class PruningGraph:
    """Prunable groups of ``model`` and fast masked / physical pruning.

    Args:
        model: the model (left untouched by everything except ``masked``, which
            restores it on exit).
        example_inputs: a batch used for tracing and MACs counting.
        exclude: module names whose output channels must not be pruned (the
            layers producing the model's output are always excluded).
        min_channels: floor of channels every group keeps.
        max_group_sparsity: no group loses more than this fraction of its channels.
        self_check: compare masked and physical pruning once on the example input
            (a ModelError if they differ).
    """

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, *, exclude=(),
                 min_channels: int = 1, max_group_sparsity: float = 1.0, self_check: bool = True):
        if min_channels < 1:
            raise PlanError(f"min_channels must be >= 1, got {min_channels}")
        if not 0.0 < max_group_sparsity <= 1.0:
            raise PlanError(f"max_group_sparsity must be in (0, 1], got {max_group_sparsity}")
        self.model = model
        self.example_inputs = example_inputs
        if not hasattr(model, INPUT_ATTR):   # lets save_pruned rebuild the model later
            setattr(model, INPUT_ATTR, [int(v) for v in example_inputs.shape[1:]])
        names = dict(model.named_modules())
        unknown = [n for n in exclude if n not in names]
        if unknown:
            raise ModelError(f"excluded layer(s) not in the model: {', '.join(unknown)}")
        self._module_name = {m: n for n, m in names.items()}
        self._device = model_device(model)

        self.dg = build_dependency(model, example_inputs)
        # the layers producing the model's output never lose channels: they are its outputs
        self._outputs = output_layers(self.dg)
        # groups crossing a channel shuffle or a split stay whole
        self._shuffles = shuffle_nodes(self.dg) | split_nodes(self.dg)
        ignored = [names[n] for n in exclude] + [m for m in self._outputs if isinstance(m, (nn.Conv2d, nn.Linear))]
        self._count_base(model, example_inputs)
        self.groups: list[Group] = []
        for tp_group in all_groups(self.dg, ignored):
            group = self._make_group(tp_group)
            if group is not None:
                self.groups.append(group)
        self.groups.sort(key=lambda g, order=list(names): order.index(g.key))  # the layers' order in the model
        if not self.groups:
            raise ModelError("the model has no prunable channel groups")
        self.channels = np.array([g.channels for g in self.groups], dtype=np.int64)
        self.units = np.array([g.unit for g in self.groups], dtype=np.int64)
        floors = np.maximum(min_channels, np.ceil(self.channels * (1.0 - max_group_sparsity)))
        floors = np.minimum(floors.astype(np.int64), self.channels)
        # a grouped conv's group keeps whole positions: what it can lose is a multiple of its unit
        self.floors = self.channels - (self.channels - floors) // self.units * self.units
        self._build_cost_tables()
        self.scores: list[torch.Tensor] | None = None
        self.criterion: str | None = None
        self.set_scores([torch.zeros(c) for c in self.channels], criterion="none")
        # which groups masked scoring reproduces exactly, and a check that it does
        self.inexact = {g.key: g.inexact for g in self.groups if g.inexact}
        if self_check and self._device.type != "meta":   # (a meta tensor has no values to compare)
            self.check_masking()

    @property
    def masking_exact(self) -> bool:
        """Whether ``masked`` equals ``prune`` for every plan (else see ``inexact``:
        group key -> reason, and use ``scored``)."""
        return not self.inexact

    def exactness(self) -> dict:
        """What a run records about its scoring path (summary.json, the log)."""
        return {"masking_exact": self.masking_exact, "physical_groups": dict(self.inexact)}

    # ------------------------------------------------------------------ structure
    def _count_base(self, model, example_inputs):
        with inspection_mode(model):
            macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(
                model, example_inputs, layer_wise=True)
        self.base_macs, self.base_params = int(round(macs)), int(params)
        # Parametrised layers scale with the channels removed on their two sides;
        # the counter's weightless layers (activation and pooling modules) are traced
        # call by call in _trace_weightless (the cost of a plan is then exact)
        self.layers = [m for m in model.modules() if isinstance(m, _PARAM_TYPES)]
        self._layer_id = {m: i for i, m in enumerate(self.layers)}
        batch = example_inputs.shape[0] if torch.is_tensor(example_inputs) else 1
        # per-layer counts are summed over the batch, the totals are per sample
        self._layer_macs = np.array([float(layer_macs.get(m) or 0.0) / batch for m in self.layers])
        self._layer_params = np.array([float(sum(p.numel() for p in m.parameters(recurse=False)))
                                       for m in self.layers])
        # the bias's share of a conv's or linear's count, which only its output side scales
        self._bias_macs = np.array([_bias_share(m, batch) for m in self.layers])
        self._bias_params = np.array([_bias_share(m, 1) for m in self.layers])

    def _make_group(self, tp_group) -> Group | None:
        root_module = tp_group[0].dep.target.module
        # groups with a single channel stay (with nothing removable) so the number of
        # groups, the RL action size, is the same at every pruning step
        channels = len(tp_group[0].idxs)
        slices, extra, reasons, units = [], [], [], [1]
        for item in tp_group:
            if item.dep.target in self._shuffles:
                return None       # channel indices are not followed across a shuffle
            module, fn = item.dep.target.module, item.dep.handler
            is_out = self.dg.is_out_channel_pruning_fn(fn)
            idx = torch.as_tensor(item.idxs, dtype=torch.long, device=self._device)
            root = torch.as_tensor(item.root_idxs, dtype=torch.long, device=self._device)
            multiplicity = max(1, len(idx) // channels)
            if isinstance(module, nn.Parameter):   # a bare parameter (layer scale): zeroed like a weight
                dim = self.dg.module2node[module].pruning_dim
                extra.append(_Slice(None, -1, "out", dim % module.dim(), False, idx, root, multiplicity,
                                    param=module))
                continue
            if not isinstance(module, nn.Module):
                continue          # concat / add / flatten placeholders carry no weights
            if is_out and module in self._outputs:
                return None       # these channels are the model's outputs
            if module not in self._layer_id:
                if any(True for _ in module.parameters(recurse=False)):
                    reasons.append(inexact_reason(module, self._module_name.get(module, "?")))
                continue
            side = "out" if is_out else "in"
            fold = 0
            if _is_grouped_not_depthwise(module):
                # channels leave every conv group at the same positions (as torch-pruning
                # does), which needs the group's channels to be the conv's, in order
                width = module.out_channels if is_out else module.in_channels
                if len(idx) != width or width != channels or not torch.equal(idx, root):
                    return None
                units.append(module.groups)
                fold = 0 if is_out else width // module.groups
            dim = _weight_dim(module, side)
            slices.append(_Slice(module, self._layer_id[module], side, dim,
                                 getattr(module, "bias", None) is not None and dim == 0,
                                 idx, root, multiplicity, fold=fold))
        unit = max(units)
        if any(unit % u for u in units) or channels % unit:
            return None           # conv groups that do not nest: no whole-group removal fits all
        return Group(self._module_name[root_module], channels, slices, root_module,
                     tp_group[0].dep.handler, unit=unit, extra=extra,
                     inexact="; ".join(sorted({r for r in reasons if r})))

    def _build_cost_tables(self):
        """Per (group, layer) coefficients: how many channels of each layer side one
        removed root channel takes away. MACs/params of a plan follow in closed form."""
        n_layers = len(self.layers)
        self._out_coef = np.zeros((len(self.groups), n_layers))
        self._in_coef = np.zeros((len(self.groups), n_layers))
        for g, group in enumerate(self.groups):
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
                self._single_axis[i] = _is_depthwise(m)
            elif isinstance(m, nn.Linear):
                self._out_size[i], self._in_size[i] = m.out_features, m.in_features
            else:
                self._out_size[i] = self._in_size[i] = m.weight.numel() if m.weight is not None else 1
                self._single_axis[i] = True
        self._trace_weightless()
        removed_all = np.diag(self.channels.astype(float))
        self.macs_share = (self._cost_of(removed_all, self._layer_macs, self._bias_macs)
                           + self._weightless_cost(removed_all)) / max(self.base_macs, 1.0)
        self.params_share = (self._cost_of(removed_all, self._layer_params, self._bias_params)
                             / max(self.base_params, 1.0))

    def _trace_weightless(self) -> None:
        """The counter's weightless layers (ReLU, pooling, upsampling modules: their
        MACs are the elements of a feature map), one row per call: its MACs and how
        many of its channels one removed root channel of each group takes away,
        followed from the parametrised layers' outputs through element-wise ops and
        concatenations on one forward pass (a map reached through anything else,
        e.g. a reshape, keeps its cost)."""
        counted = tuple(t for t in tp.utils.op_counter.MODULES_MAPPING if not issubclass(t, _PARAM_TYPES))
        coef: dict[int, np.ndarray] = {}      # id(feature map) -> channels lost per removed root channel
        keep = []                             # the maps stay alive so their ids stay unique
        rows: list[tuple[float, float, np.ndarray]] = []
        n_groups = len(self.groups)

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
            i = self._layer_id[module]
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

        batch = self.example_inputs.shape[0] if torch.is_tensor(self.example_inputs) else 1
        hooks = [m.register_forward_hook(layer_out) for m in self.layers]
        hooks += [m.register_forward_hook(weightless) for m in self.model.modules() if type(m) in counted]
        try:
            with inspection_mode(self.model), torch.no_grad(), Follow():
                self.model(self.example_inputs)
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

    # ------------------------------------------------------------------ device
    @property
    def device(self) -> torch.device:
        """The device of the model (and so of every tensor the graph keeps)."""
        return self._device

    def to(self, device) -> "PruningGraph":
        """Move the model and every tensor the graph keeps to ``device``."""
        self.model.to(device)
        self._follow_model()
        return self

    def _follow_model(self) -> None:
        """Move the graph's own tensors to wherever the model is now (a model may be
        moved after its graph was built)."""
        device = model_device(self.model)
        if device == self._device:
            return
        self._device = device
        for group in self.groups:
            for s in group.slices + group.extra:
                s.idx, s.root = s.idx.to(device), s.root.to(device)
                if s.ordered is not None:
                    s.ordered, s.rank = s.ordered.to(device), s.rank.to(device)
        if self.scores is not None:
            self.scores = [t.to(device) for t in self.scores]
            self._ranks = [t.to(device) for t in self._ranks]
        if torch.is_tensor(self.example_inputs):
            self.example_inputs = self.example_inputs.to(device)

    def tensors(self):
        """(name, tensor) of every tensor the graph keeps (device checks)."""
        yield "example_inputs", self.example_inputs
        for g, group in enumerate(self.groups):
            for i, s in enumerate(group.slices + group.extra):
                for name in ("idx", "root", "ordered", "rank"):
                    if getattr(s, name) is not None:
                        yield f"{group.key}[{i}].{name}", getattr(s, name)
            if self.scores is not None:
                yield f"{group.key}.scores", self.scores[g]
                yield f"{group.key}.ranks", self._ranks[g]

    @property
    def num_groups(self) -> int:
        return len(self.groups)

    @property
    def keys(self) -> list[str]:
        return [g.key for g in self.groups]

    @property
    def total_channels(self) -> int:
        return int(self.channels.sum())

    @property
    def max_removable(self) -> int:
        return int((self.channels - self.floors).sum())

    def sizes(self) -> dict:
        """Channels per group, total channels, MACs and params of the model: a run's
        ``original`` record (what every step's reductions are measured against)."""
        return {"channels": dict(zip(self.keys, self.channels.tolist())), "total_channels": self.total_channels,
                "macs": self.base_macs, "params": self.base_params}

    def initial_distribution(self) -> np.ndarray:
        """The paper's starting point: every filter equally likely, so each
        group's share is proportional to its channel count."""
        return self.channels / self.channels.sum()

    # ------------------------------------------------------------------ importance
    def compute_scores(self, criterion: str = "taylor", inputs=None, targets=None, *, seed: int = 0):
        """Rank each group's channels by ``criterion`` and cache the order.
        ``taylor`` needs a calibration batch (``inputs``, ``targets``)."""
        validate_criterion(criterion)
        self._follow_model()
        self.set_scores(channel_scores(self, criterion, inputs, targets, seed=seed), criterion)
        return self.scores

    def set_scores(self, scores: list[torch.Tensor], criterion: str):
        if len(scores) != self.num_groups:
            raise PlanError(f"expected {self.num_groups} score vectors, got {len(scores)}")
        self._follow_model()
        self.scores = [torch.as_tensor(s, dtype=torch.float32).to(self._device) for s in scores]
        self.criterion = criterion
        self._ranks = [_root_ranks(score, group.unit) for group, score in zip(self.groups, self.scores)]
        for group, rank in zip(self.groups, self._ranks):
            for s in group.slices + group.extra:
                s.rank = rank[s.root]
                s.ordered = s.idx[torch.argsort(s.rank, stable=True)]

    def group_features(self) -> np.ndarray:
        """Per-group, scale-free importance statistics for an RL observation: the
        coefficient of variation of the scores and the share of channels scoring
        under half the group mean (how much is cheap to remove)."""
        feats = np.zeros((self.num_groups, 2), dtype=np.float32)
        for g, s in enumerate(self.scores):
            s = s.cpu().double().abs()
            mean = float(s.mean())
            if mean > 0:
                feats[g, 0] = float(s.std(unbiased=False) / mean)
                feats[g, 1] = float((s < 0.5 * mean).double().mean())
        return feats

    # ------------------------------------------------------------------ planning
    def check_distribution(self, distribution) -> np.ndarray:
        d = np.asarray(distribution, dtype=np.float64).reshape(-1)
        if d.shape[0] != self.num_groups:
            raise PlanError(f"distribution has {d.shape[0]} entries, the model has {self.num_groups} groups")
        if not np.all(np.isfinite(d)):
            raise PlanError("distribution has NaN or infinite entries")
        if np.any(d < 0):
            raise PlanError("distribution has negative entries")
        if d.max() <= 0:
            raise PlanError("distribution is all zero")
        d = d / d.max()   # first: a sum of huge entries would overflow to inf (and every share to 0)
        return d / d.sum()

    def plan(self, distribution, num_filters: int, *, round_to: int = 1,
             already_removed=None) -> np.ndarray:
        """Filters to remove per group: proportional to ``distribution``, capped by
        each group's floor, summing exactly to ``num_filters``.

        Largest-remainder rounding keeps the total exact; a group that hits its
        floor hands its excess to the others in proportion to their weights.
        With ``round_to`` > 1 each group keeps a multiple of ``round_to`` channels
        where its floor allows, and the total is the closest such to ``num_filters``.
        ``already_removed`` (per group) is subtracted from each group's capacity.
        """
        d = self.check_distribution(distribution)
        if round_to < 1:
            raise PlanError(f"round_to must be >= 1, got {round_to}")
        done = np.zeros(self.num_groups, np.int64) if already_removed is None else np.asarray(already_removed, np.int64)
        capacity = np.maximum(self.channels - self.floors - done, 0)
        num_filters = int(num_filters)
        if num_filters < 0:
            raise PlanError(f"num_filters must be >= 0, got {num_filters}")
        if num_filters > capacity.sum():
            raise PlanError(f"cannot remove {num_filters} filters: at most {int(capacity.sum())} "
                            "can go while every group keeps its floor")
        counts = _water_fill(d, capacity, num_filters)
        if round_to > 1:
            counts = _round_widths(counts, self.channels - done, capacity, round_to, num_filters)
        if np.any(self.units > 1):
            counts = _align_to_units(counts, self.units, capacity, d, int(counts.sum()))
        return counts

    def cost(self, plan, already_removed=None) -> tuple[int, int]:
        """(MACs, params) of the model after removing ``plan``, in closed form: exact
        integers, equal to torch-pruning's count on the physically pruned model."""
        removed = np.asarray(plan, dtype=float)
        if already_removed is not None:
            removed = removed + np.asarray(already_removed, dtype=float)
        macs = (self.base_macs - self._cost_of(removed, self._layer_macs, self._bias_macs)[0]
                - self._weightless_cost(removed)[0])
        params = self.base_params - self._cost_of(removed, self._layer_params, self._bias_params)[0]
        return int(round(macs)), int(round(params))

    def pruned_indices(self, plan) -> list[list[int]]:
        """Root channel indices each group loses (its least important ones)."""
        plan = self._check_plan(plan)
        return [torch.nonzero(rank.cpu() < int(k)).flatten().tolist() for rank, k in zip(self._ranks, plan)]

    def _check_plan(self, plan) -> np.ndarray:
        plan = np.asarray(plan)
        if plan.shape != (self.num_groups,):
            raise PlanError(f"plan has shape {plan.shape}, expected ({self.num_groups},)")
        if np.any(plan < 0) or np.any(plan > self.channels - 1):
            raise PlanError("plan removes a negative count or every channel of a group")
        odd = np.flatnonzero(plan % self.units)
        if len(odd):
            g = int(odd[0])
            raise PlanError(f"group {self.keys[g]!r} loses channels in multiples of {self.units[g]} "
                            f"(its grouped convolution), the plan removes {int(plan[g])}")
        return plan.astype(np.int64)

    # ------------------------------------------------------------------ pruning
    @contextlib.contextmanager
    def masked(self, plan):
        """Zero the planned channels of every coupled parameter of ``self.model`` in
        place; the outputs then equal ``prune(plan)``'s. Restored on exit."""
        plan = self._check_plan(plan)
        self._follow_model()
        saved = []
        with torch.no_grad():
            for group, k in zip(self.groups, plan):
                if k == 0:
                    continue
                for s in group.slices + group.extra:
                    if s.tensor is None:
                        # a BN without affine parameters: nothing to zero; what it makes of
                        # the channel reaches only members whose weights on it are zeroed
                        continue
                    idx = s.ordered[: int(k) * s.multiplicity]
                    tensors = [(s.tensor, s.weight_dim, s.weight_index(idx))]
                    if s.has_bias:
                        tensors.append((s.module.bias, 0, idx))
                    for t, dim, at in tensors:
                        saved.append((t, dim, at, t.index_select(dim, at)))
                        t.index_fill_(dim, at, 0.0)
        try:
            yield self.model
        finally:
            with torch.no_grad():
                # reverse order: a slice zeroed twice (out of one group, in of
                # another) gets its original values back last
                for t, dim, idx, old in reversed(saved):
                    t.index_copy_(dim, idx, old)

    @contextlib.contextmanager
    def scored(self, plan):
        """A model whose outputs are ``prune(plan)``'s: the masked original when
        masking is exact for every group the plan touches, else the pruned copy."""
        plan = self._check_plan(plan)
        if any(plan[g] and group.inexact for g, group in enumerate(self.groups)):
            yield self.prune(plan)
        else:
            with self.masked(plan) as model:
                yield model

    def check_masking(self, plan=None, tolerance: float = 1e-4) -> float:
        """Masked against physical outputs on the example input for ``plan`` (default:
        a random one over the groups masking claims to handle exactly); a mismatch
        is a ModelError: the search would otherwise score a different model than the
        one applied. Returns the relative difference."""
        if plan is None:
            exact = np.array([not g.inexact for g in self.groups])
            if not exact.any():
                return 0.0
            weights = np.random.default_rng(0).dirichlet(np.ones(self.num_groups)) * exact
            room = int(((self.channels - self.floors) * exact).sum())
            plan = self.plan(weights, room // 2) * exact if room else np.zeros(self.num_groups, np.int64)
        plan = self._check_plan(plan)
        modes = {m: m.training for m in self.model.modules()}
        self.model.eval()   # dropout would differ between the two passes
        try:
            with torch.no_grad():
                physical = self.prune(plan).eval()(self.example_inputs).float()
                with self.masked(plan) as model:
                    masked = model(self.example_inputs).float()
        finally:
            for m, mode in modes.items():
                m.training = mode
        scale = max(float(physical.abs().max()), 1.0)
        worst = float((masked - physical).abs().max()) / scale if masked.shape == physical.shape else float("inf")
        if not worst <= tolerance:
            raise ModelError(f"masked scoring differs from physical pruning by {worst:.1e} on this model "
                             "(a structure zeroing weights does not reproduce); refusing to score it")
        return worst

    def prune(self, plan) -> nn.Module:
        """A physically smaller deep copy of the model; the original is untouched."""
        return self.prune_channels(self.pruned_indices(plan))

    def prune_channels(self, indices: list[list[int]]) -> nn.Module:
        """``prune`` for explicit root channel indices per group (host lists)."""
        if len(indices) != self.num_groups:
            raise PlanError(f"expected {self.num_groups} index lists, got {len(indices)}")
        self._follow_model()
        small = copy.deepcopy(self.model)
        history = list(getattr(self.model, HISTORY_ATTR, []))
        dg = build_dependency(small, self.example_inputs, check=False)
        modules = dict(small.named_modules())
        for group, idxs in zip(self.groups, indices):
            if not idxs:
                continue
            root = modules[group.key]
            dg.get_pruning_group(root, group.pruning_fn, idxs).prune()
        history.extend([name, bool(is_out), [int(i) for i in idx]]
                       for name, is_out, idx in dg.pruning_history())
        setattr(small, HISTORY_ATTR, history)
        return small


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


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (CPU for a model without any)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def group_widths(model: nn.Module, keys) -> dict[str, int]:
    """Channels left in each group, read off the group's root module by name."""
    modules = dict(model.named_modules())
    out = {}
    for k in keys:
        m = modules[k]
        out[k] = int(m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)
    return out


def replay_history(model: nn.Module, example_inputs: torch.Tensor, history) -> nn.Module:
    """Re-apply a recorded pruning history to a freshly built base model (in place)."""
    if history:
        dg = build_dependency(model, example_inputs, check=False)
        dg.load_pruning_history([[n, bool(o), list(i)] for n, o, i in history])
    setattr(model, HISTORY_ATTR, [list(h) for h in history])
    return model


def _root_ranks(score: torch.Tensor, unit: int) -> torch.Tensor:
    """Rank of each root channel (0 = least important; ties broken by index). With
    ``unit`` conv groups, channels go by position within a conv group, in every
    conv group at once: a position ranks by its mean score over the conv groups,
    and its ``unit`` channels take consecutive ranks (so any multiple of ``unit``
    least-ranked channels is whole positions)."""
    per_group = len(score) // unit
    position_score = score.reshape(unit, per_group).mean(dim=0)
    order = torch.argsort(position_score, stable=True)
    position_rank = torch.empty_like(order)
    position_rank[order] = torch.arange(per_group, device=order.device)
    channel = torch.arange(len(score), device=score.device)
    return position_rank[channel % per_group] * unit + channel // per_group


def _water_fill(weights: np.ndarray, capacity: np.ndarray, total: int) -> np.ndarray:
    """Integer counts ~ weights * total, each within capacity, summing to total."""
    counts = np.zeros_like(capacity)
    remaining = total
    active = capacity > 0
    w = np.where(active, weights, 0.0)
    if w.sum() <= 0:                      # all the weight sits on full groups
        w = active.astype(float)
    while remaining > 0:
        share = w / w.sum() * remaining
        free = capacity - counts
        take = np.minimum(np.floor(share).astype(np.int64), free)
        # largest remainders get the leftover units, among groups with room
        left = remaining - int(take.sum())
        if left > 0:
            # (weighted groups only: a capped group's excess must not leak onto
            # zero-weight groups while weighted ones still have room)
            frac = np.where((free - take > 0) & (w > 0), share - np.floor(share), -1.0)
            for g in np.argsort(-frac, kind="stable")[:left]:
                if frac[g] >= 0:
                    take[g] += 1
        counts += take
        remaining -= int(take.sum())
        full = counts >= capacity
        if remaining > 0 and int(take.sum()) == 0:
            # weights too small to earn a whole unit anywhere: spread by weight order
            for g in np.argsort(-np.where(full, -1, w), kind="stable"):
                if remaining == 0:
                    break
                if not full[g]:
                    counts[g] += 1
                    remaining -= 1
                    full[g] = counts[g] >= capacity[g]
        w = np.where(full, 0.0, w)
        if w.sum() <= 0 and remaining > 0:
            w = (~full).astype(float)
    return counts


def _align_to_units(counts, units, capacity, weights, target):
    """Counts of grouped-conv groups to the nearest multiple of their unit (within
    capacity); the difference moves to the other groups by weight, and whatever
    they cannot take back to the grouped ones in whole units."""
    counts = counts.copy()
    grouped = units > 1
    counts[grouped] = np.minimum(np.round(counts[grouped] / units[grouped]) * units[grouped], capacity[grouped])
    free = ~grouped
    diff = target - int(counts.sum())
    if diff > 0:
        room = np.where(free, capacity - counts, 0)
        counts += _water_fill(np.where(free, weights, 0.0), room, min(diff, int(room.sum())))
    elif diff < 0:
        have = np.where(free, counts, 0)
        counts -= _water_fill(np.where(free, weights, 0.0), have, min(-diff, int(have.sum())))
    for g in np.flatnonzero(grouped & (weights > 0)):   # what is left: whole units, while that gets closer
        diff = target - int(counts.sum())
        step = units[g] if diff > 0 else -units[g]
        if abs(diff - step) < abs(diff) and 0 <= counts[g] + step <= capacity[g]:
            counts[g] += step
    return counts


def _round_widths(counts, widths, capacity, r, target):
    """Move each group's remaining width to a multiple of ``r`` (where the floor
    allows), then adjust whole units of ``r`` toward ``target``."""
    share = counts.astype(float)          # the proportional plan, before any rounding
    counts = counts.copy()
    for g in range(len(counts)):
        keep = int(widths[g] - counts[g])
        # nearest multiple of r that fits between the floor and the full width
        # (rounding to the nearest alone skips a width of 30 -> 32 > 30 instead of 24)
        options = [m for m in (max(r, -(-keep // r) * r), max(r, keep // r * r))
                   if 0 <= widths[g] - m <= capacity[g]]
        if options:
            counts[g] = widths[g] - min(options, key=lambda m: abs(m - keep))
    while True:
        diff = target - counts.sum()
        if abs(diff) < r:
            return counts
        step = r if diff > 0 else -r
        room = (counts + step <= capacity) & (counts + step >= 0)
        if not room.any():
            return counts
        # adjust the group whose count is furthest from its proportional share, on
        # the side the step moves it toward (most below it when adding, most above
        # when taking back)
        g = int(np.argmax(np.where(room, step * (share - counts), -np.inf)))
        counts[g] += step


__all__ = ["PruningGraph", "Group", "replay_history", "HISTORY_ATTR", "CRITERIA"]
