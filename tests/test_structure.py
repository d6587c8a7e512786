"""The code's shape, read statically (ast, no saelab import): modules small enough to read, functions short enough
to follow, and no import cycle between modules, because each of these is what made the code hard to change.

Each test lists every offender in its failure message, so one run says everything there is to fix.
"""

from __future__ import annotations

import ast
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = {"saelab/cli.py": 450, "saelab/training/trainer.py": 450}
MAX_FUNCTION_LINES = 60


def source_files() -> dict[str, Path]:
    """{dotted module name: file} for saelab and its kernels (kernels/ is installed as saelab.kernels by symlink)."""
    modules = {}
    for folder, package in ((ROOT / "saelab", "saelab"), (ROOT / "kernels", "saelab.kernels")):
        for dirpath, dirnames, filenames in os.walk(folder):  # does not follow the saelab/kernels symlink
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not (Path(dirpath) / d).is_symlink())
            for filename in sorted(f for f in filenames if f.endswith(".py")):
                path = Path(dirpath) / filename
                parts = [package, *path.relative_to(folder).with_suffix("").parts]
                if parts[-1] == "__init__":
                    parts.pop()
                modules[".".join(parts)] = path
    return modules


def relative(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_the_big_modules_stay_readable():
    too_long = []
    for name, limit in MAX_MODULE_LINES.items():
        lines = len((ROOT / name).read_text().splitlines())
        if lines >= limit:
            too_long.append(f"{name}: {lines} lines (limit: under {limit})")
    assert not too_long, "modules to split:\n  " + "\n  ".join(too_long)


def test_no_function_is_too_long_to_follow():
    too_long = []
    for path in source_files().values():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    too_long.append((lines, f"{relative(path)}:{node.lineno} {node.name}: {lines} lines"))
    too_long.sort(key=lambda item: (-item[0], item[1]))
    assert not too_long, (f"{len(too_long)} functions over {MAX_FUNCTION_LINES} lines (docstring included), longest "
                          "first:\n  " + "\n  ".join(text for _, text in too_long))


# ------------------------------------------------------------------------------------------------------ imports
@dataclass(frozen=True)
class Import:
    """One `import` statement's view of one name: the module it is read from and the name taken (None: the module)."""

    module: str
    name: str | None
    line: int
    bound: str | None  # the name it binds here (`as` alias), which a face's importers ask for
    lazy: bool  # inside a function: runs at call time, but still a dependency and still a cycle


def is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(tree: ast.Module, module: str, is_package: bool) -> list[Import]:
    """Every import of a module, top-level and lazy, except those under `if TYPE_CHECKING:` (never run)."""
    found: list[Import] = []

    def visit(node: ast.AST, lazy: bool) -> None:
        if isinstance(node, ast.If) and is_type_checking(node):
            for child in node.orelse:
                visit(child, lazy)
            return
        if isinstance(node, ast.Import):
            found.extend(Import(alias.name, None, node.lineno, None, lazy) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package holding this module (or this package, for an __init__)
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([base] if base else []))
            found.extend(Import(base, alias.name, node.lineno, alias.asname or alias.name, lazy)
                         for alias in node.names)
        inner = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, False)
    return found


def is_face(tree: ast.Module) -> bool:
    """A package __init__ that only re-exports (docstring, imports, __all__): importing from it is importing from
    the submodule that defines the name, so it is no node of its own in the graph."""
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            continue
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, (ast.AugAssign, ast.AnnAssign)) else None
        if targets and all(isinstance(t, ast.Name) and t.id == "__all__" for t in targets):
            continue
        return False
    return True


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    where: str  # file:line of the import statement
    lazy: bool


def import_graph() -> list[Edge]:
    """Module-to-module imports among saelab's modules, re-export faces seen through to the defining submodule."""
    files = source_files()
    trees = {name: ast.parse(path.read_text(), str(path)) for name, path in files.items()}
    packages = {name for name, path in files.items() if path.name == "__init__.py"}
    faces = {name for name in packages if is_face(trees[name])}
    imports = {name: imports_of(trees[name], name, name in packages) for name in files}

    def targets(imp: Import, seen: frozenset = frozenset()) -> set[str]:
        """The modules an import really reaches: `from a.b import c` is module a.b.c if there is one, else a.b; a
        face is followed to where it takes the name from (all it re-exports, for a plain `import face`)."""
        if imp.name is not None and f"{imp.module}.{imp.name}" in files:
            return targets(Import(f"{imp.module}.{imp.name}", None, imp.line, None, imp.lazy), seen)
        if imp.module not in files:
            return set()  # outside saelab
        if imp.module not in faces or imp.module in seen:
            return {imp.module}
        inner = [i for i in imports[imp.module] if imp.name is None or imp.name in (i.bound, "*")]
        reached = set().union(*(targets(i, seen | {imp.module}) for i in inner)) if inner else set()
        return reached or {imp.module}

    edges = []
    for name in files:
        if name in faces:
            continue
        for imp in imports[name]:
            for target in targets(imp) - {name}:
                edges.append(Edge(name, target, f"{relative(files[name])}:{imp.line}", imp.lazy))
    return edges


def cycles(edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm), each sorted."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return sorted(found)


def shortest_cycle(edges: list[Edge], members: set[str]) -> list[str]:
    """One shortest way round a component, from its first module back to it: the cycle to read first."""
    start = min(members)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for nxt in sorted({e.target for e in edges if e.source == node and e.target in members}):
                if nxt == start:
                    return paths[node] + [start]
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    following.append(nxt)
        frontier = following
    return []


def test_no_import_cycle_between_modules():
    edges = import_graph()
    report = []
    for component in cycles(edges):
        members = set(component)
        report.append(f"cycle among {', '.join(component)} (e.g. {' -> '.join(shortest_cycle(edges, members))}):")
        inside = sorted({(e.where, e.target, e.lazy) for e in edges if e.source in members and e.target in members})
        report += [f"    {where} imports {target}{' (lazy)' if lazy else ''}" for where, target, lazy in inside]
    assert not report, "import cycles (break each by moving the shared piece to a module both can import):\n  " + \
        "\n  ".join(report)


def test_the_import_graph_sees_lazy_relative_and_face_imports():
    """The checker itself: a lazy import counts, a relative one resolves, a face is seen through."""
    tree = ast.parse("from .common import x\n\ndef f():\n    from saelab.sae import SAE\n"
                     "if TYPE_CHECKING:\n    import saelab.cli\n")
    found = imports_of(tree, "saelab.hub.folder", is_package=False)
    assert [(i.module, i.name, i.lazy) for i in found] == [("saelab.hub.common", "x", False),
                                                           ("saelab.sae", "SAE", True)]
    assert imports_of(ast.parse("from . import api"), "saelab.kernels", is_package=True)[0].module == "saelab.kernels"
    assert is_face(ast.parse('"""doc"""\nfrom .a import b\n__all__ = ["b"]\n__all__ += ["c"]'))
    assert not is_face(ast.parse("from .a import b\nX = 1"))
    edges = [Edge("a", "b", "", False), Edge("b", "c", "", True), Edge("c", "a", "", False), Edge("c", "d", "", False),
             Edge("a", "c", "", True)]
    assert cycles(edges) == [["a", "b", "c"]]
    assert shortest_cycle(edges, {"a", "b", "c"}) == ["a", "c", "a"]
