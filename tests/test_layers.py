"""Imports point one way: every module's imports (module level and inside functions) go down the
layers README's layout section names, and no set of modules imports itself in a loop."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import REPO

LAYERS: tuple[tuple[str, ...], ...] = (
    ("pipeline.errors",),
    ("pipeline.spec",),
    ("pipeline.io", "pipeline.assets", "pipeline.onnx_weights", "pipeline.dinov2_onnx", "pipeline.versions",
     "pipeline.ray_runtime", "pipeline.console"),
    ("pipeline.data",),
    ("pipeline.model",),
    ("pipeline.checkpoint",),
    ("pipeline.eval",),
    ("pipeline.curate",),
    ("pipeline.train",),
    ("pipeline.export",),
    ("pipeline.bench", "pipeline.submit"),
    ("pipeline.cli", "pipeline.__main__"),
)
"""Bottom first. A module may import from its own layer and the ones below it."""


@dataclass(frozen=True)
class Import:
    source: str
    target: str
    file: Path
    line: int

    def where(self) -> str:
        return f"{self.file}:{self.line}"


def module_name(path: Path, repo: Path) -> str:
    parts = list(path.relative_to(repo).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path, source: str, modules: dict[str, Path], repo: Path) -> list[Import]:
    """Every import of a project module anywhere in ``path`` (functions and branches included),
    once per target and line."""
    found: dict[tuple[str, int], Import] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # ``from pkg import sub`` imports the submodule when there is one, else a name of pkg.
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in modules:  # ``import pipeline.io.storage as s`` and the like
                name = name.rpartition(".")[0]
            if name and name != source:
                found[name, node.lineno] = Import(source, name, path.relative_to(repo), node.lineno)
    return list(found.values())


def layer_of(module: str) -> int:
    for index, layer in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in layer):
            return index
    if module == "pipeline":
        return 0
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: place it")


def all_imports(repo: Path = REPO) -> list[Import]:
    """The imports of every module of the ``pipeline`` package under ``repo``."""
    modules = {module_name(path, repo): path for path in sorted((repo / "pipeline").rglob("*.py"))}
    return [imp for name, path in modules.items() for imp in imports_of(path, name, modules, repo)]


def test_every_import_points_down_the_layers():
    upward = [f"{imp.where()}: {imp.source} (layer {layer_of(imp.source)}) imports {imp.target} "
              f"(layer {layer_of(imp.target)})"
              for imp in all_imports() if layer_of(imp.target) > layer_of(imp.source)]
    assert not upward, "imports that go up the layers:\n" + "\n".join(upward)


def test_no_modules_import_each_other_in_a_loop():
    edges: dict[str, list[Import]] = {}
    for imp in all_imports():
        edges.setdefault(imp.source, []).append(imp)
    cycles = [cycle for cycle in _strongly_connected(edges) if len(cycle) > 1]
    described = []
    for cycle in cycles:
        inside = [imp for module in sorted(cycle) for imp in edges.get(module, []) if imp.target in cycle]
        described.append("; ".join(f"{imp.where()}: {imp.source} -> {imp.target}" for imp in inside))
    assert not cycles, "import cycles:\n" + "\n".join(described)


def test_the_checks_see_imports_inside_functions_and_upward_ones(tmp_path):
    """The checker itself: an upward import inside a function, and a two-module loop, are found."""
    fake = tmp_path / "pipeline"
    (fake / "spec").mkdir(parents=True)
    (fake / "train").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "spec" / "__init__.py").write_text("")
    (fake / "train" / "__init__.py").write_text("")
    (fake / "spec" / "a.py").write_text("def f():\n    from pipeline.train.b import g\n")
    (fake / "train" / "b.py").write_text("import pipeline.spec.a\n\ndef g():\n    pass\n")
    imports = all_imports(tmp_path)
    upward = [imp for imp in imports if layer_of(imp.target) > layer_of(imp.source)]
    assert [(imp.source, imp.target, imp.line) for imp in upward] == [("pipeline.spec.a", "pipeline.train.b", 2)]
    edges: dict[str, list[Import]] = {}
    for imp in imports:
        edges.setdefault(imp.source, []).append(imp)
    assert {"pipeline.spec.a", "pipeline.train.b"} in [set(c) for c in _strongly_connected(edges)]


def _strongly_connected(edges: dict[str, list[Import]]) -> list[list[str]]:
    """Tarjan's algorithm over the import graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for imp in edges.get(node, []):
            if imp.target not in index:
                visit(imp.target)
                low[node] = min(low[node], low[imp.target])
            elif imp.target in on_stack:
                low[node] = min(low[node], index[imp.target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(component)

    for node in list(edges):
        if node not in index:
            visit(node)
    return components
