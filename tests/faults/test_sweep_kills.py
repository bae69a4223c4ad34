"""SIGKILL during a sweep on a real two-node cluster: one Tune trial's process, and
a whole worker node (every process of it at once, as when its machine dies).
The sweep still completes with every trial and step, and nothing a trial had
reported before the kill is computed again."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rlpruner_ray.sweep.storage import ROWS_FILE, TRIAL_FILE, read_json, read_rows

from ..local_cluster import TINY_SWEEP, LocalCluster

ROOT = Path(__file__).resolve().parents[2]
SPARSITIES = {"0.3": 3, "0.4": 4}        # steps per trial at --step-fraction 0.1


def _in_progress(out: Path, node_id: str):
    """The trial on its first attempt on node ``node_id``, past its first step and
    not finished: (name, its trial.json, rows reported so far); None until then."""
    for work in (out / "trials").glob("*"):
        info = read_json(work / TRIAL_FILE)
        if info.get("node_id") == node_id and info.get("attempts") == 1 and not (work / "summary.json").exists():
            reported = len(read_rows(work / ROWS_FILE))
            if reported:
                return work.name, info, reported
    return None


@pytest.mark.slow
def test_sweep_survives_a_killed_trial_and_a_lost_worker_node(tmp_path):
    out = tmp_path / "sw"
    with LocalCluster(cpus_per_node=2) as cluster:           # one trial per node at a time
        worker = cluster.add_worker()
        head = cluster.nodes[0]
        log_file = tmp_path / "driver.log"
        with open(log_file, "w") as log:             # a file, not a pipe nobody reads while it runs
            driver = subprocess.Popen(
                [sys.executable, "scripts/sweep.py", "-q", "--out-dir", str(out), "--sparsity", *SPARSITIES,
                 "--max-failures", "3", *TINY_SWEEP],
                cwd=ROOT, env={**cluster.env, "RAY_ADDRESS": cluster.address}, start_new_session=True,
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 420
        try:
            # each target is hit as soon as its own trial is past its first step
            hit = {}
            while len(hit) < 2:
                if head.node_id not in hit and (t := _in_progress(out, head.node_id)):
                    os.kill(t[1]["pid"], signal.SIGKILL)            # one Tune trial
                    hit[head.node_id] = t
                if worker.node_id not in hit and (t := _in_progress(out, worker.node_id)):
                    assert worker.kill() > 3                         # one worker node, all its processes
                    hit[worker.node_id] = t
                assert driver.poll() is None and time.time() < deadline, (
                    f"a trial ended before it could be killed (hit: {sorted(hit.values())})\n"
                    + log_file.read_text()[-3000:])
                time.sleep(0.1)
            cluster.wait_for_nodes(1)
            (on_head, _, head_rows), (on_worker, _, worker_rows) = hit[head.node_id], hit[worker.node_id]
            reported = {on_head: head_rows, on_worker: worker_rows}

            driver.wait(timeout=600)
            assert driver.returncode == 0, log_file.read_text()[-4000:]
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()

    rows = pq.read_table(out / "results.parquet").to_pylist()
    expected = sorted((float(s), step) for s, n in SPARSITIES.items() for step in range(1, n + 1))
    assert sorted((x["sparsity"], x["step"]) for x in rows) == expected       # every step, once
    assert sum(bool(x["final"]) for x in rows) == len(SPARSITIES)
    for name in (on_head, on_worker):
        mine = sorted((x for x in rows if x["trial"] == name), key=lambda x: x["step"])
        info = read_json(out / "trials" / name / TRIAL_FILE)
        assert info["attempts"] >= 2, (name, info)                 # it really was interrupted
        # steps reported before the kill were kept, not run again
        assert [x["attempt"] for x in mine[:reported[name]]] == [1] * reported[name], mine
        # the lost node's trial finished on the node that was left
        assert mine[-1]["node_id"] == head.node_id
    assert {x["node_id"] for x in rows} == {head.node_id, worker.node_id}
