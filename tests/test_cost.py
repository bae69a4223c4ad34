"""cost: the one bisection to a cost target and the target-kind helper (no model)."""

from __future__ import annotations

import pytest

from rlpruner_ray.cost import cost_axis, smallest_meeting


@pytest.mark.parametrize("threshold", [0, 1, 7, 63, 100])
def test_smallest_meeting_over_integers(threshold):
    tried = []

    def meets(n):
        tried.append(n)
        return n >= threshold

    assert smallest_meeting(meets, 0, 100) == threshold
    assert tried[0] == 100                       # the upper end first
    assert len(tried) <= 9                       # a bisection, not a scan


def test_smallest_meeting_is_none_when_even_the_upper_end_misses():
    assert smallest_meeting(lambda n: n >= 101, 0, 100) is None
    assert smallest_meeting(lambda r: r >= 0.95, 0.0, 0.9, tolerance=1e-4) is None


def test_smallest_meeting_over_reals_returns_a_tried_upper_end():
    tried = set()

    def meets(r):
        tried.add(r)
        return r >= 0.3

    r = smallest_meeting(meets, 0.0, 0.9, tolerance=1e-4)
    assert 0.3 <= r <= 0.3 + 1e-4 and r in tried


def test_cost_axis():
    assert cost_axis("macs") == 0 and cost_axis("params") == 1
