"""What a new user meets: help with sections and defaults, refusals before any
other line, the project's own lines only (Ray's in log.txt), progress, learning
curves, steps numbered from 1, groups in layer order, file modes, and a resumed
finished run left as it was."""
from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch

from rlpruner_ray import console
from rlpruner_ray.cli import build_parser
from rlpruner_ray.config import CompressConfig
from rlpruner_ray.measure import compare_latency

TINY = ["--sparsity", "0.2", "--step-fraction", "0.1", "--evaluations-per-step", "4",
        "--samples-per-iteration", "2", "--finetune-epochs", "1", "--num-workers", "1", "--seed", "5"]


def _cli(*args, umask=None):
    """``rlpruner`` as a user runs it: no -q."""
    def set_umask():
        os.umask(umask)
    return subprocess.run([sys.executable, "-m", "rlpruner_ray", *args], capture_output=True, text=True,
                          timeout=600, preexec_fn=set_umask if umask is not None else None)


def _scalars(folder) -> dict[str, list[tuple[int, float]]]:
    """Scalars of the TensorBoard event files in ``folder`` (TFRecord framing:
    length, its CRC, the Event, its CRC)."""
    from tensorboardX.proto import event_pb2
    out: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for v in event.summary.value:
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


# ---------------------------------------------------------------------- help and refusals
def test_help_groups_options_and_shows_defaults():
    text = build_parser()._subparsers._group_actions[0].choices["compress"].format_help()
    sections = [line[:-1] for line in text.splitlines() if line and not line[0].isspace() and line.endswith(":")]
    assert sections[1:] == ["data", "model", "base training", "target", "search", "rlpruner algorithm",
                            "RLlib policies (--algo ppo, ...)", "workers", "fine-tuning", "run"]
    flat = " ".join(text.split())
    for shown in ("(default: digits)", "(default: resnet8)", "(default: 0.5)", "(default: 200)",
                  "(default: rlpruner)", "(default: runs/default)", "(default: 10)"):
        assert shown in flat, shown
    assert "usage: rlpruner compress [options]" in text


def test_unknown_model_is_refused_before_any_other_line(tmp_path):
    r = _cli("compress", "--model", "not_a_model", "--out-dir", str(tmp_path / "x"))
    assert r.returncode == 2
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlpruner: error: unknown model"), r.stderr
    assert r.stdout == "" and not (tmp_path / "x").exists()


def test_resuming_a_run_with_0_based_step_files_is_refused(tmp_path):
    out = tmp_path / "old"
    (out / "steps").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(CompressConfig(out_dir=str(out)).to_dict()))
    (out / "steps" / "step_000.pt").write_bytes(b"old")
    r = _cli("compress", "--out-dir", str(out), "--resume")
    assert r.returncode == 2 and "steps numbered from 0" in r.stderr and len(r.stderr.splitlines()) == 1


def test_graph_groups_follow_the_layers_order_in_the_model():
    from rlpruner_ray.graph import PruningGraph
    from rlpruner_ray.models import build_model
    model = build_model("vgg11", 10, 3)             # features.10 comes after features.3
    keys = PruningGraph(model, torch.zeros(1, 3, 32, 32)).keys
    order = [name for name, _ in model.named_modules()]
    assert keys == sorted(keys, key=order.index) and keys != sorted(keys)


# ---------------------------------------------------------------------- progress and latency
def test_plain_progress_lines_only_for_long_work(monkeypatch):
    monkeypatch.setattr(console._state, "quiet", False)
    quick, slow = io.StringIO(), io.StringIO()
    with console.Progress(5, "step 1/5 evaluations", stream=quick) as bar:
        for _ in range(5):
            bar.update()
    assert quick.getvalue() == ""                           # short work: nothing on top of the step line
    with console.Progress(3, "step 2/50 evaluations", stream=slow, every_s=0.0) as bar:
        for _ in range(3):
            bar.update()
    assert slow.getvalue().splitlines()[-1].startswith("[rlpruner] step 2/50 evaluations: 3/3 (")


def test_progress_bar_on_a_terminal(monkeypatch):
    import pty
    monkeypatch.setattr(console._state, "quiet", False)
    master, slave = pty.openpty()                           # a terminal with no size, like `script`'s
    with os.fdopen(slave, "w") as stream:
        with console.Progress(3, "step 1/5 evaluations", stream=stream) as bar:
            for _ in range(3):
                bar.update()
        stream.flush()
        drawn = os.read(master, 65536)
    os.close(master)
    assert b"[rlpruner] step 1/5 evaluations:" in drawn and b"0/3" in drawn, drawn


def test_latency_of_two_models_is_timed_in_alternation():
    order = []

    class Tagged(torch.nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def forward(self, x):
            order.append(self.tag)
            return x

    timed = compare_latency({"base": Tagged("b"), "pruned": Tagged("p")}, (1, 4, 4), rounds=4, warmup=1)
    assert "".join(order) == "bppbbppbbp"                   # each round both, in alternating order
    for t in timed.values():
        assert len(t["times"]) == 4 and t["q1"] <= t["median"] <= t["q3"]


def test_latency_is_timed_on_one_thread_and_the_count_restored():
    """CPU latency runs on one torch thread (two threads on busy cores moved batch-1
    medians 20-fold between timings), and the caller's thread count comes back."""
    seen = []

    class Counting(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.get_num_threads())
            return x

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        compare_latency({"m": Counting()}, (1, 2, 2), rounds=2, warmup=1)
        assert set(seen) == {1} and torch.get_num_threads() == 2
        seen.clear()
        compare_latency({"m": Counting()}, (1, 2, 2), rounds=2, warmup=1, threads=None)
        assert set(seen) == {2}
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------- one compress run
@pytest.mark.slow
def test_compress_output_files_and_conventions(tmp_path, base_checkpoint):
    out = tmp_path / "run"
    args = ["compress", "--out-dir", str(out), "--base-checkpoint", str(base_checkpoint), *TINY]
    r = _cli(*args, umask=0o022)
    assert r.returncode == 0, r.stderr[-3000:]

    # -- the terminal shows the project's lines only; the rest is in log.txt
    lines = r.stderr.splitlines()
    assert lines and all(ln.startswith("[rlpruner] ") for ln in lines), r.stderr
    assert [ln for ln in lines if "step 1/2:" in ln] and [ln for ln in lines if "step 2/2:" in ln]
    assert "test top-1" in r.stdout and "latency b1 (CPU, 1 thread)" in r.stdout
    assert (out / "log.txt").is_file()

    # -- steps numbered from 1 everywhere a person reads them
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [1, 2]
    assert sorted(p.name for p in (out / "steps").glob("step_*.pt")) == ["step_001.pt", "step_002.pt"]
    assert sorted(p.name for p in (out / "history").glob("*.parquet")) == ["step_001.parquet", "step_002.parquet"]
    assert sorted(set(pq.read_table(out / "history.parquet").column("step").to_pylist())) == [1, 2]

    # -- groups in the layers' order in the model, the same order in every listing
    from rlpruner_ray.checkpoint import load_pruned
    module_order = [name for name, _ in load_pruned(base_checkpoint).named_modules()]
    groups = summary["groups"]
    assert groups == sorted(groups, key=module_order.index)
    assert list(summary["channels_before"]) == groups == list(summary["channels_after"])
    assert all(len(s["counts"]) == len(groups) for s in summary["steps"])
    for i, g in enumerate(groups):     # each step's counts line up with the group names
        removed = sum(s["counts"][i] for s in summary["steps"])
        assert summary["channels_after"][g] == summary["channels_before"][g] - removed, g

    # -- latency: median and quartiles of interleaved runs
    for side in ("base", "pruned"):
        q1, q3 = summary[side]["latency_ms_cpu_b1_quartiles"]
        assert q1 <= summary[side]["latency_ms_cpu_b1"] <= q3

    # -- learning curves as TensorBoard event files
    scalars = _scalars(out / "tensorboard")
    assert [s for s, _ in scalars["evaluation/reward"]] == list(range(1, 9))
    assert [s for s, _ in scalars["step/val_top1"]] == [0, 1, 2]
    assert [v for _, v in scalars["step/val_top1"]][1:] == pytest.approx([s["val_top1"] for s in summary["steps"]])

    # -- files get the mode the umask gives, like any tool's output
    for name in ("config.json", "summary.json", "pruned_model.pt", "report.png", "history.parquet",
                 "steps/step_001.pt", "base_model.pt"):
        assert (out / name).stat().st_mode & 0o777 == 0o644, name

    # -- resuming a finished run leaves its results as they were
    before = {p: (out / p).read_bytes() for p in ("summary.json", "history.parquet", "report.png")}
    again = _cli(*args, "--resume")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished" in again.stderr
    assert {p: (out / p).read_bytes() for p in before} == before


def test_latency_repeats_until_its_time_is_spent_in_even_rounds():
    import time as _time

    class Sleeper(torch.nn.Module):
        def __init__(self, seconds):
            super().__init__()
            self.seconds = seconds

        def forward(self, x):
            _time.sleep(self.seconds)
            return x

    timed = compare_latency({"base": Sleeper(0.002), "pruned": Sleeper(0.001)}, (1, 2, 2), rounds=4, warmup=2,
                            min_seconds=0.5)
    base, pruned = timed["base"]["times"], timed["pruned"]["times"]
    n = len(base)
    assert n == len(pruned) and n > 4 and n % 2 == 0                      # 0.5 s of ~3 ms rounds
    # it stopped at the first even round past 0.5 s: the rounds before the last two
    # took less than that (their timed passes are a lower bound of their wall time;
    # the passes alone can sum to a little under 0.5 s, the loop's own time not in them)
    assert sum(base[:-2]) + sum(pruned[:-2]) < 500.0
    assert "ratio" in timed["pruned"] and "ratio" not in timed["base"]
    # the ratio is of the fastest passes, which a slow spell of the machine cannot move
    assert timed["pruned"]["ratio"] == min(pruned) / min(base) and timed["base"]["min"] == min(base)
    capped = compare_latency({"m": Sleeper(0.0)}, (1, 2, 2), rounds=2, warmup=0, min_seconds=60, max_rounds=6)
    assert len(capped["m"]["times"]) == 6


@pytest.mark.parametrize("num_steps", [1, 3])
def test_report_ticks_whole_steps(num_steps):
    import matplotlib.pyplot as plt
    from rlpruner_ray.report import report_figure
    steps = [{"step": k, "val_top1": 0.9, "val_top1_before_finetune": 0.5, "chosen_accuracy": 0.4,
              "macs_reduction": 0.1 * k, "params_reduction": 0.1 * k, "sparsity": 0.1 * k}
             for k in range(1, num_steps + 1)]
    summary = {"steps": steps, "base": {"val_top1": 0.95, "test_top1": 0.94}, "pruned": {"test_top1": 0.9},
               "reductions": {"macs": 0.3}, "channels_before": {"a": 8}, "channels_after": {"a": 4},
               "groups": ["a"], "config": {"model": "m", "dataset": "d", "algo": "rlpruner", "target": "filters",
                                           "sparsity": 0.5}}
    fig = report_figure(summary)
    try:
        for ax in fig.axes[:2]:
            lo, hi = ax.get_xlim()
            ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
            assert ticks and all(float(t).is_integer() for t in ticks), ticks
    finally:
        plt.close(fig)
