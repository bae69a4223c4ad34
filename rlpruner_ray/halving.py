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

Stage 2's short fine-tunes run in parallel on the run's evaluation actors when
there is a pool (each actor holds the step's base model, its graph and the
training data; the driver sends the plans and the teacher's weights, and gets
back the fine-tuned weights and their correctness), one after another on the
driver otherwise; both give the same networks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from .checkpoint import load_pruned, model_to_bytes
from .incumbent import Rescorer, incumbent_of, paired_comparison
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
           label: str = "", pool=None, version: int | None = None) -> Selection:
    """Run stages 1 and 2 over the step's ``candidates`` (every one the search scored);
    stage 2 on ``pool``'s actors (base model ``version``) when given."""
    first_half, second_half = rescorer.halves()
    incumbent = incumbent_of(candidates)
    contenders = _with(shortlist(graph, candidates, config.halving_top), incumbent)
    correct, _ = rescorer(graph, contenders, part=first_half)
    top1 = [float(c.double().mean()) for c in correct]
    stage1 = [_row(c, top1=t) for c, t in zip(contenders, top1)]
    ranked = [c for _, c in sorted(zip(top1, contenders), key=lambda p: -p[0])]     # stable: reward order on ties
    finalists = _with(ranked[: config.halving_finalists], incumbent)
    if pool is None:
        results = [_short_finetune(config, graph, c, rescorer, second_half, teacher, data, device, ledger, seed,
                                   label) for c in finalists]
    else:
        results = _on_pool(pool, version, config, finalists, teacher, ledger, seed, label)
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


def _on_pool(pool, version, config, finalists, teacher, ledger, seed, label) -> list:
    """Stage 2's short fine-tunes on the evaluation actors, in parallel; their
    compute is added to ``ledger`` (the wall time is the driver's wait)."""
    plans = [{"counts": np.asarray(c.counts).tolist(), "indices": c.indices, "index": c.index} for c in finalists]
    with ledger.timed("selection_kd"):
        outs = pool.short_finetunes(plans, model_to_bytes(teacher), config.to_dict(), seed, label, version)
    ledger.add("selection_kd", sum(o["macs"] for o in outs))
    # the actors' networks: the driver's own model code (loaded there under the user's allow_import)
    return [(load_pruned(o["model"], allow_import=True), own_tensor(o["hits"])) for o in outs]


def own_tensor(values) -> torch.Tensor:
    """A tensor with its own memory: arrays that come back from Ray's object store are
    read-only, and a tensor sharing their memory must never be written (torch warns)."""
    return torch.from_numpy(np.array(values, copy=True))


def finetune_on_actor(env, plans: list, teacher_bytes: bytes, config_values: dict, seed: int, label: str) -> list:
    """An evaluation actor's part of stage 2 (``EvalWorker.short_finetunes``): each
    plan pruned from the actor's base model, fine-tuned and judged as the driver
    would, with the actor's own copy of the data and re-score images."""
    from . import compute
    from .config import CompressConfig
    config = CompressConfig.from_dict(config_values)
    device = str(env.scorer.device)
    teacher = load_pruned(teacher_bytes, allow_import=True)
    ledger = compute.Ledger()
    rescorer = Rescorer(config, env.data, device, ledger)
    out = []
    for plan in plans:
        before = ledger.macs["selection_kd"]
        candidate = SimpleNamespace(counts=np.asarray(plan["counts"], dtype=np.int64), indices=plan["indices"],
                                    index=plan["index"])
        model, hits = _short_finetune(config, env.scorer.graph, candidate, rescorer, rescorer.halves()[1], teacher,
                                      env.data, device, ledger, seed, label)
        out.append({"model": model_to_bytes(model.cpu()), "hits": hits.numpy(),
                    "macs": ledger.macs["selection_kd"] - before})
    return out
