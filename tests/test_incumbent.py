"""The incumbent rule: the best starting candidate stays unless the search's choice
wins a re-score on further validation images by a margin its standard error supports;
the re-score's passes are charged to the compute ledger."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

from rlpruner_ray import compute
from rlpruner_ray.config import CompressConfig
from rlpruner_ray.errors import ConfigError
from rlpruner_ray.incumbent import Rescorer, paired_comparison
from rlpruner_ray.problem import build_graph
from rlpruner_ray.search.base import Candidate, Evaluator, StepContext
from rlpruner_ray.search.registry import make_algorithm

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _candidate(counts, reward, source, iteration):
    counts = np.asarray(counts, dtype=np.int64)
    return Candidate(counts / max(counts.sum(), 1), counts, reward, reward, 0, 0, iteration, -1, source)


def _step(candidates, rescore, graph=None):
    """A step whose evaluator recorded ``candidates`` (in order) and whose context
    re-scores with ``rescore``."""
    evaluator = Evaluator(lambda items: [], len(candidates))
    for c in candidates:
        evaluator.record(c)
    return StepContext(0, 1, graph, np.random.default_rng(0), rescore=rescore), evaluator


def _correctness(n, both, only_incumbent, only_challenger):
    """Per-image correctness of two networks on ``n`` images: ``both`` right on the
    first images, then ``only_incumbent`` images, then ``only_challenger`` images."""
    inc, cha = torch.zeros(n, dtype=torch.bool), torch.zeros(n, dtype=torch.bool)
    inc[:both + only_incumbent] = True
    cha[:both] = True
    cha[both + only_incumbent: both + only_incumbent + only_challenger] = True
    return inc, cha


class FakeRescore:
    def __init__(self, incumbent, challenger):
        self.correct, self.asked = [incumbent, challenger], []

    def __call__(self, candidates):
        self.asked.append(list(candidates))
        return list(self.correct), {"disjoint": True, "macs": 0}


def _case(config, correct):
    incumbent = _candidate([2, 2, 0], 0.50, "tp-global", 0)
    challenger = _candidate([0, 2, 2], 0.57, "sample", 3)           # the higher cheap reward
    starting = [_candidate([1, 1, 2], 0.45, "uniform", 0), _candidate([2, 1, 1], 0.48, "global", 0), incumbent]
    rescore = FakeRescore(*correct)
    ctx, evaluator = _step([*starting, _candidate([1, 2, 1], 0.52, "sample", 1), challenger], rescore)
    applied = make_algorithm(config).keep_incumbent(ctx, evaluator, challenger)
    return applied, incumbent, challenger, ctx, rescore


def test_a_challenger_that_does_not_win_the_rescore_by_its_margin_is_not_applied():
    # 10 images more right out of 2048, with 50 images where the two disagree: s.e. 0.00345
    config = CompressConfig(algo="rlpruner", incumbent_rule=True, rescore_z=1.64)
    applied, incumbent, challenger, ctx, rescore = _case(config, _correctness(2048, 1000, 20, 30))
    assert rescore.asked == [[incumbent, challenger]]        # the best starting candidate is the incumbent
    assert applied is incumbent
    r = ctx.incumbent
    assert r["applied"] == "incumbent" and not r["challenger_wins"]
    assert r["difference"] == 10 / 2048 and r["images"] == 2048
    d = np.array([0.0] * 1998 + [-1.0] * 20 + [1.0] * 30)
    assert r["standard_error"] == pytest.approx(d.std(ddof=1) / math.sqrt(2048), rel=1e-12)
    assert r["incumbent_top1"] == 1020 / 2048 and r["challenger_top1"] == 1030 / 2048
    assert (r["incumbent_source"], r["challenger_source"]) == ("tp-global", "sample")
    assert (r["incumbent_reward"], r["challenger_reward"]) == (0.50, 0.57)


def test_a_challenger_that_clearly_wins_the_rescore_is_applied():
    config = CompressConfig(algo="random", incumbent_rule=True, rescore_z=1.64)
    applied, incumbent, challenger, ctx, _ = _case(config, _correctness(2048, 1000, 0, 200))
    assert applied is challenger
    assert ctx.incumbent["applied"] == "challenger" and ctx.incumbent["challenger_wins"]
    # the same margin with z large enough keeps the incumbent: the rule reads z
    applied, incumbent, *_ = _case(CompressConfig(algo="random", incumbent_rule=True, rescore_z=100.0),
                                   _correctness(2048, 1000, 0, 200))
    assert applied is incumbent


def test_without_the_rule_or_for_one_shot_methods_the_searchs_choice_is_applied():
    for config in (CompressConfig(algo="rlpruner"),                       # off by default
                   CompressConfig(algo="rlpruner", incumbent_rule=True, include_baselines=False),
                   CompressConfig(algo="global")):
        applied, _, challenger, ctx, rescore = _case(config, _correctness(2048, 1000, 0, 0))
        assert applied is challenger and rescore.asked == [] and ctx.incumbent is None


def test_the_incumbent_chosen_by_the_search_needs_no_rescore():
    incumbent = _candidate([2, 2, 0], 0.50, "global", 0)
    rescore = FakeRescore(*_correctness(10, 5, 0, 0))
    ctx, evaluator = _step([_candidate([1, 1, 2], 0.4, "uniform", 0), incumbent,
                            _candidate([0, 2, 2], 0.3, "sample", 1)], rescore)
    config = CompressConfig(incumbent_rule=True)
    assert make_algorithm(config).keep_incumbent(ctx, evaluator, incumbent) is incumbent
    assert rescore.asked == [] and ctx.incumbent["applied"] == "incumbent"


def test_paired_comparison_edge_cases():
    same = torch.tensor([True, False, True])
    r = paired_comparison(same, same, 0.0)
    assert r["difference"] == 0.0 and r["standard_error"] == 0.0 and not r["challenger_wins"]
    # every image better, no spread: wins at any z
    r = paired_comparison(torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool), 50.0)
    assert r["standard_error"] == 0.0 and r["challenger_wins"]
    # one image tells nothing
    r = paired_comparison(torch.tensor([False]), torch.tensor([True]), 0.0)
    assert r["standard_error"] is None and not r["challenger_wins"]
    with pytest.raises(ValueError):
        paired_comparison(torch.ones(3, dtype=torch.bool), torch.ones(4, dtype=torch.bool), 1.0)


def test_rescore_settings_are_validated():
    for bad in ({"rescore_samples": 0}, {"rescore_z": -1.0}, {"incumbent_rule": "yes"}):
        with pytest.raises(ConfigError):
            CompressConfig(**bad).validate()


def test_the_rescore_uses_fresh_validation_images_and_charges_its_passes(digits16, quick_resnet8):
    """The real re-score: images after the reward's, each network the one the step
    would apply at its pruned size, its BN recalibration included, all on the ledger;
    a challenger whose higher reward was luck (the same network as the incumbent) is
    not applied."""
    data, model = digits16, copy.deepcopy(quick_resnet8)
    config = CompressConfig(algo="rlpruner", incumbent_rule=True, image_size=16, reward_samples=64, rescore_samples=100,
                            reward_batch_size=32, bn_recalibration_batches=1)
    graph = build_graph(config, model, data, "cpu")
    ledger = compute.Ledger()
    rescorer = Rescorer(config, data, "cpu", ledger)
    val_x, val_y = next(data.batches("val", 10_000))
    fresh = min(100, len(val_y) - 64)
    assert rescorer.disjoint and len(rescorer.labels) == fresh
    assert torch.equal(rescorer.images, val_x[64:64 + fresh]) and torch.equal(rescorer.labels, val_y[64:64 + fresh])

    counts = graph.plan(graph.initial_distribution(), graph.max_removable // 2)
    incumbent = _candidate(counts, 0.50, "uniform", 0)
    lucky = _candidate(counts, 0.60, "sample", 1)            # the same network, a luckier reward
    ctx, evaluator = _step([incumbent, lucky], lambda cs: rescorer(graph, cs), graph)
    state = copy.deepcopy(model.state_dict())
    assert make_algorithm(config).keep_incumbent(ctx, evaluator, lucky) is incumbent
    r = ctx.incumbent
    assert r["images"] == fresh and r["difference"] == 0.0 and r["disjoint"]
    assert r["incumbent_top1"] == r["challenger_top1"]
    # two networks at their pruned size, each: one calibration batch of 32, then the fresh images
    per_network = compute.forward_macs(graph.cost(counts)[0], 32 + fresh)
    assert ledger.macs["rescore"] == r["macs"] == 2 * per_network
    assert sum(v for k, v in ledger.macs.items() if k != "rescore") == 0
    after = model.state_dict()                              # the base model is left as it was
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_a_validation_split_without_fresh_images_rescores_on_its_first(digits16):
    n_val = len(digits16.split("val"))
    config = CompressConfig(image_size=16, reward_samples=n_val, rescore_samples=20, bn_recalibration_batches=0)
    rescorer = Rescorer(config, digits16, "cpu", compute.Ledger())
    x, y = next(digits16.batches("val", 20))
    assert not rescorer.disjoint and torch.equal(rescorer.images, x) and torch.equal(rescorer.labels, y)
