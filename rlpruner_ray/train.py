"""Training from scratch, knowledge-distillation fine-tuning, and evaluation.

Both training entry points share one loop (`_fit`) that differs only in the
loss; the best epoch is chosen on the validation split, never on test, so the
test accuracy reported later is an unbiased estimate.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import compute
from .data import Dataset
from .errors import ConfigError

log = logging.getLogger("rlpruner_ray")


@dataclass
class TrainSettings:
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_fraction: float = 0.1
    min_lr: float = 1e-6
    augment: bool = True
    seed: int = 0
    device: str = "cpu"
    max_batches_per_epoch: int | None = None  # for quick runs and tests
    max_batches: int | None = None            # in total: the last epoch stops there (an exact KD budget)
    precision: str = "fp32"                   # "bf16": autocast forward and loss (no grad scaler needed)
    channels_last: bool = False               # channels-last weights and images (faster convs on GPUs)
    label: str = ""                           # what the epoch lines belong to ("step 1/5 fine-tuning")
    # False: no val pass at the start or after each epoch, the weights of the last
    # batch are kept (a short selection fine-tune judged on other images)
    validate: bool = True


@dataclass
class TrainResult:
    best_epoch: int
    best_val_top1: float
    epochs: list[dict] = field(default_factory=list)
    batches: int = 0              # optimiser steps taken (what the compute ledger charged)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_settings(s: TrainSettings) -> torch.device:
    if not _is_int(s.epochs) or s.epochs < 0:
        raise ConfigError(f"epochs must be an integer >= 0, got {s.epochs!r}")
    if not _is_int(s.batch_size) or s.batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {s.batch_size!r}")
    if not _is_num(s.lr) or s.lr <= 0:
        raise ConfigError(f"lr must be a number > 0, got {s.lr!r}")
    if not _is_num(s.min_lr) or not 0 <= s.min_lr <= s.lr:
        raise ConfigError(f"min_lr must be between 0 and lr ({s.lr}), got {s.min_lr!r}")
    if not _is_num(s.momentum) or not 0 <= s.momentum < 1:
        raise ConfigError(f"momentum must be in [0, 1), got {s.momentum!r}")
    if not _is_num(s.weight_decay) or s.weight_decay < 0:
        raise ConfigError(f"weight_decay must be a number >= 0, got {s.weight_decay!r}")
    if not _is_num(s.warmup_fraction) or not 0 <= s.warmup_fraction < 1:
        raise ConfigError(f"warmup_fraction must be in [0, 1), got {s.warmup_fraction!r}")
    if s.max_batches is not None and (not _is_int(s.max_batches) or s.max_batches < 1):
        raise ConfigError(f"max_batches must be None or an integer >= 1, got {s.max_batches!r}")
    if s.max_batches_per_epoch is not None and (not _is_int(s.max_batches_per_epoch) or s.max_batches_per_epoch < 1):
        raise ConfigError(f"max_batches_per_epoch must be None or an integer >= 1, got {s.max_batches_per_epoch!r}")
    if not _is_int(s.seed):
        raise ConfigError(f"seed must be an integer, got {s.seed!r}")
    if s.precision not in ("fp32", "bf16"):
        raise ConfigError(f"precision must be fp32 or bf16, got {s.precision!r}")
    try:
        device = torch.device(s.device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device {s.device!r} is not a valid torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {s.device!r} was asked for but CUDA is not available")
    return device


def lr_at(step: int, total_steps: int, base_lr: float, warmup_fraction: float, min_lr: float) -> float:
    """Learning rate at optimiser step `step` (0-based) of `total_steps`.

    Linear warm-up reaches base_lr after int(warmup_fraction * total_steps) steps
    (it starts at base_lr / warmup_steps, not 0, so no step is wasted); then a
    cosine decays from base_lr to exactly min_lr at step == total_steps.
    """
    if not _is_int(total_steps) or total_steps < 1:
        raise ConfigError(f"total_steps must be an integer >= 1, got {total_steps!r}")
    if not _is_int(step) or step < 0:
        raise ConfigError(f"step must be an integer >= 0, got {step!r}")
    warmup = int(warmup_fraction * total_steps)
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def evaluate(model: nn.Module, data: Dataset, split: str = "val", *, batch_size: int = 512, device="cpu",
             limit: int | None = None, ledger: compute.Ledger | None = None) -> dict:
    """Top-1/top-5 accuracy (fractions in [0, 1]) and mean cross-entropy on one split;
    its forward passes are charged to ``ledger``'s evaluation stage when given."""
    if ledger is None:
        return _evaluate(model, data, split, batch_size, device, limit)
    with ledger.timed("evaluation"):
        result = _evaluate(model, data, split, batch_size, device, limit)
        ledger.forward("evaluation", compute.model_macs(model, data.example_inputs(1)), result["n"])
    return result


def _evaluate(model: nn.Module, data: Dataset, split: str, batch_size: int, device, limit) -> dict:
    was_training = model.training
    # Moving here (a no-op when already there) saves every caller from doing it first.
    model.to(device)
    model.eval()
    k = min(5, data.num_classes)
    # Sums stay on the device so there is one host sync at the end, not one per batch.
    top1 = top5 = loss = None
    n = 0
    try:
        with torch.inference_mode():
            for x, y in data.batches(split, batch_size, device=device, limit=limit):
                logits = model(x)
                batch_loss = F.cross_entropy(logits, y, reduction="sum")
                hits = logits.topk(k, dim=1).indices == y[:, None]
                b1, b5 = hits[:, 0].sum(), hits.any(dim=1).sum()
                top1 = b1 if top1 is None else top1 + b1
                top5 = b5 if top5 is None else top5 + b5
                loss = batch_loss if loss is None else loss + batch_loss
                n += len(y)
    finally:
        model.train(was_training)
    if n == 0:
        return {"top1": 0.0, "top5": 0.0, "loss": float("nan"), "n": 0}
    return {"top1": top1.item() / n, "top5": top5.item() / n, "loss": loss.item() / n, "n": n}


def train_base(model: nn.Module, data: Dataset, settings: TrainSettings, *,
               on_epoch: Callable[[dict], None] | None = None,
               ledger: compute.Ledger | None = None) -> TrainResult:
    """Train with SGD and cross-entropy; the best epoch on val is loaded back into `model`.
    Training batches are charged to ``ledger``'s base_training stage, val passes to evaluation."""
    device = _check_settings(settings)

    def loss_fn(x, y):
        return F.cross_entropy(model(x), y)

    charge = None
    if ledger is not None:
        per_image = compute.model_macs(model, data.example_inputs(1))
        charge = ("base_training", lambda rows: compute.train_batch_macs(per_image, rows))
    return _fit(model, data, settings, device, loss_fn, on_epoch, keep_start=False, ledger=ledger, charge=charge)


def finetune_kd(student: nn.Module, teacher: nn.Module, data: Dataset, settings: TrainSettings, *,
                temperature: float = 2.0, alpha: float = 0.25,
                on_epoch: Callable[[dict], None] | None = None,
                ledger: compute.Ledger | None = None, stage: str = "fine_tune") -> TrainResult:
    """Fine-tune `student` towards `teacher`'s softened outputs plus a share `alpha` of hard-label CE.

    The untrained student counts as epoch 0: fine-tuning never returns weights
    that score worse on val than the ones it was given (unless ``settings.validate``
    is off). KD batches are charged to ``ledger``'s ``stage`` (``compute.kd_batch_macs``),
    val passes to evaluation.
    """
    device = _check_settings(settings)
    if not _is_num(temperature) or temperature <= 0:
        raise ConfigError(f"temperature must be a number > 0, got {temperature!r}")
    if not _is_num(alpha) or not 0 <= alpha <= 1:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha!r}")
    teacher_was_training = teacher.training
    teacher.to(device).eval()
    t = float(temperature)

    def loss_fn(x, y):
        with torch.no_grad():
            soft_target = F.softmax(teacher(x) / t, dim=1)
        logits = student(x)
        kd = F.kl_div(F.log_softmax(logits / t, dim=1), soft_target, reduction="batchmean")
        # T^2 keeps the soft-target gradients on the same scale as the hard-label ones.
        return (1 - alpha) * t * t * kd + alpha * F.cross_entropy(logits, y)

    charge = None
    if ledger is not None:
        example = data.example_inputs(1)
        student_macs, teacher_macs = compute.model_macs(student, example), compute.model_macs(teacher, example)
        charge = (stage, lambda rows: compute.kd_batch_macs(student_macs, teacher_macs, rows))
    try:
        return _fit(student, data, settings, device, loss_fn, on_epoch, keep_start=True, ledger=ledger,
                    charge=charge)
    finally:
        teacher.train(teacher_was_training)


def batches_per_epoch(n_train: int, batch_size: int, cap: int | None = None) -> int:
    """Training batches an epoch runs. A final batch of one sample is skipped:
    BatchNorm cannot normalise a single example."""
    steps = n_train // batch_size + (1 if n_train % batch_size >= 2 else 0)
    return steps if cap is None else min(steps, cap)


def _fit(model: nn.Module, data: Dataset, settings: TrainSettings, device: torch.device, loss_fn,
         on_epoch, *, keep_start: bool, ledger: compute.Ledger | None = None, charge=None) -> TrainResult:
    """``charge``: (stage, MACs of a batch of n images) for ``ledger``."""
    with ledger.timed(charge[0]) if ledger is not None else contextlib.nullcontext():
        return _fit_loop(model, data, settings, device, loss_fn, on_epoch, keep_start, ledger, charge)


def _fit_loop(model, data, settings, device, loss_fn, on_epoch, keep_start, ledger, charge) -> TrainResult:
    from .scoring import autocast, to_memory_format
    model.to(device)
    if settings.channels_last:
        model.to(memory_format=torch.channels_last)
    torch.manual_seed(settings.seed)  # covers anything random inside the model (e.g. dropout)
    shuffle_gen = torch.Generator().manual_seed(settings.seed)
    if settings.epochs == 0:
        start = evaluate(model, data, "val", device=device, ledger=ledger)
        return TrainResult(0, start["top1"], [])

    best_state, best_epoch, best_top1 = None, 0, -1.0
    if keep_start and settings.validate:
        best_top1 = evaluate(model, data, "val", device=device, ledger=ledger)["top1"]
        best_state = _snapshot(model)

    steps_per_epoch = batches_per_epoch(len(data.train), settings.batch_size, settings.max_batches_per_epoch)
    total_steps = max(1, settings.epochs * steps_per_epoch)
    if settings.max_batches is not None:
        total_steps = min(total_steps, settings.max_batches)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum,
                                weight_decay=settings.weight_decay)
    history: list[dict] = []
    step = 0
    lr = settings.lr
    for epoch in range(1, settings.epochs + 1):
        began = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        batches = data.batches("train", settings.batch_size, shuffle=True, augment=settings.augment,
                               generator=shuffle_gen, device=device, limit=settings.max_batches_per_epoch)
        for x, y in batches:
            if len(y) < 2:
                continue
            if step >= total_steps:          # max_batches reached: the epoch ends here
                break
            lr = lr_at(step, total_steps, settings.lr, settings.warmup_fraction, settings.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            with autocast(device, settings.precision):
                loss = loss_fn(to_memory_format(x, settings.channels_last), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += loss.detach() * len(y)
            seen += len(y)
            step += 1
            if ledger is not None:
                ledger.add(charge[0], charge[1](len(y)))
        train_loss = loss_sum.item() / max(seen, 1)
        val = (evaluate(model, data, "val", device=device, ledger=ledger) if settings.validate
               else {"top1": math.nan, "loss": math.nan})
        row = {"epoch": epoch, "lr": lr, "train_loss": train_loss, "val_top1": val["top1"],
               "val_loss": val["loss"], "seconds": time.perf_counter() - began}
        history.append(row)
        log.info("%sepoch %d/%d lr %.5f train_loss %.4f val_top1 %.4f val_loss %.4f (%.1fs)",
                 f"{settings.label}: " if settings.label else "", epoch, settings.epochs, lr, train_loss,
                 val["top1"], val["loss"], row["seconds"])
        if not settings.validate:
            best_epoch, best_top1 = epoch, math.nan
        elif val["top1"] > best_top1:  # strict: ties keep the earlier (or the original) weights
            best_state, best_epoch, best_top1 = _snapshot(model), epoch, val["top1"]
        if on_epoch is not None:
            on_epoch(row)
        if not math.isfinite(train_loss):
            # Once weights are NaN/inf nothing can recover; later epochs would only waste time.
            log.warning("training loss is %s at epoch %d; stopping early (try a lower lr)", train_loss, epoch)
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    if settings.channels_last:         # hand back the usual layout (saving, export, pruning)
        model.to(memory_format=torch.contiguous_format)
    return TrainResult(best_epoch, best_top1, history, batches=step)


def _snapshot(model: nn.Module) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
