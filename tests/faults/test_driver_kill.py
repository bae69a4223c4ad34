"""SIGKILL the ``rlpruner compress`` driver again and again at random points
(seeded), resuming with ``--resume`` each time: the run completes and its
``summary.json`` and ``history.parquet`` match an uninterrupted run with the
same seed (wall times and latencies aside). The kills land inside a file write
(between the temp file and its rename), during a search, during fine-tuning,
and after a random delay; tests/faults/killable_driver.py places them.

Only the driver is killed, as a crash or an OOM kill would; Ray's processes
follow it (its agents linger up to about a minute, so the test clears them to
keep the two CPU cores for the next attempt).
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rlpruner_ray.report import HISTORY_SCHEMA

DRIVER = Path(__file__).with_name("killable_driver.py")
TINY = ["--sparsity", "0.3", "--step-fraction", "0.1", "--evaluations-per-step", "6",
        "--samples-per-iteration", "3", "--finetune-epochs", "1", "--num-workers", "1", "--seed", "11"]
# not results: differ between any two runs
VOLATILE = {"wall_seconds", "search_seconds", "step_seconds", "latency_ms_cpu_b1", "latency_ms_cpu_b64",
            "latency_ms_gpu_b64", "latency_ms_cpu_b1_quartiles", "latency_ms_cpu_b64_quartiles",
            "latency_ms_gpu_b64_quartiles", "latency_ratio_cpu_b1", "latency_ratio_cpu_b64",
            "latency_ratio_gpu_b64", "out_dir", "resume", "seconds", "wall_s",
            # compute counts the passes a run made: a run killed and resumed makes a
            # different set (redone or skipped work, depending on where the kill fell)
            "compute", "macs_executed", "forward_equivalents"}


def _start(out: Path, base, *, env=None, log=None) -> subprocess.Popen:
    args = [sys.executable, str(DRIVER), "compress", "--out-dir", str(out), "--base-checkpoint", str(base), *TINY]
    if (out / "config.json").exists():
        args.append("--resume")
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=log or subprocess.DEVNULL,
                            start_new_session=True, env={**os.environ, **(env or {})})


def _clear_group(pgid: int) -> None:
    """Ray processes the killed driver left behind (its agents outlive it ~60 s)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _same(a, b, path="") -> None:
    """Equal up to float tolerance, ignoring VOLATILE keys."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and set(a) - VOLATILE == set(b) - VOLATILE, (path, set(a) ^ set(b))
        for k in a:
            if k not in VOLATILE:
                _same(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), (path, a, b)
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and not isinstance(b, bool):
        assert isinstance(b, (int, float)) and math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9), (path, a, b)
    else:
        assert a == b, (path, a, b)


def _files(out: Path) -> list[str]:
    """Result files; not Ray's, the log or the TensorBoard events (one per attempt)."""
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if p.is_file() and p.relative_to(out).parts[0] not in ("ray", "tensorboard", "log.txt"))


@pytest.mark.slow
def test_driver_killed_at_random_points_resumes_to_the_same_result(tmp_path, base_checkpoint):
    ref = tmp_path / "ref"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, str(DRIVER), "-q", "compress", "--out-dir", str(ref),
                           "--base-checkpoint", str(base_checkpoint), *TINY], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ref_seconds = time.perf_counter() - t0
    started = time.perf_counter()
    # how long an attempt that starts with k steps done should take: the fixed part
    # (start-up, Ray, actors, final report) plus the steps still to do
    step_seconds = [s["step_seconds"] for s in json.loads((ref / "summary.json").read_text())["steps"]]
    fixed = ref_seconds - sum(step_seconds)

    def expected(steps_done: int) -> float:
        return fixed + sum(step_seconds[steps_done:])

    # -- the kill schedule, from a seeded RNG: inside the k-th file write (k over the whole
    #    run: config, base model, step files, model, history, report, summary), during a
    #    search, during fine-tuning, and once after a random fraction of the attempt's
    #    expected duration (wherever that lands)
    rng = random.Random(20241129)
    schedule = [("write", f"write:{rng.randint(3, 12)}"),
                ("search", f"search:{rng.randint(1, 2)}:{rng.uniform(0.0, 0.3):.3f}"),
                ("finetune", f"finetune:1:{rng.uniform(0.05, 0.5):.3f}"),
                ("delay", rng.uniform(0.15, 0.8))]
    run = tmp_path / "killed"
    kill_log = tmp_path / "kills.log"
    steps = run / "steps"
    kills = []
    for attempt, (kind, how) in enumerate(schedule):
        log_path = tmp_path / f"attempt{attempt}.log"
        done_before = len(list(steps.glob("step_*.pt"))) if steps.exists() else 0
        env = {"RLPR_KILL_LOG": str(kill_log)}
        if kind != "delay":
            env["RLPR_KILL"] = how
        with open(log_path, "w") as log:
            proc = _start(run, base_checkpoint, env=env, log=log)
            try:
                rc = proc.wait(timeout=600 if kind != "delay" else how * expected(done_before))
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)           # the driver only
                rc = proc.wait()
        _clear_group(proc.pid)
        if kind == "delay" and rc == 0:      # a slow machine: the run ended before the random kill
            break
        assert rc == -signal.SIGKILL, (kind, how, rc, log_path.read_text()[-3000:])
        lines = log_path.read_text().splitlines()
        kills.append({"kind": kind, "how": how if kind != "delay" else f"{how * expected(done_before):.1f} s",
                      "steps_before": done_before,
                      "steps_after": len(list(steps.glob("step_*.pt"))) if steps.exists() else 0,
                      "last_log": lines[-1][:100] if lines else ""})
    killed_by_hook = [ln for ln in kill_log.read_text().splitlines() if ln.startswith("KILL")]
    assert len(killed_by_hook) == 3, killed_by_hook

    if not (run / "summary.json").exists():
        with open(tmp_path / "final.log", "w") as log:
            last = _start(run, base_checkpoint, env={"RLPR_KILL_LOG": str(kill_log)}, log=log)
            assert last.wait(timeout=600) == 0, (tmp_path / "final.log").read_text()[-3000:]
        _clear_group(last.pid)
    print(f"\n{len(kills)} kills, {len(kills)} resumes (uninterrupted run {ref_seconds:.0f} s; killed and "
          f"resumed runs {time.perf_counter() - started:.0f} s in all):")
    for k in kills:
        print(f"  {k['kind']} {k['how']}: steps on disk {k['steps_before']} -> {k['steps_after']}; "
              f"last log: {k['last_log']}")
    print("  " + "\n  ".join(killed_by_hook))

    # -- same results as the uninterrupted run
    _same(json.loads((run / "summary.json").read_text()), json.loads((ref / "summary.json").read_text()))
    got, want = pq.read_table(run / "history.parquet"), pq.read_table(ref / "history.parquet")
    assert got.schema.equals(HISTORY_SCHEMA)
    assert got.num_rows == want.num_rows == 18
    _same(got.to_pylist(), want.to_pylist())
    # ... and the same files: every write of a killed attempt was finished or cleaned up
    assert _files(run) == _files(ref)
