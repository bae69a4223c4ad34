"""``rlpruner sweep`` / ``compare`` / ``report``: Ray Tune trials of compress on real
digits data (tiny budgets), retry from a checkpoint, ``--resume`` after a killed
driver, the comparison outputs, and refusals before any trial starts."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from rlpruner_ray import sweep
from rlpruner_ray.cli import build_parser, main
from rlpruner_ray.config import CompressConfig

from .local_cluster import TINY_SWEEP as TINY


def _cli(args, env=None, timeout=420, cwd=None, quiet=True):
    return subprocess.run([sys.executable, "-m", "rlpruner_ray", *(["-q"] if quiet else []), *args],
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})},
                          cwd=cwd)


def _rows(out: Path) -> list[dict]:
    return pq.read_table(out / "results.parquet").to_pylist()


def _trial_rows(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / sweep.ROWS_FILE).read_text().splitlines()]


def _one_error_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlpruner: error:"), stderr
    return lines[0]


# ---------------------------------------------------------------------- end to end (start Ray)
@pytest.mark.slow
def test_sweep_grid_retry_from_checkpoint_and_report(tmp_path, capsys):
    """Two sparsities (0.1: one step, 0.2: two steps). Every trial fails once right
    after reporting step 0; with --max-failures 1 it is retried from that step's
    checkpoint and completes without running step 0 again."""
    out = tmp_path / "sw"
    r = _cli(["sweep", "--out-dir", str(out), "--sparsity", "0.1", "0.2", "--algo", "uniform",
              "--max-failures", "1", *TINY], env={sweep.FAIL_ENV: "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    # the failures really happened (Tune's trial errors go to the sweep's log.txt)
    assert "injected failure after step 1" in r.stderr + (out / "log.txt").read_text()

    rows = _rows(out)
    assert sorted((x["sparsity"], x["step"]) for x in rows) == [(0.1, 1), (0.2, 1), (0.2, 2)]
    assert {x["trial"] for x in rows} == {"uniform-s0.1-acc-l1-seed0", "uniform-s0.2-acc-l1-seed0"}
    for x in rows:
        assert (x["algo"], x["reward"], x["criterion"], x["seed"]) == ("uniform", "acc", "l1", 0)
    finals = [x for x in rows if x["final"]]
    assert len(finals) == 2 and all(0 <= x["test_top1"] <= 1 and 0 < x["final_macs_kept"] < 1 for x in finals)
    assert {x["step"] for x in finals} == {1, 2}
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert "uniform" in r.stdout and "done" in r.stdout

    # the retried trial: step 1 by the first attempt, step 2 by the second, step 1 never recomputed
    work = out / "trials" / "uniform-s0.2-acc-l1-seed0"
    assert [(x["step"], x["attempt"]) for x in _trial_rows(work)] == [(1, 1), (2, 2)]
    marker = work / ".injected_failure_step1"
    assert (work / "steps" / "step_001.pt").stat().st_mtime_ns <= marker.stat().st_mtime_ns
    assert (work / "steps" / "step_002.pt").stat().st_mtime_ns > marker.stat().st_mtime_ns
    summary = json.loads((work / "summary.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [1, 2]
    assert pq.read_table(work / "history.parquet").num_rows == summary["evaluations"]
    # Tune was never sent step 1 twice. (Its result.json may lack step 1: Ray keeps
    # that file in a driver staging folder, synced every >= 10 s, and on a retry
    # restores it from the last sync, dropping newer lines. Our rows above are the record.)
    results = [json.loads(line) for d in (out / "tune").glob("uniform-s0.2-*")
               for line in (d / "result.json").read_text().splitlines()]
    reported = [x["step"] for x in results if not x.get("final")]
    assert reported in ([1, 2], [2]), reported
    ray_results = Path.home() / "ray_results"                  # Tune wrote only under --out-dir
    assert not any("uniform-s0.2" in p.name for p in ray_results.glob("*/*"))

    # rlpruner report rebuilds the table and the plot from the folder
    (out / "results.parquet").unlink()
    (out / "pareto.png").unlink()
    assert main(["-q", "report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 of 2 trials finished" in printed and "uniform" in printed
    assert sorted((x["sparsity"], x["step"]) for x in _rows(out)) == [(0.1, 1), (0.2, 1), (0.2, 2)]
    assert (out / "pareto.png").is_file()

    # the folder is not reused by accident
    again = _cli(["sweep", "--out-dir", str(out), "--sparsity", "0.1", *TINY])
    assert "already holds a sweep" in _one_error_line(again.stderr) and again.returncode == 2


@pytest.mark.slow
def test_resume_an_interrupted_sweep(tmp_path, capsys):
    """Kill the driver (and its private Ray) after the first trial finished, then
    ``rlpruner sweep --resume DIR`` completes the sweep without redoing its steps."""
    out = tmp_path / "sw"
    first = out / "trials" / "uniform-s0.1-acc-l1-seed0"
    proc = subprocess.Popen([sys.executable, "-m", "rlpruner_ray", "-q", "sweep", "--out-dir", str(out),
                             "--sparsity", "0.1", "0.2", "--algo", "uniform", "--max-concurrent", "1", *TINY],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    while not list(out.glob("trials/*/summary.json")):
        assert proc.poll() is None and time.time() < deadline, "sweep ended before its first trial finished"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = time.time_ns()
    deadline = time.time() + 30
    while time.time() < deadline:          # wait until Ray's processes of that run are gone
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    done = [p.parent.name for p in (out / "trials").glob("*/summary.json")]
    assert done == [first.name]

    # a partial sweep can be reported
    assert main(["-q", "report", str(out)]) == 0
    assert "1 of 2 trials finished" in capsys.readouterr().out

    r = _cli(["sweep", "--resume", str(out)])
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(out)
    assert sorted((x["sparsity"], x["step"]) for x in rows) == [(0.1, 1), (0.2, 1), (0.2, 2)]
    assert sum(bool(x["final"]) for x in rows) == 2
    # the finished trial's step was not run again
    assert all(p.stat().st_mtime_ns < killed_at for p in (first / "steps").glob("step_*.pt"))
    assert [x["attempt"] for x in _trial_rows(first)] == [1]


@pytest.mark.slow
def test_compare_algorithms_over_seeds(tmp_path):
    """Through a URI out dir (file://, as s3:// or gs:// on a cluster): Tune's storage
    and the result files go there, the trials work in a local staging folder."""
    out = tmp_path / "cmp"
    uri = f"file://{out}"
    try:
        r = _cli(["compare", "--out-dir", uri, "--algo", "uniform", "random", "--seeds", "2",
                  "--sparsity", "0.1", *TINY])
    finally:
        shutil.rmtree(sweep.local_dir_for(uri), ignore_errors=True)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "sweep.json").is_file() and (out / "tune").is_dir()
    table = pq.read_table(out / "comparison.parquet")
    for col in ("algo", "seed", "step", "evaluation", "evaluations_spent", "reward", "best_reward",
                "accuracy", "macs", "params", "wall_seconds", "step_val_top1", "test_top1",
                "compute_forward_equivalents", "wall_s"):
        assert col in table.column_names, col
    rows = table.to_pylist()
    # every trial's totals from its summary's compute record (the same on each of its rows)
    for trial in {x["trial"] for x in rows}:
        totals = {(x["compute_forward_equivalents"], x["wall_s"]) for x in rows if x["trial"] == trial}
        (fe, wall), = totals
        assert fe > 0 and wall > 0
    assert {(x["algo"], x["seed"]) for x in rows} == {("uniform", 0), ("uniform", 1), ("random", 0), ("random", 1)}
    for algo, seed in {(x["algo"], x["seed"]) for x in rows}:
        mine = [x for x in rows if x["algo"] == algo and x["seed"] == seed]
        best = [x["best_reward"] for x in mine]
        assert best == sorted(best) and best[-1] == max(x["reward"] for x in mine)   # running best
        assert len(mine) == (4 if algo == "random" else 1)
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert len(_rows(out)) == 4
    ranking = r.stdout[r.stdout.index("ranking by final test top-1"):].splitlines()
    assert {ranking[2].split()[1], ranking[3].split()[1]} == {"uniform", "random"}
    assert "±" in ranking[2] and "2/2" in ranking[2]

    # the report rebuilds everything from the storage alone (no local staging folder)
    (out / "comparison.parquet").unlink()
    try:
        assert main(["-q", "report", uri]) == 0
    finally:
        shutil.rmtree(sweep.local_dir_for(uri), ignore_errors=True)
    assert pq.read_table(out / "comparison.parquet").num_rows == len(rows)


@pytest.mark.slow
def test_compare_at_one_macs_target_pairs_against_the_reference(tmp_path, base_checkpoint):
    """Default flags compare at one MACs target; a relative --base-checkpoint is taken
    from the folder the command started in (the trials run elsewhere); the paired
    table comes out (printed and as paired.parquet/.csv); Tune's progress tables go to
    log.txt and the terminal gets [rlpruner] lines."""
    (tmp_path / "runs" / "default").mkdir(parents=True)
    shutil.copy(base_checkpoint, tmp_path / "runs" / "default" / "base_model.pt")
    r = _cli(["compare", "--out-dir", "cmp", "--algo", "global", "uniform", "--seeds", "2", "--sparsity", "0.3",
              "--base-checkpoint", "runs/default/base_model.pt", *TINY], cwd=tmp_path, quiet=False)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "cmp"
    assert json.loads((out / "sweep.json").read_text())["base"]["target"] == "macs"
    paired = pq.read_table(out / "paired.parquet").to_pylist()
    assert [x["algo"] for x in paired] == ["global", "uniform"] and {x["reference"] for x in paired} == {"global"}
    for x in paired:
        assert x["seeds_finished"] == 2 and 30.0 - 1e-6 <= x["target_reduction_pts"] <= 30.5
    other = paired[1]
    assert other["pairs"] == 2 and other["unequal_size"] is False and other["reduction_gap_pts"] <= 0.5
    finals = {(x["algo"], x["seed"]): x["test_top1"] for x in _rows(out) if x["final"]}
    assert other["diff_pts"] == pytest.approx(100 * sum(finals[("uniform", s)] - finals[("global", s)]
                                                        for s in (0, 1)) / 2)
    assert (out / "paired.csv").read_text().splitlines()[0].startswith("\"algo\"")
    assert "paired difference in test top-1 (points) against global" in r.stdout
    assert "Trial status" in (out / "log.txt").read_text()                 # Tune's table, in the log ...
    assert "Trial status" not in r.stdout + r.stderr                      # ... not on the terminal
    assert "[rlpruner] trial uniform-" in r.stderr and "finished (" in r.stderr


@pytest.mark.slow
def test_compare_where_every_trial_fails_ranks_nothing(tmp_path):
    out = tmp_path / "cmp"
    r = _cli(["compare", "--out-dir", str(out), "--algo", "uniform", "--seeds", "1", "--sparsity", "0.1",
              "--max-failures", "0", *TINY], env={sweep.FAIL_ENV: "1"})
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("rlpruner: none of the 1 trials finished"), r.stderr
    assert "ranking" not in r.stdout and "paired" not in r.stdout
    for name in ("comparison.png", "pareto.png", "paired.parquet", "comparison.parquet"):
        assert not (out / name).exists(), name


# ---------------------------------------------------------------------- refusals (no Ray)
@pytest.mark.parametrize("extra, message", [
    (["--algo", "uniform", "bogus"], "unknown algorithm 'bogus'"),
    (["--sparsity", "0.2", "1.5"], "sparsity must be < 1.0"),
    (["--sparsity", "0"], "sparsity must be > 0.0"),
    (["--reward", "acc", "--seeds", "0"], "--seeds must be at least 1"),
    (["--max-concurrent", "0"], "--max-concurrent"),
    (["--num-workers", "1", "--gpus-per-worker", "GPUS"], "needs"),
    (["--num-workers", "64"], "needs 65 CPU"),
])
def test_sweep_refuses_bad_input_before_any_trial(tmp_path, capsys, extra, message):
    import torch
    gpus = str(1 if not torch.cuda.is_available() else torch.cuda.device_count() + 1)
    extra = [gpus if a == "GPUS" else a for a in extra]
    out = tmp_path / "sw"
    assert main(["-q", "sweep", "--out-dir", str(out), *extra]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert message in line
    assert not out.exists()


def test_compare_and_resume_refusals(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["-q", "compare", "--out-dir", str(out), "--algo", "uniform", "nope"]) == 2
    assert "unknown algorithm 'nope'" in _one_error_line(capsys.readouterr().err)
    assert main(["-q", "sweep", "--resume", str(tmp_path / "nothing")]) == 2
    assert "nothing to resume" in _one_error_line(capsys.readouterr().err)
    assert main(["-q", "report", str(tmp_path)]) == 2
    assert "not a sweep folder" in _one_error_line(capsys.readouterr().err)
    assert not out.exists()     # (without --out-dir a sweep runs into runs/sweep: tests/test_help_defaults.py)


def test_compare_refuses_a_missing_checkpoint_before_any_trial(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["-q", "compare", "--out-dir", "cmp", "--algo", "uniform",
                 "--base-checkpoint", "runs/default/base_model.pt", *TINY]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "checkpoint not found" in line and str(tmp_path / "runs" / "default" / "base_model.pt") in line
    assert not (tmp_path / "cmp").exists() and sorted(p.name for p in tmp_path.iterdir()) == []
    assert main(["-q", "compare", "--out-dir", "cmp", "--algo", "uniform", "global", "--reference", "random",
                 *TINY]) == 2
    assert "--reference random is not one of the compared --algo" in _one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "cmp").exists()


def test_compare_plan_defaults_and_relative_paths(tmp_path, base_checkpoint, monkeypatch):
    from rlpruner_ray.cli import _config
    (tmp_path / "runs").mkdir()
    shutil.copy(base_checkpoint, tmp_path / "runs" / "base.pt")
    monkeypatch.chdir(tmp_path)

    def plan(*argv):
        return sweep.plan_from_args(build_parser().parse_args(["compare", "--out-dir", "cmp", *argv]), _config)
    p = plan("--algo", "uniform", "global", "--base-checkpoint", "runs/base.pt", "--data-dir", "data")
    assert p.base["target"] == "macs" and p.reference == "uniform"
    assert p.base["base_checkpoint"] == str(tmp_path / "runs" / "base.pt")
    assert p.base["data_dir"] == str(tmp_path / "data")
    assert sweep.SweepPlan.from_dict(p.to_dict()).reference == "uniform"
    p = plan("--algo", "uniform", "global", "--reference", "global", "--target", "filters")
    assert p.base["target"] == "filters" and p.reference == "global"


def _final(algo, seed, top1, macs_kept, **extra):
    return {"trial": f"{algo}-{seed}", "algo": algo, "seed": seed, "final": True, "test_top1": top1,
            "final_macs_kept": macs_kept, "final_params_kept": 0.5, "final_filters_sparsity": 0.3,
            "wall_seconds": 10.0 + seed, **extra}


def test_paired_rows_against_the_reference(tmp_path, capsys):
    from rlpruner_ray.stats import paired_difference
    from rlpruner_ray.sweep.outputs import paired_rows, print_paired
    args = build_parser().parse_args(["compare", "--out-dir", str(tmp_path / "cmp"), "--algo", "a1", "b2", "c3",
                                      "--seeds", "3", "--reference", "b2"])
    plan = sweep.SweepPlan("compare", str(tmp_path), str(tmp_path), "tune", {"target": "macs", "model": "m"},
                           {"algo": ["a1", "b2", "c3"], "seed": [0, 1, 2], "sparsity": [0.3],
                            "reward": ["acc"], "criterion": ["l1"]}, reference=args.reference)
    rows = [_final("b2", s, 0.80 + 0.01 * s, 0.70, compute_forward_equivalents=100.0) for s in range(3)]
    rows += [_final("a1", s, 0.81 + 0.012 * s, 0.699, compute_forward_equivalents=300.0) for s in range(3)]
    rows += [_final("c3", s, 0.79, 0.690 if s == 1 else 0.70) for s in (0, 1)]     # seed 2 unfinished
    rows.append({"trial": "c3-2", "algo": "c3", "seed": 2, "final": False, "step": 1})
    by = {r["algo"]: r for r in paired_rows(plan, rows)}
    expect = paired_difference([0.81 + 0.012 * s for s in range(3)], [0.80 + 0.01 * s for s in range(3)],
                               scale=100)
    a = by["a1"]
    assert (a["pairs"], a["diff_pts"], a["diff_low"], a["diff_high"]) == (3, expect.mean, expect.low, expect.high)
    assert a["compute_forward_equivalents"] == 300.0 and a["unequal_size"] is False
    assert a["reduction_gap_pts"] == pytest.approx(0.1)
    c = by["c3"]
    assert c["seeds_finished"] == 2 and c["pairs"] == 2 and c["compute_forward_equivalents"] is None
    assert c["reduction_gap_pts"] == pytest.approx(1.0) and c["unequal_size"] is True   # flagged
    assert by["b2"]["pairs"] == 0 and by["b2"]["diff_pts"] is None                  # the reference itself
    print_paired(plan, list(by.values()))
    printed = capsys.readouterr().out
    assert f"{expect.mean:+.2f} [{expect.low:+.2f}, {expect.high:+.2f}]" in printed
    assert "(reference)" in printed and "n/a" in printed
    assert "more than 0.5 points for c3" in printed


# ---------------------------------------------------------------------- pieces (no Ray)
def _plan(tmp_path, **kw) -> sweep.SweepPlan:
    args = build_parser().parse_args(["sweep", "--out-dir", str(tmp_path / "sw"), *kw.pop("argv", [])])
    from rlpruner_ray.cli import _config
    return sweep.plan_from_args(args, _config)


def test_plan_grid_names_and_trial_resources(tmp_path):
    plan = _plan(tmp_path, argv=["--sparsity", "0.2", "0.4", "0.2", "--algo", "uniform", "random",
                                 "--seed-list", "3", "5", "--num-workers", "3", "--cpus-per-worker", "0.5",
                                 "--gpus-per-worker", "0.25", "--storage-path", "s3://bucket/sweeps"])
    points = plan.grid_points()
    assert len(points) == 2 * 2 * 2                     # duplicates dropped
    names = {sweep.trial_name(p) for p in points}
    assert len(names) == len(points) and "uniform-s0.4-acc-l1-seed5" in names
    assert plan.storage_path == "s3://bucket/sweeps" and plan.experiment_path == "s3://bucket/sweeps/sw"
    cfg = plan.trial_config(points[0])
    assert cfg.out_dir.endswith(f"trials/{sweep.trial_name(points[0])}") and not cfg.resume
    assert sweep.trial_bundles(cfg) == [{"CPU": 1.0, "GPU": 0.25}] + [{"CPU": 0.5, "GPU": 0.25}] * 3
    cpu = cfg.replace(gpus_per_worker=0.0, cpus_per_worker=1.0)
    assert sweep.trial_bundles(cpu) == [{"CPU": 1.0}] + [{"CPU": 1.0}] * 3
    # a resumed plan reads back the same settings
    plan.root.mkdir(parents=True)
    (plan.root / sweep.SWEEP_FILE).write_text(json.dumps(plan.to_dict()))
    again = sweep.load_plan(plan.root)
    assert again.to_dict() == plan.to_dict()
    # the default storage is the out dir itself, never ~/ray_results
    local = _plan(tmp_path, argv=["--sparsity", "0.3"])
    assert local.storage_path == str((tmp_path / "sw").resolve()) and local.name == "tune"
    assert CompressConfig.from_dict({**local.base, "out_dir": "x"}).num_workers == 2


def test_ray_address_is_accepted_by_sweep_and_compare():
    """scripts/sweep.py runs ``rlpruner sweep`` with ``--ray-address auto`` added."""
    from rlpruner_ray import cli
    assert '"sweep"' in (Path(__file__).resolve().parent.parent / "scripts" / "sweep.py").read_text()
    argv_for = getattr(cli, "cluster_argv", lambda cmd, a: [cmd, "--ray-address", "auto", *a])
    for command in ("sweep", "compare"):
        args = build_parser().parse_args(argv_for(command, ["-q", "--sparsity", "0.5", "--out-dir", "x"]))
        assert args.ray_address == "auto" and args.command == command and args.quiet


def test_restore_into_keeps_identical_files_and_drops_later_steps(tmp_path):
    ckpt, work = tmp_path / "ckpt", tmp_path / "work"
    for folder, steps in ((ckpt, [0]), (work, [0, 1])):
        (folder / "steps").mkdir(parents=True)
        (folder / "history").mkdir()
        for s in steps:
            (folder / "steps" / f"step_{s:03d}.pt").write_bytes(b"step%d" % s)
            (folder / "history" / f"step_{s:03d}.parquet").write_bytes(b"h%d" % s)
        (folder / "config.json").write_text("{}")
    (work / "summary.json").write_text("{}")
    (ckpt / "rows.jsonl").write_text('{"step": 0}\n')
    before = (work / "steps" / "step_000.pt").stat().st_mtime_ns
    time.sleep(0.01)
    sweep._restore_into(ckpt, work)
    assert (work / "steps" / "step_000.pt").stat().st_mtime_ns == before     # identical: untouched
    assert not (work / "steps" / "step_001.pt").exists()
    assert not (work / "history" / "step_001.parquet").exists()
    assert not (work / "summary.json").exists()                              # results after the checkpoint
    assert (work / "rows.jsonl").read_text() == '{"step": 0}\n'
    staged = sweep._stage_checkpoint(work, final=False)
    assert sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()) == [
        "config.json", "history/step_000.parquet", "rows.jsonl", "steps/step_000.pt"]
