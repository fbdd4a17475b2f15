"""The import circles among hpcllm's modules, read from the source (ast): every import a module runs,
at its top or inside a function, except those under `if TYPE_CHECKING:` (never run).

    python scripts/import_cycles.py            # one line per circle (strongly connected set of modules)
    python scripts/import_cycles.py --edges    # and, for each, the imports that close it
    python scripts/import_cycles.py --type-checking   # counting the imports under TYPE_CHECKING too

`import a.b` and `from a import b` (b a module) count as an import of a.b; the parent packages that
Python runs first are not counted (a package's __init__ would otherwise be in every circle below it).
Exit status 1 when there is a circle. tests/test_import_cycles.py checks the same graph.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, this: str, is_package: bool, type_checking: bool = False):
    """(module imported, line, names) for each import the module can run (`type_checking`: and
    those only a type checker reads)."""
    package = this if is_package else this.rpartition(".")[0]
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_checking:
            stack.extend(node.orelse)  # the body runs only under a type checker
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno, []
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..a import b
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            yield base, node.lineno, [a.name for a in node.names]
        stack.extend(ast.iter_child_nodes(node))


def import_graph(package_dir: Path = ROOT / "hpcllm", type_checking: bool = False) -> dict[str, dict[str, int]]:
    """module -> {imported hpcllm module: line of the first such import}."""
    root = package_dir.parent
    files = {module_name(p, root): p for p in sorted(package_dir.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {m: {} for m in files}
    for mod, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        for base, line, names in _imports(tree, mod, path.name == "__init__.py", type_checking):
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in files] or ([base] if base in files else [])
            if len(targets) < len(names) and base in files:  # `from pkg import name` also runs pkg itself
                targets.append(base)
            for t in targets:
                if t != mod:
                    graph[mod].setdefault(t, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected sets of more than one module (Tarjan), each sorted, largest first."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~130)
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                out.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out, key=lambda c: (-len(c), c))


def main(argv: list[str]) -> int:
    graph = import_graph(type_checking="--type-checking" in argv)
    found = cycles(graph)
    for scc in found:
        print(f"{len(scc)} modules: {' '.join(scc)}")
        if "--edges" in argv:
            members = set(scc)
            for m in scc:
                for t, line in sorted(graph[m].items()):
                    if t in members:
                        print(f"    {m}:{line} -> {t}")
    print(f"{len(found)} circle(s)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
