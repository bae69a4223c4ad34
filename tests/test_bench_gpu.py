"""scripts/bench_gpu.py: the GPU benchmark's code runs end to end on a CPU
(``--quick --device cpu``), rewrites only the GPU section of its Markdown file,
and refuses a CUDA run on a machine without CUDA."""
from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "bench_gpu.py"


def _run(*args, timeout=900):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_cuda_run_without_cuda_is_refused(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "B.md"
    r = _run("--out", str(out), timeout=120)
    assert r.returncode == 2 and "no CUDA device" in r.stderr and not out.exists()


@pytest.mark.slow
def test_quick_cpu_run_writes_only_the_gpu_section(tmp_path):
    out, rows = tmp_path / "B.md", tmp_path / "gpu.parquet"
    before = "# Benchmarks\n\nintro\n\n## 1. Something\n\nkept\n\n## GPU\n\nold text\n\n## Later\n\nalso kept\n"
    out.write_text(before)
    r = _run("--quick", "--device", "cpu", "--out", str(out), "--rows", str(rows))
    assert r.returncode == 0, r.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n## 1. Something\n\nkept\n\n## GPU\n")
    assert text.rstrip().endswith("## Later\n\nalso kept") and "old text" not in text
    gpu = text.split("## GPU", 1)[1].split("## Later", 1)[0]
    assert "Sections that failed" not in gpu
    for label in ("floor", "batched, K per pass", "after BN recalibration", "chose batched with recalibration",
                  "evaluation actors", "ppo: steady", "KD images/s", "latency"):
        assert label in gpu, label
    numbers = [float(x) for x in re.findall(r"\| (-?\d+(?:\.\d+)?(?:e[+-]?\d+)?)", gpu)]
    assert len(numbers) > 15 and all(math.isfinite(x) for x in numbers)

    import pyarrow.parquet as pq
    data = pq.read_table(rows).to_pylist()
    metrics = {(r["section"], r["metric"], r["variant"]) for r in data}
    for key in [("1. scoring", "batched evaluations/s", ""), ("1b. recalibrated", "masked evaluations/s", ""),
                ("1b. recalibrated", "batched evaluations/s", ""), ("1b. recalibrated", "auto chose batched", ""),
                ("1b. recalibrated", "spearman batched vs single", ""), ("2. bf16", "spearman vs fp32", ""),
                ("3. actors", "evaluations/s", "2 actors"), ("4. rllib", "steady evaluations/s", "ppo"),
                ("5. training", "kd images/s", "bf16 channels-last bs 64"), ("6. latency", "speed-up", "batch 256")]:
        assert key in metrics, key
    recalibrated = {r["metric"]: r["value"] for r in data if r["section"] == "1b. recalibrated"}
    assert recalibrated["recalibration batches"] > 0 and recalibrated["batched K"] >= 1
    assert recalibrated["auto chose batched"] == 0.0          # a CPU keeps the single path
