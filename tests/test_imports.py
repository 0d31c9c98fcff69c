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
# Folder -> import name: the top-level `models/` and `pallas_kernels/` are `jpaged.models`
# and `jpaged.pallas_kernels`.
PACKAGES = {"jpaged": "jpaged", "models": "jpaged.models",
            "pallas_kernels": "jpaged.pallas_kernels"}
# The one place the engine reaches models: a function that imports them when called.
RESOLVER = ("jpaged.engine.model_loading", "_models")
# The layers, bottom first: a module imports only modules of its own layer or below.
LAYERS = (
    ("kernels", ("jpaged.pallas_kernels",)),
    ("core", ("jpaged.core",)),
    ("host", ("jpaged.host",)),
    ("models", ("jpaged.parallel.layers", "jpaged.models")),
    ("engine", ("jpaged.engine", "jpaged.parallel", "jpaged.decode_loop")),
    ("front ends", ("jpaged.serving", "jpaged.tools", "jpaged.__main__", "jpaged")),
)


def layer(module: str) -> int:
    """Index in LAYERS of the most specific prefix that names the module."""
    best = max(((len(prefix), rank) for rank, (_, prefixes) in enumerate(LAYERS)
                for prefix in prefixes
                if module == prefix or module.startswith(prefix + ".")), default=None)
    assert best is not None, f"{module} is in no layer"
    return best[1]


def module_name(path: pathlib.Path) -> str:
    folder, *parts = path.relative_to(ROOT).with_suffix("").parts
    parts = [PACKAGES[folder], *parts]
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
            # "from jpaged.parallel import mesh" imports the submodule jpaged.parallel.mesh
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                       for alias in node.names]
        found.extend((t, function) for t in targets if t in modules)
        for child in ast.iter_child_nodes(node):
            visit(child, function)

    visit(ast.parse(path.read_text()), None)
    return found


def import_graph() -> tuple[dict[str, set[str]], dict[str, list]]:
    files = [p for folder in PACKAGES for p in (ROOT / folder).rglob("*.py")]
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
    assert "jpaged.core.attention" in graph["jpaged.models.llama"]
    assert "jpaged.parallel.layers" in graph["jpaged.models.llama"]
    assert "jpaged.pallas_kernels.reference" in graph["jpaged.core.attention"]
    assert "jpaged.parallel.mesh" in graph["jpaged.engine.engine"]
    assert ("jpaged.models", "_models") in edges["jpaged.engine.model_loading"]
    assert "jpaged.engine.engine" in graph["jpaged.serving.cli"]   # inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert [layer(m) for m in ("jpaged.pallas_kernels.reference", "jpaged.core.cache",
                               "jpaged.host.scheduler", "jpaged.parallel.layers",
                               "jpaged.parallel.mesh", "jpaged.serving.server")] == [
        0, 1, 2, 3, 4, 5]


def test_no_import_cycle():
    graph, _ = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_imports_point_down_the_layers():
    """Every import, lazy ones included, goes to the importer's layer or one below it."""
    graph, _ = import_graph()
    upward = sorted((m, t) for m, targets in graph.items() for t in targets
                    if layer(t) > layer(m))
    assert not upward, upward


def test_engine_reaches_models_only_through_the_resolver():
    """Only the lazy resolver; models import the core modules they use, not the package."""
    _, edges = import_graph()
    reaching = {(module, function) for module, found in edges.items()
                if not module.startswith("jpaged.models")
                for target, function in found if target.startswith("jpaged.models")}
    assert reaching == {RESOLVER}
    for module, found in edges.items():
        if module.startswith("jpaged.models"):
            assert "jpaged" not in {target for target, _ in found}, module


def loaded_after(statement: str, cwd=ROOT) -> set[str]:
    """The top-level packages and jpaged modules in sys.modules after `statement`, run in
    a fresh interpreter (what a user's process really loads, not what the source says)."""
    code = (f"import sys\n{statement}\n"
            "print(' '.join(m for m in sys.modules if m.startswith('jpaged') "
            "or '.' not in m))\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(proc.stdout.split())


def under(modules: set[str], *prefixes: str) -> set[str]:
    return {m for m in modules for p in prefixes if m == p or m.startswith(p + ".")}


def test_import_jpaged_is_lazy():
    loaded = loaded_after("import jpaged")
    assert under(loaded, "jpaged") == {"jpaged"}
    assert not under(loaded, "jax", "numpy", "flax")


def test_host_side_loads_no_jax():
    loaded = loaded_after("import jpaged.host.scheduler, jpaged.host.request, "
                          "jpaged.host.stop, jpaged.host.sampling_params, "
                          "jpaged.host.detokenizer, jpaged.host.beam_search")
    assert not under(loaded, "jax", "flax", "jpaged.engine", "jpaged.models")


def test_core_loads_neither_flax_nor_the_engine():
    loaded = loaded_after("import jpaged.core.attention, jpaged.core.cache, "
                          "jpaged.core.interfaces")
    assert "jax" in loaded
    assert not under(loaded, "flax", "jpaged.engine", "jpaged.host", "jpaged.models",
                     "jpaged.serving")


def test_models_load_no_engine():
    loaded = loaded_after("import jpaged.models")
    assert "flax" in loaded
    assert not under(loaded, "jpaged.engine", "jpaged.serving", "jpaged.tools",
                     "jpaged.parallel.mesh", "jpaged.parallel.replicas")


def test_engine_loads_neither_flax_nor_models_nor_the_server():
    loaded = loaded_after("from jpaged import LLM, SamplingParams")
    assert "jpaged.engine.engine" in loaded
    assert not under(loaded, "flax", "jpaged.models", "jpaged.serving", "starlette",
                     "uvicorn", "matplotlib")


def test_the_command_loads_jax_only_for_a_subcommand():
    """`jpaged --help` answers without loading JAX or the engine (only its config)."""
    loaded = loaded_after("from jpaged.serving import cli")
    assert not under(loaded, "jax", "jpaged.engine.engine", "starlette")


def test_user_files_named_like_the_packages_do_not_shadow_them(tmp_path):
    """`models.py` and `pallas_kernels.py` in the working directory (first on sys.path)."""
    for name in ("models", "pallas_kernels"):
        (tmp_path / f"{name}.py").write_text(f"raise ImportError('the user\\'s {name}.py')\n")
    loaded = loaded_after("from jpaged import LLM, SamplingParams\n"
                          "out = LLM('tiny').generate([[1, 2, 3]], SamplingParams("
                          "max_tokens=2, temperature=0))\n"
                          "assert len(out[0].outputs[0].token_ids) == 2", cwd=tmp_path)
    assert "jpaged.models" in loaded and "models" not in loaded
