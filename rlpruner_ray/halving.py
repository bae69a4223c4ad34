"""Multi-fidelity selection of the step's plan (``--halving``): successive halving.

The search's reward (top-1 on ``reward_samples`` validation images right after
pruning) is cheap and noisy, and it is measured before any fine-tuning, while the
step's network is judged after it. So the candidates go through three stages,
each on fewer of them and at a higher fidelity, as NetAdapt's short-term
fine-tuning and EagleEye's adaptive BN do:

0. every candidate: the search's reward;
1. the ``halving_top`` best distinct plans by reward, and the incumbent (the best
   starting candidate, a one-shot plan): top-1 on the first half of the re-score
   images (:class:`~rlpruner_ray.incumbent.Rescorer`: validation images after the
   reward images), BN statistics re-estimated as the reward's are;
2. the ``halving_finalists`` best of stage 1, and the incumbent: each pruned and
   KD fine-tuned for ``halving_kd_batches`` batches (the same batches, learning
   rate schedule and seed for each), then top-1 on the *second* half of the
   re-score images. The stages read disjoint images, so a finalist's luck on
   stage 1's images does not carry it through stage 2 (the winner's curse again).

The best finalist of stage 2 wins; with ``incumbent_rule`` a finalist must also
beat the incumbent in the paired test of :func:`~rlpruner_ray.incumbent.paired_comparison`.
The winner keeps its fine-tuned weights, and the step's fine-tuning goes on from
them, so its short fine-tune is not spent twice. Stage 1's passes are charged to
the ledger's ``rescore`` stage, stage 2's KD batches and passes to ``selection_kd``.

The stages run on the driver, one finalist after another (the driver holds the
teacher and the training data).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .incumbent import incumbent_of, paired_comparison
from .plans import apply_plan, removed_channels
from .problem import train_settings
from .train import batches_per_epoch, finetune_kd


@dataclass
class Selection:
    """The candidate the step applies, its short-fine-tuned network, and the record."""
    chosen: object
    model: torch.nn.Module
    record: dict


def shortlist(graph, candidates, top: int) -> list:
    """The ``top`` best candidates by reward, one per distinct network (two plans that
    remove the same channels are one), best first; the first of equals kept."""
    seen, out = set(), []
    for c in sorted(candidates, key=lambda c: -c.reward):      # stable: the first of equals first
        key = tuple(tuple(g) for g in removed_channels(graph, c.counts, c.indices))
        if key not in seen:
            seen.add(key)
            out.append(c)
        if len(out) == top:
            break
    return out


def _with(first: list, extra) -> list:
    return first + [extra] if extra is not None and all(c is not extra for c in first) else first


def _row(c, **figures) -> dict:
    return {"index": c.index, "source": c.source, "reward": c.reward, **figures}


def select(config, graph, candidates, rescorer, teacher, data, device: str, ledger, seed: int,
           label: str = "") -> Selection:
    """Run stages 1 and 2 over the step's ``candidates`` (every one the search scored)."""
    first_half, second_half = rescorer.halves()
    incumbent = incumbent_of(candidates)
    pool = _with(shortlist(graph, candidates, config.halving_top), incumbent)
    correct, _ = rescorer(graph, pool, part=first_half)
    top1 = [float(c.double().mean()) for c in correct]
    stage1 = [_row(c, top1=t) for c, t in zip(pool, top1)]
    ranked = [c for _, c in sorted(zip(top1, pool), key=lambda p: -p[0])]     # stable: reward order on ties
    finalists = _with(ranked[: config.halving_finalists], incumbent)
    results = [_short_finetune(config, graph, c, rescorer, second_half, teacher, data, device, ledger, seed,
                               label) for c in finalists]
    scores = [float(r[1].double().mean()) for r in results]
    best = max(range(len(finalists)), key=lambda i: scores[i])   # the first of equals
    record = {"stage1_images": first_half.stop - first_half.start,
              "stage2_images": second_half.stop - second_half.start,
              "kd_batches": config.halving_kd_batches, "stage1": stage1,
              "stage2": [_row(c, top1=s) for c, s in zip(finalists, scores)]}
    if config.incumbent_rule and incumbent is not None and finalists[best] is not incumbent:
        mine = finalists.index(incumbent)
        test = paired_comparison(results[mine][1], results[best][1], config.rescore_z)
        record["incumbent_test"] = test
        if not test["challenger_wins"]:
            best = mine
    chosen = finalists[best]
    record.update(winner_index=chosen.index, winner_source=chosen.source, winner_top1=scores[best])
    return Selection(chosen, results[best][0], record)


def _short_finetune(config, graph, candidate, rescorer, part, teacher, data, device, ledger, seed, label):
    """(the candidate's network after ``halving_kd_batches`` KD batches, its per-image
    correctness on ``part`` of the re-score images)."""
    model = apply_plan(graph, candidate.counts, candidate.indices)
    settings = train_settings(config, epochs=1, lr=config.finetune_lr, seed=seed, device=device, finetune=True,
                              label=f"{label} selection fine-tuning of candidate {candidate.index}")
    per_epoch = batches_per_epoch(len(data.train), settings.batch_size, settings.max_batches_per_epoch)
    settings.epochs = math.ceil(config.halving_kd_batches / per_epoch)
    settings.max_batches, settings.validate = config.halving_kd_batches, False
    finetune_kd(model, teacher, data, settings, temperature=config.kd_temperature, alpha=config.kd_alpha,
                ledger=ledger, stage="selection_kd")
    with ledger.timed("selection_kd"):
        hits = rescorer.correct(model, graph.cost(candidate.counts)[0], part=part, recalibrate=False,
                                stage="selection_kd")
    return model, hits
