"""The package's import layering, read from the source with ``ast`` (nothing is imported).

Two rules: no import cycles between modules, counting imports inside functions too (a function
import that closes a cycle only moves the failure to call time and hides the dependency), and
``lightning_irl.data`` stays below the models, the rollout and the algorithms.
"""

from __future__ import annotations

import ast
import os
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

PACKAGE = "lightning_irl"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

FORBIDDEN_UNDER_DATA = ("lightning_irl.models", "lightning_irl.rollout", "lightning_irl.algorithms")


class Edge(NamedTuple):
    source: str
    target: str
    line: int
    in_function: bool
    type_checking: bool


def _module_files() -> Dict[str, str]:
    modules = {}
    for folder, _, files in os.walk(ROOT):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            parts = [PACKAGE] + os.path.relpath(path, ROOT)[:-3].split(os.sep)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def _is_package(module: str, modules: Dict[str, str]) -> bool:
    return modules[module].endswith("__init__.py")


def _ancestors(module: str) -> List[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every import statement with (in a function?, under ``if TYPE_CHECKING``?)."""
    def visit(nodes, in_function: bool, type_checking: bool):
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                yield node, in_function, type_checking
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                yield from visit(ast.iter_child_nodes(node), True, type_checking)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                yield from visit(node.body, in_function, True)
                yield from visit(node.orelse, in_function, type_checking)
            else:
                yield from visit(ast.iter_child_nodes(node), in_function, type_checking)

    return visit([tree], False, False)


def _resolve(module: str, node: ast.ImportFrom, modules: Dict[str, str]) -> Optional[str]:
    if not node.level:
        return node.module
    package = module if _is_package(module, modules) else module.rpartition(".")[0]
    parts = package.split(".")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> Tuple[Dict[str, str], List[Edge]]:
    """Modules of the package and the import edges between them.

    ``import a.b.c`` runs ``a`` and ``a.b`` first, so an import also depends on the packages
    above its target, with one exception: the packages above the *importer*. Those have already
    started running before the importer could (a submodule is only reached through its package),
    so ``data/datamodule.py`` importing ``lightning_irl.data.collate`` does not make a cycle with
    ``data/__init__.py``, which imports ``datamodule``. An explicit import of an ancestor package
    itself (``from lightning_irl.data import DataError`` inside ``data/``) reads its re-exports
    and is kept as an edge. ``from pkg import name`` depends on ``pkg.name`` when that is a
    module, else on ``pkg`` (whose ``__init__`` re-exports the name).
    """
    modules = _module_files()
    edges: List[Edge] = []
    for module, path in sorted(modules.items()):
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        own_ancestors = set(_ancestors(module))
        for node, in_function, type_checking in _imports(tree):
            if isinstance(node, ast.Import):
                explicit = [alias.name for alias in node.names]
            else:
                base = _resolve(module, node, modules)
                if base is None:
                    continue
                explicit = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                            for alias in node.names]
            targets = set()
            for target in explicit:
                if target.split(".")[0] != PACKAGE:
                    continue
                targets.add(target)
                targets.update(a for a in _ancestors(target) if a not in own_ancestors)
            for target in sorted(targets & set(modules)):
                if target != module:
                    edges.append(Edge(module, target, node.lineno, in_function, type_checking))
    return modules, edges


def _cycles(nodes: List[str], edges: List[Edge]) -> List[List[str]]:
    """One cycle path (first node repeated at the end) per strongly connected component."""
    adjacency: Dict[str, List[str]] = {n: [] for n in nodes}
    for edge in edges:
        if edge.target not in adjacency[edge.source]:
            adjacency[edge.source].append(edge.target)
    index: Dict[str, int] = {}
    low: Dict[str, int] = {}
    stack: List[str] = []
    on_stack: Set[str] = set()
    components: List[List[str]] = []

    def connect(node: str) -> None:  # Tarjan; the package is small enough for recursion
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in adjacency[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(nodes):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:
        members = set(component)
        start = component[0]
        previous: Dict[str, str] = {}
        frontier = [start]
        while frontier and start not in previous:  # breadth first back to start
            following = []
            for node in frontier:
                for nxt in adjacency[node]:
                    if nxt in members and nxt not in previous:
                        previous[nxt] = node
                        following.append(nxt)
            frontier = following
        path = [start]
        node = previous[start]
        while node != start:
            path.append(node)
            node = previous[node]
        cycles.append([start] + path[:0:-1] + [start])
    return cycles


def _describe(cycle: List[str], edges: List[Edge], modules: Dict[str, str]) -> str:
    lines = [" -> ".join(cycle)]
    for source, target in zip(cycle, cycle[1:]):
        for edge in edges:
            if (edge.source, edge.target) == (source, target):
                where = "function" if edge.in_function else "module"
                lines.append(f"    {os.path.relpath(modules[source], os.path.dirname(ROOT))}:{edge.line} "
                             f"imports {target} ({where} level)")
    return "\n".join(lines)


def test_no_import_cycles():
    modules, edges = import_graph()
    runtime = [e for e in edges if not e.type_checking]  # `if TYPE_CHECKING:` imports never run
    cycles = _cycles(list(modules), runtime)
    assert not cycles, "import cycles (module- and function-level imports):\n" + "\n".join(
        _describe(c, runtime, modules) for c in cycles)


def test_data_does_not_import_models_rollout_or_algorithms():
    modules, edges = import_graph()
    bad = [e for e in edges if _within(e.source, "lightning_irl.data")
           and any(_within(e.target, layer) for layer in FORBIDDEN_UNDER_DATA)]
    assert not bad, "lightning_irl.data imports a layer above it:\n" + "\n".join(
        f"    {os.path.relpath(modules[e.source], os.path.dirname(ROOT))}:{e.line} imports {e.target}"
        for e in bad)


def test_graph_sees_function_level_and_relative_imports():
    """The reader itself, on the cases the rules above depend on."""
    tree = ast.parse("import os\ndef f():\n    from .b import c\n")
    found = [(n.module, n.level, in_function) for n, in_function, _ in _imports(tree)
             if isinstance(n, ast.ImportFrom)]
    assert found == [("b", 1, True)]
    fake = {"p": "p/__init__.py", "p.a": "p/a.py", "p.b": "p/b.py"}
    assert _resolve("p.a", tree.body[1].body[0], fake) == "p.b"
    assert _resolve("p", tree.body[1].body[0], fake) == "p.b"
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n")
    assert [type_checking for _, _, type_checking in _imports(tree)] == [False, True, False]
    pairs = {(e.source, e.target) for e in import_graph()[1]}
    assert ("lightning_irl.data.datamodule", "lightning_irl.data.collate") in pairs
    assert ("lightning_irl.data.datamodule", "lightning_irl.data") not in pairs  # its own package
    assert ("lightning_irl.metrics.functional", "lightning_irl.data") in pairs  # runs data/__init__
    assert _cycles(["x", "y", "z"], [Edge("x", "y", 1, False, False), Edge("y", "z", 1, True, False),
                                     Edge("z", "x", 1, False, False)]) == [["x", "y", "z", "x"]]
