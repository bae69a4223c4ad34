"""The rlpruner command's non-Ray subcommands: train, evaluate, prune (+ export),
run as a user runs them; their refusals in this process (``cli.main``)."""
from __future__ import annotations

import json
import subprocess
import sys

import torch

from rlpruner_ray.checkpoint import load_pruned
from rlpruner_ray.cli import main


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "rlpruner_ray", "-q", *args], capture_output=True, text=True,
                          timeout=300)


def test_train_evaluate_prune_export(tmp_path, base_checkpoint, digits16):
    r = _cli("train", "--out-dir", str(tmp_path / "t"), "--train-epochs", "1", "--model", "resnet8")
    assert r.returncode == 0, r.stderr
    trained = json.loads(r.stdout)
    assert (tmp_path / "t" / "base_model.pt").is_file() and trained["params"] > 0
    r = _cli("train", "--out-dir", str(tmp_path / "t"), "--train-epochs", "1")
    assert r.returncode == 2 and "exists" in r.stderr            # never overwritten silently

    r = _cli("evaluate", str(base_checkpoint), "--split", "val")
    assert r.returncode == 0, r.stderr
    ev = json.loads(r.stdout)
    assert ev["split"] == "val" and ev["top1"] > 0.5 and ev["top5"] >= ev["top1"]

    out = tmp_path / "p"
    r = _cli("prune", "--base-checkpoint", str(base_checkpoint), "--sparsity", "0.4", "--algo", "global",
             "--criterion", "l1", "--finetune-epochs", "2", "--out-dir", str(out), "--export", "torchscript")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["reductions"]["filters"] == 0.4 or abs(summary["reductions"]["filters"] - 0.4) < 0.01
    assert summary["pruned"]["macs"] < summary["base"]["macs"]
    assert summary["pruned"]["val_top1"] >= summary["pruned"]["val_top1_before_finetune"]
    small = load_pruned(out / "pruned_model.pt")
    scripted = torch.jit.load(str(out / "pruned_model.ts"))
    x = digits16.example_inputs(3).normal_()
    with torch.no_grad():
        assert torch.allclose(scripted(x), small(x), atol=1e-5)


def test_prune_with_torch_pruning_reaches_the_macs_target(tmp_path, base_checkpoint):
    r = _cli("prune", "--base-checkpoint", str(base_checkpoint), "--target", "macs", "--sparsity", "0.5",
             "--algo", "tp-global", "--finetune-epochs", "0", "--out-dir", str(tmp_path / "tp"))
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["strategy"] == "tp-global"
    assert 0.5 <= summary["reductions"]["macs"] <= 0.505    # reached, overshooting by at most 0.5 points
    small = load_pruned(tmp_path / "tp" / "pruned_model.pt")
    assert sum(p.numel() for p in small.parameters()) == summary["pruned"]["params"]


def test_bad_input_one_line_exit_2(tmp_path, base_checkpoint, capsys):
    cases = [
        ("evaluate", str(tmp_path / "missing.pt")),
        ("evaluate", str(base_checkpoint), "--dataset", "nope"),
        ("prune", "--base-checkpoint", str(base_checkpoint), "--sparsity", "2", "--out-dir", str(tmp_path / "x")),
        ("prune", "--base-checkpoint", str(base_checkpoint), "--algo", "ppo", "--out-dir", str(tmp_path / "x")),
        ("train", "--model", "pkg_that_does_not_exist.mod:factory", "--out-dir", str(tmp_path / "x")),
        ("train", "--batch-size", "0", "--out-dir", str(tmp_path / "x")),
        ("compress", "--resume", "--overwrite", "--out-dir", str(tmp_path / "x")),
        ("compress", "--train-lr", "nan", "--out-dir", str(tmp_path / "x")),
    ]
    # in this process: a refusal is decided before any work (the exit code of the
    # real process: faults/test_cli_refusals.py)
    for args in cases:
        try:
            code = main(["-q", *args])
        except SystemExit as exc:           # argparse's own refusals
            code = exc.code
        err = capsys.readouterr().err
        assert code == 2, (args, err)
        lines = [ln for ln in err.splitlines() if ln.startswith("rlpruner")]
        assert len(lines) == 1 and "error" in lines[0] and "Traceback" not in err, (args, err)
        assert not (tmp_path / "x").exists(), args
