"""Section 1: one candidate evaluation against its floor (one plain forward pass),
on the masked and the physical path."""
from __future__ import annotations

from .common import _accuracy, _getter, _median, _tagged_model, _threads, _timed, log, num, row, run_task, task

TITLE = "1. Evaluation cost against its floor"


@task
def task_cost(p: dict) -> dict:
    """Per model: floor (plain forward), StepScorer.score (masked), env.step
    (plan + masked score), physical (deepcopy + graph.prune + forward)."""
    import numpy as np
    from rlpruner_ray.config import CompressConfig
    from rlpruner_ray.data import load_dataset
    from rlpruner_ray.graph import PruningGraph
    from rlpruner_ray.search.workers import env_settings, make_payload
    import envs
    _threads(p["threads"])
    data = load_dataset(p["dataset"], val_fraction=0.1, seed=0)
    rows, info = [], {}
    for name in p["models"]:
        log(f"section 1: {name}")
        model = _tagged_model(name, data)
        graph = PruningGraph(model, data.example_inputs(1))
        graph.compute_scores("l1")
        num_filters = int(round(p["step_fraction"] * graph.total_channels))
        context = {"step": 0, "num_steps": 1, "original": graph.sizes(), "num_filters": num_filters}
        config = CompressConfig(dataset=p["dataset"], reward_samples=p["samples"], reward_batch_size=p["batch"],
                                cpus_per_worker=p["threads"], criterion="l1",
                                bn_recalibration_batches=0)   # the masked pass against its floor
        settings = env_settings(config, store=None)
        settings["payload"] = make_payload(model, graph, context, version=0)
        env = envs.LayerPruningEnv(settings)
        scorer = env.scorer
        counts = scorer.plan(scorer.graph.initial_distribution())
        zero = np.zeros(env.action_space.shape, np.float32)

        def floor():
            return _accuracy(scorer.model, scorer.batches)

        def masked():
            return scorer.score(counts)["accuracy"]

        def step():
            env.reset()
            return env.step(zero)[1]

        small_holder = {}

        def physical():
            small = scorer.graph.prune(counts).eval()
            small_holder["m"] = small
            return _accuracy(small, scorer.batches)

        def pruned_forward():
            return _accuracy(small_holder["m"], scorer.batches)

        measures = {"floor": floor, "masked_score": masked, "env_step": step, "physical": physical,
                    "pruned_forward": pruned_forward}
        warm = {k: fn() for k, fn in measures.items()}     # warm-up (allocator, first-call costs)
        acc = {"masked": warm["masked_score"], "physical": warm["physical"]}
        times = {k: [] for k in measures}
        for r in range(p["repeats"]):
            for k, fn in measures.items():
                dt, _ = _timed(fn)
                times[k].append(dt)
                rows.append(row(1, name, k, "seconds", dt, "s", repeat=r))
        med = {k: _median(v) for k, v in times.items()}
        for k in measures:
            rows.append(row(1, name, k, "median_seconds", med[k], "s"))
            rows.append(row(1, name, k, "ratio_to_floor", med[k] / med["floor"], "x"))
            per_rep = [t / f for t, f in zip(times[k], times["floor"])]
            rows.append(row(1, name, k, "median_per_repeat_ratio", _median(per_rep), "x"))
        # compare outputs, not top-1: a freshly initialised network's logits are tiny
        # (MobileNetV3: about 1e-10, top-2 gaps of 1e-13), so float rounding alone
        # breaks argmax ties differently on the two paths
        gap = _relative_output_gap(scorer, counts, small_holder["m"])
        info[name] = {"groups": graph.num_groups, "channels": graph.total_channels, "removed": int(counts.sum()),
                      "macs": graph.base_macs, "params": graph.base_params, "masked_relative_gap": gap,
                      "masked_equals_physical": gap <= MASK_TOLERANCE,
                      "accuracy": acc}
    return {"rows": rows, "info": info}


MASK_TOLERANCE = 1e-4   # as PruningGraph.check_masking


def _relative_output_gap(scorer, counts, small) -> float:
    """Largest |physical - masked| output over the reward batches, relative to the
    largest physical output; the masked side is what StepScorer scores."""
    import torch
    worst = 0.0
    with torch.inference_mode(), scorer.graph.scored(counts) as masked:
        for x, _ in scorer.batches:
            ref, out = small(x).float(), masked(x).float()
            worst = max(worst, float((ref - out).abs().max() / ref.abs().max().clamp_min(1e-30)))
    return worst



def measure(bench):
    P = bench.P
    res = run_task("cost", {"dataset": bench.synthetic(), "models": P["cost_models"], "samples": P["cost_samples"],
                            "batch": P["cost_batch"], "repeats": P["cost_repeats"], "threads": 1,
                            "step_fraction": P["cost_step_fraction"]}, bench.work)
    bench.rows += res["rows"]
    return {"info": res["info"]}


def render(bench, st) -> tuple[str, list[str]]:
    P = bench.P
    get = _getter(bench.rows)
    lines = [
        f"One candidate evaluation against its floor, one plain forward pass of the unpruned model over the "
        f"same reward batches ({P['cost_samples']} random 3x32x32 images in batches of {P['cost_batch']}; "
        f"the cost does not depend on pixel values). The plan removes {int(100 * P['cost_step_fraction'])}% of "
        f"the filters (one default step) with the initial distribution; L1 importance. 1 torch thread (what an "
        f"evaluation actor uses). Ratios of the medians of {P['cost_repeats']} interleaved repeats, after a "
        f"warm-up.",
        "",
        "| model | groups | floor (s) | masked: StepScorer.score (x floor) | masked: env.step (x floor) "
        "| physical: deepcopy + prune + forward (x floor) | forward of the pruned copy alone (x floor) "
        "| target masked <= 1.2x |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary, notes = [], []
    for m in P["cost_models"]:
        info = st["info"][m]
        floor = get(m, "floor", "median_seconds")
        r_score, r_step = get(m, "masked_score", "ratio_to_floor"), get(m, "env_step", "ratio_to_floor")
        worst = max(r_score, r_step)
        ok = worst <= 1.2
        phys, pfwd = get(m, "physical", "median_seconds"), get(m, "pruned_forward", "median_seconds")
        lines.append(f"| {m} | {info['groups']} | {num(floor)} | {num(r_score, '.3f', 'x')} "
                     f"| {num(r_step, '.3f', 'x')} | {num(get(m, 'physical', 'ratio_to_floor'), '.3f', 'x')} "
                     f"| {num(pfwd / floor, '.3f', 'x')} | {'met' if ok else 'missed'} |")
        notes.append(f"{m}: the physical path's extra work (deep copy, dependency-graph rebuild, pruning) took "
                     f"{num(phys - pfwd, '.2f')} s ({num(100 * (phys - pfwd) / floor, '.0f')}% of the floor) "
                     f"and its smaller model saved {num(100 * (1 - pfwd / floor), '.0f')}% of the forward pass")
        summary.append(f"Evaluation cost, {m}: a masked step costs {num(worst, '.2f')}x the plain forward pass "
                       f"(target <= 1.2x **{'met' if ok else 'missed'}**); the physical path "
                       f"{num(get(m, 'physical', 'ratio_to_floor'), '.2f')}x.")
    same = all(st["info"][m]["masked_equals_physical"] for m in P["cost_models"])
    gap = [get(m, "physical", "ratio_to_floor") - max(get(m, "masked_score", "ratio_to_floor"),
                                                      get(m, "env_step", "ratio_to_floor"))
           for m in P["cost_models"]]
    verdict = cost_verdict(gap, P["cost_samples"])
    lines += ["", _agreement(st, P["cost_models"], same) +
              "Zeroed channels still cost their MACs, so the masked path can only approach the floor. "
              + "; ".join(notes) + ". " + verdict + " The search scores candidates on the masked path: it "
              "needs no copy of the model per candidate, so the evaluation actors' memory stays flat."]
    return "\n".join(lines), summary


def _agreement(st, models, same: bool) -> str:
    gaps = {m: st["info"][m].get("masked_relative_gap") for m in models}
    if any(g is None for g in gaps.values()):   # a state written before the outputs were compared
        return f"Masked and physical paths gave the same reward-batch accuracy: {'yes' if same else '**NO**'}. "
    listed = ", ".join(f"{m} {g:.1e}" for m, g in gaps.items())
    return (f"Masked and physical paths gave the same outputs on the reward batches: "
            f"{'yes' if same else '**NO**'} (largest difference relative to the largest logit: {listed}; "
            f"tolerance {MASK_TOLERANCE:.0e}). ")


def cost_verdict(gaps: list[float], samples: int) -> str:
    """Section 1's sentence on which path is cheaper, from each model's physical
    minus masked cost (in multiples of the floor)."""
    if all(abs(g) <= 0.1 for g in gaps):
        return (f"At {samples} reward images the forward pass dominates and the two paths cost about the same; "
                f"the masked path's fixed saving counts for more as the reward batches shrink or the model's "
                f"graph grows.")
    if all(g > 0 for g in gaps):
        return (f"At {samples} reward images the masked path is the cheaper one by {min(gaps):.2f}x to "
                f"{max(gaps):.2f}x of the floor.")
    if all(g < 0 for g in gaps):
        return (f"At {samples} reward images the physical path is the cheaper one by {-max(gaps):.2f}x to "
                f"{-min(gaps):.2f}x of the floor: the pruned copy's smaller forward pass saves more than the "
                f"copy and the graph rebuild cost.")
    return (f"At {samples} reward images neither path is cheaper for every model (physical minus masked: "
            f"{', '.join(f'{g:+.2f}x' for g in gaps)} of the floor).")
