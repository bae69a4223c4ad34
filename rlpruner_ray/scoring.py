"""Scoring a pruning distribution on the current base model: the search's hot path.

A :class:`StepScorer` holds one base model, its :class:`PruningGraph` (built once
per base model), the importance order shipped by the driver, and the reward
batches (a fixed slice of the validation split, kept on the scorer's device).
Scoring a candidate is: plan -> ``graph.masked`` -> forward passes -> reward.
No deep copy, no graph rebuild, no file I/O, no logging.

The same :func:`plan_for_step` turns a distribution into per-group counts here
and in the pipeline, so what is applied is exactly what was scored.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .checkpoint import load_pruned
from .data import Dataset
from .errors import ConfigError
from .graph import PruningGraph


def plan_for_step(graph: PruningGraph, distribution, context: dict, *, round_to: int = 1,
                  fraction: float = 1.0, already_removed=None) -> np.ndarray:
    """Per-group counts for this step. ``context["num_filters"]`` fixes the count
    (the paper's filter sparsity); ``context["cost_target"]`` (hard budget mode)
    instead asks for the fewest filters, in this distribution, that bring MACs or
    params down to the target. ``fraction`` < 1 plans part of the step (sub-steps
    of a multi-step episode); ``already_removed`` is what earlier sub-steps took."""
    done = np.zeros(graph.num_groups, np.int64) if already_removed is None else np.asarray(already_removed)
    target = context.get("cost_target")
    if target is None:
        n = int(round(context["num_filters"] * fraction)) - int(done.sum())
        n = min(max(n, 0), int(np.maximum(graph.channels - graph.floors - done, 0).sum()))
        return graph.plan(distribution, n, round_to=round_to, already_removed=done)
    kind = 0 if target["kind"] == "macs" else 1
    start = graph.cost(np.zeros(graph.num_groups), done)[kind]
    goal = start - (start - target["value"]) * fraction
    capacity = int(np.maximum(graph.channels - graph.floors - done, 0).sum())

    def cost(n):
        return graph.cost(graph.plan(distribution, n, round_to=round_to, already_removed=done), done)[kind]

    lo, hi = 0, capacity                # smallest n with cost(n) <= goal (cost falls with n)
    if cost(hi) > goal:
        lo = hi
    while lo < hi:
        mid = (lo + hi) // 2
        if cost(mid) <= goal:
            hi = mid
        else:
            lo = mid + 1
    return graph.plan(distribution, lo, round_to=round_to, already_removed=done)


def reward_of(accuracy: float, macs: float, params: float, settings: dict, original: dict) -> float:
    kind, coef = settings["reward"], settings["reward_coef"]
    if kind == "acc":
        return accuracy
    if kind == "flops":
        return accuracy + coef * (1.0 - macs / original["macs"])
    if kind == "params":
        return accuracy + coef * (1.0 - params / original["params"])
    raise ConfigError(f"unknown reward {kind!r}")


class StepScorer:
    """Scores distributions on one base model. ``settings`` is the plain dict of
    environment settings (see ``envs.layer_pruning``)."""

    def __init__(self, settings: dict, data: Dataset):
        self.settings = settings
        self.device = torch.device(settings.get("device", "cpu"))
        n = settings["reward_samples"]
        bs = settings["reward_batch_size"]
        # fixed reward batches: the first n validation images, moved to the device once
        x, y = next(data.batches("val", n, device=self.device))
        self.batches = list(zip(torch.split(x, bs), torch.split(y, bs)))
        nb = settings.get("bn_recalibration_batches", 0)
        self.bn_batches = [x for x, _ in data.batches("train", bs, device=self.device, limit=nb)] if nb else []
        self.version = None
        self.model = None
        self.graph = None

    # ------------------------------------------------------------------ base model
    def load(self, payload: dict) -> None:
        """Adopt a new base model (once per outer step)."""
        # the payload is the driver's own model, loaded there under the user's allow_import
        model = load_pruned(payload["model"], allow_import=True).to(self.device).eval()
        graph = PruningGraph(model, torch.zeros(1, *payload["input_shape"], device=self.device),
                             exclude=self.settings.get("exclude", ()),
                             min_channels=self.settings["min_channels"],
                             max_group_sparsity=self.settings["max_group_sparsity"])
        if graph.keys != list(payload["keys"]):
            raise RuntimeError("worker traced different groups than the driver; versions of "
                               "torch / torch-pruning differ between nodes?")
        graph.set_scores([torch.tensor(np.array(s)) for s in payload["scores"]], payload["criterion"])
        self.model, self.graph = model, graph
        self.context = payload["context"]
        self.version = payload["version"]
        self._bn = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    # ------------------------------------------------------------------ scoring
    def plan(self, distribution, *, fraction: float = 1.0, already_removed=None) -> np.ndarray:
        return plan_for_step(self.graph, distribution, self.context, round_to=self.settings["round_to"],
                             fraction=fraction, already_removed=already_removed)

    def score(self, counts: np.ndarray) -> dict:
        """Accuracy, MACs, params and reward of the base model minus ``counts``."""
        with self.graph.masked(counts):
            if self.bn_batches:
                saved = self._recalibrate()
            accuracy = self._accuracy()
            if self.bn_batches:
                self._restore_bn(saved)
        macs, params = self.graph.cost(counts)
        original = self.context["original"]
        return {"reward": reward_of(accuracy, macs, params, self.settings, original),
                "accuracy": accuracy, "macs": macs, "params": params}

    def _accuracy(self) -> float:
        correct = total = 0
        with torch.inference_mode():
            for x, y in self.batches:
                correct += int((self.model(x).argmax(1) == y).sum())
                total += len(y)
        return correct / max(total, 1)

    def _recalibrate(self):
        """Re-estimate BN statistics of the masked model on a few training batches:
        accuracy right after pruning is a noisy stand-in for accuracy after
        fine-tuning, and stale statistics are much of the noise."""
        saved = [(m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum)
                 for m in self._bn]
        for m in self._bn:
            m.reset_running_stats()
            m.momentum = None                    # cumulative average over the batches
            m.train()
        with torch.no_grad():
            for x in self.bn_batches:
                self.model(x)
        for m in self._bn:
            m.eval()
        return saved

    def _restore_bn(self, saved):
        for m, (mean, var, n, momentum) in zip(self._bn, saved):
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(n)
            m.momentum = momentum
