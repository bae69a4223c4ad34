"""What the dependency graph can and cannot follow in a model, said in one line.

Torch-pruning traces a model with autograd and ties channels together through
the operations it recognises. Three things are settled here, before and after
that trace, so the pruning graph never silently prunes the wrong thing:

* models it cannot follow are refused with a line naming the layer (attention,
  a reshape of the channel axis other than a flatten or a channel shuffle);
* channel shuffles are found, so the groups crossing them stay unpruned;
* the layers that produce the model's output, found on the traced graph
  whatever their type: their output channels are the model's outputs;
* for each group, whether zeroing its weights reproduces physical pruning
  (a normalisation over the channels, for one, sees the zeroed channels).
"""
from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch.overrides import TorchFunctionMode

from .errors import ModelError

# layers on which zeroing a channel's parameters is exactly its removal: each of
# their output channels depends on its own weight slice only
EXACT_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.PReLU)
# layers whose output channel is a function of every input channel's statistics
CHANNEL_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


_RESHAPE_LOCK = threading.RLock()
_ORIGINAL_RESHAPE_MAPPING = tp_index_mapping.update_reshape_index_mapping


def _tolerant_reshape_mapping(graph, node):
    # torch-pruning infers a channel stride for every reshape: on a channel shuffle's
    # views it divides by zero or maps each index to thousands; such a reshape keeps
    # no mapping here, and every group crossing it is frozen (see shuffle_nodes)
    if node in _cached_shuffle_nodes(graph):
        return
    try:
        _ORIGINAL_RESHAPE_MAPPING(graph, node)
    except ZeroDivisionError:
        pass


_ORIGINAL_MAPPING_PASS = tp_index_mapping.update_index_mapping


@contextlib.contextmanager
def _tolerant_reshapes(mapping_pass: bool = True):
    """torch-pruning's index-mapping pass (run on building and on every group
    query) with the tolerant reshape rule, or skipped (``mapping_pass=False``) when
    nothing was pruned since it last ran; for this call only."""
    with _RESHAPE_LOCK:
        tp_index_mapping.update_reshape_index_mapping = _tolerant_reshape_mapping
        if not mapping_pass:
            tp_index_mapping.update_index_mapping = lambda graph: None
        try:
            yield
        finally:
            tp_index_mapping.update_reshape_index_mapping = _ORIGINAL_RESHAPE_MAPPING
            tp_index_mapping.update_index_mapping = _ORIGINAL_MAPPING_PASS


class _DependencyGraph(tp.DependencyGraph):
    # True while groups are only read: the mapping pass (a whole-graph sweep that
    # torch-pruning repeats on every query, quadratic on a DenseNet) has nothing new to map
    mapping_fresh = False

    def get_pruning_group(self, *args, **kwargs):
        with _tolerant_reshapes(mapping_pass=not self.mapping_fresh):
            return super().get_pruning_group(*args, **kwargs)


@contextlib.contextmanager
def inspection_mode(model: nn.Module):
    """Every module in eval mode while the model is only looked at (tracing, counting
    MACs), each back in its own mode after: a forward pass in training mode would
    move BatchNorm's running statistics, so merely building a graph would change
    the model (and a resumed run, whose model comes from a file, would then differ
    from an uninterrupted one)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes:
            m.training = mode


def build_dependency(model: nn.Module, example_inputs, *, check: bool = True) -> tp.DependencyGraph:
    """torch-pruning's graph of ``model``, or a one-line ModelError for a model it
    cannot follow. ``check``: refuse attention and channel reshapes first (a model
    already refused never gets here again, e.g. when pruning a copy)."""
    with inspection_mode(model):
        if check:
            _refuse_attention(model)
            _refuse_channel_reshapes(model, example_inputs)
        try:
            with torch.enable_grad(), _tolerant_reshapes():  # torch-pruning traces with autograd
                return _DependencyGraph().build_dependency(model, example_inputs, verbose=False)
        except Exception as exc:  # a structure its tracer does not know, in words it chose
            text = " ".join(str(exc).split())[:160]
            raise ModelError(f"the dependency graph cannot follow this model: {type(exc).__name__}: "
                             f"{text}") from None


def all_groups(dg: tp.DependencyGraph, ignored, root_types=(nn.Conv2d, nn.Linear)):
    """Each coupled group once, rooted at the first conv or linear (graph order) whose
    output channels it holds; groups holding an ignored layer's output channels are
    left out. A root whose group torch-pruning cannot work out (its index mapping
    fails, as around a channel shuffle's split) is left unpruned."""
    ignored = set(ignored) | set(dg.IGNORED_LAYERS_IN_TRACING)
    covered = set()
    dg.mapping_fresh = True     # (building ran the mapping pass; nothing is pruned here)
    try:
        yield from _groups_by_root(dg, ignored, covered, root_types)
    finally:
        dg.mapping_fresh = False


def _groups_by_root(dg, ignored, covered, root_types):
    for module in list(dg.module2node):
        if module in ignored or module in covered or not isinstance(module, root_types):
            continue
        pruner = dg.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            group = dg.get_pruning_group(module, pruner.prune_out_channels,
                                         list(range(pruner.get_out_channels(module))))
        except (IndexError, ZeroDivisionError, KeyError):
            continue
        outs = {dep.target.module for dep, _ in group if dg.is_out_channel_pruning_fn(dep.handler)}
        covered |= outs
        if not outs & ignored:
            yield group


def _cached_shuffle_nodes(dg) -> set:
    # (the index-mapping pass runs on every group query; the traced nodes never change)
    if not hasattr(dg, "_rlpruner_shuffles"):
        dg._rlpruner_shuffles = shuffle_nodes(dg)
    return dg._rlpruner_shuffles


def shuffle_nodes(dg: tp.DependencyGraph) -> set:
    """The graph nodes of every channel shuffle (reshape, transpose or permute,
    reshape back, with copies in between): the graph cannot map channel indices
    across them, so no group that crosses one may be pruned."""
    found = set()
    for node in dg.module2node.values():
        if _op_name(node).startswith(("TransposeBackward", "PermuteBackward")):
            before = _reshape_chain(node, "inputs")
            after = _reshape_chain(node, "outputs")
            if before and after:
                found |= {node} | before | after
    return found


def split_nodes(dg: tp.DependencyGraph) -> set:
    """The graph nodes of every split along the channels (``torch.split``,
    ``torch.chunk``, ``Tensor.split``): the sizes of the parts are written in the
    model's code (or worked out from the tensor), so they do not follow a pruning
    that removes different numbers of channels from each part; no group that
    crosses one may be pruned (the layers after the split still prune)."""
    return {node for node in dg.module2node.values() if node.type == tp.ops.OPTYPE.SPLIT}


def _op_name(node) -> str:
    """The autograd function name torch-pruning kept for an element-wise op node."""
    if not isinstance(node.module, tp.ops._ElementWiseOp):
        return ""
    fn = node.module._grad_fn
    return fn if isinstance(fn, str) else type(fn).__name__


def _reshape_chain(node, direction: str, depth: int = 0) -> set:
    """Nodes from ``node`` (exclusive) to the nearest reshape along ``direction``
    through weightless single-tensor ops; empty when none is reached."""
    if depth > 4:
        return set()
    for nxt in getattr(node, direction):
        if nxt.type == tp.ops.OPTYPE.RESHAPE:
            return {nxt}
        if isinstance(nxt.module, tp.ops._ElementWiseOp) and len(getattr(nxt, direction)) == 1:
            rest = _reshape_chain(nxt, direction, depth + 1)
            if rest:
                return {nxt} | rest
    return set()


def _refuse_attention(model: nn.Module) -> None:
    # attention mixes tokens through its heads' channels; pruning it needs head-aware
    # grouping this project does not do (vision transformers are not CNNs)
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention) or (name and "attention" in type(module).__name__.lower()):
            raise ModelError(f"layer {name!r} ({type(module).__name__}) is attention, which this "
                             "CNN pruner does not support (vision transformers are refused)")


class _ChannelReshapeWatch(TorchFunctionMode):
    """Records the first view/reshape that splits or merges the channel axis of a
    feature map other than a flatten before a classifier (a channel shuffle does)."""

    def __init__(self, current):
        super().__init__()
        self.current, self.found = current, None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if (self.found is None and func in (torch.Tensor.view, torch.Tensor.reshape, torch.reshape)
                and torch.is_tensor(out) and torch.is_tensor(args[0])):
            before, after = tuple(args[0].shape), tuple(out.shape)
            flatten = len(after) == 2 and after[0] == before[0]
            if len(before) >= 3 and len(after) >= 3 and before[1] != after[1] and not flatten \
                    and not _splits_or_joins_channels(before, after):
                self.found = (self.current[-1] if self.current else "", before, after)
        return out


def _splits_or_joins_channels(before, after) -> bool:
    """(N, C, ...) <-> (N, G, C/G, ...): a channel shuffle's views, which are frozen
    rather than refused (see shuffle_nodes)."""
    longer, shorter = (after, before) if len(after) > len(before) else (before, after)
    return (len(longer) == len(shorter) + 1 and longer[0] == shorter[0]
            and longer[1] * longer[2] == shorter[1] and longer[3:] == shorter[2:])


def _refuse_channel_reshapes(model: nn.Module, example_inputs) -> None:
    current: list[str] = []

    def leave(module, args, output):   # (a hook's return value would replace the output)
        current.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(lambda m, a, n=name: current.append(n)))
        handles.append(module.register_forward_hook(leave))
    watch = _ChannelReshapeWatch(current)
    try:
        with torch.no_grad(), watch:
            model(example_inputs)
    except RuntimeError as exc:
        shape = list(example_inputs.shape) if torch.is_tensor(example_inputs) else "?"
        first = (str(exc).splitlines() or [""])[0][:160]
        raise ModelError(f"the model's forward fails on an input of shape {shape}: {first}") from None
    finally:
        for h in handles:
            h.remove()
    if watch.found is not None:
        layer, before, after = watch.found
        where = f"layer {layer!r}" if layer else "the model's own forward"
        raise ModelError(f"{where} reshapes the channel axis {list(before)} -> {list(after)} "
                         "(neither a flatten nor a channel shuffle), which the dependency graph cannot follow")


def output_layers(dg: tp.DependencyGraph) -> set[nn.Module]:
    """Every parametrised layer whose output channels reach the model's output
    unchanged in meaning: walking back from the graph's sinks through activations,
    pooling, reshapes, adds and concats, up to the first conv or linear."""
    found: set[nn.Module] = set()
    stack = [node for node in dg.module2node.values() if not node.outputs]
    seen = set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        module = node.module
        if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
            found.add(module)
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and not _one_axis(module):
                continue          # a two-sided layer sets its output channels itself
        stack.extend(node.inputs)
    return found


def _one_axis(module: nn.Module) -> bool:
    return (isinstance(module, nn.modules.conv._ConvNd) and module.groups > 1
            and module.groups == module.out_channels)


def inexact_reason(module, name: str) -> str:
    """Why zeroing ``module``'s channel slices does not equal removing them ("" if it does)."""
    if isinstance(module, CHANNEL_NORMS):
        return f"{type(module).__name__} {name!r} normalises over the channels"
    if isinstance(module, nn.Module) and not isinstance(module, EXACT_TYPES):
        return f"{type(module).__name__} {name!r} is not a layer whose channels masking can zero"
    return ""
