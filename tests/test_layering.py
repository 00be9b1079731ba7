"""The tree's layering: the ML library imports no KFP, Kubernetes or pipeline code, and nothing imports at module
level what only the operations need, so `import llm2clip.<stage>` works without kfp."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parent.parent / "src" / "llm2clip"
# the library: src/llm2clip/*.py; operations (llm2clip.ops: they compile, run or submit the pipeline, or talk to
# Kubernetes) import those lazily, inside the functions that need them; benchmarks (llm2clip.benchmarks) use the
# library only
FORBIDDEN = ("kfp", "kfp_server_api", "kubernetes", "llm2clip.pipelines", "llm2clip.components", "llm2clip.ops")
# The one exception: the package's __init__ starts llm2clip.ops.lifeline's parent watch in the task processes of a
# local run (LLM2CLIP_PARENT_PID set), the first import each component body makes; lifeline imports only stdlib.
HOOK = {"__init__.py": ["llm2clip.ops"]}


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def forbidden(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))


def test_the_library_imports_no_kfp_kubernetes_or_pipeline_anywhere():
    """Every import statement, module level or inside a function, of every library module."""
    modules = sorted([*SRC.glob("*.py"), *SRC.glob("benchmarks/*.py")])
    assert len(modules) > 20
    found = {str(p.relative_to(SRC)): forbidden(imported_names(p)) for p in modules}
    assert {k: v for k, v in found.items() if v} == HOOK


def test_no_module_loads_kfp_or_kubernetes_when_imported():
    """Operations included: kfp and the kubernetes client load only when a command needs them."""
    names = sorted(
        ".".join(p.relative_to(SRC).with_suffix("").parts)
        for p in SRC.rglob("*.py")
        if p.stem != "__init__" and "__pycache__" not in p.parts
    )
    code = (
        "import importlib, sys\n"
        f"for n in {names!r}: importlib.import_module('llm2clip.' + n)\n"
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in ('kfp', 'kfp_server_api', 'kubernetes') "
        "or m.startswith(('llm2clip.pipelines', 'llm2clip.components'))))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_checker_sees_a_function_level_import(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    from kfp import dsl\n    import kubernetes.client\n")
    assert forbidden(imported_names(tmp_path / "m.py")) == ["kfp", "kubernetes.client"]
