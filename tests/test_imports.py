"""The package's import graph: every module of mole_core imports, no two of them import each other in a
cycle, and the generic evaluation (metrics, study harness, report) knows nothing of the pixel world.

The graph is read from the source with `ast`: module-level imports only (those inside functions run
later and cannot form an import cycle), relative imports resolved, `from pkg import name` counted as an
import of the submodule pkg.name when there is one, else of pkg itself.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "mole_core"


def module_files() -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package (packages by their __init__)."""
    modules = {}
    for path in sorted((ROOT / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def top_level_statements(body):
    """The module's statements, looking into if / try / with blocks but not into functions or classes."""
    for node in body:
        yield node
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody", "handlers"):
                for inner in getattr(node, block, []):
                    yield from top_level_statements(inner.body if isinstance(inner, ast.ExceptHandler) else [inner])


def imports_of(name: str) -> set[str]:
    """The package's modules that `name` imports at module level."""
    path = MODULES[name]
    return parse_imports(path.read_text(), name, is_package=path.name == "__init__.py")


def parse_imports(source: str, name: str, is_package: bool = False) -> set[str]:
    """The package's modules that the module `name` with this source imports at module level."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in top_level_statements(ast.parse(source).body):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def find_cycle() -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None."""
    state: dict[str, str] = {}          # "open" while on the path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(GRAPH):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_graph_reader_sees_the_imports_it_should():
    assert "mole_core.world.render" in GRAPH["mole_core.world.oracle"]       # from mole_core.world import render
    assert "mole_core.world.quality" in GRAPH["mole_core.world.build"]
    assert "mole_core.world.config" in GRAPH["mole_core.world.quality"]
    source = """
from . import mix
from .engine import Engine
from ..defaults import DEFAULT_MODEL
import mole_core.atomic as atomic
try:
    from mole_core.world import scoring
except ImportError:
    from mole_core import report
def later():
    from mole_core import cli
"""
    assert parse_imports(source, "mole_core.world.quality") == {
        "mole_core.world", "mole_core.defaults", "mole_core.atomic", "mole_core.world.scoring", "mole_core.report"}
    assert parse_imports(source, "mole_core", is_package=True) >= {"mole_core.mix", "mole_core.engine"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_import_cycle_between_package_modules():
    assert find_cycle() is None, f"import cycle: {' -> '.join(find_cycle())}"


def test_a_cycle_would_be_found(monkeypatch):
    monkeypatch.setitem(GRAPH, "mole_core.world.config", GRAPH["mole_core.world.config"] | {"mole_core.world.build"})
    assert find_cycle() is not None


@pytest.mark.parametrize("name", ["mole_core.metrics", "mole_core.study", "mole_core.report"])
def test_the_generic_evaluation_knows_nothing_of_the_world(name):
    assert not {m for m in reachable(name) | {name} if m.startswith("mole_core.world")}


def test_the_world_build_and_its_quality_bars_do_not_import_each_other_back():
    assert "mole_core.world.build" not in reachable("mole_core.world.quality")
    assert "mole_core.world.evaluate" not in MODULES          # one module named evaluate: mole_core.evaluate
