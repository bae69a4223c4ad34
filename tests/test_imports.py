"""Imports run one way: no module of the package imports, directly or through
others, a module that imports it back, and no module takes a private name from
another package.

The graph is built from the source with ``ast``, not by importing: imports
inside functions count (a lazy import still ties two modules together), and
relative imports are resolved against the importing module's package."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("rlpruner_ray", "envs")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def imported(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, str]]:
    """(module, name taken from it or "") for every import of ``path`` that lands
    in ``known``. ``from a import b`` where ``a.b`` is a module is an import of ``a.b``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                out.append((sub, "") if sub in known else (source, alias.name))
    result = []
    for target, taken in out:
        while target and target not in known:       # "a.b.C" names a thing in module a.b
            target = target.rpartition(".")[0]
        if target and target != name:
            result.append((target, taken))
    return result


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {t for t, _ in imported(name, path, known)} for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_lazy_and_relative_imports():
    edges = graph()
    # a relative import at module level, and one inside a function
    assert "rlpruner_ray.config" in edges["rlpruner_ray.pipeline"]
    assert "rlpruner_ray.runtime" in edges["rlpruner_ray.pipeline"]


def test_no_import_circle():
    found = circles(graph())
    assert not found, "import circle(s): " + "; ".join(" <-> ".join(c) for c in found)


def test_no_private_name_across_packages():
    known = modules()
    crossing = []
    for name, path in known.items():
        for target, taken in imported(name, path, known):
            if taken.startswith("_") and target.split(".")[0] != name.split(".")[0]:
                crossing.append(f"{name} takes {taken} from {target}")
    assert not crossing, "; ".join(crossing)
