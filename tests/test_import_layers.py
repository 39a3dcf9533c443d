"""The code's import graph: every arrow runs down the layers, and no module imports itself back.

Read from the source (top-level and function-level imports alike), so a lazy import that hides a
cycle is still seen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Lowest first. A module may import from its own layer and the ones below, never above.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("utils",),
    ("datasets",),
    ("prompts",),
    ("networks",),
    ("preprocessing",),
    ("prediction",),
    ("evaluation",),
    ("training", "trainer", "baselines"),
    ("commands", "train", "test", "predict", "preprocess_data", "make_phantom"),
    ("bench",),
)
LAYER_OF = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def _modules() -> dict[str, Path]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[0] not in LAYER_OF:
            continue  # tests, .venv, docs
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """First-party modules ``path`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                targets.add(child if child in known else node.module)
    return {t for t in targets if t in known}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}


def test_layers_are_found(graph):
    # The test would pass vacuously if it read nothing.
    assert {"trainer", "networks.checkpoint", "preprocessing.segmenter", "test"} <= set(graph)
    assert "networks.checkpoint" in graph["trainer"]


def test_no_import_runs_up(graph):
    upward = sorted(f"{source} -> {target}" for source, targets in graph.items()
                    for target in targets
                    if LAYER_OF[target.split(".")[0]] > LAYER_OF[source.split(".")[0]])
    assert upward == []


def find_cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every cycle a depth-first walk meets, as ``a -> b -> a``."""
    cycles = []
    state: dict[str, int] = {}  # 1 on the current path, 2 finished

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target):], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_find_cycles_on_known_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a -> b -> c -> a"]
    assert find_cycles({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_cycles(graph):
    assert find_cycles(graph) == []
