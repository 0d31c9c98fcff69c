"""Imports point one way: pallas_kernels <- jpaged core <- models <- engine.

The graph is read from the source with ``ast`` (imports inside functions included), so a
lazy import cannot hide a cycle.
"""

import ast
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("jpaged", "models", "pallas_kernels")
# The one place jpaged reaches models: a function that imports it when called.
RESOLVER = ("jpaged.model_loading", "_models")


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_main_guard(node: ast.AST) -> bool:
    """``if __name__ == "__main__":``: run as a script, the file is a new module
    (``__main__``), so imports under it are not edges of the package's import graph."""
    test = getattr(node, "test", None)
    return (isinstance(node, ast.If) and isinstance(test, ast.Compare)
            and isinstance(test.left, ast.Name) and test.left.id == "__name__")


def imports(path: pathlib.Path, modules: set[str]) -> list[tuple[str, str | None]]:
    """(imported project module, enclosing function or None) for every import in a file."""
    found, name = [], module_name(path)

    def visit(node, function):
        if is_main_guard(node):
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            function = node.name
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"{name}: relative import (the project uses none)"
            base = node.module
            # "from jpaged import parallel" imports the submodule jpaged.parallel
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        found.extend((t, function) for t in targets if t in modules)
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text()), None)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, list]]:
    files = [p for package in PACKAGES for p in (ROOT / package).rglob("*.py")]
    modules = {module_name(p) for p in files}
    edges = {module_name(p): imports(p, modules) for p in files}
    graph = {m: {target for target, _ in found} - {m} for m, found in edges.items()}
    return graph, edges


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_graph_is_read():
    """The parser sees the edges the layering is made of (a broken parser finds no cycle)."""
    graph, edges = import_graph()
    assert "jpaged.attention" in graph["models.llama"]
    assert "jpaged.layers" in graph["models.llama"]
    assert "pallas_kernels.reference" in graph["jpaged.attention"]
    assert "jpaged.parallel" in graph["jpaged.engine"]
    assert ("models", "_models") in edges["jpaged.model_loading"]
    assert "jpaged.engine" in graph["jpaged.cli"]   # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle():
    graph, _ = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_jpaged_never_imports_models():
    """Only the lazy resolver; models imports the core modules it uses, not the package."""
    _, edges = import_graph()
    reaching = {(module, function) for module, found in edges.items()
                if module.split(".")[0] == "jpaged"
                for target, function in found if target.split(".")[0] == "models"}
    assert reaching == {RESOLVER}
    for module, found in edges.items():
        if module.split(".")[0] == "models":
            assert "jpaged" not in {target for target, _ in found}, module


def test_pallas_kernels_import_no_project_module():
    _, edges = import_graph()
    for module, found in edges.items():
        if module.startswith("pallas_kernels"):
            assert all(t.startswith("pallas_kernels") for t, _ in found), (module, found)


def test_import_jpaged_loads_neither_flax_nor_models():
    code = ("import sys, jpaged\n"
            "from jpaged import LLM, SamplingParams\n"
            "loaded = [m for m in sys.modules if m.split('.')[0] in ('flax', 'models')]\n"
            "assert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
