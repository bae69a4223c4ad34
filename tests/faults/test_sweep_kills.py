"""SIGKILL during a sweep on a real two-node cluster: one Tune trial's process, and
a whole worker node (every process of it at once, as when its machine dies).
The sweep still completes with every trial and step, and nothing a trial had
reported before the kill is computed again."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ..local_cluster import TINY_SWEEP, LocalCluster, wait_until

ROOT = Path(__file__).resolve().parents[2]
SPARSITIES = {"0.3": 3, "0.4": 4}        # steps per trial at --step-fraction 0.1


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _running_trials(out: Path) -> dict | None:
    """Both trials on their first attempt, each past its first step and not done:
    {trial name: its trial.json}; None until then."""
    found = {}
    for work in (out / "trials").glob("*"):
        info, rows = _read(work / "trial.json"), work / "rows.jsonl"
        if (info and info.get("attempts") == 1 and rows.is_file() and rows.read_text().strip()
                and not (work / "summary.json").exists()):
            found[work.name] = info
    return found if len(found) == len(SPARSITIES) else None


@pytest.mark.slow
def test_sweep_survives_a_killed_trial_and_a_lost_worker_node(tmp_path):
    out = tmp_path / "sw"
    with LocalCluster(cpus_per_node=2) as cluster:           # one trial per node at a time
        worker = cluster.add_worker()
        head = cluster.nodes[0]
        driver = subprocess.Popen(
            [sys.executable, "scripts/sweep.py", "-q", "--out-dir", str(out), "--sparsity", *SPARSITIES,
             "--max-failures", "3", *TINY_SWEEP],
            cwd=ROOT, env={**cluster.env, "RAY_ADDRESS": cluster.address}, start_new_session=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            running = wait_until(lambda: _running_trials(out), timeout=420, alive=driver,
                                 what="both trials past their first step")
            by_node = {info["node_id"]: name for name, info in running.items()}
            assert set(by_node) == {head.node_id, worker.node_id}, running
            on_head, on_worker = by_node[head.node_id], by_node[worker.node_id]
            reported = {name: len((out / "trials" / name / "rows.jsonl").read_text().splitlines())
                        for name in running}

            os.kill(running[on_head]["pid"], signal.SIGKILL)          # one Tune trial
            assert worker.kill() > 3                                   # one worker node, all its processes
            cluster.wait_for_nodes(1)

            log, _ = driver.communicate(timeout=600)
            assert driver.returncode == 0, log[-4000:]
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()

    rows = pq.read_table(out / "results.parquet").to_pylist()
    expected = sorted((float(s), step) for s, n in SPARSITIES.items() for step in range(n))
    assert sorted((x["sparsity"], x["step"]) for x in rows) == expected       # every step, once
    assert sum(bool(x["final"]) for x in rows) == len(SPARSITIES)
    for name in (on_head, on_worker):
        mine = sorted((x for x in rows if x["trial"] == name), key=lambda x: x["step"])
        info = _read(out / "trials" / name / "trial.json")
        assert info["attempts"] >= 2, (name, info)                 # it really was interrupted
        # steps reported before the kill were kept, not run again
        assert [x["attempt"] for x in mine[:reported[name]]] == [1] * reported[name], mine
        # the lost node's trial finished on the node that was left
        assert mine[-1]["node_id"] == head.node_id
    assert {x["node_id"] for x in rows} == {head.node_id, worker.node_id}
