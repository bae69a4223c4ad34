"""A GPU sweep on an autoscaled cluster that starts with 0 GPU workers.

The cluster is clusters/aws-gpu.yaml scaled down to this machine, with Ray's
fake multi-node provider in place of AWS: the real autoscaler starts and stops
"GPU nodes" as local Ray processes that declare 1 GPU each (none is real, so
the sweep runs with ``--device cpu`` while Ray places it by GPU resource).
The sweep is submitted the way users do, ``scripts/sweep.py`` against the head.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rlpruner_ray.sweep.storage import ROWS_FILE, TRIAL_FILE, read_json, read_rows

from .local_cluster import TINY_SWEEP, AutoscalingCluster, fake_autoscaling_config

ROOT = Path(__file__).resolve().parent.parent
SPARSITIES = {"0.2": 2, "0.3": 3}          # steps per trial at --step-fraction 0.1
ALGOS = ("uniform", "random")
# a trial: its own process {CPU: 1} and one evaluation actor {CPU: 1, GPU: 0.5}; one per 2-CPU node
GPU_SWEEP = ["--gpus-per-worker", "0.5", "--device", "cpu", "--autoscale-timeout", "300"]


@pytest.fixture(scope="module")
def cluster():
    config = fake_autoscaling_config(ROOT / "clusters" / "aws-gpu.yaml", cpus_per_node=2, max_workers=2,
                                     idle_timeout_minutes=0.1)
    with AutoscalingCluster(config) as c:
        yield c


def _sweep(cluster, out: Path, *args: str, log: Path) -> subprocess.Popen:
    """``scripts/sweep.py`` on the head machine, joining the cluster (as `ray submit` runs it)."""
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "scripts/sweep.py", "--out-dir", str(out), *args],
                                cwd=ROOT, env={**cluster.env, "RAY_ADDRESS": cluster.address},
                                start_new_session=True, stdout=f, stderr=subprocess.STDOUT)


def _started_gpu_trial(out: Path, head: str):
    """A trial on its first attempt on an autoscaled node, past its first step and
    not finished: (its node, name, rows reported so far); None until then. The
    first one is of the first two trials (both nodes busy, two trials waiting):
    after the kill the autoscaler must replace the lost node."""
    for work in (out / "trials").glob("*"):
        info = read_json(work / TRIAL_FILE)
        if (info.get("attempts") == 1 and info.get("node_id") not in (None, head)
                and not (work / "summary.json").exists()):
            reported = len(read_rows(work / ROWS_FILE))
            if reported:
                return info["node_id"], work.name, reported
    return None


@pytest.mark.slow
def test_request_no_node_type_can_hold_is_refused_at_once(cluster, tmp_path):
    """2 GPUs per actor: no node type of the cluster has more than 1."""
    out = tmp_path / "sw"
    t0 = time.time()
    r = subprocess.run([sys.executable, "scripts/sweep.py", "-q", "--out-dir", str(out), "--sparsity", "0.2",
                        *TINY_SWEEP, "--gpus-per-worker", "2", "--device", "cpu"],
                       cwd=ROOT, env={**cluster.env, "RAY_ADDRESS": cluster.address}, capture_output=True,
                       text=True, timeout=300)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
    assert "no node the autoscaler may launch can hold it" in lines[0] and "gpu_worker: 2 CPU, 1 GPU x2" in lines[0]
    assert time.time() - t0 < 120                      # at once: the driver's start, no waiting
    assert not out.exists()
    assert cluster.worker_ids() == set()               # and nothing was asked of the autoscaler


def _wait_for_scale_down(cluster, timeout: float = 180) -> None:
    """Until the autoscaler has removed every idle node (idle_timeout_minutes 0.1)."""
    until = time.time() + timeout
    while cluster.worker_ids():
        assert time.time() < until, "the autoscaler kept idle nodes"
        time.sleep(2)


def _evaluation_actors(cluster) -> list[dict]:
    actors = (cluster.get("/api/v0/actors?limit=1000&detail=true") or {})["data"]["result"]["result"]
    return [a for a in actors if a.get("class_name") == "EvalWorker"]


@pytest.mark.slow
def test_gpu_compress_waits_for_the_autoscaler(cluster, tmp_path):
    """compress's evaluation actor (0.5 GPU) waits for a GPU node instead of being refused."""
    out = tmp_path / "run"
    assert cluster.worker_ids() == set()
    r = subprocess.run([sys.executable, "scripts/compress.py", "--out-dir", str(out), "--sparsity", "0.1",
                        *TINY_SWEEP, *GPU_SWEEP], cwd=ROOT, env={**cluster.env, "RAY_ADDRESS": cluster.address},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "1 evaluation actors needs 1 CPU, 0.5 GPU; the cluster has nothing: waiting up to 300 s" in r.stderr
    assert (out / "summary.json").is_file()
    actors = _evaluation_actors(cluster)
    assert len(actors) == 1 and actors[0]["node_id"] != cluster.head_id, actors
    _wait_for_scale_down(cluster)


@pytest.mark.slow
def test_gpu_sweep_scales_up_survives_a_lost_node_and_scales_down(cluster, tmp_path):
    out = tmp_path / "sw"
    head = cluster.head_id
    assert cluster.worker_ids() == set()                                       # 0 GPU workers to start with
    # the evaluation actors of an earlier test of this cluster (its nodes are gone)
    earlier_nodes = {a["node_id"] for a in _evaluation_actors(cluster)}
    log = tmp_path / "driver.log"
    driver = _sweep(cluster, out, "--sparsity", *SPARSITIES, "--algo", *ALGOS, "--max-failures", "3",
                    *TINY_SWEEP, *GPU_SWEEP, log=log)
    seen: set[str] = set()
    killed = None
    deadline = time.time() + 900
    try:
        while driver.poll() is None:
            assert time.time() < deadline, log.read_text()[-4000:]
            seen |= cluster.worker_ids()
            if killed is None and (hit := _started_gpu_trial(out, head)):
                assert cluster.kill_worker(hit[0]) >= 3                    # raylet, agents, trial, actor
                killed = hit
            time.sleep(0.2)
        assert driver.returncode == 0, log.read_text()[-4000:]
        text = log.read_text()
        assert "waiting up to 300 s for the autoscaler to add nodes" in text, text[-4000:]
        assert killed is not None, "no trial was caught mid-run"

        # evaluation actors ran on the autoscaled GPU nodes only
        evaluators = [a for a in _evaluation_actors(cluster) if a["node_id"] not in earlier_nodes]
        assert evaluators and all(a["node_id"] in seen for a in evaluators), evaluators
        for a in evaluators:             # in a placement group Ray names it GPU_group_<i>_<group id>
            gpus = {v for k, v in (a.get("required_resources") or {}).items() if k.split("_group_")[0] == "GPU"}
            assert gpus == {0.5}, a

        _wait_for_scale_down(cluster)             # idle nodes go again
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, 9)
            driver.wait()

    rows = pq.read_table(out / "results.parquet").to_pylist()
    expected = sorted((a, float(s), step) for a in ALGOS for s, n in SPARSITIES.items()
                      for step in range(1, n + 1))           # steps are numbered from 1
    assert sorted((x["algo"], x["sparsity"], x["step"]) for x in rows) == expected      # every step, once
    assert sum(bool(x["final"]) for x in rows) == len(ALGOS) * len(SPARSITIES)
    assert all(x["node_id"] in seen and x["node_id"] != head for x in rows)             # only on GPU nodes
    assert len(seen) >= 3                              # two nodes at once, and the lost one's replacement

    lost_node, name, reported = killed
    mine = sorted((x for x in rows if x["trial"] == name), key=lambda x: x["step"])
    assert read_json(out / "trials" / name / TRIAL_FILE)["attempts"] >= 2
    assert [x["attempt"] for x in mine[:reported]] == [1] * reported                  # kept, not rerun
    assert {x["node_id"] for x in mine[reported:]} and lost_node not in {x["node_id"] for x in mine[reported:]}
