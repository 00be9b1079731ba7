"""No import cycles anywhere in llm2clip: the library, llm2clip.ops, llm2clip.benchmarks, the components and the
pipelines, counting every `import` / `from ... import` statement, at module level or inside a function (a lazy
import hides a cycle from Python, not from a reader).

Read with ast, never imported. `from P import x` is an edge to the module P.x when that is a module of the tree,
else to P; importing a module is not counted as an edge to its parent packages (Python's package __init__ pattern
is not a cycle a reader has to untangle)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
# package -> its folder (pyproject.toml [tool.setuptools] package-dir)
PACKAGES = {
    "llm2clip": ROOT / "src" / "llm2clip",
    "llm2clip.components": ROOT / "components",
    "llm2clip.pipelines": ROOT / "pipelines",
}


def tree_modules(packages: dict[str, Path]) -> dict[str, Path]:
    """Every module of the tree by dotted name (a package by its own name, for its __init__.py)."""
    modules = {}
    for package, folder in packages.items():
        for path in folder.rglob("*.py"):
            if "__pycache__" in path.parts:
                continue
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The tree's modules that module `name` (file `path`) imports anywhere in its body."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package the module is in
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import llm2clip.ops.cli as c` names the module itself
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    modules = tree_modules(packages)
    return {name: imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search, modules and edges in sorted order)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycles_in_the_tree():
    graph = import_graph(PACKAGES)
    assert {"llm2clip.ops.cli", "llm2clip.ops.submit", "llm2clip.params", "llm2clip.benchmarks.suite"} <= set(graph)
    assert "llm2clip.pipelines.llm2clip_pipeline" in graph and "llm2clip.components.train_clip" in graph
    assert "llm2clip.ops.submit" in graph["llm2clip.ops.cli"]  # a function-level import is an edge
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_planted_function_level_cycle_is_found_and_named(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")  # a package importing its module: no cycle
    (pkg / "sub" / "a.py").write_text("import os\n\ndef f():\n    from pkg.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from pkg import c\n")
    (pkg / "c.py").write_text("def g():\n    from .sub.a import f\n")
    graph = import_graph({"pkg": pkg})
    assert graph["pkg.sub"] == {"pkg.sub.a"} and graph["pkg.c"] == {"pkg.sub.a"}
    assert find_cycle(graph) == ["pkg.c", "pkg.sub.a", "pkg.sub.b", "pkg.c"]
    (pkg / "c.py").write_text("import json\n")
    assert find_cycle(import_graph({"pkg": pkg})) is None
