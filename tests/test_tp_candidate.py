"""Torch-Pruning's importance for every method (``--criterion tp-magnitude``), and the
searches' Torch-Pruning starting candidate carrying Torch-Pruning's own channels: its
reward is that of ``tp-global``'s network and applying it gives exactly that network."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from envs import LayerPruningEnv
from rlpruner_ray.config import CompressConfig
from rlpruner_ray.graph import PruningGraph
from rlpruner_ray.importance import tp_group_scores
from rlpruner_ray.model_store import make_payload
from rlpruner_ray.models import build_model
from rlpruner_ray.plans import BASELINE_SOURCES, apply_plan, baseline_plans, removed_channels
from rlpruner_ray.problem import build_graph, env_settings
from rlpruner_ray.search.base import Evaluator, StepContext, plans_for
from rlpruner_ray.search.registry import make_algorithm

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class Depthwise(nn.Module):
    """A depthwise-separable block: the stem's group reaches through the depthwise conv
    (its input and output channels are one), its BN and the pointwise conv's input."""

    def __init__(self, num_classes=10, in_channels=3):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.dw_bn = nn.BatchNorm2d(16)
        self.pw = nn.Conv2d(16, 24, 1, bias=False)
        self.pw_bn = nn.BatchNorm2d(24)
        self.dw2 = nn.Conv2d(24, 24, 3, stride=2, padding=1, groups=24, bias=False)
        self.dw2_bn = nn.BatchNorm2d(24)
        self.pw2 = nn.Conv2d(24, 32, 1, bias=False)
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = F.relu(self.stem_bn(self.stem(x)))
        x = F.relu(self.pw_bn(self.pw(F.relu(self.dw_bn(self.dw(x))))))
        x = F.relu(self.pw2(F.relu(self.dw2_bn(self.dw2(x)))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _randomised(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter drawn at random (BN scales too, which start all equal), so the
    project's l1 order and Torch-Pruning's differ."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p).abs() + 0.05 * torch.randn_like(p))
    return model.eval()


def _scored_nowhere(items: list) -> list[dict]:
    """An evaluator's score function that scores nothing (the channels are the point)."""
    return [{"reward": 0.0, "accuracy": 0.0, "macs": 0, "params": 0, "macs_executed": 0,
             "bn_recalibration_macs": 0, "worker_s": 0.0, "bn_recalibration_s": 0.0,
             "counts": np.asarray(i["counts"] if isinstance(i, dict) else i)} for i in items]


def _tp_global_candidate(graph, extras, score_fn):
    config = CompressConfig(algo="tp-global")
    evaluator = Evaluator(score_fn, 1)
    return make_algorithm(config).search(StepContext(0, 1, graph, np.random.default_rng(0), extras=extras),
                                         evaluator)


def _starting_tp_item(graph, extras):
    ctx = StepContext(0, 1, graph, np.random.default_rng(0), extras=extras)
    items = dict(baseline_plans(ctx, CompressConfig(algo="rlpruner")))
    assert list(items) == list(BASELINE_SOURCES) and not ctx.skipped
    return items["tp-global"]


@pytest.mark.parametrize("name", ["resnet8", "resnet20", "depthwise"])
def test_the_searches_torch_pruning_candidate_removes_tp_globals_channels(name):
    model = Depthwise() if name == "depthwise" else build_model(name, 10, 3)
    graph = PruningGraph(_randomised(model, 0), torch.randn(1, 3, 32, 32))
    graph.compute_scores("l1")
    extras = {"cost_target": {"kind": "macs", "value": 0.5 * graph.base_macs}, "num_filters": None}
    item = _starting_tp_item(graph, extras)
    tp_global = _tp_global_candidate(graph, extras, _scored_nowhere)
    # (the run's l1 order picks other channels for the same counts here, so the test can tell)
    assert graph.pruned_indices(item["counts"]) != tp_global.indices
    np.testing.assert_array_equal(item["counts"], tp_global.counts)
    assert removed_channels(graph, item["counts"], item.get("indices")) == tp_global.indices
    # the network the candidate stands for is tp-global's, weight for weight
    ours = apply_plan(graph, item["counts"], item.get("indices")).state_dict()
    theirs = apply_plan(graph, tp_global.counts, tp_global.indices).state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape and torch.equal(ours[k], theirs[k]) for k in ours)


def test_applying_the_searches_torch_pruning_candidate_gives_tp_globals_network_and_reward(
        digits16, quick_resnet8):
    """Through the real path: a search's starting candidates scored by an environment,
    the candidate carried by the Evaluator, applied as the pipeline applies it."""
    data, model = digits16, _randomised(copy.deepcopy(quick_resnet8), 1)
    config = CompressConfig(reward_samples=64, image_size=16, num_workers=1, algo="rlpruner",
                            bn_recalibration_batches=1, evaluations_per_step=3)
    graph = build_graph(config, model, data, "cpu")
    original = graph.sizes()
    context = {"step": 0, "num_steps": 1, "original": original, "num_filters": None,
               "cost_target": {"kind": "macs", "value": 0.5 * original["macs"]}}
    settings = env_settings(config)
    settings["payload"] = make_payload(model, graph, context, version=0)
    env = LayerPruningEnv(settings)

    def score(items):
        return env.evaluate_plans(plans_for(env, items))    # as an evaluation actor does

    extras = {k: context[k] for k in ("num_filters", "cost_target")}
    evaluator = Evaluator(score, 3)
    ctx = StepContext(0, 1, graph, np.random.default_rng(0), extras=extras)
    started = make_algorithm(config).starting_candidates(ctx, evaluator)
    ours = next(c for c in started if c.source == "tp-global")
    tp_global = _tp_global_candidate(graph, extras, score)
    assert graph.pruned_indices(ours.counts) != tp_global.indices     # l1 would prune others
    assert ours.indices == tp_global.indices
    assert ours.reward == tp_global.reward and ours.accuracy == tp_global.accuracy
    a = apply_plan(graph, ours.counts, ours.indices).state_dict()
    b = apply_plan(graph, tp_global.counts, tp_global.indices).state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


class KnownMagnitudes(nn.Module):
    """conv1 (1 -> 3 channels, 1x1) -> bn1 -> conv2 (3 -> 2, 1x1) -> linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 2, 1, bias=False)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.conv1.weight.copy_(torch.tensor([1.0, -2.0, 3.0]).view(3, 1, 1, 1))
            self.bn1.weight.copy_(torch.tensor([3.0, 1.0, -2.0]))
            # conv2's input columns: |.| sums 2, 4 and 30
            self.conv2.weight.copy_(torch.tensor([[1.0, -1.0, 10.0], [-1.0, 3.0, -20.0]]).view(2, 3, 1, 1))

    def forward(self, x):
        x = self.conv2(F.relu(self.bn1(self.conv1(x))))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def test_tp_magnitude_ranks_channels_as_torch_prunings_importance():
    graph = PruningGraph(KnownMagnitudes().eval(), torch.randn(1, 1, 4, 4))
    g = graph.keys.index("conv1")
    # Torch-Pruning: raw L1 per member summed over the group (conv1 out, bn1, conv2 in),
    # averaged over the 3 members, then divided by the group's mean
    raw = torch.tensor([1 + 3 + 2, 2 + 1 + 4, 3 + 2 + 30], dtype=torch.float32) / 3
    expected = raw / raw.mean()
    scores = graph.compute_scores("tp-magnitude")
    assert graph.criterion == "tp-magnitude"
    torch.testing.assert_close(scores[g], expected)
    assert graph.pruned_indices(np.eye(graph.num_groups, dtype=np.int64)[g]) [g] == [0]
    # the same vector as Torch-Pruning's importance object on every group
    for group, s in zip(graph.groups, scores):
        torch.testing.assert_close(s, tp_group_scores(graph.dg, group).float())
    # the project's l1 (each member divided by its mean) ranks channel 1 lowest instead
    l1 = graph.compute_scores("l1")[g]
    assert int(torch.argmin(l1)) == 1 and int(torch.argmin(scores[g])) == 0
