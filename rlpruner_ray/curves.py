"""Best-so-far reward curves: how fast each search finds good candidates.

A run's curve is the best reward seen after each evaluation of a step (the
running maximum over ``history.parquet``'s rows in evaluation order), averaged
over the run's steps where it has several. Over seeds the plot shows the
median and the full spread (min to max): with 5 seeds an interquartile band
would be drawn through two or three points.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def best_so_far(rewards) -> np.ndarray:
    """Running maximum of rewards in the order they were evaluated."""
    return np.maximum.accumulate(np.asarray(list(rewards), dtype=np.float64))


def history_curve(path) -> list[float]:
    """The best-so-far curve of one run's ``history.parquet``: per step in
    evaluation order, the mean over steps (cut to the shortest step)."""
    import pyarrow.parquet as pq
    rows = pq.read_table(path, columns=["step", "evaluation", "reward"]).to_pylist()
    steps: dict[int, list] = {}
    for r in sorted(rows, key=lambda r: (r["step"], r["evaluation"])):
        steps.setdefault(r["step"], []).append(r["reward"])
    if not steps:
        return []
    n = min(len(v) for v in steps.values())
    return np.mean([best_so_far(v[:n]) for v in steps.values()], axis=0).tolist()


def band(curves) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(evaluations 1..n, median, min, max) over curves, each cut to the shortest."""
    curves = [np.asarray(c, dtype=np.float64) for c in curves if len(c)]
    if not curves:
        empty = np.zeros(0)
        return empty, empty, empty, empty
    n = min(len(c) for c in curves)
    arr = np.stack([c[:n] for c in curves])
    return np.arange(1, n + 1), np.median(arr, axis=0), arr.min(axis=0), arr.max(axis=0)


def write_best_so_far_plot(curves: dict[str, list], path, *, title: str = "") -> None:
    """A PNG: per method (``curves[method]`` = one curve per seed) the median
    best-so-far reward against evaluations, and a band from the minimum to the
    maximum over the seeds. Methods without a curve are left out."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from .checkpoint import atomic_write_bytes
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for method, runs in curves.items():
        x, median, low, high = band(runs)
        if not len(x):
            continue
        label = f"{method} ({len(runs)} seed{'s' if len(runs) != 1 else ''})"
        if len(x) > 1:
            line, = ax.plot(x, median, "-", label=label)
            ax.fill_between(x, low, high, alpha=0.2, color=line.get_color())
        else:                        # a one-shot method: one evaluation, a point with its range
            ax.errorbar(x, median, yerr=[median - low, high - median], fmt="o", capsize=4, label=label)
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))      # evaluations are counted
    ax.set(xlabel="evaluations in the step", ylabel="best reward so far",
           title=title or "Best reward so far: median, band min to max over seeds")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
