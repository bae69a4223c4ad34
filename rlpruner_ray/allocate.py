"""A pruning distribution -> whole channels to remove per group (numpy only).

The integer side of planning, apart from any model: each group has ``channels``,
keeps at least its ``floors``, and loses channels in multiples of its ``units``
(a grouped convolution's conv groups). :func:`allocate` turns a distribution
over the groups into counts that sum exactly to the filters asked for.
"""
from __future__ import annotations

import numpy as np

from .errors import PlanError


def group_floors(channels: np.ndarray, units: np.ndarray, min_channels: int,
                 max_group_sparsity: float) -> np.ndarray:
    """Channels each group keeps at least: ``min_channels``, and no more than
    ``max_group_sparsity`` of its channels gone."""
    floors = np.maximum(min_channels, np.ceil(channels * (1.0 - max_group_sparsity)))
    floors = np.minimum(floors.astype(np.int64), channels)
    # a grouped conv's group keeps whole positions: what it can lose is a multiple of its unit
    return channels - (channels - floors) // units * units


def normalise_distribution(distribution, num_groups: int) -> np.ndarray:
    """``distribution`` as float64 shares summing to 1, or a PlanError for one of
    the wrong length, with NaN, infinite or negative entries, or all zero."""
    d = np.asarray(distribution, dtype=np.float64).reshape(-1)
    if d.shape[0] != num_groups:
        raise PlanError(f"distribution has {d.shape[0]} entries, the model has {num_groups} groups")
    if not np.all(np.isfinite(d)):
        raise PlanError("distribution has NaN or infinite entries")
    if np.any(d < 0):
        raise PlanError("distribution has negative entries")
    if d.max() <= 0:
        raise PlanError("distribution is all zero")
    d = d / d.max()   # first: a sum of huge entries would overflow to inf (and every share to 0)
    return d / d.sum()


def allocate(distribution, num_filters: int, channels: np.ndarray, floors: np.ndarray, units: np.ndarray, *,
             round_to: int = 1, already_removed=None) -> np.ndarray:
    """Filters to remove per group: proportional to ``distribution``, capped by
    each group's floor, summing exactly to ``num_filters``.

    Largest-remainder rounding keeps the total exact; a group that hits its
    floor hands its excess to the others in proportion to their weights.
    With ``round_to`` > 1 each group keeps a multiple of ``round_to`` channels
    where its floor allows, and the total is the closest such to ``num_filters``.
    ``already_removed`` (per group) is subtracted from each group's capacity.
    """
    d = normalise_distribution(distribution, len(channels))
    if round_to < 1:
        raise PlanError(f"round_to must be >= 1, got {round_to}")
    done = np.zeros(len(channels), np.int64) if already_removed is None else np.asarray(already_removed, np.int64)
    capacity = np.maximum(channels - floors - done, 0)
    num_filters = int(num_filters)
    if num_filters < 0:
        raise PlanError(f"num_filters must be >= 0, got {num_filters}")
    if num_filters > capacity.sum():
        raise PlanError(f"cannot remove {num_filters} filters: at most {int(capacity.sum())} "
                        "can go while every group keeps its floor")
    counts = water_fill(d, capacity, num_filters)
    if round_to > 1:
        counts = round_widths(counts, channels - done, capacity, round_to, num_filters)
    if np.any(units > 1):
        counts = align_to_units(counts, units, capacity, d, int(counts.sum()))
    return counts


def water_fill(weights: np.ndarray, capacity: np.ndarray, total: int) -> np.ndarray:
    """Integer counts ~ weights * total, each within capacity, summing to total."""
    counts = np.zeros_like(capacity)
    remaining = total
    active = capacity > 0
    w = np.where(active, weights, 0.0)
    if w.sum() <= 0:                      # all the weight sits on full groups
        w = active.astype(float)
    while remaining > 0:
        share = w / w.sum() * remaining
        free = capacity - counts
        take = np.minimum(np.floor(share).astype(np.int64), free)
        # largest remainders get the leftover units, among groups with room
        left = remaining - int(take.sum())
        if left > 0:
            # (weighted groups only: a capped group's excess must not leak onto
            # zero-weight groups while weighted ones still have room)
            frac = np.where((free - take > 0) & (w > 0), share - np.floor(share), -1.0)
            for g in np.argsort(-frac, kind="stable")[:left]:
                if frac[g] >= 0:
                    take[g] += 1
        counts += take
        remaining -= int(take.sum())
        full = counts >= capacity
        if remaining > 0 and int(take.sum()) == 0:
            # weights too small to earn a whole unit anywhere: spread by weight order
            for g in np.argsort(-np.where(full, -1, w), kind="stable"):
                if remaining == 0:
                    break
                if not full[g]:
                    counts[g] += 1
                    remaining -= 1
                    full[g] = counts[g] >= capacity[g]
        w = np.where(full, 0.0, w)
        if w.sum() <= 0 and remaining > 0:
            w = (~full).astype(float)
    return counts


def align_to_units(counts, units, capacity, weights, target):
    """Counts of grouped-conv groups to the nearest multiple of their unit (within
    capacity); the difference moves to the other groups by weight, and whatever
    they cannot take back to the grouped ones in whole units."""
    counts = counts.copy()
    grouped = units > 1
    counts[grouped] = np.minimum(np.round(counts[grouped] / units[grouped]) * units[grouped], capacity[grouped])
    free = ~grouped
    diff = target - int(counts.sum())
    if diff > 0:
        room = np.where(free, capacity - counts, 0)
        counts += water_fill(np.where(free, weights, 0.0), room, min(diff, int(room.sum())))
    elif diff < 0:
        have = np.where(free, counts, 0)
        counts -= water_fill(np.where(free, weights, 0.0), have, min(-diff, int(have.sum())))
    for g in np.flatnonzero(grouped & (weights > 0)):   # what is left: whole units, while that gets closer
        diff = target - int(counts.sum())
        step = units[g] if diff > 0 else -units[g]
        if abs(diff - step) < abs(diff) and 0 <= counts[g] + step <= capacity[g]:
            counts[g] += step
    return counts


def round_widths(counts, widths, capacity, r, target):
    """Move each group's remaining width to a multiple of ``r`` (where the floor
    allows), then adjust whole units of ``r`` toward ``target``."""
    share = counts.astype(float)          # the proportional plan, before any rounding
    counts = counts.copy()
    for g in range(len(counts)):
        keep = int(widths[g] - counts[g])
        # nearest multiple of r that fits between the floor and the full width
        # (rounding to the nearest alone skips a width of 30 -> 32 > 30 instead of 24)
        options = [m for m in (max(r, -(-keep // r) * r), max(r, keep // r * r))
                   if 0 <= widths[g] - m <= capacity[g]]
        if options:
            counts[g] = widths[g] - min(options, key=lambda m: abs(m - keep))
    while True:
        diff = target - counts.sum()
        if abs(diff) < r:
            return counts
        step = r if diff > 0 else -r
        room = (counts + step <= capacity) & (counts + step >= 0)
        if not room.any():
            return counts
        # adjust the group whose count is furthest from its proportional share, on
        # the side the step moves it toward (most below it when adding, most above
        # when taking back)
        g = int(np.argmax(np.where(room, step * (share - counts), -np.inf)))
        counts[g] += step
