"""User models written with functional code (tests/user_models.py) through the
whole default ``rlpruner compress`` on the embedded digits data, with small
budgets; a Torch-Pruning failure only skips its optional candidate, and an
unexpected error inside a step stops in one line and leaves the finished steps
resumable."""
from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from rlpruner_ray import pipeline
from rlpruner_ray.checkpoint import load_pruned
from rlpruner_ray.cli import main
from rlpruner_ray.conformance import end_to_end_flags
from tests.user_models import FAMILY

# the default job with budgets small enough for a test (the conformance script's end-to-end check)
SMALL = end_to_end_flags()
STARTS = ["uniform", "global", "tp-global"]


def _compress(out, *args) -> int:
    # on the shared Ray (compress leaves a Ray it did not start running): each run
    # pays for its actors, not for a cluster
    return main(["-q", "compress", "--out-dir", str(out), *SMALL, *args])


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILY)
def test_user_model_finishes_the_default_compress(name, tmp_path, ray_session, capsys):
    out = tmp_path / name
    assert _compress(out, "--model", f"tests.user_models:{name}") == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["steps"]) == 1 and summary["evaluations"] == 4
    assert summary["pruned"]["macs"] < summary["base"]["macs"]
    small = load_pruned(out / "pruned_model.pt", allow_import=f"tests.user_models:{name}")
    assert sum(p.numel() for p in small.parameters()) == summary["pruned"]["params"]
    # the starting candidates come first, each by name; Torch-Pruning's only where it could be built
    rows = pq.read_table(out / "history.parquet").to_pylist()
    sources = [r["source"] for r in rows]
    skipped = [s["candidate"] for s in summary["skipped"]]
    # exact integer sizes: the chosen candidate's closed-form cost is the pruned model's count
    chosen = [r for r in rows if r["chosen"]]
    assert len(chosen) == 1 and (chosen[0]["macs"], chosen[0]["params"]) == \
        (summary["steps"][0]["macs"], summary["steps"][0]["params"]) == \
        (summary["pruned"]["macs"], summary["pruned"]["params"])
    assert sources[:3 - len(skipped)] == [s for s in STARTS if s not in skipped]
    assert set(sources[3 - len(skipped):]) == {"sample"}
    assert summary["steps"][0]["skipped"] == [{k: v for k, v in s.items() if k != "step"}
                                              for s in summary["skipped"]]


@pytest.mark.slow
def test_torch_pruning_failure_skips_its_candidate(tmp_path, ray_session, capfd):
    """The issue's usernet2: Torch-Pruning's importance raises IndexError inside its
    pruner; the run goes on without that candidate and says why, everywhere."""
    out = tmp_path / "usernet2"
    assert main(["compress", "--out-dir", str(out), "--model", "tests.user_models:usernet2", *SMALL]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["skipped"] == [{"step": 1, "candidate": "tp-global",
                                   "reason": summary["skipped"][0]["reason"]}]
    assert summary["skipped"][0]["reason"].startswith("IndexError: ")
    assert "tp-global candidate is skipped: IndexError" in capfd.readouterr().err   # (the terminal's fd)
    sources = pq.read_table(out / "history.parquet").column("source").to_pylist()
    assert sources[:2] == ["uniform", "global"] and "tp-global" not in sources


def test_starting_candidates_are_named_and_a_failing_one_is_skipped_with_its_reason():
    """usernet2: Torch-Pruning's own importance raises IndexError (not PlanError) inside
    its pruner; the other starting candidates stay, by name."""
    import numpy as np
    import torch
    from rlpruner_ray.graph import PruningGraph
    from rlpruner_ray.search.base import StepContext
    from rlpruner_ray.config import CompressConfig
    from rlpruner_ray.plans import baseline_plans
    from tests.user_models import mean_pooled, usernet2
    for factory, skipped in ((usernet2, ["tp-global"]), (mean_pooled, [])):
        graph = PruningGraph(factory(10, 1).eval(), torch.randn(1, 1, 12, 12))
        graph.compute_scores("l1")
        ctx = StepContext(0, 1, graph, np.random.default_rng(0),
                          extras={"num_filters": graph.max_removable // 2, "cost_target": None})
        items = baseline_plans(ctx, CompressConfig())
        assert [source for source, _ in items] == [s for s in STARTS if s not in skipped]
        assert [s["candidate"] for s in ctx.skipped] == skipped
        assert all(s["reason"].startswith("IndexError: ") for s in ctx.skipped)


def test_torch_pruning_algo_on_such_a_model_is_refused_before_any_work(tmp_path, capsys):
    for algo in ("tp-global", "tp-uniform"):
        out = tmp_path / algo
        assert _compress(out, "--model", "tests.user_models:usernet2", "--algo", algo) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith(f"rlpruner: error: --algo {algo}: Torch-Pruning"), err
        assert not out.exists()


@pytest.mark.slow
def test_unexpected_error_in_step_2_leaves_step_1_resumable(tmp_path, ray_session, capsys, monkeypatch):
    out = tmp_path / "run"
    args = ["--sparsity", "0.5", "--step-fraction", "0.25"]
    real, calls = pipeline.finetune_kd, []

    def fails_in_step_2(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("injected fault")
        return real(*a, **k)

    monkeypatch.setattr(pipeline, "finetune_kd", fails_in_step_2)
    capsys.readouterr()
    assert _compress(out, *args) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("rlpruner: error: step 2/2 of model resnet8 failed: RuntimeError: injected fault")
    assert "--resume" in err[0]
    log = (out / "log.txt").read_text()
    assert "Traceback" in log and "injected fault" in log
    assert [p.name for p in (out / "steps").glob("step_*.pt")] == ["step_001.pt"]

    monkeypatch.setattr(pipeline, "finetune_kd", real)
    assert _compress(out, *args, "--resume") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [1, 2]


@pytest.mark.slow
def test_conformance_script_runs_named_models_end_to_end(tmp_path, ray_session, capsys):
    import csv
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[1] / "scripts" / "conformance.py"
    spec = importlib.util.spec_from_file_location("conformance_script", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out, table = tmp_path / "c.md", tmp_path / "c.csv"
    assert script.main(["--models", "tests.user_models:usernet2", "--out", str(out), "--csv", str(table)]) == 0
    with open(table) as f:
        (row,) = list(csv.DictReader(f))
    assert (row["status"], row["end_to_end"]) == ("ok", "ok")
    assert row["end_to_end_reason"] == "tp-global skipped"
    assert "- `tests.user_models:usernet2`: ok (tp-global skipped)" in out.read_text()
