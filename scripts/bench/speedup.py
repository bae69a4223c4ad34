"""Section 5: real CPU speed-up of section 3's pruned models against their MACs
reduction."""
from __future__ import annotations

import statistics
from pathlib import Path

from .common import _median, log, not_read_note, num, row, run_task, task

TITLE = "5. Real speed-up"


@task
def task_latency(p: dict) -> dict:
    """Each pruned model against the base with a run's own paired timing
    (``measure.time_against_base`` with ``LATENCY_SETTINGS``: what summary.json's
    latency_ratio_* are), ``timings`` times over, the timings of all models
    interleaved so a slow spell of the machine falls on each of them."""
    from rlpruner_ray.checkpoint import load_pruned
    from rlpruner_ray.measure import LATENCY_SETTINGS, time_against_base
    base = load_pruned(p["base"]).eval()
    models = {k: load_pruned(v).eval() for k, v in p["models"].items()}
    shape = tuple(p["input_shape"])
    rows = []
    for r in range(p["timings"]):
        for name, m in models.items():
            for setting in LATENCY_SETTINGS:
                t = time_against_base(base, m, shape, setting)
                batch = setting[0].rsplit("_", 1)[1]              # cpu_b1 -> b1
                rows.append(row(5, name, batch, "latency_ratio", t["pruned"]["ratio"], "x", repeat=r))
                rows.append(row(5, "base", batch, "latency_ms", t["base"]["median"], "ms", repeat=r))
        log(f"section 5: timing {r + 1}/{p['timings']}")
    return {"rows": rows}


def measure(bench):
    P = bench.P
    runs = bench.state["sections"].get("3", {}).get("runs", {})
    base = bench.state["sections"].get("3", {}).get("base")
    models, macs = {}, {}
    for key, r in runs.items():
        if r.get("summary"):
            models[key] = str(Path(r["dir"]) / "pruned_model.pt")
            macs[key] = (r["summary"]["base"]["macs"], r["summary"]["pruned"]["macs"])
    shape = [3, 32, 32] if P["dataset"].startswith("npz:") else [1, 16, 16]
    res = run_task("latency", {"base": base["file"], "models": models, "input_shape": shape,
                               "timings": P["lat_timings"]}, bench.work)
    bench.rows += res["rows"]
    ratios, base_ms = {}, {}
    for rr in res["rows"]:
        if rr["metric"] == "latency_ratio":
            ratios.setdefault(f"{rr['item']}|{rr['variant']}", {})[rr["repeat"]] = rr["value"]
        else:
            base_ms.setdefault(rr["variant"], []).append(rr["value"])
    for key, (b, p) in macs.items():
        r = runs[key]
        for bs in ("b1", "b64"):
            bench.rows.append(row(5, r["method"], bs, "speedup", 1.0 / _median(ratios[f"{key}|{bs}"].values()), "x",
                                  seed=r["seed"]))
        bench.rows.append(row(5, r["method"], "macs", "macs_ratio", b / p, "x", seed=r["seed"]))
    # how far apart two timings of the same pair land: the largest relative spread of
    # a model's ratios (max - min over their mean), per batch size
    agreement = {bs: max(((max(v.values()) - min(v.values())) / statistics.mean(v.values())
                          for k, v in ratios.items() if k.endswith(f"|{bs}") and len(v) > 1), default=float("nan"))
                 for bs in ("b1", "b64")}
    return {"ratios": {k: list(v.values()) for k, v in ratios.items()}, "base_ms": {k: _median(v) for k, v in
            base_ms.items()}, "macs": macs, "shape": shape, "agreement": agreement, "timings": P["lat_timings"]}


def render(bench, st) -> tuple[str, list[str]]:
    P = bench.P
    macs, shape, ratios = st["macs"], st["shape"], st["ratios"]
    runs = bench.state["sections"]["3"]["runs"]
    agree = st["agreement"]
    lines = [
        f"CPU latency of the pruned models of section 3 against the base, timed as a run times it for its "
        f"summary.json (`rlpruner_ray.measure.time_against_base`: the two models in alternation, one torch "
        f"thread, the ratio of the two models' fastest passes; batch 1 and batch 64 for at least 3 s, "
        f"batch 64 for at least 7 rounds), input {'x'.join(map(str, shape))}, {st['timings']} timings of every "
        f"model, interleaved. Speed-up = 1 / the median of its ratios; MACs ratio = base MACs / pruned MACs. "
        f"Base: {num(st['base_ms'].get('b1'), '.2f')} ms at batch 1, {num(st['base_ms'].get('b64'), '.1f')} ms "
        f"at batch 64. Medians over the seeds.",
        "",
        f"Two timings of the same pair agree within {num(100 * agree['b1'], '.1f')}% at batch 1 and "
        f"{num(100 * agree['b64'], '.1f')}% at batch 64 (the largest spread of any model's ratios, max - min "
        f"over their mean).",
        "",
        "| method | MACs ratio | speed-up b1 | speed-up b64 | b64 speed-up / MACs ratio |",
        "|---|---|---|---|---|",
    ]
    parts, missing = [], []
    for method in P["methods"]:
        keys = [k for k in macs if runs[k]["method"] == method]
        if not keys:
            missing.append(method)
            continue
        mr = _median([macs[k][0] / macs[k][1] for k in keys])
        s1 = _median([1.0 / _median(ratios[f"{k}|b1"]) for k in keys])
        s64 = _median([1.0 / _median(ratios[f"{k}|b64"]) for k in keys])
        parts.append((method, mr, s1, s64))
        lines.append(f"| {method} | {num(mr, '.2f', 'x')} | {num(s1, '.2f', 'x')} | {num(s64, '.2f', 'x')} "
                     f"| {num(s64 / mr, '.2f')} |")
    if parts:
        lo = min(p[3] / p[1] for p in parts)
        hi = max(p[3] / p[1] for p in parts)
        lines += ["", f"At batch 64 the measured speed-up is {lo:.0%} to {hi:.0%} of the MACs reduction; where the "
                  "pruning lands (which layers, which widths) decides how much of it turns into time."]
    lines += not_read_note(missing)
    summary = (["Real CPU speed-up at ~2x fewer MACs: " + "; ".join(
        f"{m} {num(s64, '.2f')}x (b64) / {num(s1, '.2f')}x (b1)" for m, mr, s1, s64 in parts) + "."]
        if parts else [])
    return "\n".join(lines), summary
