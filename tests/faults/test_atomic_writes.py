"""Every output file is written atomically (temp file in the same folder, fsync,
rename): a write that fails or is killed half-way leaves the previous version
intact and readable; a failed write removes its temp file, a killed one leaves
a hidden temp file that ``--resume`` clears. History is streamed to Parquet one
step at a time and not held in memory across steps."""
from __future__ import annotations

import ast
import io
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from rlpruner_ray import checkpoint as ckpt
from rlpruner_ray.models import build_model, model_spec
from rlpruner_ray.report import HISTORY_SCHEMA, HistoryWriter, write_report, write_table
from rlpruner_ray.search.base import Candidate

ROOT = Path(__file__).resolve().parents[2]


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    model = build_model("resnet8", 10, 1)
    return ckpt.tag_model(model, model_spec("resnet8", 10, 1), (1, 16, 16))


def _summary():
    steps = [{"step": 0, "val_top1": 0.8, "val_top1_before_finetune": 0.5, "chosen_accuracy": 0.5,
              "macs_reduction": 0.2, "params_reduction": 0.3, "sparsity": 0.1}]
    return {"steps": steps, "base": {"val_top1": 0.9, "test_top1": 0.9}, "pruned": {"test_top1": 0.8},
            "reductions": {"macs": 0.2}, "channels_before": {"a": 4, "b": 8}, "channels_after": {"a": 3, "b": 6},
            "config": {"model": "resnet8", "dataset": "digits", "algo": "rlpruner", "target": "filters",
                       "sparsity": 0.1}}


def _history_table(n=3):
    return pa.Table.from_pylist([{"step": 0, "iteration": 0, "evaluation": i, "algo": "x", "source": "sample",
                                  "reward": 0.5, "accuracy": 0.5, "macs": 1, "params": 1,
                                  "filters_removed": 3, "chosen": i == 0, "seconds": 0.0,
                                  "distribution": [0.5, 0.5], "counts": [1, 2], "learner_stats": None}
                                 for i in range(n)], HISTORY_SCHEMA)


# every writer of an output file, with a reader that proves the file is whole
WRITERS = {
    "json": (lambda p, v: ckpt.atomic_write_json(p, {"version": v}), lambda p: json.loads(p.read_text())["version"]),
    "tensors": (lambda p, v: ckpt.save_tensors(p, {"version": v, "t": torch.full((64, 64), float(v))}),
                lambda p: ckpt.load_tensors(p)["version"]),
    "model": (lambda p, v: ckpt.save_pruned(_tiny_model(v), p, meta={"version": v}),
              lambda p: ckpt.read_model_record(p)["meta"]["version"]),
    "parquet": (lambda p, v: write_table(p, _history_table(v + 1)), lambda p: pq.read_table(p).num_rows - 1),
}


def _temps(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


class _DiskFull(OSError):
    pass


@pytest.mark.parametrize("name", sorted(WRITERS))
@pytest.mark.parametrize("fault", ["rename", "half_write", "fsync"])
def test_failed_write_keeps_the_previous_version(tmp_path, monkeypatch, name, fault):
    write, read = WRITERS[name]
    path = tmp_path / f"out.{name}"
    write(path, 1)
    before = path.read_bytes()
    assert read(path) == 1

    if fault == "rename":
        def boom(*a, **k):
            raise _DiskFull("rename failed")
        monkeypatch.setattr(os, "replace", boom)
    elif fault == "fsync":
        def boom(*a, **k):
            raise _DiskFull("fsync failed")
        monkeypatch.setattr(os, "fsync", boom)
    else:   # the device fills up half-way through the data
        real_fdopen = os.fdopen

        class HalfFile(io.FileIO):
            def write(self, data):
                super().write(bytes(data)[: len(data) // 2])
                raise _DiskFull("no space left on device")

        monkeypatch.setattr(os, "fdopen", lambda fd, mode="r", *a, **k: HalfFile(fd, "wb") if "w" in mode
                            else real_fdopen(fd, mode, *a, **k))
    with pytest.raises(_DiskFull):
        write(path, 2)
    monkeypatch.undo()
    assert path.read_bytes() == before and read(path) == 1
    assert _temps(tmp_path) == []


def test_report_png_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "report.png"
    write_report(_summary(), path)
    before = path.read_bytes()
    assert before[:4] == b"\x89PNG"
    monkeypatch.setattr(os, "replace", lambda *a, **k: (_ for _ in ()).throw(_DiskFull("rename failed")))
    with pytest.raises(_DiskFull):
        write_report(_summary(), path)
    monkeypatch.undo()
    assert path.read_bytes() == before and _temps(tmp_path) == []


def test_write_killed_between_temp_file_and_rename(tmp_path):
    """A real SIGKILL inside a write: the old file survives whole; the hidden temp
    file left behind is what ``--resume`` removes (remove_stale_temps)."""
    path = tmp_path / "step_000.pt"
    ckpt.save_tensors(path, {"version": 1, "t": torch.ones(256, 256)})
    before = path.read_bytes()
    child = textwrap.dedent(f"""
        import os, signal, torch
        from rlpruner_ray import checkpoint as ckpt
        os.replace = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)
        ckpt.save_tensors({str(path)!r}, {{"version": 2, "t": torch.zeros(256, 256)}})
    """)
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert path.read_bytes() == before and ckpt.load_tensors(path)["version"] == 1
    temps = _temps(tmp_path)
    assert len(temps) == 1 and temps[0].startswith(".step_000.pt.")
    assert ckpt.remove_stale_temps(tmp_path, tmp_path / "missing") == 1
    assert _temps(tmp_path) == [] and ckpt.load_tensors(path)["version"] == 1


def _candidate(i):
    return Candidate(np.full(4, 0.25), np.array([1, 2, 0, 1]), 0.5 + i / 1000, 0.5, 1e6, 1e4, i // 3, i)


def test_history_is_streamed_per_step_and_not_held(tmp_path):
    writer = HistoryWriter(tmp_path, algo="rlpruner", base_macs=10**6)
    for step in range(3):
        for i in range(5):
            writer.add(_candidate(i), 0.01)
        assert len(writer.rows) == 5                       # only the current step in memory
        writer.flush(step, chosen_index=2)
        assert writer.rows == []
        table = pq.read_table(tmp_path / f"step_{step:03d}.parquet")
        assert table.num_rows == 5 and table.column("chosen").to_pylist() == [False, False, True, False, False]
    HistoryWriter.combine(tmp_path, tmp_path / "history.parquet")
    combined = pq.read_table(tmp_path / "history.parquet")
    assert combined.schema.equals(HISTORY_SCHEMA)
    assert combined.column("step").to_pylist() == [0] * 5 + [1] * 5 + [2] * 5


def _direct_writes(tree: ast.AST) -> list[tuple[int, str]]:
    """Calls that would write a file in place rather than through atomic_write_bytes."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""
        if name in ("write_text", "write_bytes", "save", "savez", "savez_compressed", "dump", "to_csv",
                    "to_parquet", "write_csv"):
            found.append((node.lineno, name))
        elif name == "open":
            modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
            modes += [k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)]
            if any(isinstance(m, str) and set(m) & set("wax+") for m in modes):
                found.append((node.lineno, "open"))
        elif name in ("write_table", "savefig"):
            # the pyarrow / matplotlib writers may only target an in-memory buffer
            target = node.args[1] if name == "write_table" and len(node.args) > 1 else (
                node.args[0] if name == "savefig" and node.args else None)
            if not (isinstance(target, ast.Name) and target.id == "buf"):
                if not (name == "write_table" and isinstance(f, ast.Name)):   # report.write_table is atomic
                    found.append((node.lineno, name))
    return found


def test_package_writes_output_files_only_through_atomic_writes():
    """Static check of the package (the sweep's files are its author's to check):
    every file it writes goes through checkpoint.atomic_write_bytes."""
    offenders = {}
    for path in sorted((ROOT / "rlpruner_ray").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith("rlpruner_ray/sweep"):
            continue
        found = _direct_writes(ast.parse(path.read_text(), rel))
        if rel == "rlpruner_ray/checkpoint.py":   # the atomic writer itself: torch.save into a buffer
            found = [f for f in found if f[1] != "save"]
        if found:
            offenders[rel] = found
    assert offenders == {}


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_honour_the_umask(tmp_path, umask):
    """Atomic writes go through mkstemp (mode 0600); the final file gets the mode a
    plain open() would give it under the process umask, like any other tool's output."""
    before = os.umask(umask)
    try:
        for kind, (write, _) in WRITERS.items():
            path = tmp_path / f"{kind}-{umask:o}"
            write(path, 1)
            assert path.stat().st_mode & 0o777 == 0o666 & ~umask, (kind, oct(path.stat().st_mode))
        assert ckpt.new_file_mode() == 0o666 & ~umask
    finally:
        os.umask(before)
