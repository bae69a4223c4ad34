"""PruningGraph: masked == pruned, exact restore, per-group widths, closed-form cost,
exclusions, chained pruning and history replay."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from rlpruner_ray.checkpoint import load_pruned, model_to_bytes

from rlpruner_ray.errors import ModelError
from rlpruner_ray.graph import HISTORY_ATTR, PruningGraph, replay_history
from rlpruner_ray.models import build_model, list_models



pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

NUM_CLASSES = 10
TV_MODELS = ["tv:resnet18", "tv:googlenet", "tv:mobilenet_v3_small", "tv:vgg11_bn", "tv:densenet121"]
# Big concat models run with one sample to stay fast on a small CPU.
BATCH_ONE = {"densenet121", "googlenet", "tv:densenet121", "tv:googlenet", "tv:vgg11_bn"}


def _stable_seed(name: str) -> int:
    return sum(ord(c) * (i + 1) for i, c in enumerate(name)) % 10_000


def _randomise_bn(model: nn.Module, seed: int) -> None:
    """Random BN affine params and running stats, with bounded activations.

    Affine params are drawn first, then the running stats are calibrated on one
    random batch (so deep residual nets do not blow up to 1e10 logits) and
    perturbed, so a zero-weight channel yields a non-zero BN output unless the
    BN itself is masked too.
    """
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        for bn in bns:
            n = bn.num_features
            if bn.affine:
                bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(n, generator=gen) * 0.5)
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average: one batch sets the stats exactly
        in_ch = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
        model.train()
        model(torch.randn(4, in_ch, 32, 32, generator=gen))
        for bn in bns:
            bn.momentum = 0.1
            n = bn.num_features
            std = bn.running_var.sqrt()
            bn.running_mean.add_(torch.randn(n, generator=gen) * 0.2 * std)
            bn.running_var.mul_(torch.rand(n, generator=gen) * 0.5 + 0.75)
    model.eval()


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _clone_state(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _width(module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    raise AssertionError(f"unexpected root module type {type(module).__name__}")


def _last_linear_name(model: nn.Module) -> str:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][-1]


@pytest.mark.parametrize("name", list_models() + TV_MODELS)
def test_masked_equals_pruned_and_cost(name):
    warnings.filterwarnings("ignore")
    seed = _stable_seed(name)
    torch.manual_seed(seed)
    model = build_model(name, NUM_CLASSES, 3)
    _randomise_bn(model, seed)
    batch = 1 if name in BATCH_ONE else 2
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed + 1))

    graph = PruningGraph(model, x)
    graph.compute_scores("l1")
    rng = np.random.default_rng(seed)
    dist = rng.dirichlet(np.ones(graph.num_groups))
    num_filters = int(rng.uniform(0.1, 0.6) * graph.max_removable)
    plan = graph.plan(dist, num_filters)
    assert plan.sum() == num_filters

    before_state = _clone_state(model)
    with torch.no_grad():
        original = model(x)
    small = graph.prune(plan)
    assert _state_equal(before_state, model.state_dict()), "prune() modified the original model"
    small.eval()

    with torch.no_grad():
        pruned_out = small(x)
        with graph.masked(plan) as masked_model:
            assert masked_model is model
            masked_out = model(x)
        restored = model(x)
    assert original.abs().max() < 1e3, "BN randomisation let the logits blow up"
    diff = (masked_out - pruned_out).abs().max().item()
    assert diff <= 1e-4, f"masked vs pruned logits differ by {diff}"
    # the mask actually changed something (it is not a no-op)
    assert not torch.allclose(masked_out, original)
    assert torch.equal(restored, original), "masked() did not restore the model exactly"
    assert _state_equal(before_state, model.state_dict())

    # every group's root lost exactly plan[g] channels; the classifier lost none
    orig_modules = dict(model.named_modules())
    small_modules = dict(small.named_modules())
    for group, k in zip(graph.groups, plan):
        assert _width(orig_modules[group.key]) == group.channels
        assert _width(small_modules[group.key]) == group.channels - int(k), group.key
    cls = _last_linear_name(model)
    assert small_modules[cls].out_features == NUM_CLASSES
    assert cls not in graph.keys

    # closed-form cost against torch-pruning's counter
    macs, params = tp.utils.count_ops_and_params(small, x)
    assert macs < graph.base_macs
    assert params < graph.base_params
    est_macs, est_params = graph.cost(plan)
    assert isinstance(est_macs, int) and isinstance(est_params, int)
    assert est_params == params                                         # exact, on every model
    if name in list_models():   # the project's zoo: MACs exact too (history.parquet == summary.json)
        assert est_macs == round(macs), (est_macs, macs)
    else:
        assert abs(est_macs - macs) / macs <= 0.03, (est_macs, macs)
    assert graph.cost(np.zeros(graph.num_groups)) == (graph.base_macs, graph.base_params)

    # the history recorded on the pruned copy is replayable on a fresh build
    history = getattr(small, HISTORY_ATTR)
    assert history and getattr(model, HISTORY_ATTR, []) == []

    # and the model file round-trips: same architecture, identical outputs
    loaded = load_pruned(model_to_bytes(small))
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned_out)


def _resnet20(seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet20", NUM_CLASSES, 3)
    _randomise_bn(model, seed)
    return model


def test_classifier_is_always_protected():
    model = _resnet20()
    x = torch.randn(2, 3, 32, 32)
    fc = _last_linear_name(model)
    graph = PruningGraph(model, x)
    assert fc not in graph.keys
    # even removing the maximum everywhere leaves the classifier whole
    plan = graph.plan(graph.initial_distribution(), graph.max_removable)
    small = graph.prune(plan)
    assert dict(small.named_modules())[fc].out_features == NUM_CLASSES
    assert small(x).shape == (2, NUM_CLASSES)
    assert all(dict(small.named_modules())[g.key].out_channels == 1 for g in graph.groups)


def test_exclude_keeps_layer_and_unknown_raises():
    model = _resnet20()
    x = torch.randn(2, 3, 32, 32)
    full = PruningGraph(model, x)
    # a conv inside a block (its out channels are not tied to the residual stream)
    name = "layer2.1.conv1"
    assert name in full.keys
    graph = PruningGraph(model, x, exclude=[name])
    assert name not in graph.keys
    assert graph.num_groups == full.num_groups - 1
    plan = graph.plan(graph.initial_distribution(), graph.max_removable)
    small = graph.prune(plan)
    before = dict(model.named_modules())[name].out_channels
    assert dict(small.named_modules())[name].out_channels == before
    # excluding a layer coupled to the residual stream drops that whole group
    stem = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    coupled = PruningGraph(model, x, exclude=[stem])
    assert coupled.num_groups == full.num_groups - 1 and stem not in coupled.keys
    small2 = coupled.prune(coupled.plan(coupled.initial_distribution(), coupled.max_removable))
    assert dict(small2.named_modules())[stem].out_channels == dict(model.named_modules())[stem].out_channels

    with pytest.raises(ModelError):
        PruningGraph(model, x, exclude=["no.such.layer"])


def test_chained_pruning_and_replay():
    warnings.filterwarnings("ignore")
    model = _resnet20(3)
    x = torch.randn(2, 3, 32, 32)
    rng = np.random.default_rng(3)

    g1 = PruningGraph(model, x)
    g1.compute_scores("l1")
    small1 = g1.prune(g1.plan(rng.dirichlet(np.ones(g1.num_groups)), g1.max_removable // 3))
    small1.eval()
    g2 = PruningGraph(small1, x)
    g2.compute_scores("l2")
    plan2 = g2.plan(rng.dirichlet(np.ones(g2.num_groups)), g2.max_removable // 3)
    assert plan2.sum() > 0
    small2 = g2.prune(plan2)
    small2.eval()

    h1 = getattr(small1, HISTORY_ATTR)
    h2 = getattr(small2, HISTORY_ATTR)
    assert len(h2) > len(h1) and h2[: len(h1)] == h1

    fresh = build_model("resnet20", NUM_CLASSES, 3)
    replayed = replay_history(fresh, x, h2)
    assert replayed is fresh
    shapes = {k: tuple(v.shape) for k, v in small2.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in replayed.state_dict().items()} == shapes
    replayed.load_state_dict(small2.state_dict())
    replayed.eval()
    with torch.no_grad():
        assert torch.equal(replayed(x), small2(x))
    assert getattr(replayed, HISTORY_ATTR) == h2
    # the replayed model can itself be pruned again
    # (every group stays, even one left with a single channel, so the number of
    # groups — the RL action size — never changes between steps)
    g3 = PruningGraph(replayed, x)
    left = {k: int(c - p) for k, c, p in zip(g2.keys, g2.channels, plan2)}
    assert dict(zip(g3.keys, g3.channels.tolist())) == left
    assert g3.max_removable == sum(c - 1 for c in left.values())


def test_prune_leaves_original_untouched():
    model = _resnet20(5)
    x = torch.randn(2, 3, 32, 32)
    state = _clone_state(model)
    graph = PruningGraph(model, x)
    graph.compute_scores("l1")
    small = graph.prune(graph.plan(graph.initial_distribution(), graph.max_removable // 2))
    assert _state_equal(state, model.state_dict())
    assert small is not model
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    assert not hasattr(model, HISTORY_ATTR)


def test_masked_restores_after_exception():
    model = _resnet20(6)
    x = torch.randn(2, 3, 32, 32)
    state = _clone_state(model)
    graph = PruningGraph(model, x)
    plan = graph.plan(graph.initial_distribution(), graph.max_removable // 2)
    with pytest.raises(RuntimeError, match="inside"):
        with graph.masked(plan):
            raise RuntimeError("inside")
    assert _state_equal(state, model.state_dict())


@pytest.mark.parametrize("name", ["resnet8", "mobilenetv3_small"])
def test_building_a_graph_leaves_a_training_model_unchanged(name):
    """Tracing and counting run forward passes; in training mode they would move
    BatchNorm's running statistics, so an uninterrupted run (model fresh from
    fine-tuning, in training mode) and a resumed one (model from its file) would
    prune different models."""
    from rlpruner_ray.measure import macs_params
    model = build_model(name, NUM_CLASSES, 3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    graph = PruningGraph(model, x)
    macs_params(model, x)
    graph.compute_scores("l1")
    graph.prune(graph.plan(graph.initial_distribution(), 4))
    moved = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert not moved, moved[:3]
    assert all(m.training for m in model.modules())


def test_masking_a_group_whose_members_each_hold_part_of_it_zeroes_the_planned_channels():
    """A depthwise conv after a concatenation couples both branches into one group; a
    plan's channels may fall in one branch or both, and masking must zero exactly
    those (it once zeroed the first k channels of every branch)."""
    from tests.helpers_models import concat_depthwise
    torch.manual_seed(0)
    model = concat_depthwise().eval()
    x = torch.randn(4, 3, 16, 16)
    graph = PruningGraph(model, x[:1])                      # its build-time check passes
    dw = graph.keys.index("dw")
    for scores, k in ((torch.arange(16.0), 3), (-torch.arange(16.0), 3),          # all in a, all in b
                      (torch.tensor([5.0, 0, 9, 9, 9, 9, 9, 9, 1, 9, 9, 9, 9, 2, 9, 9]), 4)):  # both
        graph.set_scores([scores if i == dw else torch.ones(c) for i, c in enumerate(graph.channels)], "test")
        plan = np.zeros(graph.num_groups, np.int64)
        plan[dw] = k
        with torch.no_grad():
            physical = graph.prune(plan).eval()(x)
            with graph.masked(plan) as masked:
                assert torch.allclose(masked(x), physical, atol=1e-5)
