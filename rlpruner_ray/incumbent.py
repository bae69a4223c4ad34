"""Keep the incumbent unless a challenger really wins (``--incumbent-rule``).

A search's cheap reward (top-1 on a few hundred validation images) is noisy, and
the best of many near-equal candidates is the one whose noise was luckiest: its
reward overstates it (the winner's curse). So the best starting candidate, a
one-shot plan (uniform, global threshold, Torch-Pruning's), is the *incumbent*,
and the search's choice, the *challenger*, replaces it only when it wins a
re-score on further validation images, by a margin its standard error supports:

* the re-score images are the validation images after the reward images (never
  the ones the challenger was chosen on, nor the test halves), up to
  ``rescore_samples``; only when the validation split has none after them, its
  first ``rescore_samples`` (recorded: ``disjoint`` false);
* each of the two networks is the one the step would apply (:func:`plans.apply_plan`),
  with its BN statistics re-estimated as the reward does;
* per image ``d = challenger correct - incumbent correct``; the challenger wins when
  ``mean(d) > z * sd(d) / sqrt(n)`` (a one-sided paired test; ``mean(d) > 0`` as well).

The re-score's passes go to the compute ledger's ``rescore`` stage, its BN
recalibration included.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from . import compute
from .batched import recalibrated
from .plans import BASELINE_SOURCES, apply_plan
from .scoring import autocast


def paired_comparison(incumbent: torch.Tensor, challenger: torch.Tensor, z: float) -> dict:
    """The re-score's figures from per-image correctness of the two networks on the
    same images: top-1 of each, the mean paired difference, its standard error
    (sample standard deviation over sqrt(n); None with one image, where nothing can
    be told) and whether the challenger wins by more than ``z`` of them."""
    if incumbent.shape != challenger.shape or incumbent.dim() != 1 or not len(incumbent):
        raise ValueError("the re-score needs both networks' correctness on the same images")
    d = challenger.double() - incumbent.double()
    n = len(d)
    mean = float(d.mean())
    se = float(d.std(unbiased=True)) / math.sqrt(n) if n > 1 else None
    wins = se is not None and mean > 0 and mean > z * se
    return {"images": n, "incumbent_top1": float(incumbent.double().mean()),
            "challenger_top1": float(challenger.double().mean()), "difference": mean,
            "standard_error": se, "z": float(z), "challenger_wins": bool(wins)}


def incumbent_of(candidates) -> object | None:
    """The best starting candidate by reward (the first of equals), or None."""
    start = [c for c in candidates if c.source in BASELINE_SOURCES and c.iteration == 0]
    return max(start, key=lambda c: c.reward) if start else None


def hold_to_incumbent(candidates, challenger, rescore: Callable, z: float) -> tuple[object, dict]:
    """(the candidate to apply, the record of the decision) among ``candidates`` (the
    step's, in evaluation order) for the search's ``challenger``; ``rescore(list of
    candidates) -> (list of per-image correctness tensors, info dict)``."""
    incumbent = incumbent_of(candidates)
    if incumbent is None:
        return challenger, {"applied": "challenger", "reason": "no starting candidate was scored"}
    record = {"incumbent_source": incumbent.source, "incumbent_index": incumbent.index,
              "incumbent_reward": incumbent.reward, "challenger_source": challenger.source,
              "challenger_index": challenger.index, "challenger_reward": challenger.reward}
    if challenger is incumbent:
        return incumbent, {**record, "applied": "incumbent", "reason": "the search chose the incumbent"}
    (kept, other), info = rescore([incumbent, challenger])
    figures = paired_comparison(kept, other, z)
    wins = figures["challenger_wins"]
    return (challenger if wins else incumbent), {**record, **figures, **info,
                                                 "applied": "challenger" if wins else "incumbent"}


class Rescorer:
    """The re-score's images and BN batches (fixed for the run), and the passes that
    give a candidate's per-image correctness on a step's base model, charged to
    ``ledger``."""

    def __init__(self, config, data, device: str, ledger: compute.Ledger):
        self.device = torch.device(device)
        self.precision = config.precision
        self.batch_size = config.reward_batch_size
        self.ledger = ledger
        val = len(data.split("val"))
        after = val - min(config.reward_samples, val)
        self.disjoint = after > 0
        start = config.reward_samples if self.disjoint else 0
        wanted = min(config.rescore_samples, after if self.disjoint else val)
        x, y = next(data.batches("val", start + wanted, device=self.device))
        self.images, self.labels = x[start:], y[start:]
        # the reward's own calibration batches (scoring.StepScorer): the same statistics
        nb = config.bn_recalibration_batches
        self.bn_batches = ([x for x, _ in data.batches("train", self.batch_size, device=self.device, limit=nb)]
                           if nb else [])

    def __call__(self, graph, candidates, part: slice = slice(None)) -> tuple[list[torch.Tensor], dict]:
        """Per-image correctness of each candidate's network on the re-score images
        (``part`` of them: successive halving judges its two stages on two halves)."""
        before = self.ledger.macs["rescore"]
        with self.ledger.timed("rescore"):
            correct = [self.correct(apply_plan(graph, c.counts, c.indices), graph.cost(c.counts)[0], part=part)
                       for c in candidates]
        return correct, {"disjoint": self.disjoint, "macs": self.ledger.macs["rescore"] - before}

    def halves(self) -> tuple[slice, slice]:
        """The re-score images in two disjoint halves (successive halving's stages)."""
        mid = len(self.labels) // 2
        return slice(0, mid), slice(mid, len(self.labels))

    def correct(self, model, macs_per_image, *, part: slice = slice(None), recalibrate: bool = True,
                stage: str = "rescore") -> torch.Tensor:
        """Per-image top-1 correctness of ``model`` (of ``macs_per_image``: its size)
        on ``part`` of the re-score images, its BN statistics re-estimated first as
        the reward's are (``recalibrate``; a fine-tuned network keeps its own), its
        passes charged to ``stage``."""
        model = model.to(self.device).eval()
        per_image = int(round(macs_per_image))
        hits = []
        images, labels = self.images[part], self.labels[part]
        with compute.counting_forwards(model, per_image) as passes, \
                recalibrated(model, self.bn_batches if recalibrate else [],
                             lambda: autocast(self.device, self.precision)) as model:
            with torch.inference_mode(), autocast(self.device, self.precision):
                for x, y in zip(torch.split(images, self.batch_size), torch.split(labels, self.batch_size)):
                    hits.append(model(x).argmax(-1) == y)
        self.ledger.add(stage, passes[0])
        return torch.cat(hits).cpu()
