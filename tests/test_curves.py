"""Best-so-far reward curves (rlpruner_ray.curves): running maxima from a run's
history, the median and min-max band over seeds, and the PNG."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from rlpruner_ray.curves import band, best_so_far, history_curve, write_best_so_far_plot
from rlpruner_ray.report import HISTORY_SCHEMA


def _history(path, steps: dict[int, list[float]]):
    rows = []
    for step, rewards in steps.items():
        # written out of order: the curve follows the evaluation numbers, not the row order
        for i in reversed(range(len(rewards))):
            rows.append({"step": step, "iteration": 0, "evaluation": i, "algo": "random", "source": "sample",
                         "reward": rewards[i], "accuracy": 0.5, "macs": 1.0, "params": 1.0, "filters_removed": 1,
                         "chosen": False, "seconds": 0.0, "distribution": [1.0], "counts": [1],
                         "learner_stats": None})
    pq.write_table(pa.Table.from_pylist(rows, HISTORY_SCHEMA), path)


def test_best_so_far_is_the_running_maximum():
    assert best_so_far([0.2, 0.1, 0.5, 0.3, 0.6]).tolist() == [0.2, 0.2, 0.5, 0.5, 0.6]


def test_history_curve_follows_evaluations_and_averages_steps(tmp_path):
    path = tmp_path / "history.parquet"
    _history(path, {1: [0.1, 0.4, 0.2], 2: [0.3, 0.2, 0.5, 0.9]})
    # step 2 cut to step 1's three evaluations: [0.3, 0.3, 0.5]; step 1: [0.1, 0.4, 0.4]
    assert np.allclose(history_curve(path), [0.2, 0.35, 0.45])


def test_band_is_median_min_and_max_over_seeds():
    x, median, low, high = band([[1, 2, 3], [0, 5, 5, 9], [2, 2, 2]])
    assert x.tolist() == [1, 2, 3]
    assert median.tolist() == [1, 2, 3] and low.tolist() == [0, 2, 2] and high.tolist() == [2, 5, 5]
    assert all(len(a) == 0 for a in band([]))


def test_the_plot_is_a_png_with_one_shot_points_and_search_curves(tmp_path):
    out = tmp_path / "sub" / "best.png"
    write_best_so_far_plot({"random": [[0.1, 0.3], [0.2, 0.2]], "tp-global": [[0.25], [0.3]], "none": []}, out)
    assert out.read_bytes()[:4] == b"\x89PNG"
