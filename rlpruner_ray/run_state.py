"""What a run of ``compress`` carries from one pruning step to the next: one type,
written as each step's checkpoint (``steps/step_NNN.pt``) and read back by ``--resume``.

The file is one ``torch.save`` dict of plain data (it loads with
``weights_only=True``), with the keys in this order: ``model`` (a model record,
:func:`checkpoint.model_record`), ``steps`` (the step records so far),
``algo_state``, ``teacher`` (a model record, or None when the base model is the
teacher), ``teacher_acc``, ``wall_seconds`` (the run's kept wall time at the save)
and ``compute`` (the ledger's state). Runs written before this type existed have
the same layout, so they resume unchanged.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.nn as nn

from . import checkpoint as ckpt
from . import compute


@dataclass
class RunState:
    """The run after its last finished step (or before its first).

    ``model``: the model the next step prunes (the base model before the first
    step). ``teacher``: the KD teacher when a pruned model has become it, else None
    (the base model teaches). ``wall_before``: wall seconds of the kept work of this
    run's earlier processes; ``started``: when this process began (``perf_counter``),
    so :meth:`wall_seconds` counts kept work only, not work a kill threw away."""

    model: nn.Module
    teacher: nn.Module | None = None
    teacher_acc: float | None = None
    steps: list[dict] = field(default_factory=list)
    algo_state: dict = field(default_factory=dict)
    ledger: compute.Ledger = field(default_factory=compute.Ledger)
    wall_before: float = 0.0
    started: float = field(default_factory=time.perf_counter)

    def wall_seconds(self) -> float:
        """The run's wall time so far: earlier processes' kept work plus this one's."""
        return self.wall_before + time.perf_counter() - self.started

    def to_record(self) -> dict:
        """The checkpoint's dict (the key order is the file's, see the module's docstring)."""
        return {"model": ckpt.model_record(self.model), "steps": self.steps, "algo_state": self.algo_state,
                "teacher": None if self.teacher is None else ckpt.model_record(self.teacher),
                "teacher_acc": self.teacher_acc, "wall_seconds": self.wall_seconds(),
                "compute": self.ledger.state_dict()}

    def checkpoint(self, path) -> None:
        """Write the state as a checkpoint, atomically (a kill mid-write leaves the
        previous file). (Not named ``save``: the package's only ``save`` calls are
        checkpoint.py's, which tests/faults/test_atomic_writes.py checks.)"""
        ckpt.save_tensors(path, self.to_record())

    @classmethod
    def load(cls, path, *, allow_import: bool | str = False, device="cpu", started: float | None = None
             ) -> RunState:
        """Read a checkpoint written by :meth:`checkpoint`; its models go to ``device``.
        ``started``: when this process began (default: now)."""
        record = ckpt.load_tensors(path)
        teacher = record["teacher"]
        return cls(model=ckpt.model_from_record(record["model"], allow_import=allow_import).to(device),
                   teacher=(None if teacher is None
                            else ckpt.model_from_record(teacher, allow_import=allow_import).to(device)),
                   teacher_acc=record["teacher_acc"], steps=list(record["steps"]),
                   algo_state=record["algo_state"],
                   # (a run of a version without compute records is refused earlier: its config.json
                   # lacks selection_fraction, so --resume finds different settings)
                   ledger=compute.Ledger(record["compute"]),
                   wall_before=float(record.get("wall_seconds", 0.0)),
                   started=time.perf_counter() if started is None else started)
