"""The package's modules import each other without a circle, read from the
source (every import statement, at module level or inside a function, type-only
ones included: a reader of either module needs the other). In particular the
checkpoint validation does not know the optimizer base class."""

from __future__ import annotations

import ast
from pathlib import Path

import interpolatron

ROOT = Path(interpolatron.__file__).resolve().parent
PACKAGE = "interpolatron"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (``from pkg import name`` counts
    as importing ``pkg.name`` when that is a module, else ``pkg``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                # ``import a.b.c`` needs a.b.c; a name the graph lacks (an
                # extension module) points at its nearest listed parent.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE) and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _without_packages(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """The graph without edges into a package's ``__init__`` from below it: a
    submodule reaches its own package's ``__init__`` by being imported at all,
    which is not a dependency a reader follows."""
    packages = {m for m, p in _modules().items() if p.name == "__init__.py"}
    return {m: {t for t in ts if not (t in packages and m.startswith(t + "."))} for m, ts in graph.items()}


def test_no_import_circle_among_the_package_modules():
    found = cycles(_without_packages(import_graph()))
    assert not found, f"import circles: {found}"


def test_checkpoint_validation_does_not_import_the_optimizer_base():
    graph = import_graph()
    assert "interpolatron.optim._checkpoint" in graph
    assert "interpolatron.optim._base" not in graph["interpolatron.optim._checkpoint"]


def test_the_graph_sees_a_circle():
    # The checker itself: a planted circle is found.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]
