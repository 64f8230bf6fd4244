"""The package's shape (docs/architecture.md): no import cycles between subpackages, no
underscore-private name imported from another module, nothing that changes process state at
import time, and no file past the length the style guide allows. Read from the source (ast),
nothing is imported."""

from __future__ import annotations

import ast
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "evl_platform"
MAX_LINES = 450
LAYERS: tuple[tuple[str, ...], ...] = (
    ("evl_platform", "registry", "arguments"),
    ("config", "tracking"),
    ("models",),
    ("data",),
    ("features", "serving"),
    ("runtime",),
    ("train", "ensemble"),
    ("sweep", "inference"),
    ("report",),
    ("bench",),
    ("cli",),
)
"""The layers of docs/architecture.md, lowest first: a subpackage imports only lower layers."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    return {module_name(path): path for path in sorted(root.rglob("*.py"))}


def imports(name: str, path: Path) -> Iterator[tuple[str, list[str], int]]:
    """``(imported module, names taken from it, line)`` for every import in the file,
    including imports inside functions."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            yield target, [alias.name for alias in node.names], node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno


def subpackage(module: str) -> str:
    """``evl_platform.sweep.runner`` -> ``sweep``; top-level modules are their own."""
    return module.split(".")[1] if module.count(".") else module


def subpackage_graph(mods: dict[str, Path]) -> dict[str, dict[str, list[str]]]:
    """subpackage -> imported subpackage -> the import lines that make the edge."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for name, path in mods.items():
        for target, _, line in imports(name, path):
            if not target.startswith("evl_platform.") or subpackage(target) == subpackage(name):
                continue
            graph[subpackage(name)][subpackage(target)].append(f"{name}:{line} -> {target}")
    return graph


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in graph.get(node, {}):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in list(graph):
        if node not in index:
            visit(node)
    return found


def describe(graph: dict[str, dict[str, list[str]]], component: list[str]) -> str:
    edges = [line for a in component for b in component if b in graph[a] for line in graph[a][b]]
    return f"cycle {' <-> '.join(component)}: " + "; ".join(edges)


def private_imports(mods: dict[str, Path]) -> list[str]:
    """``from evl_platform.x import _name`` anywhere in the package (dunders are fine)."""
    found = []
    for name, path in mods.items():
        for target, taken, line in imports(name, path):
            if target.startswith("evl_platform") and target != name:
                for item in taken:
                    if item.startswith("_") and not item.startswith("__"):
                        found.append(f"{name}:{line}: from {target} import {item}")
    return found


def _is_environ(node: ast.AST) -> bool:
    """``os.environ`` (or a bare ``environ``)."""
    return (isinstance(node, ast.Attribute) and node.attr == "environ") or (
        isinstance(node, ast.Name) and node.id == "environ"
    )


def _changes_state(node: ast.AST) -> bool:
    if isinstance(node, ast.Assign | ast.AugAssign):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target]
        return any(isinstance(t, ast.Subscript) and _is_environ(t.value) for t in targets)
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        method, owner = node.func.attr, node.func.value
        if _is_environ(owner) and method in ("setdefault", "update", "pop", "__setitem__"):
            return True
        if method in ("putenv", "unsetenv") and isinstance(owner, ast.Name) and owner.id == "os":
            return True
        if method == "setLevel":
            return isinstance(owner, ast.Call) and getattr(owner.func, "attr", "") == "getLogger"
    return False


def import_time_effects(path: Path) -> list[int]:
    """Lines, outside any function or class body, that set environment variables or
    logger levels: the statements that run when the module is imported."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    lines: list[int] = []

    def walk(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
                continue  # runs when called, not when imported
            if _changes_state(child):
                lines.append(child.lineno)
            walk(child)

    walk(tree)
    return lines


# --- the checks on the package ---------------------------------------------------------------


def test_no_import_cycle_between_subpackages() -> None:
    graph = subpackage_graph(modules())
    assert [describe(graph, c) for c in cycles(graph)] == []


def test_every_import_goes_down_the_layers() -> None:
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    mods = modules()
    assert {subpackage(name) for name in mods} - set(level) == set(), "a subpackage has no layer"
    upward = [
        line
        for a, targets in subpackage_graph(mods).items()
        for b, lines in targets.items()
        if level[b] >= level[a]
        for line in lines
    ]
    assert upward == []


def test_no_private_name_is_imported_from_another_module() -> None:
    assert private_imports(modules()) == []


def test_importing_a_module_changes_no_process_state() -> None:
    found = [
        f"{name}:{line}" for name, path in modules().items() for line in import_time_effects(path)
    ]
    assert found == []


def test_no_file_is_longer_than_the_style_guide_allows() -> None:
    lengths = {
        name: len(path.read_text(encoding="utf-8").splitlines()) for name, path in modules().items()
    }
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


# --- the checks catch what they are meant to -------------------------------------------------


@pytest.fixture
def fake_package(tmp_path: Path) -> Path:
    root = tmp_path / "evl_platform"
    for sub in ("a", "b"):
        (root / sub).mkdir(parents=True)
        (root / sub / "__init__.py").write_text("")
    (root / "__init__.py").write_text("")
    return root


def _names(root: Path) -> dict[str, Path]:
    return {
        ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__"): p
        for p in sorted(root.rglob("*.py"))
    }


def test_a_cycle_through_a_function_level_import_is_found(fake_package: Path) -> None:
    (fake_package / "a" / "x.py").write_text("from evl_platform.b.y import g\n")
    (fake_package / "b" / "y.py").write_text("def g():\n    from evl_platform.a import x\n")
    graph = subpackage_graph(_names(fake_package))
    assert cycles(graph) == [["a", "b"]]
    assert "evl_platform.b.y:2 -> evl_platform.a" in describe(graph, ["a", "b"])


def test_a_one_way_dependency_is_no_cycle(fake_package: Path) -> None:
    (fake_package / "a" / "x.py").write_text("from evl_platform.b.y import g\n")
    (fake_package / "b" / "y.py").write_text("import os\n")
    assert cycles(subpackage_graph(_names(fake_package))) == []


def test_a_private_import_across_modules_is_found(fake_package: Path) -> None:
    (fake_package / "a" / "x.py").write_text("from ..b.y import _helper, __version__, public\n")
    (fake_package / "b" / "y.py").write_text("_helper = public = __version__ = 1\n")
    assert private_imports(_names(fake_package)) == [
        "evl_platform.a.x:1: from evl_platform.b.y import _helper"
    ]


@pytest.mark.parametrize(
    "line",
    [
        'os.environ["X"] = "1"',
        'os.environ.setdefault("X", "1")',
        'logging.getLogger("ray").setLevel(logging.WARNING)',
        'if True:\n    os.environ["X"] = "1"',
    ],
)
def test_module_level_state_changes_are_found(tmp_path: Path, line: str) -> None:
    path = tmp_path / "m.py"
    path.write_text(f"import logging\nimport os\n{line}\n")
    assert import_time_effects(path) == [3 + line.count("\n")]


def test_state_changes_inside_functions_are_allowed(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text(
        "import logging, os\n"
        "def start():\n"
        '    os.environ.setdefault("X", "1")\n'
        '    logging.getLogger("ray").setLevel(logging.WARNING)\n'
        "log = logging.getLogger(__name__)\n"
        'value = os.environ.get("X")\n'
    )
    assert import_time_effects(path) == []
