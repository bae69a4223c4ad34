"""Importance criteria: a masked (zeroed) channel ranks last, random is seeded,
fpgm is finite, errors, and taylor's side effects (grads, BN stats)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from rlpruner_ray.errors import ConfigError
from rlpruner_ray.graph import PruningGraph
from rlpruner_ray.importance import CRITERIA
from rlpruner_ray.models import build_model

warnings.filterwarnings("ignore")


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _bns(model):
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _resnet20(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("resnet20", 10, 3)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial BN so a zeroed conv channel alone would not vanish
        for bn in _bns(model):
            n = bn.num_features
            bn.weight.copy_(torch.rand(n, generator=gen) + 0.5)
            bn.bias.copy_(torch.randn(n, generator=gen) * 0.2)
            bn.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            bn.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def setup():
    model = _resnet20()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([3, 7])
    return model, PruningGraph(model, x), x, y


# (group key, channel): an in-block conv and the residual-stream group of stage 2
TARGETS = [("layer2.1.conv1", 5), ("layer2.0.shortcut.0", 17)]


@pytest.mark.parametrize("key,channel", TARGETS)
@pytest.mark.parametrize("criterion", ["taylor", "l1", "l2"])
def test_masked_channel_ranks_last(setup, criterion, key, channel):
    model, graph, x, y = setup
    g = graph.keys.index(key)
    assert graph.channels[g] > channel + 1
    # scores that make `channel` the least important of group g
    scores = [torch.ones(int(c)) for c in graph.channels]
    scores[g] = torch.linspace(1.0, 2.0, int(graph.channels[g]))
    scores[g][channel] = -1.0
    graph.set_scores(scores, criterion="manual")
    plan = np.zeros(graph.num_groups, dtype=np.int64)
    plan[g] = 1
    assert graph.pruned_indices(plan)[g] == [channel]

    root = graph.groups[g].root_module
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with graph.masked(plan):
        # the expected channel, and only it, is zeroed in the root
        w = root.weight.detach()
        assert torch.count_nonzero(w[channel]) == 0
        others = torch.cat([w[:channel], w[channel + 1:]])
        assert bool((others.flatten(1).abs().sum(1) > 0).all())
        result = graph.compute_scores(criterion, x, y)
        s = result[g]
        assert s.shape == (graph.channels[g],)
        assert torch.isfinite(s).all()
        assert int(torch.argmin(s)) == channel
        assert s[channel] < torch.cat([s[:channel], s[channel + 1:]]).min()
    assert graph.criterion == criterion
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # outside the mask the channel is no longer special for the weight criteria
    if criterion != "taylor":
        s = graph.compute_scores(criterion)[g]
        assert s[channel] > 0


def test_unmasked_scores_shapes_all_criteria(setup):
    model, graph, x, y = setup
    for criterion in CRITERIA:
        scores = graph.compute_scores(criterion, x, y)
        assert len(scores) == graph.num_groups
        for s, c in zip(scores, graph.channels):
            assert s.shape == (c,)
            assert torch.isfinite(s).all()
            if criterion != "random":
                assert (s >= 0).all()


def test_random_is_seeded(setup):
    model, graph, x, y = setup
    a = graph.compute_scores("random", seed=11)
    b = graph.compute_scores("random", seed=11)
    c = graph.compute_scores("random", seed=12)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert any(not torch.equal(p, q) for p, q in zip(a, c))
    assert all(p.shape == (int(n),) for p, n in zip(a, graph.channels))
    # the order used for pruning follows the latest scores (seed 12)
    plan = np.minimum(graph.channels - 1, 3)
    for g, idx in enumerate(graph.pruned_indices(plan)):
        assert idx == sorted(torch.argsort(c[g], stable=True)[: plan[g]].tolist())


def test_fpgm_finite_right_length(setup):
    model, graph, x, y = setup
    scores = graph.compute_scores("fpgm")
    assert len(scores) == graph.num_groups
    for s, c in zip(scores, graph.channels):
        assert s.shape == (int(c),)
        assert torch.isfinite(s).all()
        assert s.std() > 0  # not a constant placeholder


def test_fpgm_on_depthwise_model():
    torch.manual_seed(0)
    model = build_model("mobilenetv3_small", 10, 3).eval()
    graph = PruningGraph(model, torch.randn(1, 3, 32, 32))
    scores = graph.compute_scores("fpgm")
    assert [s.shape[0] for s in scores] == graph.channels.tolist()
    assert all(torch.isfinite(s).all() for s in scores)


def test_unknown_criterion(setup):
    model, graph, x, y = setup
    with pytest.raises(ConfigError):
        graph.compute_scores("magnitude", x, y)
    with pytest.raises(ConfigError):
        graph.compute_scores("", x, y)


def test_taylor_needs_a_batch(setup):
    model, graph, x, y = setup
    with pytest.raises(ConfigError):
        graph.compute_scores("taylor")
    with pytest.raises(ConfigError):
        graph.compute_scores("taylor", x, None)
    with pytest.raises(ConfigError):
        graph.compute_scores("taylor", None, y)


def test_taylor_side_effects():
    model = _resnet20(4)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([0, 9])
    graph = PruningGraph(model, x)
    model.train()
    bn_stats = [(b.running_mean.clone(), b.running_var.clone(), b.num_batches_tracked.clone())
                for b in _bns(model)]
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    with torch.no_grad():  # works even when called under no_grad
        scores = graph.compute_scores("taylor", x, y)
    assert model.training, "taylor must restore train mode"
    assert all(p.grad is None for p in model.parameters()), "taylor left gradients behind"
    for b, (m, v, n) in zip(_bns(model), bn_stats):
        assert torch.equal(b.running_mean, m) and torch.equal(b.running_var, v)
        assert torch.equal(b.num_batches_tracked, n)
    assert all(torch.equal(params[k], v) for k, v in model.named_parameters())
    assert any(float(s.abs().sum()) > 0 for s in scores)
    # deterministic for a fixed batch
    again = graph.compute_scores("taylor", x, y)
    assert all(torch.allclose(a, b) for a, b in zip(scores, again))
    # eval mode stays eval
    model.eval()
    graph.compute_scores("taylor", x, y)
    assert not model.training
