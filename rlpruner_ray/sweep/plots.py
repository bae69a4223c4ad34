"""The sweep's plots: pareto.png (test accuracy vs MACs kept) and, for a
comparison, comparison.png (search efficiency; accuracy vs MACs)."""
from __future__ import annotations

import io

from .plan import SweepPlan


def _plt():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> None:
    from ..checkpoint import atomic_write_bytes
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _curve_label(plan: SweepPlan, r: dict) -> str:
    parts = [r["algo"]]
    for key in ("reward", "criterion"):
        if len(plan.grid[key]) > 1:
            parts.append(str(r[key]))
    return " ".join(parts)


def write_pareto(plan: SweepPlan, rows: list[dict], path) -> None:
    """Test top-1 vs the fraction of MACs kept: one curve per algorithm (mean over
    seeds at each sparsity), every trial as a faint dot, the base model as a star."""
    import numpy as np
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 5))
    finals = [r for r in rows if r.get("final")]
    curves: dict[str, dict[float, list]] = {}
    for r in finals:
        curves.setdefault(_curve_label(plan, r), {}).setdefault(r["sparsity"], []).append(r)
    for label, by_s in curves.items():
        pts = sorted((np.mean([r["final_macs_kept"] for r in rs]), np.mean([r["test_top1"] for r in rs]))
                     for rs in by_s.values())
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=label)
        allr = [r for rs in by_s.values() for r in rs]
        ax.scatter([r["final_macs_kept"] for r in allr], [r["test_top1"] for r in allr], s=12, alpha=0.35,
                   color=line.get_color())
    if finals:
        ax.plot([1.0], [float(np.mean([r["base_test_top1"] for r in finals]))], "*", color="black",
                markersize=14, label="base model")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no finished trial yet", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlabel="fraction of MACs kept", ylabel="test top-1",
           title=f"{plan.base.get('model')} on {plan.base.get('dataset')}: accuracy vs MACs")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save(fig, path)


def write_comparison_plot(plan: SweepPlan, rows: list[dict], comp: list[dict], path) -> None:
    """Left: best reward so far vs evaluations spent in a step (mean over the
    trial's steps; mean line and min/max band over seeds). Right: final test
    top-1 vs MACs, one marker per trial."""
    import numpy as np
    from matplotlib.ticker import MaxNLocator
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for algo in plan.grid["algo"]:
        curves = []
        for seed in plan.grid["seed"]:
            cs = [c for c in comp if c["algo"] == algo and c["seed"] == seed]
            if not cs:
                continue
            per_step: dict[int, list[float]] = {}
            for c in cs:
                per_step.setdefault(c["step"], []).append(c["best_reward"])
            n = min(len(v) for v in per_step.values())
            curves.append(np.mean([v[:n] for v in per_step.values()], axis=0))
        if not curves:
            continue
        n = min(len(c) for c in curves)
        arr = np.array([c[:n] for c in curves])
        x = np.arange(1, n + 1)
        mean, lo, hi = arr.mean(axis=0), arr.min(axis=0), arr.max(axis=0)
        label = f"{algo} ({len(curves)} seed{'s' if len(curves) > 1 else ''})"
        if n > 1:
            line, = ax1.plot(x, mean, "-", label=label)
            ax1.fill_between(x, lo, hi, alpha=0.2, color=line.get_color())
        else:                   # one evaluation per step (uniform, global): a point with its range
            ax1.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="o", capsize=4, label=label)
    ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax1.set(xlabel="evaluations spent in a step", ylabel="best reward so far (mean over steps)",
            title="Search efficiency")
    ax1.grid(alpha=0.3)
    if comp:
        ax1.legend(fontsize=8)
    finals = [r for r in rows if r.get("final")]
    for algo in plan.grid["algo"]:
        rs = [r for r in finals if r["algo"] == algo]
        if rs:
            ax2.scatter([r["final_macs"] / 1e6 for r in rs], [r["test_top1"] for r in rs], label=algo, s=30)
    if finals:
        ax2.plot([float(np.mean([r["base_macs"] for r in finals])) / 1e6],
                 [float(np.mean([r["base_test_top1"] for r in finals]))], "*", color="black", markersize=14,
                 label="base model")
        ax2.legend(fontsize=8)
    ax2.set(xlabel="MACs (M)", ylabel="final test top-1", title="Accuracy vs MACs (one marker per trial)")
    ax2.grid(alpha=0.3)
    fig.suptitle(f"{plan.base.get('model')} on {plan.base.get('dataset')}, sparsity "
                 f"{plan.grid['sparsity'][0]:g}, {plan.base.get('evaluations_per_step')} evaluations per step")
    fig.tight_layout()
    _save(fig, path)
