"""compress() end to end on real digits data: output files and schemas, resume
of a run that stopped before its report (kills at random points: faults/), and
refusals before any work."""
from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from rlpruner_ray.cli import main
from rlpruner_ray.config import CompressConfig
from rlpruner_ray.report import HISTORY_SCHEMA

SMALL = ["--sparsity", "0.3", "--step-fraction", "0.1", "--evaluations-per-step", "6",
         "--samples-per-iteration", "3", "--finetune-epochs", "1", "--num-workers", "2", "--seed", "3"]


def _cli(args, **kw):
    return subprocess.run([sys.executable, "-m", "rlpruner_ray", "-q", *args], capture_output=True, text=True,
                          timeout=600, **kw)


def _comparable(summary):
    keep = ("filters_removed", "sparsity", "macs", "params", "chosen_reward", "chosen_accuracy", "counts",
            "val_top1_before_finetune", "val_top1", "evaluations")
    return {"steps": [{k: s[k] for k in keep} for s in summary["steps"]],
            "test": summary["pruned"]["test_top1"], "macs": summary["pruned"]["macs"]}


@pytest.mark.slow
def test_compress_end_to_end_and_resume_after_the_last_step(tmp_path, base_checkpoint):
    common = ["--base-checkpoint", str(base_checkpoint), *SMALL]
    ref = tmp_path / "ref"
    done = _cli(["compress", "--out-dir", str(ref), *common])
    assert done.returncode == 0, done.stderr

    # -- output files and schemas
    for name in ("summary.json", "history.parquet", "pruned_model.pt", "report.png", "config.json"):
        assert (ref / name).is_file(), name
    summary = json.loads((ref / "summary.json").read_text())
    assert len(summary["steps"]) == 3 and summary["evaluations"] == 18
    assert summary["reductions"]["filters"] == pytest.approx(0.3, abs=0.01)
    assert summary["pruned"]["macs"] < summary["base"]["macs"]
    assert summary["pruned"]["test_top1"] > 0.3     # well above chance (0.1) after 6 evaluations a step
    table = pq.read_table(ref / "history.parquet")
    assert table.schema.equals(HISTORY_SCHEMA)
    assert table.num_rows == 18
    rows = table.to_pylist()
    assert sum(r["chosen"] for r in rows) == 3          # one chosen candidate per step
    assert (ref / "report.png").read_bytes()[:4] == b"\x89PNG"
    from rlpruner_ray.checkpoint import load_pruned
    small = load_pruned(ref / "pruned_model.pt")
    assert sum(p.numel() for p in small.parameters()) == summary["pruned"]["params"]

    # -- killed after the last step's checkpoint but before the report: resume only reports
    # (kills at random points, with resumes, are in tests/faults/test_driver_kill.py)
    steps_before = {p.name: p.stat().st_mtime_ns for p in (ref / "steps").glob("step_*.pt")}
    (ref / "summary.json").unlink()
    (ref / "history.parquet").unlink()
    again = _cli(["compress", "--out-dir", str(ref), *common, "--resume"])
    assert again.returncode == 0, again.stderr
    resumed = json.loads((ref / "summary.json").read_text())
    assert _comparable(resumed) == _comparable(summary)
    # its wall time counts the first attempt's steps too, not only the resume's report
    from rlpruner_ray.checkpoint import load_tensors
    kept = load_tensors(ref / "steps" / "step_003.pt")["wall_seconds"]
    assert kept >= sum(s["step_seconds"] for s in summary["steps"]) and resumed["wall_seconds"] > kept
    t2 = pq.read_table(ref / "history.parquet").drop(["seconds"])
    assert t2.equals(table.drop(["seconds"]))
    assert {p.name: p.stat().st_mtime_ns for p in (ref / "steps").glob("step_*.pt")} == steps_before


def test_refusals_write_nothing(tmp_path, base_checkpoint, capsys):
    out = tmp_path / "run"
    # (--evaluations-per-step 0 and a missing --base-checkpoint: test_refusals.py, word for word)
    cases = [
        ["--sparsity", "0"], ["--sparsity", "1.2"],
        ["--sparsity", "0.99", "--max-group-sparsity", "0.5"],          # unreachable with the floors
        ["--gpus-per-worker", "64"], ["--algo", "nope"], ["--criterion", "nope"],
        ["--dataset", "npz:/does/not/exist"], ["--model", "not_a_model"],
    ]
    # in this process (fresh processes: faults/test_cli_refusals.py)
    for extra in cases:
        try:
            code = main(["-q", "compress", "--out-dir", str(out), *extra])
        except SystemExit as exc:           # argparse's own refusals
            code = exc.code
        assert code == 2, extra
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("rlpruner") and "error" in lines[0], (extra, err)
        assert not out.exists(), extra


def test_existing_run_is_not_overwritten_and_resume_checks_settings(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    config = CompressConfig(out_dir=str(out)).to_dict()
    (out / "config.json").write_text(json.dumps(config))
    before = (out / "config.json").read_bytes()
    assert main(["-q", "compress", "--out-dir", str(out)]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["-q", "compress", "--out-dir", str(out), "--resume", "--sparsity", "0.7"]) == 2
    assert "sparsity" in capsys.readouterr().err
    assert main(["-q", "compress", "--out-dir", str(tmp_path / "empty"), "--resume"]) == 2
    assert "nothing to resume" in capsys.readouterr().err
    assert (out / "config.json").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["config.json"]


@pytest.mark.slow
def test_cmaes_compress_end_to_end_with_the_shared_starting_candidates(tmp_path, base_checkpoint):
    """A tiny `compress --algo cmaes` on digits: the budget exactly, the baseline
    plans first under their own names, then CMA-ES's generations."""
    out = tmp_path / "cmaes"
    done = _cli(["compress", "--out-dir", str(out), "--base-checkpoint", str(base_checkpoint), "--algo", "cmaes",
                 "--sparsity", "0.3", "--evaluations-per-step", "9", "--samples-per-iteration", "3",
                 "--finetune-epochs", "1", "--max-batches-per-epoch", "2", "--num-workers", "2",
                 "--incumbent-rule"])
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["evaluations"] == 9 and len(summary["steps"]) == 1
    rows = sorted(pq.read_table(out / "history.parquet").to_pylist(), key=lambda r: r["evaluation"])
    assert [r["source"] for r in rows] == ["uniform", "global", "tp-global"] + ["sample"] * 6
    assert [r["iteration"] for r in rows] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert all(r["algo"] == "cmaes" for r in rows) and sum(r["chosen"] for r in rows) == 1
    chosen = next(r for r in rows if r["chosen"])
    # the best by reward, unless the incumbent rule kept the best starting candidate
    rule = summary["steps"][0]["incumbent_rule"]
    if rule["applied"] == "challenger":
        assert chosen["reward"] == max(r["reward"] for r in rows)
    else:
        assert chosen["reward"] == max(r["reward"] for r in rows[:3]) and chosen["source"] == rule["incumbent_source"]
