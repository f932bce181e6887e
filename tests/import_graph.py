"""r1mega's import graph read with ``ast`` (nothing is imported), for tests/test_layers.py.

Every ``import`` and ``from ... import`` counts wherever it stands: at module level, inside a function (a
lazy import still ties the two modules together when that function runs) and under ``if TYPE_CHECKING:``
(a type-only import is still a dependency a reader has to follow). ``from a.b import c`` is an edge to the
module ``a.b.c`` when that file exists, else to ``a.b``. Importing ``a.b.c`` also runs the package
``__init__`` files of ``a`` and ``a.b``; those implicit edges are added too, so a package ``__init__`` that
re-exports its modules is part of the graph the way Python runs it.

Run ``python tests/import_graph.py`` for the numbers (modules in cycles, the cycles, package edges).
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Edge:
    """One import: ``src`` imports ``dst`` at ``path:line``."""

    src: str
    dst: str
    path: str
    line: int
    implicit: bool = False
    """A package ``__init__`` that the import runs on the way to the module it names."""


def module_names(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``package_dir`` (a package root)."""
    names: dict[str, Path] = {}
    base = package_dir.parent
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(base).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def _resolve_relative(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    parts = module.split(".")
    if not is_package:
        parts = parts[:-1]
    if level > 1:
        parts = parts[: len(parts) - (level - 1)]
    return ".".join(parts + ([target] if target else []))


def _parents(name: str) -> list[str]:
    """``a.b.c`` -> ``["a", "a.b"]``: the packages whose ``__init__`` runs before ``a.b.c``."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def import_edges(package_dir: Path, root: str | None = None, implicit_parents: bool = True) -> list[Edge]:
    """Every import between modules of the package at ``package_dir``, function-level ones included.

    ``implicit_parents=False`` leaves out the edges to the package ``__init__`` files that an import runs.
    """
    names = module_names(package_dir)
    root = root or package_dir.name
    edges: dict[Edge, None] = {}
    for module, path in names.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        is_package = path.name == "__init__.py"
        rel = str(path.relative_to(package_dir.parent))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve_relative(module, is_package, node.level, node.module) if node.level else node.module
                if base is None:
                    continue
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in names else base)
            for target in targets:
                if target != root and not target.startswith(root + "."):
                    continue
                # the target and the package __init__ files that run before it
                for dst in [*_parents(target), target] if implicit_parents else [target]:
                    if dst in names and dst != module and dst != root and not module.startswith(dst + "."):
                        edges[Edge(module, dst, rel, node.lineno, dst != target)] = None
    return list(edges)


def strongly_connected(nodes: set[str], edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    succ: dict[str, set[str]] = defaultdict(set)
    for e in edges:
        succ[e.src].add(e.dst)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(nodes):
        if start in index:
            continue
        work = [(start, iter(sorted(succ[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(succ[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def package_of(module: str, depth: int = 2) -> str:
    """``r1mega.train.step`` -> ``r1mega.train`` (the first ``depth`` parts)."""
    return ".".join(module.split(".")[:depth])


def main() -> None:
    """Print the cycles and the package-level edges of r1mega."""
    package_dir = ROOT / "r1mega"
    nodes = set(module_names(package_dir))
    direct = strongly_connected(nodes, import_edges(package_dir, implicit_parents=False))
    print(f"without the package __init__ edges: {sum(len(c) for c in direct)} modules in {len(direct)} cycle(s)")
    edges = import_edges(package_dir)
    components = strongly_connected(nodes, edges)
    in_cycles = sum(len(c) for c in components)
    print(f"{len(nodes)} modules, {len(edges)} import statements, {in_cycles} modules in {len(components)} cycle(s)")
    for component in components:
        print("cycle:", ", ".join(component))
        members = set(component)
        for e in edges:
            if e.src in members and e.dst in members:
                print(f"    {e.src} -> {e.dst}  ({e.path}:{e.line})")
    pkg_edges: dict[tuple[str, str], int] = defaultdict(int)
    for e in edges:
        a, b = package_of(e.src), package_of(e.dst)
        if a != b:
            pkg_edges[(a, b)] += 1
    print("package edges:")
    for (a, b), n in sorted(pkg_edges.items()):
        print(f"    {a} -> {b}  ({n})")
    pkgs = {package_of(n) for n in nodes}
    pkg_cycles = strongly_connected(pkgs, [Edge(a, b, "", 0) for a, b in pkg_edges])
    print("package cycles:", [len(c) for c in pkg_cycles], pkg_cycles)


if __name__ == "__main__":
    sys.exit(main())
