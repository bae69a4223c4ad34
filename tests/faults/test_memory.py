"""Memory stays flat over a long search: resident memory of the driver and of
every evaluation actor after 2,000 evaluations is within 10% of what it was
after 200. The search runs the way the pipeline runs it: one Evaluator and one
history file per step of 200 evaluations, rows streamed to Parquet at each step."""
from __future__ import annotations

import gc

import pyarrow.parquet as pq
import pytest
import ray  # noqa: F401

from rlpruner_ray.report import HistoryWriter
from rlpruner_ray.search.base import Evaluator
from rlpruner_ray.search.registry import make_algorithm

from .helpers import step_context

PER_STEP = 200
STEPS = 10


def _rss(pids) -> dict[int, int]:
    import psutil
    return {pid: psutil.Process(pid).memory_info().rss for pid in pids}


@pytest.mark.slow
def test_rss_flat_over_2000_evaluations(pool, published, tmp_path):
    import os
    pids = [os.getpid()] + [d["pid"] for d in pool.describe()]
    search = make_algorithm(published["config"])
    history = HistoryWriter(tmp_path / "history", algo="rlpruner", base_macs=10**6)
    after: dict[int, dict[int, int]] = {}
    for step in range(STEPS):
        evaluator = Evaluator(lambda ds: pool.evaluate(ds, 0), PER_STEP, on_candidate=history.add)
        chosen = search.search(step_context(published, step=step), evaluator)
        assert evaluator.used == PER_STEP
        assert len(history.rows) == PER_STEP
        history.flush(step, chosen.index)
        assert history.rows == []            # nothing held across steps
        del evaluator, chosen
        gc.collect()
        after[(step + 1) * PER_STEP] = _rss(pids)

    assert [d["pid"] for d in pool.describe()] == pids[1:]      # no actor was restarted on the way
    total = sum(pq.read_table(p).num_rows for p in (tmp_path / "history").glob("step_*.parquet"))
    assert total == PER_STEP * STEPS
    early, late = after[PER_STEP], after[PER_STEP * STEPS]
    growth = {pid: late[pid] / early[pid] - 1 for pid in pids}
    print("RSS MiB after 200 / 2000 evaluations:",
          {pid: (round(early[pid] / 2**20), round(late[pid] / 2**20)) for pid in pids})
    for pid, g in growth.items():
        assert g < 0.10, f"process {pid} grew {g:.1%} between 200 and 2000 evaluations"
