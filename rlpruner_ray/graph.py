"""PruningGraph: the coupled-channel groups of a model, and the two ways to prune them.

Built once per base model on torch-pruning's DependencyGraph (which traces the
model with autograd, so it must never be built under ``no_grad``). Each *group*
is one set of coupled channels (a conv with its BN, everything tied by a
residual add, concat offsets, depthwise convs, SE gates, the linear after a
flatten); a group is one entry of the pruning distribution.

Two ways to remove channels, with identical outputs, and one entry point that
picks between them:

* ``prune(plan)``: physical removal on a deep copy (once per outer step).
* ``masked(plan)``: zero every coupled slice of the original in place and
  restore it on exit. This is the search's hot path: no graph rebuild, no copy;
  each group's slices are precomputed in importance order, so a plan becomes
  a handful of ``index_fill_`` calls on index-tensor prefixes.
* ``scored(plan)``: a model whose outputs are ``prune(plan)``'s, for any plan:
  the masked original where that is exact, else the pruned copy.

Masking is exact only where a zeroed channel is a removed one: a LayerNorm or
GroupNorm over the channels still counts the zeros. Such groups are named in
``inexact`` (``masking_exact`` is False); ``masked`` refuses a plan that
touches them (a PlanError naming ``scored``) and ``scored(plan)`` prunes
physically instead; at build, one random plan checks masked == physical
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

import numpy as np
import torch
import torch.nn as nn

from .allocate import allocate, group_floors, normalise_distribution
from .cost import CostModel, parametrised_layers
from .errors import ModelError, PlanError
from .groups import Group, Slice, is_grouped_not_depthwise, weight_dim
from .importance import CRITERIA, channel_scores, root_ranks, score_features, validate_criterion
from .tracing import all_groups, build_dependency, inexact_reason, output_layers, shuffle_nodes, split_nodes

# Attribute on a pruned module holding torch-pruning's replayable history
# ([module_name, is_out_channel, indices] per group pruned). It travels with the
# module through deepcopy and lets checkpoints rebuild the exact architecture.
HISTORY_ATTR = "_rlpruner_history"
INPUT_ATTR = "_rlpruner_input_shape"


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
        self.layers = parametrised_layers(model)
        self._layer_id = {m: i for i, m in enumerate(self.layers)}
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
        self.floors = group_floors(self.channels, self.units, min_channels, max_group_sparsity)
        self.costs = CostModel(model, example_inputs, self.layers, self.groups)
        self.base_macs, self.base_params = self.costs.base_macs, self.costs.base_params
        self.macs_share, self.params_share = self.costs.macs_share, self.costs.params_share
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
                extra.append(Slice(None, -1, "out", dim % module.dim(), False, idx, root, multiplicity,
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
            if is_grouped_not_depthwise(module):
                # channels leave every conv group at the same positions (as torch-pruning
                # does), which needs the group's channels to be the conv's, in order
                width = module.out_channels if is_out else module.in_channels
                if len(idx) != width or width != channels or not torch.equal(idx, root):
                    return None
                units.append(module.groups)
                fold = 0 if is_out else width // module.groups
            dim = weight_dim(module, side)
            slices.append(Slice(module, self._layer_id[module], side, dim,
                                 getattr(module, "bias", None) is not None and dim == 0,
                                 idx, root, multiplicity, fold=fold))
        unit = max(units)
        if any(unit % u for u in units) or channels % unit:
            return None           # conv groups that do not nest: no whole-group removal fits all
        return Group(self._module_name[root_module], channels, slices, root_module,
                     tp_group[0].dep.handler, unit=unit, extra=extra,
                     inexact="; ".join(sorted({r for r in reasons if r})))

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
        self._ranks = [root_ranks(score, group.unit) for group, score in zip(self.groups, self.scores)]
        for group, rank in zip(self.groups, self._ranks):
            for s in group.slices + group.extra:
                s.rank = rank[s.root]
                s.ordered = s.idx[torch.argsort(s.rank, stable=True)]

    def group_features(self) -> np.ndarray:
        """Per-group importance statistics for an RL observation (see :func:`score_features`)."""
        return score_features(self.scores)

    # ------------------------------------------------------------------ planning
    def check_distribution(self, distribution) -> np.ndarray:
        return normalise_distribution(distribution, self.num_groups)

    def plan(self, distribution, num_filters: int, *, round_to: int = 1,
             already_removed=None) -> np.ndarray:
        """Filters to remove per group (see :func:`~rlpruner_ray.allocate.allocate`):
        proportional to ``distribution``, within each group's floor and unit,
        summing exactly to ``num_filters``; ``already_removed`` (per group) is
        subtracted from each group's capacity."""
        return allocate(distribution, num_filters, self.channels, self.floors, self.units,
                        round_to=round_to, already_removed=already_removed)

    def cost(self, plan, already_removed=None) -> tuple[int, int]:
        """(MACs, params) of the model after removing ``plan``, in closed form: exact
        integers, equal to torch-pruning's count on the physically pruned model."""
        return self.costs.cost(plan, already_removed)

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
        place; the outputs then equal ``prune(plan)``'s. Restored on exit. A plan
        that touches an ``inexact`` group is refused (PlanError): zeroing cannot
        reproduce its pruning, and ``scored(plan)`` is the exact entry point."""
        plan = self._check_plan(plan)
        touched = self._inexact_touched(plan)
        if touched:
            reason = self.inexact[touched[0]]
            raise PlanError(f"masked(plan) would differ from prune(plan): the plan removes channels of "
                            f"{len(touched)} group(s) masking cannot reproduce (first {touched[0]!r}: "
                            f"{reason}); use graph.scored(plan), which prunes those physically")
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
                    # the positions whose root channel is among the k least important:
                    # the first k (times the multiplicity) of a slice over the whole group
                    # (counted without reading values: a meta model has none), fewer or
                    # none of a part of it (one input of a concatenation that a
                    # depthwise convolution after it couples into one group)
                    whole = len(s.idx) == group.channels * s.multiplicity
                    idx = s.ordered[: int(k) * s.multiplicity if whole else int((s.rank < int(k)).sum())]
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

    def _inexact_touched(self, plan: np.ndarray) -> list[str]:
        """Keys of the groups ``plan`` removes channels from where masking is not exact."""
        return [group.key for group, k in zip(self.groups, plan) if k and group.inexact]

    @contextlib.contextmanager
    def scored(self, plan):
        """A model whose outputs are ``prune(plan)``'s: the masked original when
        masking is exact for every group the plan touches, else the pruned copy."""
        plan = self._check_plan(plan)
        if self._inexact_touched(plan):
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


__all__ = ["PruningGraph", "Group", "replay_history", "HISTORY_ATTR", "CRITERIA"]
