"""Section 5: real CPU speed-up of section 3's pruned models against their MACs
reduction."""
from __future__ import annotations

from pathlib import Path

from .common import _median, _threads, log, not_read_note, num, row, run_task, task

TITLE = "5. Real speed-up"


@task
def task_latency(p: dict) -> dict:
    from rlpruner_ray.checkpoint import load_pruned
    from rlpruner_ray.measure import latency_ms
    _threads(1)
    models = {k: load_pruned(v).eval() for k, v in p["models"].items()}
    shape = tuple(p["input_shape"])
    rows = []
    for r in range(p["repeats"]):
        for name, m in models.items():   # interleaved, so load changes hit every model alike
            rows.append(row(5, name, "b1", "latency_ms", latency_ms(m, shape, batch_size=1), "ms", repeat=r))
            rows.append(row(5, name, "b64", "latency_ms",
                            latency_ms(m, shape, batch_size=64, repeats=p["b64_repeats"], warmup=1), "ms", repeat=r))
        log(f"section 5: latency repeat {r + 1}/{p['repeats']}")
    return {"rows": rows}



def measure(bench):
    P = bench.P
    runs = bench.state["sections"].get("3", {}).get("runs", {})
    base = bench.state["sections"].get("3", {}).get("base")
    models = {"base": base["file"]}
    macs = {}
    for key, r in runs.items():
        if r.get("summary"):
            models[key] = str(Path(r["dir"]) / "pruned_model.pt")
            macs[key] = (r["summary"]["base"]["macs"], r["summary"]["pruned"]["macs"])
    shape = [3, 32, 32] if P["dataset"].startswith("npz:") else [1, 16, 16]
    res = run_task("latency", {"models": models, "input_shape": shape, "repeats": P["lat_repeats"],
                               "b64_repeats": P["lat_b64_repeats"]}, bench.work)
    bench.rows += res["rows"]
    lat = {}
    for rr in res["rows"]:
        lat.setdefault(f"{rr['item']}|{rr['variant']}", []).append(rr["value"])
    med = {k: _median(v) for k, v in lat.items()}
    for key, (b, p) in macs.items():
        r = runs[key]
        for bs in ("b1", "b64"):
            bench.rows.append(row(5, r["method"], bs, "speedup", med[f"base|{bs}"] / med[f"{key}|{bs}"], "x",
                                 seed=r["seed"]))
        bench.rows.append(row(5, r["method"], "macs", "macs_ratio", b / p, "x", seed=r["seed"]))
    return {"median_ms": med, "macs": macs, "shape": shape}


def render(bench, st) -> tuple[str, list[str]]:
    P = bench.P
    med, macs = st["median_ms"], st["macs"]
    runs = bench.state["sections"]["3"]["runs"]
    shape = st["shape"]
    lines = [
        f"CPU latency of the pruned models of section 3 with `rlpruner_ray.measure.latency_ms` (median of 20 "
        f"runs at batch 1, {P['lat_b64_repeats']} at batch 64; then the median of {P['lat_repeats']} "
        f"interleaved repeats), 1 torch thread, input {'x'.join(map(str, shape))}. Speed-up = base latency / "
        f"pruned latency; MACs ratio = base MACs / pruned MACs. Base: {num(med.get('base|b1'), '.2f')} ms at "
        f"batch 1, {num(med.get('base|b64'), '.1f')} ms at batch 64. Medians over the seeds.",
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
        s1 = _median([med["base|b1"] / med[f"{k}|b1"] for k in keys])
        s64 = _median([med["base|b64"] / med[f"{k}|b64"] for k in keys])
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
