"""Any CNN a user brings is pruned exactly or refused with one line: the output
layer never loses outputs, masked scoring equals physical pruning or is not used,
grouped convolutions prune in whole positions, channel shuffles are frozen,
functional user code is followed. The slow test runs every torchvision classifier."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from rlpruner_ray.conformance import check_model, randomise_normalisation, torchvision_names
from rlpruner_ray.errors import ModelError, PlanError
from rlpruner_ray.graph import PruningGraph, group_widths
from rlpruner_ray.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# the models of the failures, and the user models written with functional code
FAST = ["tv:squeezenet1_1", "tv:convnext_tiny", "tv:resnext50_32x4d", "tv:regnet_x_400mf",
        "tv:shufflenet_v2_x0_5", "tv:mnasnet0_5",
        "tests.helpers_models:functional", "tests.helpers_models:conv_head", "tests.helpers_models:grouped"]


def _graph(name: str, size: int = 32) -> PruningGraph:
    torch.manual_seed(0)
    model = build_model(name, 10).eval()
    randomise_normalisation(model)
    return PruningGraph(model, torch.randn(1, 3, size, size))


@pytest.mark.parametrize("name", FAST)
def test_conforms(name):
    row = check_model(name)
    assert row["status"] == "ok", row["reason"]
    assert row["masked_vs_physical"] <= 1e-4
    assert row["groups"] > 0 and row["prunable_channels"] > 0


def test_output_layer_found_from_the_graph_keeps_its_outputs():
    """A conv classifier (squeezenet) and a classifier summed with a second conv:
    no group removes any of their output channels, whatever the plan."""
    for name, outputs in (("tv:squeezenet1_1", ["classifier.1"]),
                          ("tests.helpers_models:conv_head", ["classifier", "side"])):
        graph = _graph(name)
        modules = dict(graph.model.named_modules())
        for group in graph.groups:
            assert not any(s.side == "out" and s.module in {modules[o] for o in outputs} for s in group.slices)
        small = graph.prune(graph.plan(np.ones(graph.num_groups), graph.max_removable))
        with torch.no_grad():
            assert small(graph.example_inputs).shape == (1, 10)


def test_grouped_convolutions_prune_in_whole_positions():
    graph = _graph("tests.helpers_models:grouped")
    grouped = [g for g in graph.groups if g.unit > 1]
    assert [g.unit for g in grouped] == [4, 4]   # the grouped conv's input side and its output side
    g = graph.groups.index(grouped[0])
    with pytest.raises(PlanError, match="multiples of 4"):
        plan = np.zeros(graph.num_groups, np.int64)
        plan[g] = 3
        graph.masked(plan).__enter__()
    graph.compute_scores("l1")
    for share in (0.2, 0.5, 0.8):
        plan = graph.plan(np.ones(graph.num_groups), int(share * graph.max_removable))
        assert np.all(plan % graph.units == 0)
        graph.check_masking(plan)
        small = graph.prune(plan)
        assert small.grouped.groups == 4
        widths = group_widths(small, graph.keys)
        assert [widths[k] for k in graph.keys] == (graph.channels - plan).tolist()


def test_plans_with_grouped_groups_stay_close_to_the_asked_total():
    graph = _graph("tv:resnext50_32x4d")
    rng = np.random.default_rng(1)
    for n in (100, 1000, graph.max_removable // 2):
        plan = graph.plan(rng.dirichlet(np.ones(graph.num_groups)), n)
        assert np.all(plan % graph.units == 0) and np.all(plan <= graph.channels - graph.floors)
        assert abs(int(plan.sum()) - n) < graph.units.max(), n


def test_resnext_and_regnet_have_their_grouped_groups():
    for name in ("tv:resnext50_32x4d", "tv:regnet_x_400mf"):
        graph = _graph(name)
        assert graph.num_groups > 20 and (graph.units > 1).sum() >= 10, name


def test_layernorm_groups_are_scored_physically():
    """ConvNeXt: a LayerNorm over the channels counts zeroed channels, so its groups
    are named inexact and scored on the pruned model, equal to prune(plan); masking
    refuses a plan on them rather than score a different model."""
    graph = _graph("tv:convnext_tiny")
    assert not graph.masking_exact
    assert graph.exactness()["physical_groups"]
    assert all("LayerNorm" in reason for reason in graph.inexact.values())
    plan = graph.plan(np.ones(graph.num_groups), graph.max_removable // 3)
    with torch.no_grad():
        physical = graph.prune(plan)(graph.example_inputs)
        with graph.scored(plan) as model:
            assert model is not graph.model
            torch.testing.assert_close(model(graph.example_inputs), physical, atol=1e-4, rtol=0)
    exact_only = plan * np.array([not g.inexact for g in graph.groups])
    with graph.scored(exact_only) as model:
        assert model is graph.model          # masked in place where that is exact
    before = {k: v.clone() for k, v in graph.model.state_dict().items()}
    with pytest.raises(PlanError, match=r"masked\(plan\) would differ from prune\(plan\).*graph\.scored\(plan\)"):
        with graph.masked(plan):
            pass
    assert all(torch.equal(v, before[k]) for k, v in graph.model.state_dict().items())   # nothing zeroed
    one = np.zeros(graph.num_groups, np.int64)
    one[next(g for g, group in enumerate(graph.groups) if group.inexact)] = 1
    with pytest.raises(PlanError, match="LayerNorm"):      # one channel of one such group is enough
        graph.masked(one).__enter__()
    with torch.no_grad(), graph.masked(exact_only) as model:   # the exact groups still mask
        torch.testing.assert_close(model(graph.example_inputs), graph.prune(exact_only)(graph.example_inputs),
                                   atol=1e-4, rtol=0)


def test_layer_scale_parameters_are_masked_too():
    graph = _graph("tv:convnext_tiny")
    assert any(s.param is not None for g in graph.groups for s in g.extra)


def test_channel_shuffle_groups_are_frozen():
    graph = _graph("tests.helpers_models:functional")
    keys = set(graph.keys)
    assert {"left", "right", "stem"} & keys == {"stem"}   # left/right feed the shuffle: frozen
    assert {"se_reduce", "expand"} <= keys and {"pw", "skip", "se_expand"} & keys   # (one group: add, gate)


def test_unforeseen_mismatch_is_a_clear_error():
    with pytest.raises(ModelError, match="masked scoring differs from physical pruning"):
        _graph("tests.helpers_models:channel_centred")


@pytest.mark.parametrize("name,match", [
    ("tests.helpers_models:channel_fold", r"layer 'conv'|the model's own forward.*reshapes the channel axis"),
    ("tests.helpers_models:with_attention", r"layer 'attn' \(MultiheadAttention\) is attention"),
    ("tv:swin_v2_t", r"layer 'features.1.0.attn' \(ShiftedWindowAttentionV2\) is attention"),
])
def test_unsupported_patterns_are_refused_with_one_line(name, match):
    row = check_model(name)
    assert row["status"] == "refused" and "\n" not in row["reason"]
    with pytest.raises(ModelError, match=match):
        _graph(name)


def test_refused_model_is_one_cli_line_exit_2_nothing_written(tmp_path, capsys):
    from rlpruner_ray.cli import main
    out = tmp_path / "run"
    assert main(["-q", "compress", "--model", "tests.helpers_models:with_attention", "--out-dir", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("rlpruner")]
    assert len(err) == 1 and "is attention" in err[0]
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", torchvision_names())
def test_every_torchvision_classifier_conforms_or_is_refused(name):
    row = check_model(name)
    assert row["status"] in ("ok", "refused"), row["reason"]
    if row["status"] == "refused":
        assert "\n" not in row["reason"] and row["reason"]


@pytest.mark.parametrize("name", ["tests.helpers_models:grouped", "tests.helpers_models:functional",
                                  "tv:regnet_x_400mf"])
def test_batched_scoring_follows_grouped_convs_and_shuffles(name):
    from rlpruner_ray.batched import CandidateMasks
    graph = _graph(name)
    graph.compute_scores("l1")
    rng = np.random.default_rng(0)
    plans = [graph.plan(rng.dirichlet(np.ones(graph.num_groups)), graph.max_removable // d) for d in (2, 4)]
    x = torch.randn(2, 3, 32, 32)
    assert CandidateMasks(graph).check_exact(x, plans) <= 1e-4
