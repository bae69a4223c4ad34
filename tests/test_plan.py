"""PruningGraph.plan: exact totals, capacities, floors, spill-over, rounding, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from rlpruner_ray.errors import PlanError
from rlpruner_ray.graph import PruningGraph
from rlpruner_ray.models import build_model

warnings.filterwarnings("ignore")
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture])
# Odd widths (not multiples of 8) so rounding and floors have something to do.
WIDTHS = (12, 20, 13, 40, 7, 30)


def _odd_cnn(widths=WIDTHS) -> nn.Module:
    layers, cin = [], 3
    for w in widths:
        layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU()]
        cin = w
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10)]
    return nn.Sequential(*layers)


def _graph(**kw) -> PruningGraph:
    torch.manual_seed(0)
    return PruningGraph(_odd_cnn(), torch.randn(1, 3, 16, 16), **kw)


@pytest.fixture(scope="module")
def graph():
    return _graph()


@pytest.fixture(scope="module")
def floored():
    # floors from both knobs: min 5 channels, and at most 60% of any group removed
    return _graph(min_channels=5, max_group_sparsity=0.6)


@pytest.fixture(scope="module")
def resnet_graph():
    torch.manual_seed(0)
    return PruningGraph(build_model("resnet20", 10, 3), torch.randn(1, 3, 32, 32))


def _dist(seed: int, n: int, sparse: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    d = rng.dirichlet(np.full(n, 0.3 if sparse else 1.0))
    if sparse:  # some exact zeros, never all
        d[rng.random(n) < 0.4] = 0.0
        if d.sum() == 0:
            d[rng.integers(n)] = 1.0
    return d


def test_graph_shape(graph, floored):
    assert sorted(graph.channels.tolist()) == sorted(WIDTHS)
    assert graph.floors.tolist() == [1] * len(WIDTHS)
    expected = [min(max(5, int(np.ceil(c * 0.4))), c) for c in floored.channels]
    assert floored.floors.tolist() == expected
    assert floored.max_removable == int((floored.channels - floored.floors).sum())


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), frac=st.floats(0.0, 1.0), sparse=st.booleans(),
       which=st.sampled_from(["graph", "floored", "resnet_graph"]))
def test_plan_sums_exactly_within_capacity(graph, floored, resnet_graph, seed, frac, sparse, which):
    g = {"graph": graph, "floored": floored, "resnet_graph": resnet_graph}[which]
    d = _dist(seed, g.num_groups, sparse)
    n = int(round(frac * g.max_removable))
    plan = g.plan(d, n)
    assert plan.shape == (g.num_groups,)
    assert np.issubdtype(plan.dtype, np.integer)
    assert int(plan.sum()) == n
    assert np.all(plan >= 0)
    assert np.all(plan <= g.channels - g.floors)          # never exceeds capacity
    assert np.all(g.channels - plan >= g.floors)           # floors respected
    # scale-invariant in the distribution
    assert np.array_equal(g.plan(d * 7.5, n), plan)
    # proportional when nothing is capped: within one filter of the exact share
    share = d / d.sum() * n
    if np.all(np.ceil(share) <= g.channels - g.floors):
        assert np.all(np.abs(plan - share) < 1.0), (plan, share)
    # a zero-weight group gets nothing unless the weighted groups are full
    cap = g.channels - g.floors
    if np.sum(np.minimum(cap, np.where(d > 0, cap, 0))) >= n:
        assert np.all(plan[d == 0] == 0)


def test_already_removed_shrinks_capacity(floored):
    g = floored
    done = (g.channels - g.floors) // 2
    cap = g.channels - g.floors - done
    for seed in range(10):
        d = _dist(seed, g.num_groups, sparse=seed % 2 == 1)
        n = int(cap.sum() * (seed + 1) / 10)
        plan = g.plan(d, n, already_removed=done)
        assert plan.sum() == n
        assert np.all(plan <= cap)
        assert np.all(g.channels - done - plan >= g.floors)
    with pytest.raises(PlanError):
        g.plan(g.initial_distribution(), int(cap.sum()) + 1, already_removed=done)


@pytest.mark.parametrize("fixture", ["graph", "floored"])
def test_one_hot_weight_spills_once_full(fixture, request):
    g = request.getfixturevalue(fixture)
    cap = g.channels - g.floors
    for k in range(g.num_groups):
        d = np.zeros(g.num_groups)
        d[k] = 1.0
        # below capacity: all on group k
        n_small = int(cap[k])
        plan = g.plan(d, n_small)
        assert plan[k] == n_small and plan.sum() == n_small
        # above capacity: group k full, the excess goes to the others
        n = int(cap[k]) + (g.max_removable - int(cap[k])) // 2
        plan = g.plan(d, n)
        assert plan[k] == cap[k]
        assert plan.sum() == n
        assert np.all(plan <= cap)
        others = np.delete(plan, k)
        assert others.sum() == n - cap[k]
        # the excess is spread, not dumped on a single group
        assert np.count_nonzero(others) >= min(2, g.num_groups - 1)
        # everything that can go does
        assert np.array_equal(g.plan(d, g.max_removable), cap)


@SETTINGS
@given(seed=st.integers(0, 2**31 - 1), frac=st.floats(0.0, 1.0), sparse=st.booleans(),
       which=st.sampled_from(["graph", "floored", "resnet_graph"]))
def test_round_to_8(graph, floored, resnet_graph, seed, frac, sparse, which):
    r = 8
    g = {"graph": graph, "floored": floored, "resnet_graph": resnet_graph}[which]
    d = _dist(seed, g.num_groups, sparse)
    n = int(round(frac * g.max_removable))
    plan = g.plan(d, n, round_to=r)
    cap = g.channels - g.floors
    assert np.all(plan >= 0) and np.all(plan <= cap)
    assert abs(int(plan.sum()) - n) <= r * g.num_groups
    widths = g.channels - plan
    for c, f, w in zip(g.channels, g.floors, widths):
        # a multiple of r (at least r) lies between the floor and the full width
        snappable = any(m >= f for m in range(r, int(c) + 1, r))
        if snappable:
            assert w % r == 0, (g.channels.tolist(), g.floors.tolist(), widths.tolist(), n)


def test_round_to_1_is_plain_plan(resnet_graph):
    g = resnet_graph
    for seed in range(5):
        d = _dist(seed, g.num_groups, False)
        n = g.max_removable // (seed + 2)
        assert np.array_equal(g.plan(d, n, round_to=1), g.plan(d, n))


def test_round_to_invalid(graph):
    with pytest.raises(PlanError):
        graph.plan(graph.initial_distribution(), 3, round_to=0)


@pytest.mark.parametrize("bad", [
    "short", "long", "nan", "inf", "neg_inf", "negative", "zeros",
])
def test_bad_distribution_raises(graph, bad):
    n = graph.num_groups
    d = {
        "short": np.ones(n - 1),
        "long": np.ones(n + 1),
        "nan": np.r_[np.ones(n - 1), np.nan],
        "inf": np.r_[np.ones(n - 1), np.inf],
        "neg_inf": np.r_[np.ones(n - 1), -np.inf],
        "negative": np.r_[np.ones(n - 1), -0.1],
        "zeros": np.zeros(n),
    }[bad]
    with pytest.raises(PlanError):
        graph.plan(d, 3)


def test_bad_num_filters_raises(graph, floored):
    for g in (graph, floored):
        d = g.initial_distribution()
        with pytest.raises(PlanError):
            g.plan(d, g.max_removable + 1)
        with pytest.raises(PlanError):
            g.plan(d, -1)
        assert g.plan(d, 0).sum() == 0
        assert np.array_equal(g.plan(d, g.max_removable), g.channels - g.floors)


def test_bad_graph_knobs():
    with pytest.raises(PlanError):
        _graph(min_channels=0)
    with pytest.raises(PlanError):
        _graph(max_group_sparsity=0.0)
    with pytest.raises(PlanError):
        _graph(max_group_sparsity=1.5)


def test_initial_distribution_is_proportional(graph, resnet_graph):
    for g in (graph, resnet_graph):
        d = g.initial_distribution()
        assert d.shape == (g.num_groups,)
        assert d.sum() == pytest.approx(1.0)
        np.testing.assert_allclose(d, g.channels / g.channels.sum())
        np.testing.assert_allclose(d / d[0], g.channels / g.channels[0])
        # plan from it removes about the same fraction of every group
        plan = g.plan(d, g.total_channels // 2)
        np.testing.assert_allclose(plan / g.channels, 0.5, atol=1.0 / g.channels.min() + 1e-9)


def test_round_to_adjusts_the_group_furthest_from_its_share():
    from rlpruner_ray.allocate import round_widths
    widths = np.array([64, 64, 64, 64])
    # snapped to multiples of 8 the plan removes 8 + 0 + 8 + 0 = 16 of 29: one more unit
    # of 8 goes to group 0, the one furthest below its share (12 vs 8), not to group 1,
    # the smallest count (0 vs a share of 3)
    share = np.array([12, 3, 11, 3])
    assert round_widths(share, widths, widths - 1, 8, 29).tolist() == [16, 0, 8, 0]
    # taking back (24 + 8 + 8 = 40 of 31): from group 1, furthest above its share
    # (8 vs 5), not from group 0, the largest count (24 vs 22)
    share = np.array([22, 5, 5, 0])
    assert round_widths(share, widths, widths - 1, 8, 31).tolist() == [24, 0, 8, 0]
