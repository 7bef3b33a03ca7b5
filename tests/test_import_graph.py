"""The import graph of kat_timm: no cycles, and the core (ops -> layers -> models) never reaches up into the tools.

Every module of the package is parsed with ``ast`` (nothing is imported), and every ``import`` statement counts,
whether at module level or inside a function, class or ``if``: an import hidden in a function is still a cycle, only
a later one. Relative imports are resolved against the importing module's package. The edges:

- ``import a.b.c`` and ``from a.b.c import name``: an edge to ``a.b.c``, and to ``a.b`` / ``a`` where those are
  packages the importer is not inside (Python runs their ``__init__`` first);
- ``from a.b import c`` where ``a.b.c`` is a module: an edge to it; where ``c`` is a name, an edge to ``a.b`` (its
  ``__init__``). So ``from kat_timm import X`` or ``from .. import X`` inside ``kat_timm.tools.x`` is an edge to
  ``kat_timm``'s ``__init__``.

Being inside a package is not an import: ``kat_timm.tools.x`` has no edge to ``kat_timm.tools`` unless it names it.
Dynamic imports (``importlib.import_module`` of a computed name) are invisible to this test.
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Optional, Set

import pytest

PACKAGE = "kat_timm"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE

# Layer -> the parts of kat_timm it may import (besides itself). A part is a top-level subpackage or module.
CORE_LAYERS = {
    "ops": set(),
    "layers": {"ops"},
    "models": {"ops", "layers", "checkpoint"},
}
TOOL_LAYERS = ("cli", "tools", "training")


def module_names(root: Path = ROOT, package: str = PACKAGE) -> Dict[str, Path]:
    """Dotted name -> source file of every module under ``root`` (a package's name maps to its ``__init__.py``)."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join([package, *parts])] = path
    return modules


def _resolve(importer: str, is_package: bool, module: Optional[str], level: int) -> str:
    """The absolute name of ``from <level dots><module> import ...`` written in ``importer``."""
    if level == 0:
        return module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    assert base, f"{importer}: relative import beyond the top-level package"
    return ".".join(base + ([module] if module else []))


def _with_packages(target: str, importer: str, modules: Dict[str, Path]) -> Set[str]:
    """``target`` plus its enclosing packages of ours that ``importer`` is not inside (their __init__ runs first)."""
    parts = target.split(".")
    found = set()
    for i in range(1, len(parts) + 1):
        name = ".".join(parts[:i])
        inside = importer == name or importer.startswith(name + ".")
        if name in modules and (i == len(parts) or not inside):
            found.add(name)
    return found


def imports_of(name: str, path: Path, modules: Dict[str, Path]) -> Dict[str, int]:
    """The modules of ours that ``name`` (source ``path``) imports -> line of the first such import."""
    is_package = path.name == "__init__.py"
    top = name.split(".")[0]
    edges: Dict[str, int] = {}

    def add(targets: Set[str], line: int) -> None:
        for target in targets - {name}:
            edges[target] = min(line, edges.get(target, line))

    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(_with_packages(alias.name, name, modules), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            source = _resolve(name, is_package, node.module, node.level)
            if source.split(".")[0] != top:
                continue
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                add(_with_packages(submodule if submodule in modules else source, name, modules), node.lineno)
    return edges


def import_graph(root: Path = ROOT, package: str = PACKAGE) -> Dict[str, Dict[str, int]]:
    """Module -> {imported module of ours -> line}, for every module of the package."""
    modules = module_names(root, package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: Dict[str, Dict[str, int]]) -> Optional[List[str]]:
    """One cycle of ``graph`` as a path ``[a, b, ..., a]``, or None. Depth-first search, colouring nodes."""
    state: Dict[str, int] = {}  # 1: on the current path, 2: finished
    path: List[str] = []

    def visit(node: str) -> Optional[List[str]]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return None


def describe(cycle: List[str], graph: Dict[str, Dict[str, int]]) -> str:
    """``a (a.py:12) -> b (b.py:40) -> a``: each hop with the line of the import that makes it."""
    hops = [f"{a} (line {graph[a][b]}) -> " for a, b in zip(cycle, cycle[1:])]
    return "".join(hops) + cycle[-1]


def _part(module: str) -> str:
    """The top-level part of kat_timm a module belongs to (``kat_timm.ops.flops`` -> ``ops``; the root -> '')."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.fixture(scope="module")
def graph() -> Dict[str, Dict[str, int]]:
    return import_graph()


# --------------------------------------------------------------------------------------------------------------------
# The graph builder itself, on a package made for the purpose
# --------------------------------------------------------------------------------------------------------------------


def _write_package(root: Path, files: Dict[str, str]) -> Path:
    for relative, text in files.items():
        path = root / "pkg" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


def test_builder_sees_function_level_relative_and_parent_imports(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "from .a import f\n",
        "a.py": "def f():\n    from .sub.b import g  # inside a function\n    return g\n",
        "sub/__init__.py": "",
        "sub/b.py": "from .. import f\n",  # a name of the parent __init__
        "sub/c.py": "import pkg.a\nfrom . import b\n",
        "d.py": "from pkg.sub import c\nimport os\n",
    })
    graph = import_graph(pkg, "pkg")
    assert set(graph["pkg"]) == {"pkg.a"}
    assert set(graph["pkg.a"]) == {"pkg.sub", "pkg.sub.b"}, "a function-level import with its package"
    assert set(graph["pkg.sub.b"]) == {"pkg"}, "from .. import NAME is an edge to the parent's __init__"
    assert set(graph["pkg.sub.c"]) == {"pkg.a", "pkg.sub.b"}, "no edge to pkg.sub: c is inside it"
    assert set(graph["pkg.d"]) == {"pkg.sub", "pkg.sub.c"}
    assert graph["pkg.a"]["pkg.sub.b"] == 2, "the line of the import"
    cycle = find_cycle(graph)
    assert cycle == ["pkg", "pkg.a", "pkg.sub.b", "pkg"], cycle
    assert describe(cycle, graph) == "pkg (line 1) -> pkg.a (line 2) -> pkg.sub.b (line 1) -> pkg"


def test_builder_finds_no_cycle_in_a_tree(tmp_path):
    pkg = _write_package(tmp_path, {
        "__init__.py": "from .b import g\nfrom .a import f\n",
        "a.py": "from .b import g\n",
        "b.py": "import json\n",
    })
    assert find_cycle(import_graph(pkg, "pkg")) is None


# --------------------------------------------------------------------------------------------------------------------
# kat_timm
# --------------------------------------------------------------------------------------------------------------------


def test_graph_covers_the_package(graph):
    assert {"kat_timm", "kat_timm.ops.group_rational", "kat_timm.layers.kan", "kat_timm.models.kat",
            "kat_timm.cli.train", "kat_timm.tools.hub", "kat_timm.training.data"} <= set(graph)
    assert "kat_timm.ops.group_rational" in graph["kat_timm.layers.group_rational"], "the builder sees imports"


def test_no_import_cycles(graph):
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle in kat_timm: {describe(cycle, graph)}"


@pytest.mark.parametrize("layer", sorted(CORE_LAYERS))
def test_core_layering(graph, layer):
    allowed = CORE_LAYERS[layer] | {layer}
    wrong = [f"{module} imports {target} (line {line})"
             for module, targets in sorted(graph.items()) if _part(module) == layer
             for target, line in sorted(targets.items()) if _part(target) not in allowed]
    assert not wrong, (f"kat_timm.{layer} may import only kat_timm.{{{', '.join(sorted(allowed))}}}: "
                       + "; ".join(wrong))


def test_core_never_imports_the_tools(graph):
    wrong = [f"{module} imports {target} (line {line})"
             for module, targets in sorted(graph.items()) if _part(module) in CORE_LAYERS
             for target, line in sorted(targets.items()) if _part(target) in TOOL_LAYERS]
    assert not wrong, "ops/layers/models must not import cli, tools or training: " + "; ".join(wrong)
