"""The layering rules of ARCHITECTURE.md, checked on the source: which folder may import which, the one
module that imports ComfyUI, and no import circles (imports inside functions count too).

Written with the standard library's `ast` rather than import-linter: the pack is imported by file
location under whatever name ComfyUI gives its folder, not installed as a package, which import-linter
needs; the rules are a few lines here."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PRODUCTION = ("converters", "loaders", "nodes")
# What each folder may import from the pack (besides itself).
ALLOWED = {
    "converters": set(),
    "loaders": {"converters"},
    "nodes": {"loaders"},
    "headless": {"nodes", "loaders", "converters", "devtools"},
    "devtools": {"converters", "loaders"},
}
HOST_MODULE = "nodes.comfy_host"
COMFYUI_MODULES = {
    "comfy",
    "comfy_extras",
    "comfy_api",
    "folder_paths",
    "latent_preview",
    "server",
    "execution",
}
# Node modules may import these two node modules, and no other node.
NODE_SHARED = {"nodes.comfy_host", "nodes.common"}


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _pack_modules() -> dict[str, Path]:
    modules = {}
    for folder in ALLOWED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            modules[_module_name(path)] = path
    return modules


def _imports(path: Path, name: str) -> list[tuple[str, int, bool]]:
    """(imported name, line, is_pack) for every import in the file, at any depth. Relative imports
    are resolved to pack module names (`converters.lora_keys`); others keep their top-level name."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno, False) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append(((node.module or "").split(".")[0], node.lineno, False))
                continue
            base = package[: len(package) - (node.level - 1)]
            target = ".".join([*base, *(node.module.split(".") if node.module else [])])
            if node.module is None or target in ("", *ALLOWED):  # `from . import x`: modules x
                found += [(f"{target}.{alias.name}".strip("."), node.lineno, True) for alias in node.names]
            else:
                found.append((target, node.lineno, True))
    return found


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for target, _, is_pack in _imports(path, name):
            if not is_pack:
                continue
            while target and target not in modules:  # `from .x import name` where name is not a module
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that cross the layers the wrong way."""
    problems = []
    for module, targets in graph.items():
        folder = module.split(".")[0]
        for target in targets:
            other = target.split(".")[0]
            if other != folder and other not in ALLOWED[folder]:
                problems.append(f"{module} imports {target} ({folder}/ may not import {other}/)")
            elif (
                folder == other == "nodes" and module != "nodes" and {module, target}.isdisjoint(NODE_SHARED)
            ):
                problems.append(f"{module} imports another node module, {target}")
    return problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import circle, each as the list of modules along it (Tarjan's strongly connected parts)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            part = []
            while True:
                top = stack.pop()
                part.append(top)
                if top == node:
                    break
            if len(part) > 1:
                found.append(sorted(part))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.fixture(scope="module")
def graph():
    return _graph(_pack_modules())


def test_the_checks_catch_what_they_look_for():
    """The checkers find a planted wrong-way import, node-to-node import and circle."""
    planted = {
        "converters.a": {"loaders.b"},
        "loaders.b": {"loaders.c"},
        "loaders.c": {"loaders.b"},
        "nodes.x": {"nodes.y", "nodes.comfy_host"},
        "nodes.y": {"converters.a"},
    }
    problems = layer_violations(planted)
    assert any("converters.a imports loaders.b" in p for p in problems)
    assert any("nodes.x imports another node module, nodes.y" in p for p in problems)
    assert any("nodes.y imports converters.a" in p for p in problems)
    assert not any("comfy_host" in p for p in problems)
    assert cycles(planted) == [["loaders.b", "loaders.c"]]


def test_layers_import_only_downwards(graph):
    assert layer_violations(graph) == []


def test_no_import_circles(graph):
    assert cycles(graph) == []


def test_converters_are_pure():
    """converters/ works on state dicts: the standard library and torch, nothing that builds models."""
    allowed = set(sys.stdlib_module_names) | {"torch", "__future__"}
    problems = [
        f"{name}:{line} imports {target}"
        for name, path in _pack_modules().items()
        if name.startswith("converters")
        for target, line, is_pack in _imports(path, name)
        if not is_pack and target not in allowed
    ]
    assert problems == []


def test_only_the_host_module_imports_comfyui():
    files = {**_pack_modules(), "cli": ROOT / "cli.py", "__init__": ROOT / "__init__.py"}
    problems = [
        f"{name}:{line} imports {target}"
        for name, path in files.items()
        if name != HOST_MODULE
        for target, line, is_pack in _imports(path, name)
        if not is_pack and target in COMFYUI_MODULES
    ]
    assert problems == []


def test_production_never_imports_the_development_tools(graph):
    problems = [
        f"{module} imports {target}"
        for module, targets in graph.items()
        if module.split(".")[0] in PRODUCTION
        for target in targets
        if target.startswith("devtools")
    ]
    assert problems == []
