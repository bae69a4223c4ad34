"""allocate: a distribution -> whole channels per group, on plain arrays (no model)."""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rlpruner_ray import allocate as alloc
from rlpruner_ray.allocate import align_to_units, allocate, group_floors, normalise_distribution, round_widths, water_fill
from rlpruner_ray.errors import PlanError

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True, database=None)


def test_the_module_needs_numpy_only():
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(alloc))):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported <= {"numpy", "__future__"}, imported


def test_water_fill_is_proportional_and_exact():
    counts = water_fill(np.array([0.5, 0.25, 0.25]), np.array([100, 100, 100]), 40)
    assert counts.tolist() == [20, 10, 10]
    # largest remainders take the leftover units: 7 * (0.5, 0.25, 0.25) = 3.5, 1.75, 1.75
    counts = water_fill(np.array([0.5, 0.25, 0.25]), np.array([100, 100, 100]), 7)
    assert counts.sum() == 7 and counts.tolist() == [3, 2, 2]


def test_water_fill_spills_a_full_group_onto_the_weighted_ones_only():
    counts = water_fill(np.array([0.8, 0.2, 0.0]), np.array([5, 100, 100]), 30)
    assert counts.tolist() == [5, 25, 0]   # the zero-weight group gets nothing while group 1 has room
    counts = water_fill(np.array([0.8, 0.2, 0.0]), np.array([5, 10, 100]), 30)
    assert counts.tolist() == [5, 10, 15]  # ... and only what the weighted ones cannot take


def test_water_fill_spreads_weights_too_small_to_earn_a_unit():
    counts = water_fill(np.array([1e-12, 2e-12, 1.0]), np.array([3, 3, 0]), 2)
    assert counts.tolist() == [1, 1, 0]


def test_align_to_units_keeps_grouped_counts_whole_and_the_total():
    units = np.array([4, 1, 1])
    counts = align_to_units(np.array([6, 5, 5]), units, np.array([12, 20, 20]), np.array([1 / 3] * 3), 16)
    assert counts[0] % 4 == 0 and counts.sum() == 16 and np.all(counts <= [12, 20, 20])


def test_round_widths_leaves_multiples_of_r_where_the_floor_allows():
    widths = np.array([30, 64, 13])
    capacity = np.array([29, 63, 5])          # group 2 may keep 8..13: 8 is the only multiple of 8
    counts = round_widths(np.array([10, 20, 3]), widths, capacity, 8, 33)
    assert ((widths - counts) % 8 == 0).all() and abs(int(counts.sum()) - 33) < 8
    assert counts[0] == 6                      # 30 -> 24 kept, not 32 (more than the group has)


def test_group_floors():
    channels, units = np.array([10, 64, 3, 32]), np.array([1, 1, 1, 8])
    assert group_floors(channels, units, 1, 1.0).tolist() == [1, 1, 1, 8]   # the grouped one keeps a whole position
    assert group_floors(channels, units, 4, 0.5).tolist() == [5, 32, 3, 16]


@pytest.mark.parametrize("bad", [[1.0, 2.0], [np.nan, 1, 1], [np.inf, 1, 1], [-1, 1, 1], [0, 0, 0]])
def test_normalise_distribution_refuses(bad):
    with pytest.raises(PlanError):
        normalise_distribution(bad, 3)


def test_normalise_distribution_survives_huge_entries():
    assert normalise_distribution([1e308, 1e308, 0], 3).tolist() == [0.5, 0.5, 0.0]


@pytest.mark.parametrize("kwargs, num_filters", [({"round_to": 0}, 1), ({}, -1), ({}, 100)])
def test_allocate_refuses(kwargs, num_filters):
    channels = np.array([10, 20, 30])
    with pytest.raises(PlanError):
        allocate([1, 1, 1], num_filters, channels, np.ones(3, np.int64), np.ones(3, np.int64), **kwargs)


@SETTINGS
@given(widths=st.lists(st.integers(1, 64), min_size=1, max_size=8), data=st.data())
def test_allocate_sums_exactly_within_floors_and_units(widths, data):
    channels = np.array(widths, np.int64)
    units = np.array([data.draw(st.sampled_from([u for u in (1, 2, 4) if w % u == 0])) for w in widths], np.int64)
    floors = group_floors(channels, units, 1, data.draw(st.floats(0.1, 1.0)))
    done = np.array([data.draw(st.integers(0, int(c - f) // u)) * u for c, f, u in zip(channels, floors, units)])
    room = int((channels - floors - done).sum())
    num_filters = data.draw(st.integers(0, room))
    weights = data.draw(st.lists(st.floats(0.0, 1.0), min_size=len(widths), max_size=len(widths)))
    weights[0] += 1e-3                     # not all zero
    counts = allocate(weights, num_filters, channels, floors, units, already_removed=done)
    assert np.all(counts >= 0) and np.all(counts + done <= channels - floors)
    assert np.all(counts % units == 0)
    if np.all(units == 1):
        assert counts.sum() == num_filters
