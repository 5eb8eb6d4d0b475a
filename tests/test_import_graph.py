"""No import cycle between the subpackages of lit_tokensel (issue 19), lazy imports included.

Nodes are the first component under `lit_tokensel/` (a subpackage, or a top-level module such as
`export.py`; the package's own `__init__.py` is the node `__init__`). Every `import` anywhere in a
file is an edge, inside functions too; only imports under `if TYPE_CHECKING:` are left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1] / "lit_tokensel"


def _node_of(module: str, root: Path) -> str | None:
    """Node of a dotted module name under lit_tokensel; None outside the package."""
    parts = module.split(".")
    if parts[0] != "lit_tokensel":
        return None
    if len(parts) == 1:
        return "__init__"
    return parts[1] if (root / parts[1]).is_dir() or (root / f"{parts[1]}.py").is_file() else "__init__"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def import_graph(root: Path = ROOT) -> dict[str, dict[str, list[str]]]:
    """`{node: {imported node: [files]}}` for every runtime import between different nodes."""
    graph: dict[str, dict[str, list[str]]] = {}
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("").parts
        package = list(rel[:-1])  # the package a relative import starts from
        source = _node_of(".".join(rel[:-1] if rel[-1] == "__init__" else rel), root)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        package[: len(package) - node.level + 1] + ([node.module] if node.module else [])
                    )
                # `from lit_tokensel import x`: x may be a subpackage or a name of the package's __init__
                targets = (
                    [f"{base}.{alias.name}" for alias in node.names] if base == "lit_tokensel" else [base]
                )
            else:
                continue
            for target in targets:
                dest = _node_of(target, root)
                if dest is not None and dest != source:
                    graph.setdefault(source, {}).setdefault(dest, []).append(
                        str(path.relative_to(root.parent))
                    )
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """Strongly connected groups of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(set(graph) | {w for targets in graph.values() for w in targets}):
        if v not in index:
            visit(v)
    return groups


def test_the_checker_finds_lazy_cycles_and_ignores_type_checking_imports(tmp_path):
    pkg = tmp_path / "lit_tokensel"
    for name, text in {
        "__init__.py": "",
        "a/__init__.py": "",
        "a/x.py": "def f():\n    from lit_tokensel.b.y import g\n",  # lazy: counts
        "b/__init__.py": "",
        "b/y.py": "from ..a import x\n",  # relative: counts
        "c/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from lit_tokensel.a import x\n",
        "tool.py": "from lit_tokensel.c import z\n",
    }.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    graph = import_graph(pkg)
    assert graph == {
        "a": {"b": ["lit_tokensel/a/x.py"]},
        "b": {"a": ["lit_tokensel/b/y.py"]},
        "tool": {"c": ["lit_tokensel/tool.py"]},
    }
    assert cycles(graph) == [["a", "b"]]


def test_no_import_cycle_between_subpackages():
    graph = import_graph()
    found = cycles(graph)
    detail = [
        f"{a} -> {b}: {graph[a][b]}" for group in found for a in group for b in graph.get(a, {}) if b in group
    ]
    assert found == [], "import cycles:\n" + "\n".join(detail)


@pytest.mark.parametrize("layer", ["selection"])
def test_selection_imports_no_other_subpackage(layer):
    assert import_graph().get(layer, {}) == {}


def test_nothing_in_the_library_imports_the_cli():
    importers = {
        node: files
        for node, targets in import_graph().items()
        for dest, files in targets.items()
        if dest == "cli"
    }
    assert importers == {}
