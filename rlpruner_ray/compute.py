"""Compute accounting: the one place that turns forward and backward passes into
MACs executed, and the ledger every stage of a run adds to.

Everything is counted in multiply-accumulates of the model that actually ran, per
image, as Torch-Pruning's counter gives them (``measure.macs_params``):

* a forward pass over ``n`` images of a model costs ``n x its MACs per image``;
  a weight-masked candidate runs at its base model's full size (zeroed channels
  are still multiplied), a physically pruned one at its own size;
* a training batch adds a backward pass, counted as ``BACKWARD_FACTOR`` forwards
  (the gradients with respect to the activations and to the weights each cost
  about one forward pass), so a student costs ``1 + BACKWARD_FACTOR`` forwards per
  image and a KD teacher (forward only, no gradients) one.

``forward_equivalents`` divides MACs by the *original* base model's MACs per image:
the number of single-image forward passes of the unpruned model the work is worth,
the unit a benchmark converts between methods with. Single-image traces that only
read a model's structure (building a pruning graph, counting MACs) are not counted.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

import torch.nn as nn

# a backward pass costs about two forward passes (activation and weight gradients)
BACKWARD_FACTOR = 2

# every stage a run can spend compute in, in the order a run reaches them
STAGES = ("base_training", "importance", "search", "bn_recalibration", "rescore", "selection_kd", "fine_tune",
          "evaluation", "latency_timing")

# what every scored candidate carries about its compute (Candidate fields of the same
# names): all its passes, BN recalibration's share of them, and the scoring worker's
# seconds in all and in recalibration
SCORED_KEYS = ("macs_executed", "bn_recalibration_macs", "worker_s", "bn_recalibration_s")


def model_macs(model: nn.Module, example_inputs) -> int:
    """MACs of one image through ``model`` (its real, possibly pruned, size)."""
    from .measure import macs_params
    weight = next(model.parameters(), None)
    example = example_inputs[:1] if weight is None else example_inputs[:1].to(weight.device)
    macs, _ = macs_params(model, example)
    return int(round(macs))


def forward_macs(macs_per_image: int, images: int) -> int:
    """A forward pass of ``images`` images."""
    return int(macs_per_image) * int(images)


def train_batch_macs(macs_per_image: int, images: int) -> int:
    """One training batch of a model: forward and backward."""
    return forward_macs(macs_per_image, images) * (1 + BACKWARD_FACTOR)


def kd_batch_macs(student_macs: int, teacher_macs: int, images: int) -> int:
    """One KD batch: the teacher's forward (at its size) plus the student's forward
    and backward (at its pruned size)."""
    return forward_macs(teacher_macs, images) + train_batch_macs(student_macs, images)


def kd_batch_compute(student: nn.Module, teacher: nn.Module, example_inputs, batch_size: int,
                     base_macs: int) -> dict:
    """The compute of one KD batch of ``batch_size`` images for this pruned
    ``student`` and its ``teacher``: what a benchmark divides extra compute by to
    give a one-shot method the same compute as extra KD batches."""
    macs = kd_batch_macs(model_macs(student, example_inputs), model_macs(teacher, example_inputs), batch_size)
    return {"macs": macs, "forward_equivalents": macs / base_macs}


@contextmanager
def counting_forwards(model: nn.Module, macs_per_image: int):
    """Count every image that goes through ``model``'s forward while inside; the
    yielded list's single entry holds the MACs so far (a hook sees every pass, also
    ones a caller would forget to count by hand)."""
    total = [0]

    def hook(_module, args):
        total[0] += forward_macs(macs_per_image, args[0].shape[0])

    handle = model.register_forward_pre_hook(hook)
    try:
        yield total
    finally:
        handle.remove()


class Ledger:
    """MACs and wall time per stage of one run. ``timed`` contexts may nest: an
    inner stage's time is taken out of the outer one, so stage times never count
    the same second twice."""

    def __init__(self, state: dict | None = None):
        self.macs = {s: 0 for s in STAGES}
        self.wall = {s: 0.0 for s in STAGES}
        self._open: list[float] = []       # inner seconds of each open ``timed`` context
        self.restore(state)

    def restore(self, state: dict | None) -> None:
        """Take the counts of ``state_dict()`` (a resumed run's earlier sessions)."""
        for s in STAGES if state else ():
            self.macs[s] = int(state["macs"].get(s, 0))
            self.wall[s] = float(state["wall"].get(s, 0.0))

    def add(self, stage: str, macs: int = 0, seconds: float = 0.0) -> None:
        if stage not in self.macs:
            raise KeyError(f"unknown compute stage {stage!r}; expected one of {', '.join(STAGES)}")
        self.macs[stage] += int(macs)
        self.wall[stage] += float(seconds)

    @contextmanager
    def timed(self, stage: str):
        if stage not in self.wall:
            raise KeyError(f"unknown compute stage {stage!r}; expected one of {', '.join(STAGES)}")
        started = time.perf_counter()
        self._open.append(0.0)
        try:
            yield self
        finally:
            elapsed = time.perf_counter() - started
            inner = self._open.pop()
            self.wall[stage] += elapsed - inner
            if self._open:
                self._open[-1] += elapsed

    def forward(self, stage: str, macs_per_image: int, images: int) -> None:
        self.add(stage, forward_macs(macs_per_image, images))

    def state_dict(self) -> dict:
        return {"macs": dict(self.macs), "wall": dict(self.wall)}

    def summary(self, base_macs: int, wall_s: float) -> dict:
        """The run's ``compute`` entry: totals and every stage, MACs as integers,
        forward-equivalents of the original base model, wall seconds (the total is
        the run's wall time, which also holds what no stage claims: start-up,
        writing files)."""
        def entry(macs, seconds):
            return {"macs": int(macs), "forward_equivalents": macs / base_macs, "wall_s": float(seconds)}

        total = sum(self.macs.values())
        return {**entry(total, wall_s), "base_macs_per_image": int(base_macs),
                "backward_factor": BACKWARD_FACTOR,
                "by_stage": {s: entry(self.macs[s], self.wall[s]) for s in STAGES}}
