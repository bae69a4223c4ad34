"""Result files people can open: the per-candidate history as Parquet (streamed
one step at a time, never held whole in memory) and the run's report figure."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .checkpoint import atomic_write_bytes

HISTORY_SCHEMA = pa.schema([
    ("step", pa.int32()), ("iteration", pa.int32()), ("evaluation", pa.int32()),
    ("algo", pa.string()), ("source", pa.string()),
    # MACs and params of the candidate's plan: exact counts (the closed form equals the
    # count on the physically pruned model, so the chosen row matches summary.json)
    ("reward", pa.float64()), ("accuracy", pa.float64()), ("macs", pa.int64()), ("params", pa.int64()),
    ("filters_removed", pa.int64()), ("chosen", pa.bool_()), ("seconds", pa.float64()),
    ("distribution", pa.list_(pa.float32())), ("counts", pa.list_(pa.int32())),
    ("learner_stats", pa.map_(pa.string(), pa.float64())),
    # what scoring the candidate executed (``compute``), also in original-base forward passes
    ("macs_executed", pa.int64()), ("forward_equivalents", pa.float64()),
])


def write_table(path, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


class HistoryWriter:
    """Collects one step's candidates and writes them as ``history/step_NNN.parquet``
    when the step ends (before its checkpoint, so a resumed step rewrites it)."""

    def __init__(self, folder, algo: str, *, base_macs: int):
        """``base_macs``: MACs of one image through the original base model."""
        self.folder = Path(folder)
        self.algo = algo
        self.base_macs = base_macs
        self.rows: list[dict] = []

    def add(self, c, seconds: float = 0.0) -> None:
        self.rows.append({
            "step": -1, "iteration": c.iteration, "evaluation": c.index, "algo": self.algo, "source": c.source,
            "reward": c.reward, "accuracy": c.accuracy, "macs": c.macs, "params": c.params,
            "filters_removed": int(np.sum(c.counts)), "chosen": False, "seconds": seconds,
            "distribution": np.asarray(c.distribution, np.float32).tolist(),
            "counts": np.asarray(c.counts, np.int32).tolist(),
            "learner_stats": None if c.learner_stats is None else list(c.learner_stats.items()),
            "macs_executed": int(c.macs_executed), "forward_equivalents": c.macs_executed / self.base_macs,
        })

    def flush(self, step: int, chosen_index: int) -> None:
        for r in self.rows:
            r["step"] = step
            r["chosen"] = r["evaluation"] == chosen_index
        write_table(self.folder / f"step_{step:03d}.parquet", pa.Table.from_pylist(self.rows, HISTORY_SCHEMA))
        self.rows = []

    @staticmethod
    def combine(folder, path) -> None:
        parts = sorted(Path(folder).glob("step_*.parquet"))
        tables = [pq.read_table(p) for p in parts]
        table = pa.concat_tables(tables) if tables else HISTORY_SCHEMA.empty_table()
        write_table(path, table)


def write_report(summary: dict, path) -> None:
    """report.png: accuracy and MACs per step, channels per group before/after."""
    import matplotlib.pyplot as plt
    fig = report_figure(summary)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def report_figure(summary: dict):
    """The figure of :func:`write_report` (the caller closes it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    steps = summary["steps"]
    x = [s["step"] for s in steps]           # numbered from 1; 0 is the base model
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.2), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    ax = axes[0]
    ax.plot([0] + x, [summary["base"]["val_top1"]] + [s["val_top1"] for s in steps], "o-", label="after fine-tuning")
    ax.plot(x, [s["val_top1_before_finetune"] for s in steps], "s--", label="before fine-tuning")
    ax.plot(x, [s["chosen_accuracy"] for s in steps], "^:", label="reward batches (search)")
    ax.set(xlabel="pruning step", ylabel="validation top-1", title="Accuracy per step")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.plot([0] + x, [1.0] + [1 - s["macs_reduction"] for s in steps], "o-", label="MACs")
    ax.plot([0] + x, [1.0] + [1 - s["params_reduction"] for s in steps], "s-", label="params")
    ax.plot([0] + x, [1.0] + [1 - s["sparsity"] for s in steps], "^-", label="filters")
    ax.set(xlabel="pruning step", ylabel="fraction of the base model", title="Size per step", ylim=(0, 1.05))
    ax.legend(fontsize=8)
    for ax in axes[:2]:     # steps are whole numbers (matplotlib would tick 0.2, 0.4 ... for one step)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax = axes[2]
    before = summary["channels_before"]
    after = summary["channels_after"]
    keys = summary.get("groups") or list(before)    # the layers' order in the model
    idx = np.arange(len(keys))
    ax.bar(idx, [before[k] for k in keys], color="#bbbbbb", label="before")
    ax.bar(idx, [after[k] for k in keys], color="#1f77b4", label="after")
    ax.set(xlabel="group (root layer, in model order)", ylabel="channels", title="Channels per group")
    ax.set_xticks(idx, keys, rotation=60, ha="right", fontsize=max(4, min(8, 400 // max(len(keys), 1))))
    ax.legend(fontsize=8)
    cfg = summary["config"]
    fig.suptitle(f"{cfg['model']} on {cfg['dataset']}: {cfg['algo']}, {cfg['target']} sparsity {cfg['sparsity']:g} — "
                 f"test top-1 {summary['base']['test_top1']:.3f} → {summary['pruned']['test_top1']:.3f}, "
                 f"MACs −{100 * summary['reductions']['macs']:.1f}%", fontsize=11)
    fig.tight_layout()
    return fig


class LearningCurves:
    """TensorBoard event files in ``folder`` (``tensorboard --logdir RUN/tensorboard``):
    every evaluation's reward and accuracy, indexed by evaluations spent in the run,
    and each step's results, indexed by step number (0: the base model)."""

    def __init__(self, folder):
        from tensorboardX import SummaryWriter   # comes with ray[tune]
        self.writer = SummaryWriter(str(folder), flush_secs=30)

    def evaluation(self, spent: int, c) -> None:
        self.writer.add_scalar("evaluation/reward", c.reward, spent)
        self.writer.add_scalar("evaluation/accuracy", c.accuracy, spent)
        self.writer.add_scalar("evaluation/macs", c.macs, spent)

    def step(self, number: int, values: dict) -> None:
        for key, value in values.items():
            self.writer.add_scalar(f"step/{key}", value, number)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
