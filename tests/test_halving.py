"""Successive halving: the best plans by reward (and the incumbent) re-scored on one
half of the re-score images, the best of them briefly KD fine-tuned and judged on
the other half; the winner's fine-tuned weights are the ones the step goes on from;
every stage's compute is on the ledger."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch

from rlpruner_ray import compute, halving
from rlpruner_ray.config import CompressConfig
from rlpruner_ray.errors import ConfigError
from rlpruner_ray.incumbent import Rescorer
from rlpruner_ray.plans import apply_plan
from rlpruner_ray.problem import build_graph
from rlpruner_ray.search.base import Candidate
from rlpruner_ray.search.registry import make_algorithm

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def _candidate(counts, reward, source, index, iteration=1):
    counts = np.asarray(counts, dtype=np.int64)
    return Candidate(counts / max(counts.sum(), 1), counts, reward, reward, 0, 0, iteration, index, source)


def _config(**kw):
    return CompressConfig(algo="rlpruner", halving=True, image_size=16, reward_samples=64, rescore_samples=200,
                          reward_batch_size=32, bn_recalibration_batches=1, batch_size=32, halving_top=3,
                          halving_finalists=2, halving_kd_batches=2, **kw)


@pytest.fixture()
def step(digits16, quick_resnet8):
    """A step's graph on the trained ResNet-8 and six candidates: the incumbent (a
    starting candidate with the lowest reward), and five samples of which two are
    the same network."""
    model = copy.deepcopy(quick_resnet8)
    graph = build_graph(_config(), model, digits16, "cpu")
    rng = np.random.default_rng(3)
    half = graph.max_removable // 2
    plans = [graph.plan(rng.dirichlet(np.ones(graph.num_groups)), half) for _ in range(4)]
    candidates = [_candidate(graph.plan(graph.initial_distribution(), half), 0.30, "uniform", 0, iteration=0),
                  _candidate(plans[0], 0.60, "sample", 1), _candidate(plans[0], 0.58, "sample", 2),
                  _candidate(plans[1], 0.55, "sample", 3), _candidate(plans[2], 0.50, "sample", 4),
                  _candidate(plans[3], 0.40, "sample", 5)]
    return graph, candidates, model


def test_the_shortlist_keeps_one_candidate_per_network_best_reward_first(step):
    graph, candidates, _ = step
    assert [c.index for c in halving.shortlist(graph, candidates, 3)] == [1, 3, 4]
    assert [c.index for c in halving.shortlist(graph, candidates, 10)] == [1, 3, 4, 5, 0]


def test_the_stages_read_disjoint_images_and_the_winner_keeps_its_fine_tuned_weights(step, digits16):
    graph, candidates, model = step
    config, ledger = _config(), compute.Ledger()
    rescorer = Rescorer(config, digits16, "cpu", ledger)
    first, second = rescorer.halves()
    assert (first.start, first.stop, second.start, second.stop) == (0, 40, 40, 80)   # 144 val - 64 reward
    state = copy.deepcopy(model.state_dict())
    picked = halving.select(config, graph, candidates, rescorer, model, digits16, "cpu", ledger, seed=5)
    r = picked.record

    # stage 1: the 3 best distinct plans by reward and the incumbent, on the first half
    assert [row["index"] for row in r["stage1"]] == [1, 3, 4, 0]
    check = Rescorer(config, digits16, "cpu", compute.Ledger())
    for row in r["stage1"]:
        c = candidates[row["index"]]
        hits = check.correct(apply_plan(graph, c.counts), graph.cost(c.counts)[0], part=first)
        assert row["top1"] == float(hits.double().mean())
    # stage 2: the 2 best of stage 1 (reward order on ties) and the incumbent, on the second half
    order = sorted(r["stage1"], key=lambda row: -row["top1"])
    expected = [row["index"] for row in order[:2]]
    expected += [0] if 0 not in expected else []
    assert [row["index"] for row in r["stage2"]] == expected and r["stage2_images"] == 40
    best = max(r["stage2"], key=lambda row: row["top1"])
    assert picked.chosen is candidates[best["index"]] and r["winner_index"] == best["index"]

    # the winner's network is its short fine-tune's (the same again gives the same weights)
    again, hits = halving._short_finetune(config, graph, picked.chosen, check, second, model, digits16, "cpu",
                                          compute.Ledger(), 5, "")
    mine, theirs = picked.model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert r["winner_top1"] == float(hits.double().mean())
    untuned = apply_plan(graph, picked.chosen.counts).state_dict()
    assert any(not torch.equal(untuned[k], mine[k]) for k in mine if k.endswith("weight"))

    # compute: stage 1 on the ledger's rescore, stage 2's KD and passes on selection_kd
    base_macs = int(round(graph.cost(np.zeros(graph.num_groups, dtype=np.int64))[0]))
    cost = {c.index: int(round(graph.cost(c.counts)[0])) for c in candidates}
    assert ledger.macs["rescore"] == sum(compute.forward_macs(cost[row["index"]], 32 + 40) for row in r["stage1"])
    assert ledger.macs["selection_kd"] == sum(
        2 * compute.kd_batch_macs(cost[row["index"]], base_macs, 32) + compute.forward_macs(cost[row["index"]], 40)
        for row in r["stage2"])
    assert sum(v for k, v in ledger.macs.items() if k not in ("rescore", "selection_kd")) == 0
    after = model.state_dict()                               # the base model (the teacher) is unchanged
    assert all(torch.equal(state[k], after[k]) for k in state)


def test_with_the_incumbent_rule_a_finalist_must_beat_the_incumbent_in_the_paired_test(step, digits16,
                                                                                        monkeypatch):
    graph, candidates, model = step
    n = 40

    def short(config, graph, candidate, *args):
        hits = torch.zeros(n, dtype=torch.bool)
        hits[: 20 + (2 if candidate.index != 0 else 0)] = True    # the samples: 2 more images right
        return None, hits

    monkeypatch.setattr(halving, "_short_finetune", short)
    for rule, winner in ((False, "sample"), (True, "uniform")):
        config = _config(incumbent_rule=rule)
        picked = halving.select(config, graph, candidates, Rescorer(config, digits16, "cpu", compute.Ledger()),
                                model, digits16, "cpu", compute.Ledger(), seed=0)
        assert picked.chosen.source == winner
        assert ("incumbent_test" in picked.record) is rule


def test_halving_is_for_searches_and_its_settings_are_validated():
    assert make_algorithm(CompressConfig(algo="rlpruner", halving=True)).selects_by_halving
    assert not make_algorithm(CompressConfig(algo="rlpruner")).selects_by_halving        # off by default
    assert not make_algorithm(CompressConfig(algo="global", halving=True)).selects_by_halving
    for bad in ({"halving_top": 0}, {"halving_finalists": 0}, {"halving_kd_batches": 0}, {"halving": "yes"}):
        with pytest.raises(ConfigError):
            CompressConfig(**bad).validate()


@pytest.mark.slow
def test_the_step_fine_tunes_the_network_that_won_the_selection(tmp_path, base_checkpoint, monkeypatch):
    """End to end: the step's KD starts from the selection's fine-tuned network (not a
    fresh copy of the plan), and the step's record and compute show the stages."""
    from rlpruner_ray import pipeline
    picked, students = [], []
    select, finetune = halving.select, pipeline.finetune_kd

    def spying_select(*args, **kwargs):
        picked.append(select(*args, **kwargs))
        return picked[-1]

    def spying_finetune(student, *args, **kwargs):
        students.append(student)
        return finetune(student, *args, **kwargs)

    monkeypatch.setattr(halving, "select", spying_select)
    monkeypatch.setattr(pipeline, "finetune_kd", spying_finetune)
    config = CompressConfig(out_dir=str(tmp_path / "run"), base_checkpoint=str(base_checkpoint), image_size=16,
                            max_batches_per_epoch=2, batch_size=64, sparsity=0.3, evaluations_per_step=6,
                            samples_per_iteration=2, finetune_epochs=1, num_workers=1, bn_recalibration_batches=1,
                            reward_samples=64, halving=True, halving_top=2, halving_kd_batches=2, seed=1)
    summary = pipeline.compress(config)
    assert len(picked) == 1 and students and students[0] is picked[0].model
    step, = summary["steps"]
    assert step["halving"]["winner_index"] == picked[0].chosen.index
    assert step["counts"] == picked[0].chosen.counts.tolist()
    by_stage = summary["compute"]["by_stage"]
    assert by_stage["rescore"]["macs"] > 0 and by_stage["selection_kd"]["macs"] > 0


def test_the_actors_hits_become_a_tensor_of_their_own():
    """Ray hands numpy arrays back read-only; the hits tensor must not share their memory."""
    hits = np.array([1, 0, 1], dtype=np.int64)
    hits.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mine = halving.own_tensor(hits)
    mine += 1
    assert hits.tolist() == [1, 0, 1] and mine.tolist() == [2, 1, 2]


@pytest.mark.slow
def test_the_short_fine_tunes_on_the_evaluation_actors_give_the_drivers_networks(step, digits16, ray_session):
    """Stage 2 spread over the run's evaluation actors (each holds the base model, its
    graph and the data) chooses the same plan, with the same weights and compute, as
    the driver does alone."""
    ray = ray_session
    from rlpruner_ray.search.workers import EvaluationPool, make_payload, start_store
    graph, candidates, model = step
    config = _config(num_workers=2)
    context = {"step": 0, "num_steps": 1, "original": graph.sizes(), "num_filters": graph.max_removable // 2}
    store, store_name = start_store()
    pool = None
    try:
        ray.get(store.publish.remote(make_payload(model, graph, context, version=0)))
        pool = EvaluationPool(config, store_name)
        picked = {}
        for where in ("driver", "actors"):
            ledger = compute.Ledger()
            picked[where] = (halving.select(config, graph, candidates, Rescorer(config, digits16, "cpu", ledger),
                                            model, digits16, "cpu", ledger, seed=5,
                                            pool=pool if where == "actors" else None, version=0), ledger)
        (mine, mine_ledger), (theirs, their_ledger) = picked["driver"], picked["actors"]
        assert theirs.record == mine.record and theirs.chosen is mine.chosen
        a, b = mine.model.state_dict(), theirs.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k].to(a[k].device)) for k in a)
        assert their_ledger.macs == mine_ledger.macs
        assert len({d["pid"] for d in pool.describe()}) == 2
    finally:
        if pool is not None:
            pool.close()
        ray.kill(store)
