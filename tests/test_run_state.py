"""RunState: what a run carries between steps, written as each step's checkpoint
and read back by --resume. A round trip keeps everything; a checkpoint written in
the layout runs have always had (before the type existed) still loads."""
from __future__ import annotations

import numpy as np
import torch

from rlpruner_ray import checkpoint as ckpt
from rlpruner_ray import compute
from rlpruner_ray.graph import HISTORY_ATTR, PruningGraph
from rlpruner_ray.models import build_model, model_spec
from rlpruner_ray.run_state import RunState

# the step checkpoint's keys, in the order every version of compress wrote them
KEYS = ["model", "steps", "algo_state", "teacher", "teacher_acc", "wall_seconds", "compute"]


def _models():
    """A tagged base model and a physically pruned copy (its record carries a pruning history)."""
    torch.manual_seed(0)
    base = ckpt.tag_model(build_model("resnet8", 10, 1), model_spec("resnet8", 10, 1), (1, 8, 8))
    graph = PruningGraph(base, torch.randn(1, 1, 8, 8))
    plan = np.minimum(graph.channels - graph.floors, 1)
    return base, graph.prune(plan)


def _ledger() -> compute.Ledger:
    ledger = compute.Ledger()
    ledger.add("search", macs=1234, seconds=0.5)
    ledger.add("fine_tune", macs=99)
    return ledger


def _same_model(a, b) -> None:
    assert getattr(a, HISTORY_ATTR, []) == getattr(b, HISTORY_ATTR, [])
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_checkpoint_then_load_keeps_everything(tmp_path):
    base, small = _models()
    steps = [{"step": 1, "counts": [1, 2], "chosen_accuracy": 0.5, "evaluations": 6}]
    for teacher in (None, small):        # None: the base model teaches
        state = RunState(model=small, teacher=teacher, teacher_acc=0.75, steps=steps,
                         algo_state={"distribution": [0.25, 0.75], "iteration": 3}, ledger=_ledger(),
                         wall_before=10.0)
        path = tmp_path / "step_001.pt"
        state.checkpoint(path)
        back = RunState.load(path, allow_import="resnet8", started=123.0)
        _same_model(back.model, small)
        assert (back.teacher is None) == (teacher is None)
        if teacher is not None:
            _same_model(back.teacher, teacher)
        assert back.teacher_acc == 0.75 and back.steps == steps
        assert back.algo_state == {"distribution": [0.25, 0.75], "iteration": 3}
        assert back.ledger.state_dict() == _ledger().state_dict()
        assert back.started == 123.0
        # the saved wall time is the earlier processes' plus this one's up to the save
        assert back.wall_before >= 10.0
        assert back.wall_before == ckpt.load_tensors(path)["wall_seconds"]


def test_the_file_keeps_the_layout_of_earlier_runs(tmp_path):
    """A checkpoint written as compress wrote it before RunState existed loads into
    the same state, and RunState writes the same keys in the same order."""
    base, small = _models()
    steps = [{"step": 1, "counts": [1], "chosen_accuracy": 0.5}]
    old = tmp_path / "old.pt"
    ckpt.save_tensors(old, {"model": ckpt.model_record(small), "steps": steps, "algo_state": {"k": 1},
                            "teacher": ckpt.model_record(small), "teacher_acc": 0.6, "wall_seconds": 42.5,
                            "compute": _ledger().state_dict()})
    state = RunState.load(old, allow_import="resnet8")
    _same_model(state.model, small)
    _same_model(state.teacher, small)
    assert (state.steps, state.algo_state, state.teacher_acc, state.wall_before) == (steps, {"k": 1}, 0.6, 42.5)
    assert state.ledger.state_dict() == _ledger().state_dict()

    new = tmp_path / "new.pt"
    state.checkpoint(new)
    a, b = ckpt.load_tensors(old), ckpt.load_tensors(new)
    assert list(a) == list(b) == KEYS
    for key in ("steps", "algo_state", "teacher_acc", "compute"):
        assert a[key] == b[key]
    assert b["wall_seconds"] >= 42.5
    assert ckpt.model_record(small).keys() == b["model"].keys() == b["teacher"].keys()
