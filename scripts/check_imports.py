"""Check the import rules of docs/ARCHITECTURE.md (CI runs it): no import cycles among zdni's
modules, broker/ and workers/ apart from each other, and only zdni/cli/ importing them.

Every import counts, also one inside a function: a lazy import hides a circle, it does not
remove it. Usage: python scripts/check_imports.py  (exit 1 and one line per broken rule).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("zdni", "broker", "workers")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (a package's __init__ counts as the package)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), and self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def main() -> int:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    known = set(files)
    graph = {m: imports_of(p, known) - {m} for m, p in files.items()}
    # A package's __init__ importing its own submodules is how a package is assembled, and a
    # submodule importing the package's own names through it is not a circle of concepts.
    for m in graph:
        graph[m] = {d for d in graph[m] if not (d.startswith(m + ".") or m.startswith(d + "."))}
    problems = [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    for m, deps in sorted(graph.items()):
        top = m.split(".")[0]
        for d in sorted(deps):
            other = d.split(".")[0]
            if other in ("broker", "workers") and other != top and not m.startswith("zdni.cli"):
                problems.append(f"{m} imports {d}: only zdni.cli may import broker/ and workers/")
    for line in problems:
        print(line)
    print(f"checked {len(files)} modules: {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
