"""Compute accounting (rlpruner_ray/compute.py): hand counts on tiny models, the
scorer's per-candidate counts, and a whole compress run whose summary adds up
(stages sum to the total, KD compute is batches x the cost of one KD batch) and
that reads the test split's halves only in its final evaluation."""
from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn as nn

from rlpruner_ray import compute
from rlpruner_ray.data import Dataset, Split
from rlpruner_ray.train import TrainSettings, evaluate, finetune_kd, train_base

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# no biases and no activations: Torch-Pruning's counter then counts exactly the
# multiply-accumulates of the convolution and the linear layer
STUDENT_MACS = 2 * 2 * 2 * (1 * 3 * 3) + 8 * 3       # conv 1->2, 3x3 on 4x4 (2x2 out), linear 8->3: 96
TEACHER_MACS = 4 * 2 * 2 * (1 * 3 * 3) + 16 * 3      # conv 1->4, linear 16->3: 192


def _net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3, bias=False), nn.Flatten(), nn.Linear(width * 4, 3, bias=False))


def _tiny_data(n_train=10, n_val=5) -> Dataset:
    g = torch.Generator().manual_seed(0)

    def split(n):
        return Split(torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g), torch.arange(n) % 3)

    return Dataset("tiny", split(n_train), split(n_val), split(6), 3, 1, 4, (0.5,), (0.25,), False)


def test_model_macs_is_the_hand_count():
    example = torch.zeros(1, 1, 4, 4)
    assert compute.model_macs(_net(2), example) == STUDENT_MACS == 96
    assert compute.model_macs(_net(4), example) == TEACHER_MACS == 192


def test_batch_costs_by_hand():
    assert compute.forward_macs(96, 5) == 480
    assert compute.train_batch_macs(96, 5) == 480 * 3            # backward = 2 forwards
    assert compute.kd_batch_macs(96, 192, 5) == 5 * 192 + 5 * 96 * 3
    one = compute.kd_batch_compute(_net(2), _net(4), torch.zeros(1, 1, 4, 4), 5, base_macs=192)
    assert one == {"macs": 5 * 192 + 5 * 96 * 3, "forward_equivalents": (5 * 192 + 5 * 96 * 3) / 192}


def test_kd_fine_tuning_and_base_training_charge_exact_counts():
    data = _tiny_data()
    settings = TrainSettings(epochs=1, batch_size=4, lr=0.01, augment=False)
    ledger = compute.Ledger()
    result = finetune_kd(_net(2), _net(4), data, settings, ledger=ledger)
    # 10 training images in batches of 4, 4, 2; val (5 images) read before and after the epoch
    assert result.batches == 3
    assert ledger.macs["fine_tune"] == 10 * (TEACHER_MACS + 3 * STUDENT_MACS)
    assert ledger.macs["evaluation"] == 2 * 5 * STUDENT_MACS
    ledger = compute.Ledger()
    result = train_base(_net(2), data, settings, ledger=ledger)
    assert result.batches == 3
    assert ledger.macs["base_training"] == 10 * 3 * STUDENT_MACS
    assert ledger.macs["evaluation"] == 1 * 5 * STUDENT_MACS
    assert sum(v for k, v in ledger.macs.items() if k not in ("base_training", "evaluation")) == 0


def test_evaluate_charges_every_image_once():
    data, ledger = _tiny_data(), compute.Ledger()
    evaluate(_net(2), data, "test", batch_size=4, ledger=ledger)
    assert ledger.macs["evaluation"] == 6 * STUDENT_MACS


def test_counting_forwards_sees_every_pass_and_stops_after():
    model = _net(2)
    with compute.counting_forwards(model, 96) as counted:
        model(torch.zeros(3, 1, 4, 4))
        model(torch.zeros(2, 1, 4, 4))
    model(torch.zeros(7, 1, 4, 4))
    assert counted[0] == 5 * 96


def test_ledger_nested_times_do_not_count_twice_and_summary_adds_up():
    ledger = compute.Ledger({"macs": {"search": 7}, "wall": {"search": 1.0}})
    with ledger.timed("fine_tune"):
        with ledger.timed("evaluation"):
            pass
    assert ledger.wall["fine_tune"] >= 0 and ledger.wall["evaluation"] >= 0
    ledger.add("fine_tune", 5)
    s = ledger.summary(base_macs=4, wall_s=10.0)
    assert s["macs"] == 12 and s["forward_equivalents"] == 3.0 and s["wall_s"] == 10.0
    assert sum(v["macs"] for v in s["by_stage"].values()) == s["macs"]
    assert s["by_stage"]["search"] == {"macs": 7, "forward_equivalents": 1.75, "wall_s": 1.0}
    with pytest.raises(KeyError):
        ledger.add("nowhere", 1)


# ---------------------------------------------------------------------- the scorer
def test_scorer_counts_masked_candidates_at_the_base_models_full_size(digits16, quick_resnet8):
    from envs import LayerPruningEnv
    from rlpruner_ray.config import CompressConfig
    from rlpruner_ray.pipeline import build_graph
    from rlpruner_ray.search.workers import env_settings, make_payload
    model = copy.deepcopy(quick_resnet8)
    config = CompressConfig(reward_samples=144, reward_batch_size=48, bn_recalibration_batches=2, image_size=16)
    graph = build_graph(config, model, digits16, "cpu")
    context = {"step": 0, "num_steps": 1, "original": graph.sizes(), "num_filters": graph.total_channels // 4}
    env = LayerPruningEnv({**env_settings(config), "payload": make_payload(model, graph, context, version=0)})
    per_image = int(round(graph.base_macs))
    reward_images, bn_images = 144, 2 * 48
    plans = [env.plan_distribution(graph.initial_distribution()),
             env.plan_distribution(np.ones(graph.num_groups) / graph.num_groups)]
    first, second = env.evaluate_plans(plans)
    # the first candidate also carries the base model's reference pass on the reward images
    assert first["macs_executed"] == (reward_images + reward_images + bn_images) * per_image
    assert second["macs_executed"] == (reward_images + bn_images) * per_image
    assert first["bn_recalibration_macs"] == second["bn_recalibration_macs"] == bn_images * per_image
    again, = env.evaluate_plans(plans[:1])
    assert again["macs_executed"] == (reward_images + bn_images) * per_image


def test_batched_scoring_charges_each_candidate_its_share_of_the_pass(digits16, quick_resnet8):
    from envs import LayerPruningEnv
    from rlpruner_ray.config import CompressConfig
    from rlpruner_ray.pipeline import build_graph
    from rlpruner_ray.search.workers import env_settings, make_payload
    model = copy.deepcopy(quick_resnet8)
    config = CompressConfig(reward_samples=144, bn_recalibration_batches=0, scoring="batched",
                            candidates_per_pass=2, image_size=16)
    graph = build_graph(config, model, digits16, "cpu")
    context = {"step": 0, "num_steps": 1, "original": graph.sizes(), "num_filters": graph.total_channels // 4}
    env = LayerPruningEnv({**env_settings(config), "payload": make_payload(model, graph, context, version=0)})
    assert env.scorer.path == "batched"
    per_image = int(round(graph.base_macs))
    rng = np.random.default_rng(0)
    plans = [env.plan_distribution(rng.dirichlet(np.ones(graph.num_groups))) for _ in range(3)]
    results = env.evaluate_plans(plans)          # a pass of 2 candidates, then one of 1
    # set-up before the first: the base model's reference pass (144 images) and the
    # exactness check of the batched path (2 plans x 4 images, batched and masked)
    assert results[0]["macs_executed"] == (144 + 2 * 4 * 2 + 144) * per_image
    assert [r["macs_executed"] for r in results[1:]] == [144 * per_image] * 2
    assert all(r["bn_recalibration_macs"] == 0 for r in results)


# ---------------------------------------------------------------------- a whole run
@pytest.mark.slow
def test_compress_summary_adds_up_and_only_the_end_reads_the_test_halves(tmp_path, monkeypatch):
    from rlpruner_ray import pipeline
    from rlpruner_ray.config import CompressConfig
    reads, at_end = [], [False]
    batches, finish = Dataset.batches, pipeline.finish

    def spying_batches(self, split, *args, **kwargs):
        reads.append((split, at_end[0]))
        return batches(self, split, *args, **kwargs)

    def spying_finish(*args, **kwargs):
        at_end[0] = True
        return finish(*args, **kwargs)

    monkeypatch.setattr(Dataset, "batches", spying_batches)
    monkeypatch.setattr(pipeline, "finish", spying_finish)
    config = CompressConfig(out_dir=str(tmp_path / "run"), train_epochs=1, max_batches_per_epoch=2,
                            batch_size=64, sparsity=0.3, evaluations_per_step=4, samples_per_iteration=2,
                            finetune_epochs=1, num_workers=1, bn_recalibration_batches=1,
                            selection_fraction=0.5, seed=1, incumbent_rule=True)
    summary = pipeline.compress(config)

    # nothing but the final evaluation reads the test split or its halves; it reads each
    # half once per model (base and pruned) and never the whole test split
    assert all(at_end for split, at_end in reads if split in ("test", "selection", "final"))
    assert [s for s, _ in reads].count("selection") == 2 and [s for s, _ in reads].count("final") == 2
    assert "test" not in [s for s, _ in reads]
    assert 0 <= summary["pruned"]["selection_top1"] <= 1 and 0 <= summary["pruned"]["test_top1"] <= 1

    c = summary["compute"]
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())["compute"]
    assert on_disk == c
    base_macs = c["base_macs_per_image"]
    assert base_macs == int(round(summary["base"]["macs"]))
    assert sum(s["macs"] for s in c["by_stage"].values()) == c["macs"]
    assert c["forward_equivalents"] == c["macs"] / base_macs
    assert c["wall_s"] == summary["wall_seconds"]
    assert sum(s["wall_s"] for s in c["by_stage"].values()) <= c["wall_s"]
    for stage in ("base_training", "search", "bn_recalibration", "fine_tune", "evaluation"):
        assert c["by_stage"][stage]["macs"] > 0, stage
    # base training: 1 epoch of 2 full batches of 64, forward and backward
    assert c["by_stage"]["base_training"]["macs"] == 2 * compute.train_batch_macs(base_macs, 64)
    # KD: every batch full (max 2 of 64), the base model teaching the one pruned step's student
    step, = summary["steps"]
    student = int(round(summary["pruned"]["macs"]))
    assert step["finetune_batches"] == 2
    assert c["by_stage"]["fine_tune"]["macs"] == 2 * compute.kd_batch_macs(student, base_macs, 64)
    # the search's compute is what the candidates in history executed
    history = pq.read_table(tmp_path / "run" / "history.parquet").to_pylist()
    assert len(history) == 4
    assert sum(r["macs_executed"] for r in history) == (c["by_stage"]["search"]["macs"]
                                                        + c["by_stage"]["bn_recalibration"]["macs"])
    assert all(r["forward_equivalents"] == r["macs_executed"] / base_macs for r in history)
    # the incumbent rule's re-score (when the search's choice was not the incumbent) is
    # its own stage, exactly what the step record says it spent
    rule = step["incumbent_rule"]
    assert rule["incumbent_source"] in ("uniform", "global", "tp-global")
    assert c["by_stage"]["rescore"]["macs"] == rule.get("macs", 0)
    assert ("macs" in rule) == (rule["challenger_index"] != rule["incumbent_index"])
