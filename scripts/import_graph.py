#!/usr/bin/env python3
"""The import graph of polycoder's own modules, read from the source (nothing is imported).

    python3 scripts/import_graph.py            # package-level graph, one line a package
    python3 scripts/import_graph.py --modules  # every module and what it imports

`imports(root)` maps each module (`polycoder.generation.engine`) to the polycoder modules it
imports, with where each import stands (top of the file, or inside a function);
tests/test_structure.py uses it to keep the graph acyclic and the CLI on top of it.
"""

from __future__ import annotations

import argparse
import ast
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports(root: Path = SRC) -> dict[str, list[tuple[str, bool, int]]]:
    """module -> [(imported polycoder module, at top level?, line)], for every .py under root/polycoder."""
    files = sorted((root / "polycoder").rglob("*.py"))
    names = {module_name(p, root) for p in files}
    graph: dict[str, list[tuple[str, bool, int]]] = {}
    for path in files:
        me = module_name(path, root)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {id(n) for n in tree.body} | {id(c) for n in tree.body if isinstance(n, ast.Try)
                                            for c in n.body + [h for x in n.handlers for h in x.body]}
        found = []
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from polycoder.x import y` may import the module polycoder.x.y
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in names else node.module
                           for a in node.names]
            for t in targets:
                if t == "polycoder" or t.startswith("polycoder."):
                    while t not in names and "." in t:
                        t = t.rsplit(".", 1)[0]
                    if t != me:
                        found.append((t, id(node) in top, node.lineno))
        graph[me] = found
    return graph


def package_of(module: str) -> str:
    """polycoder.generation.engine -> polycoder.generation; top-level modules stand alone."""
    parts = module.split(".")
    return ".".join(parts[:2])


def package_graph(graph: dict[str, list[tuple[str, bool, int]]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = defaultdict(set)
    for mod, deps in graph.items():
        out[package_of(mod)]
        for dep, _, _ in deps:
            if package_of(dep) != package_of(mod) and dep != "polycoder":
                out[package_of(mod)].add(package_of(dep))
    return out


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", action="store_true", help="module level instead of package level")
    args = ap.parse_args()
    graph = imports()
    if args.modules:
        for mod in sorted(graph):
            deps = sorted({d for d, _, _ in graph[mod]})
            print(f"{mod}: {', '.join(deps) or '-'}")
        return
    short = lambda name: name.removeprefix("polycoder.")  # noqa: E731
    for pkg, deps in sorted(package_graph(graph).items()):
        print(f"{short(pkg):14} -> {', '.join(sorted(map(short, deps))) or '-'}")


if __name__ == "__main__":
    main()
