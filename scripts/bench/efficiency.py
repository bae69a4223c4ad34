"""Section 6: sample efficiency (evaluations to reach 95% of a step's best reward)."""
from __future__ import annotations

import math
from pathlib import Path

from .common import PAPER_EVALS_PER_STEP, _median, not_read_note, row

TITLE = "6. Sample efficiency"


def measure(bench):
    import pyarrow.parquet as pq
    runs = bench.state["sections"].get("3", {}).get("runs", {})
    out = {}
    for key, r in runs.items():
        if not r.get("summary"):
            continue
        hist = pq.read_table(Path(r["dir"]) / "history.parquet").to_pylist()
        m = out.setdefault(r["method"], {"n95": [], "n99": [], "per": []})
        for step in sorted({h["step"] for h in hist}):
            rewards = [h["reward"] for h in sorted((h for h in hist if h["step"] == step),
                                                   key=lambda h: h["evaluation"])]
            a, b = evals_to_fraction(rewards, 0.95), evals_to_fraction(rewards, 0.99)
            m["n95"].append(a)
            m["n99"].append(b)
            m["per"].append(len(rewards))
            bench.rows.append(row(6, r["method"], f"step{step}", "evals_to_95pct", a, seed=r["seed"]))
            bench.rows.append(row(6, r["method"], f"step{step}", "evals_to_99pct", b, seed=r["seed"]))
            bench.rows.append(row(6, r["method"], f"step{step}", "evals_in_step", len(rewards), seed=r["seed"]))
    return {"methods": out}



def render(bench, st) -> tuple[str, list[str]]:
    P = bench.P
    lines = [
        f"From each section-3 run's `history.parquet`: within each step, the number of evaluations (in the order "
        f"they were recorded) until the running best reward first reaches 95% (and 99%) of the step's final "
        f"best; median and max over steps and seeds. The paper spends {PAPER_EVALS_PER_STEP} evaluations per "
        f"step; these runs had {P['evals']}.",
        "",
        "| method | steps | evaluations per step | to 95% of best (median) | to 95% (max) | to 99% (median) "
        "| to 99% (max) | 95% median / the paper's 100 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    summary_bits, missing = [], []
    for method in P["methods"]:
        m = st["methods"].get(method)
        if not m or not m["n95"]:
            missing.append(method)
            continue
        m95 = _median(m["n95"])
        lines.append(f"| {method} | {len(m['n95'])} | {_median(m['per']):.0f} | {m95:.1f} | {max(m['n95'])} "
                     f"| {_median(m['n99']):.1f} | {max(m['n99'])} | {m95 / PAPER_EVALS_PER_STEP:.2f} |")
        if _median(m["per"]) > 1:
            summary_bits.append(f"{method} {m95:.1f} of {_median(m['per']):.0f}")
    lines += ["", "The one-shot methods (uniform, global, tp-*) evaluate one candidate, so they reach it at 1. "
              "The counts are capped at a step's budget (its evaluations per step): a method still improving "
              "at the end of the budget shows up as a max at the cap. Rewards are on each method's own scale "
              "(minus the KL divergence for rlpruner-kl), so 95% of the best is not the same distance for all."]
    lines += not_read_note(missing)
    summary = ([f"Sample efficiency: median evaluations to reach 95% of a step's best reward, of the step's "
                f"budget: {', '.join(summary_bits)} (the paper spends {PAPER_EVALS_PER_STEP})."]
               if summary_bits else [])
    return "\n".join(lines), summary



def evals_to_fraction(rewards, fraction: float) -> int:
    """1-based number of evaluations until the running best reaches ``fraction``
    of the final best (for a negative best, until it is within that share)."""
    if not rewards:
        return 0
    best = max(rewards)
    goal = fraction * best if best >= 0 else best / fraction
    run = -math.inf
    for i, r in enumerate(rewards, 1):
        run = max(run, r)
        if run >= goal:
            return i
    return len(rewards)
