"""The package's shape: no import cycles, and no layer importing one above it.

Every import counts, also those inside functions (lazy imports still tie modules together).
"""

from __future__ import annotations

import ast
from pathlib import Path

import dalle_data

ROOT = Path(dalle_data.__file__).parent
# What each layer may import besides itself and the shared top-level utilities.
ALLOWED = {
    "formats": set(),
    "pipeline": {"formats"},
    "model": {"formats"},
    "collection": {"formats", "model"},
    "serve": {"formats", "model", "collection"},
    "demo": {"formats", "pipeline", "model"},
}
UTILITIES = {"errors", "atomic", "hashing", "compat", "config", "settings", "locations"}
# The `dalle-data` entry points (the typer app and the stage server that forks it) may use
# anything.
ENTRY_POINTS = {"cli", "stage_server"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                    base = f"{base}.{node.module}" if node.module else base
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for target in targets:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and target != "dalle_data":
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                item = stack.pop()
                component.append(item)
                if item == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_no_import_cycles() -> None:
    assert _cycles(_imports()) == []


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_layers_import_only_downward() -> None:
    wrong = []
    for module, targets in _imports().items():
        layer = _layer(module)
        if layer in ENTRY_POINTS or layer not in ALLOWED and layer not in UTILITIES:
            continue
        allowed = {layer} | (ALLOWED.get(layer, set()))
        for target in targets:
            other = _layer(target)
            if other in UTILITIES and layer not in UTILITIES:
                continue
            if (
                layer in UTILITIES
                and other != layer
                and other not in UTILITIES
                or layer not in UTILITIES
                and other not in allowed
            ):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_every_module_sits_in_a_known_place() -> None:
    """New modules go into a layer (or are a shared utility), so the map stays true."""
    layers = {_layer(m) for m in _imports()}
    assert layers <= set(ALLOWED) | UTILITIES | ENTRY_POINTS | {""}
