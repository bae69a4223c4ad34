"""Helpers of the fault suite (processes, refusals, step contexts)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np

# settings of every evaluation pool here: a cheap reward (16 validation images)
POOL_CONFIG = dict(criterion="l1", reward_samples=16, reward_batch_size=16, image_size=16, num_workers=2,
                   samples_per_iteration=8, seed=7)


def cli(args, *, env=None, cwd=None, timeout=300):
    """``rlpruner -q ARGS`` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "rlpruner_ray", "-q", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env={**os.environ, **(env or {})})


def error_lines(stderr: str) -> list[str]:
    """Non-blank stderr lines."""
    return [ln for ln in stderr.splitlines() if ln.strip()]


def assert_refused(result, *, contains: str | None = None) -> str:
    """Exit code 2, exactly one stderr line, an error line, no traceback."""
    lines = error_lines(result.stderr)
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert len(lines) == 1, result.stderr[-2000:]
    assert lines[0].startswith("rlpruner") and "error:" in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    if contains is not None:
        assert contains in lines[0], lines[0]
    return lines[0]


def step_context(published, *, step=0, seed=7):
    """The search context of one step on the published base model."""
    from rlpruner_ray.search.base import StepContext
    return StepContext(step, 5, published["graph"], np.random.default_rng([seed, step]),
                       extras={"num_filters": published["context"]["num_filters"]})


class Evil:
    """Unpickling this runs ``touch MARKER`` (a file crafted to run code on load)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


FACTORY = "rlpr_evilpkg.mod:factory"


def write_factory_package(site, marker) -> str:
    """A user factory module under ``site`` that writes ``marker`` when imported;
    returns its ``pkg.module:factory`` name."""
    import textwrap
    from pathlib import Path
    pkg = Path(site) / "rlpr_evilpkg"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mod.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").write("imported")
        from rlpruner_ray.models.resnet import resnet8
        def factory(num_classes, in_channels):
            return resnet8(num_classes=num_classes, in_channels=in_channels)
    """))
    return FACTORY


def factory_checkpoint(path, name=FACTORY):
    """A genuine resnet8 model file (10 classes, 1 channel, 16x16) whose spec names ``name``."""
    import torch
    from rlpruner_ray import checkpoint as ckpt
    from rlpruner_ray.models import build_model, model_spec
    torch.manual_seed(0)
    model = ckpt.tag_model(build_model("resnet8", 10, 1), model_spec("resnet8", 10, 1), (1, 16, 16))
    record = ckpt.model_record(model)
    record["spec"] = dict(record["spec"], name=name)
    ckpt.save_tensors(path, record)
    return path
