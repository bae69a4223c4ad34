"""The README and docs/ stay true to the tree.

Every ```python block of README.md runs as written, on the embedded data. A block
that needs data the user supplies is marked ``<!-- needs: PATH ... -->`` just above
it and runs against small generated copies of those paths: ``npz:FOLDER`` gets a
tiny random CIFAR-like npz folder, ``*.pt`` a trained digits model.

The README's Layout section names every module, and every relative link in
README.md and docs/*.md reaches a file."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
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


# The Layout section's code block: a line whose first word ends in "/" opens that
# folder (at column 0 a top-level one, indented a sub-folder of the last top-level
# one); the ``name.py`` and ``name/`` words after it, up to the next opener, are
# entries of the open folder. Prose inside the block must avoid such words.
_OPENER = re.compile(r"^(?P<indent> *)(?P<folder>\w+)/(?=\s|$)")
_FILE = re.compile(r"(?<![\w./-])(\w+\.py)\b")
_FOLDER = re.compile(r"(?<![\w./-])(\w+)/(?=[\s),]|$)")


def _layout_entries() -> set[str]:
    section = README.read_text().split("\n## Layout\n", 1)
    assert len(section) == 2, "README.md has no '## Layout' section"
    block = re.search(r"```\n(.*?)```", section[1], re.S)
    assert block, "the Layout section has no code block"
    entries, top, folder = set(), None, None
    for line in block.group(1).splitlines():
        opener = _OPENER.match(line)
        if opener:
            name = opener.group("folder")
            if opener.group("indent"):
                assert top, f"a sub-folder before any top-level folder: {line!r}"
                folder = f"{top}/{name}"
            else:
                top = folder = name
            entries.add(folder + "/")
            line = line[opener.end():]
        for name in _FILE.findall(line):
            entries.add(f"{folder}/{name}")
        for name in _FOLDER.findall(line):
            entries.add(f"{folder}/{name}/")
    return entries


def _modules() -> set[str]:
    """What the Layout must name: every module of the two packages (a package's
    ``__init__.py`` is stood for by its folder) and every top-level script or
    script package."""
    found = set()
    for package in ("rlpruner_ray", "envs"):
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT)
            found.add(f"{rel.parent.as_posix()}/" if path.name == "__init__.py" else rel.as_posix())
    for path in (ROOT / "scripts").iterdir():
        if path.suffix == ".py":
            found.add(f"scripts/{path.name}")
        elif path.is_dir() and (path / "__init__.py").exists():
            found.add(f"scripts/{path.name}/")
    return found


def test_readme_layout_names_every_module_and_nothing_missing():
    listed = _layout_entries()
    assert not _modules() - listed, f"modules the README's Layout does not name: {sorted(_modules() - listed)}"
    gone = sorted(e for e in listed if not (ROOT / e).exists())
    assert not gone, f"the README's Layout names what is not on disk: {gone}"


_LINK = re.compile(r"\[[^\]]*\]\((?P<target>[^)\s]+)\)")


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_relative_links_reach_a_file(page):
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)   # a fenced block's text is code, not links
    broken = []
    for match in _LINK.finditer(text):
        target = match.group("target").split("#", 1)[0]
        if not target or re.match(r"^[a-z][a-z0-9+.-]*:", target):   # an anchor in the page, or a URL
            continue
        if not (page.parent / target).exists():
            broken.append(match.group("target"))
    assert not broken, f"{page.relative_to(ROOT)} links to files that do not exist: {broken}"
