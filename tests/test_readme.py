"""Every ```python block of README.md runs as written, on the embedded data. A block
that needs data the user supplies is marked ``<!-- needs: PATH ... -->`` just above
it and runs against small generated copies of those paths: ``npz:FOLDER`` gets a
tiny random CIFAR-like npz folder, ``*.pt`` a trained digits model."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"(?:<!-- needs: (?P<needs>[^>]*?) \(.*?\) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks():
    return [(m.group("needs") or "", m.group("code")) for m in BLOCK.finditer(README.read_text())]


def _npz_folder(folder: Path) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 60), ("test", 20)):
        np.savez(folder / f"{split}.npz", images=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                 labels=np.arange(n) % 10)


def test_readme_has_the_python_blocks_it_documents():
    blocks = _blocks()
    assert len(blocks) >= 2 and all(code.strip() for _, code in blocks)
    assert sum("```python" in line for line in README.read_text().splitlines()) == len(blocks)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(_blocks())))
def test_readme_python_block_runs(index, tmp_path, monkeypatch, base_checkpoint):
    needs, code = _blocks()[index]
    work = tmp_path / "work"          # (a relative ../ path in a block stays inside tmp_path)
    work.mkdir()
    for need in needs.split():
        if need.startswith("npz:"):
            _npz_folder(work / need[4:])
        elif need.endswith(".pt"):
            (work / need).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(base_checkpoint, work / need)
        else:
            raise AssertionError(f"README marks an unknown kind of user data: {need}")
    monkeypatch.chdir(work)
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})
