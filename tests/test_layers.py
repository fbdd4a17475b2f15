"""The package's layering, checked from the source (no imports run): the module import graph of
hpcllm/ — every `import`, including those inside functions — has no circle through the model,
parallel and train packages, and those import no layer above them.

    python tests/test_layers.py      prints every import circle in hpcllm/ (all packages)

The layers, lowest first (hpcllm/parallel/__init__.py writes them down): model < parallel < train <
infer < launch < jobs < cli; each package's cli.py registers its commands and belongs to the cli
layer. Only model/parallel/train are checked here: the other packages' circles (config <-> jobs,
checkpoint <-> checkpoint.sharded) are other changes' to remove.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "hpcllm"
CHECKED = ("hpcllm.model", "hpcllm.parallel", "hpcllm.train")
# what each checked package must never import (the layers above it)
ABOVE = {"hpcllm.model": ("hpcllm.parallel", "hpcllm.train", "hpcllm.infer", "hpcllm.launch", "hpcllm.jobs",
                          "hpcllm.cli", "hpcllm.bench", "hpcllm.checkpoint"),
         "hpcllm.parallel": ("hpcllm.train", "hpcllm.infer", "hpcllm.launch", "hpcllm.jobs", "hpcllm.cli",
                             "hpcllm.bench"),
         "hpcllm.train": ("hpcllm.infer", "hpcllm.launch", "hpcllm.jobs", "hpcllm.cli", "hpcllm.bench")}
# removed by the change that makes the provenance writer a leaf module (issue 26, item 5): drop this then
FIXED_ELSEWHERE = [{"hpcllm.report.provenance", "hpcllm.train.metrics"}]


def modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the hpcllm modules it imports anywhere in its file (a package's own __init__ too,
    where the importer is not inside that package)."""
    mods = modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            for t in targets:
                while t and t not in mods:  # `import hpcllm.x.y` names a module or something in one
                    t = t.rpartition(".")[0]
                if not t.startswith("hpcllm") or t == mod:
                    continue
                graph[mod].add(t)
                parent = t.rpartition(".")[0]
                while parent and parent not in ("hpcllm", mod) and not mod.startswith(parent + "."):
                    graph[mod].add(parent)  # importing a submodule runs its package's __init__ first
                    parent = parent.rpartition(".")[0]
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    sys.setrecursionlimit(10000)

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _in(mod: str, pkg: str) -> bool:
    return mod == pkg or mod.startswith(pkg + ".")


def test_no_import_circle_through_model_parallel_train():
    bad = [c for c in cycles(import_graph()) if any(_in(m, p) for m in c for p in CHECKED)
           and set(c) not in FIXED_ELSEWHERE]
    assert not bad, f"import circles: {bad}"


def test_model_parallel_train_import_no_layer_above():
    upward = [(m, t) for m, ts in import_graph().items() for pkg, above in ABOVE.items()
              if _in(m, pkg) and not m.endswith(".cli") for t in ts if any(_in(t, a) for a in above)]
    assert not upward, f"imports of a layer above: {sorted(upward)}"


def test_the_graph_sees_function_level_imports():
    """The check can fail: a deferred import inside a function is an edge like any other."""
    graph = import_graph()
    assert "hpcllm.model.hf" in graph["hpcllm.parallel.materialize"]  # imported inside materialize()


if __name__ == "__main__":
    g = import_graph()
    for c in cycles(g):
        print(f"circle of {len(c)}: {', '.join(c)}")
    for pkg, above in ABOVE.items():
        for m in sorted(g):
            if _in(m, pkg) and not m.endswith(".cli"):
                for t in sorted(g[m]):
                    if any(_in(t, a) for a in above):
                        print(f"upward: {m} -> {t}")
