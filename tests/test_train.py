"""Tests for rlpruner_ray.train: schedule, real training, KD recovery, evaluation, settings errors."""

import copy
import math

import pytest
import torch
from torch import nn

from rlpruner_ray.data import load_dataset
from rlpruner_ray.errors import ConfigError
from rlpruner_ray.train import TrainSettings, evaluate, finetune_kd, lr_at, train_base

from .conftest import TEST_SEED

FAST = dict(batch_size=64, lr=0.1, augment=False)


def tiny_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", image_size=8)


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(TEST_SEED)
    model = tiny_cnn()
    rows = []
    result = train_base(model, digits, TrainSettings(epochs=6, seed=TEST_SEED, **FAST), on_epoch=rows.append)
    return model, result, rows


# ------------------------------------------------------------------ schedule

def test_lr_warmup_then_cosine():
    base, low = 0.1, 1e-4
    assert lr_at(0, 100, base, 0.1, low) == pytest.approx(0.01)
    assert lr_at(4, 100, base, 0.1, low) == pytest.approx(0.05)
    assert lr_at(9, 100, base, 0.1, low) == pytest.approx(base)
    assert lr_at(10, 100, base, 0.1, low) == pytest.approx(base)
    assert lr_at(55, 100, base, 0.1, low) == pytest.approx((base + low) / 2)
    assert lr_at(100, 100, base, 0.1, low) == pytest.approx(low)
    after = [lr_at(s, 100, base, 0.1, low) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(after, after[1:]))


def test_lr_without_warmup_starts_at_base():
    assert lr_at(0, 50, 0.2, 0.0, 0.0) == pytest.approx(0.2)
    assert lr_at(50, 50, 0.2, 0.0, 0.0) == pytest.approx(0.0, abs=1e-12)


def test_lr_bad_steps():
    with pytest.raises(ConfigError, match="total_steps"):
        lr_at(0, 0, 0.1, 0.1, 0.0)
    with pytest.raises(ConfigError, match="step"):
        lr_at(-1, 10, 0.1, 0.1, 0.0)


# ------------------------------------------------------------------ training

def test_train_base_learns_digits(trained, digits):
    model, result, rows = trained
    assert result.best_val_top1 > 0.5                    # learned: well above chance (0.1)
    assert len(result.epochs) == 6 and rows == result.epochs
    assert set(rows[0]) == {"epoch", "lr", "train_loss", "val_top1", "val_loss", "seconds"}
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert rows[-1]["lr"] < rows[0]["lr"]
    best = max(rows, key=lambda r: r["val_top1"])
    assert result.best_epoch == best["epoch"] and result.best_val_top1 == best["val_top1"]
    # The best epoch's weights are the ones left in the model.
    assert evaluate(model, digits)["top1"] == pytest.approx(result.best_val_top1)


def test_train_is_deterministic(digits):
    histories = []
    for _ in range(2):
        torch.manual_seed(1)
        model = tiny_cnn()
        settings = TrainSettings(epochs=2, max_batches_per_epoch=4, seed=3, batch_size=32, lr=0.05)
        result = train_base(model, digits, settings)
        histories.append([(r["train_loss"], r["val_top1"]) for r in result.epochs])
    assert histories[0] == histories[1]


def test_zero_epochs_only_evaluates(trained, digits):
    model = copy.deepcopy(trained[0])
    before = [p.clone() for p in model.parameters()]
    result = train_base(model, digits, TrainSettings(epochs=0))
    assert result.epochs == [] and result.best_epoch == 0
    assert result.best_val_top1 == pytest.approx(evaluate(model, digits)["top1"])
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ------------------------------------------------------------------ distillation

def damaged_copy(model):
    """Zero half the filters of both convs (and their BN shifts) to destroy accuracy."""
    student = copy.deepcopy(model)
    with torch.no_grad():
        for conv, bn in ((student[0], student[1]), (student[3], student[4])):
            half = conv.out_channels // 2
            conv.weight[half:] = 0
            conv.bias[half:] = 0
            bn.weight[half:] = 0
            bn.bias[half:] = 0
    return student


def test_finetune_kd_recovers_accuracy(trained, digits):
    teacher = trained[0]
    student = damaged_copy(teacher)
    damaged = evaluate(student, digits)["top1"]
    result = finetune_kd(student, teacher, digits, TrainSettings(epochs=3, batch_size=64, lr=0.02, augment=False))
    recovered = evaluate(student, digits)["top1"]
    # the best epoch's weights are kept, and epoch 0 (the given weights) is a
    # candidate: never worse than the damaged copy, by construction
    assert recovered == pytest.approx(result.best_val_top1) and recovered >= damaged
    assert recovered > 0.5                               # learned: well above chance (0.1)
    assert len(result.epochs) == 3 and result.epochs[-1]["train_loss"] < result.epochs[0]["train_loss"]


def test_finetune_kd_keeps_original_when_training_hurts(trained, digits):
    teacher = trained[0]
    student = copy.deepcopy(teacher)
    original = {k: v.clone() for k, v in student.state_dict().items()}
    start = evaluate(student, digits)["top1"]
    # An absurd learning rate wrecks the weights; epoch 0 (the given weights) must win.
    result = finetune_kd(student, teacher, digits, TrainSettings(epochs=2, batch_size=64, lr=50.0, min_lr=0.0,
                                                                 warmup_fraction=0.0, augment=False))
    assert result.best_epoch == 0 and result.best_val_top1 == pytest.approx(start)
    assert all(torch.equal(original[k], v) for k, v in student.state_dict().items())


@pytest.mark.parametrize("temperature, alpha", [(2.0, 0.25), (4.0, 0.0), (1.0, 1.0)])
def test_finetune_kd_loss_formula(digits, temperature, alpha):
    torch.manual_seed(2)
    student = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    teacher = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    settings = TrainSettings(epochs=1, max_batches_per_epoch=1, batch_size=64, lr=1e-9, min_lr=0.0,
                             augment=False, seed=4)
    # The reported train loss of a one-batch epoch is the loss of that batch before the step.
    x, y = next(digits.batches("train", 64, shuffle=True, generator=torch.Generator().manual_seed(4)))
    with torch.no_grad():
        s_logits, t_logits = student(x), teacher(x)
        p_t = torch.softmax(t_logits / temperature, dim=1)
        kl = (p_t * (p_t.log() - torch.log_softmax(s_logits / temperature, dim=1))).sum(1).mean()
        ce = nn.functional.cross_entropy(s_logits, y)
    expected = (1 - alpha) * temperature ** 2 * kl + alpha * ce
    result = finetune_kd(student, teacher, digits, settings, temperature=temperature, alpha=alpha)
    assert result.epochs[0]["train_loss"] == pytest.approx(float(expected), rel=1e-4)


def test_finetune_kd_restores_teacher_mode(trained, digits):
    teacher = copy.deepcopy(trained[0]).train()
    student = copy.deepcopy(trained[0])
    finetune_kd(student, teacher, digits, TrainSettings(epochs=1, max_batches_per_epoch=2, lr=0.01, augment=False))
    assert teacher.training


# ------------------------------------------------------------------ evaluation

def test_evaluate_is_sane(trained, digits):
    model = trained[0].train()
    stats = evaluate(model, digits, "test")
    assert model.training  # mode restored
    assert stats["n"] == len(digits.test)
    assert 0.0 <= stats["top1"] <= stats["top5"] <= 1.0
    assert stats["top1"] > 0.5                           # the trained model: well above chance
    assert math.isfinite(stats["loss"]) and stats["loss"] > 0
    assert evaluate(model, digits, "val", batch_size=16, limit=2)["n"] == 32


# ------------------------------------------------------------------ settings errors

@pytest.mark.parametrize("field, value", [
    ("epochs", -1), ("epochs", 1.5), ("batch_size", 0), ("lr", 0.0), ("lr", -0.1), ("lr", float("nan")),
    ("warmup_fraction", 1.0), ("warmup_fraction", -0.1), ("momentum", 1.0), ("weight_decay", -1.0),
    ("min_lr", 1.0), ("max_batches_per_epoch", 0), ("max_batches", 0), ("device", "not-a-device"),
])
def test_bad_settings(digits, field, value):
    settings = TrainSettings(**{"epochs": 1, field: value})
    with pytest.raises(ConfigError, match=field.split("_per")[0] if field != "device" else "device"):
        train_base(tiny_cnn(), digits, settings)


@pytest.mark.parametrize("kwargs, match", [
    ({"temperature": 0.0}, "temperature"), ({"temperature": -1.0}, "temperature"),
    ({"alpha": 1.5}, "alpha"), ({"alpha": -0.1}, "alpha"),
])
def test_bad_kd_arguments(digits, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        finetune_kd(tiny_cnn(), tiny_cnn(), digits, TrainSettings(epochs=1), **kwargs)


def test_kd_recovers_accuracy_lost_to_structured_pruning(base_checkpoint, digits16):
    """Physically prune half the filters of a trained model, then KD fine-tune from it."""
    from rlpruner_ray.checkpoint import load_pruned
    from rlpruner_ray.graph import PruningGraph
    teacher = load_pruned(base_checkpoint)
    graph = PruningGraph(teacher, digits16.example_inputs(1))
    graph.compute_scores("l1")
    small = graph.prune(graph.plan(graph.initial_distribution(), graph.total_channels // 2))
    hurt = evaluate(small, digits16, "val")["top1"]
    finetune_kd(small, teacher, digits16, TrainSettings(epochs=3, lr=0.02, batch_size=64, augment=False))
    healed = evaluate(small, digits16, "val")["top1"]
    assert healed >= hurt and healed > 0.5, (hurt, healed)  # never worse (epoch 0 competes); well above chance


def test_finetune_batch_size_applies_to_kd_only():
    from rlpruner_ray.config import CompressConfig
    from rlpruner_ray.pipeline import train_settings
    config = CompressConfig(batch_size=64, finetune_batch_size=512, precision="bf16", channels_last=True)
    kd = train_settings(config, epochs=1, lr=0.01, seed=0, device="cpu", finetune=True)
    base = train_settings(config, epochs=1, lr=0.01, seed=0, device="cpu")
    assert (kd.batch_size, base.batch_size) == (512, 64)
    assert kd.precision == base.precision == "bf16" and kd.channels_last and base.channels_last
    assert train_settings(CompressConfig(batch_size=64), epochs=1, lr=0.01, seed=0, device="cpu",
                          finetune=True).batch_size == 64


def test_bf16_channels_last_training_runs_and_hands_back_a_plain_model(digits16):
    from rlpruner_ray.models import build_model
    torch.manual_seed(0)
    model = build_model("resnet8", 10, 1)
    result = train_base(model, digits16, TrainSettings(epochs=1, lr=0.05, batch_size=64, max_batches_per_epoch=3,
                                                       precision="bf16", channels_last=True))
    assert result.epochs and math.isfinite(result.epochs[0]["train_loss"])
    assert all(p.dtype == torch.float32 for p in model.parameters())          # autocast leaves weights fp32
    conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous()                                        # usual layout again


def test_finetune_batches_sets_the_number_of_kd_batches_exactly(digits, monkeypatch):
    """An equal-compute comparison asks for a stated number of KD batches: the
    epochs it needs, the last one cut short."""
    from rlpruner_ray.config import CompressConfig
    from rlpruner_ray.pipeline import finetune_epochs, train_settings
    steps = []
    original = torch.optim.SGD.step
    monkeypatch.setattr(torch.optim.SGD, "step", lambda self, *a, **k: (steps.append(1), original(self, *a, **k))[1])
    config = CompressConfig(finetune_epochs=2, max_batches_per_epoch=4, finetune_batches=10, batch_size=32)
    epochs = finetune_epochs(config, digits)
    assert epochs == 3
    result = finetune_kd(tiny_cnn(), tiny_cnn(), digits,
                         train_settings(config, epochs=epochs, lr=0.01, seed=0, device="cpu", finetune=True))
    assert len(steps) == 10 and len(result.epochs) == 3
    steps.clear()
    plain = config.replace(finetune_batches=None)        # unset: whole epochs of --finetune-epochs
    assert finetune_epochs(plain, digits) == 2
    finetune_kd(tiny_cnn(), tiny_cnn(), digits,
                train_settings(plain, epochs=2, lr=0.01, seed=0, device="cpu", finetune=True))
    assert len(steps) == 8
