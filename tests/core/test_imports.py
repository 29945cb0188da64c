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

ROOT = Path(__file__).resolve().parents[2]
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


def imports_of(name: str, deep: bool = False) -> set[str]:
    """The package's modules that `name` imports at module level (deep: inside functions too)."""
    path = MODULES[name]
    return parse_imports(path.read_text(), name, is_package=path.name == "__init__.py", deep=deep)


def parse_imports(source: str, name: str, is_package: bool = False, deep: bool = False) -> set[str]:
    """The package's modules that the module `name` with this source imports at module level, or anywhere
    in it (function-level imports too) with deep=True."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(source)
    for node in (ast.walk(tree) if deep else top_level_statements(tree.body)):
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
DEEP = {name: imports_of(name, deep=True) for name in MODULES}   # function-level imports included


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in GRAPH[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def find_cycle(graph: dict[str, set[str]] | None = None) -> list[str] | None:
    """One import cycle as [a, b, ..., a] in `graph` (default GRAPH), or None. A package and its own
    the root package's lazy faces (`mole_core/__init__` imports its submodules on first use) do not count."""
    graph = GRAPH if graph is None else graph
    state: dict[str, str] = {}          # "open" while on the path, "done" after

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if PACKAGE in (node, nxt):
                continue
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt, path + [nxt])
                if cycle:
                    return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_the_graph_reader_sees_the_imports_it_should():
    assert "mole_core.world.pixel.render" in GRAPH["mole_core.world.pixel.oracle"]       # from mole_core.world.pixel import render
    assert "mole_core.world.pixel.quality" in GRAPH["mole_core.world.pixel.build"]
    assert "mole_core.world.pixel.config" in GRAPH["mole_core.world.pixel.quality"]
    source = """
from .. import mix
from .engine import Engine
from ..defaults import DEFAULT_MODEL
import mole_core.atomic as atomic
try:
    from mole_core.world.pixel import scoring
except ImportError:
    from mole_core.studies import report
def later():
    from mole_core import cli
"""
    assert parse_imports(source, "mole_core.image.bank") == {
        "mole_core.mix", "mole_core.image.engine", "mole_core.defaults", "mole_core.atomic",
        "mole_core.world.pixel.scoring", "mole_core.studies.report"}
    assert "mole_core.cli" in parse_imports(source, "mole_core.image.bank", deep=True)
    assert parse_imports(source, "mole_core.image", is_package=True) >= {"mole_core.image.engine", "mole_core.mix"}


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_import_cycle_between_package_modules():
    assert find_cycle() is None, f"import cycle: {' -> '.join(find_cycle())}"


def test_no_import_cycle_counting_function_level_imports():
    cycle = find_cycle(DEEP)
    assert cycle is None, f"import cycle through function-level imports: {' -> '.join(cycle)}"


def test_the_core_imports_no_wing():
    """The core (the package's top-level modules) knows neither images nor text: no import of image/, text/,
    world/, studies/ or cli/ from it, function-level imports included."""
    wings = ("image", "text", "world", "studies", "cli")
    core = [name for name in MODULES if name.count(".") == 1 and name.split(".")[1] not in (*wings, "__main__")]
    found = {name: sorted(m for m in DEEP[name] if m.split(".")[1:2] and m.split(".")[1] in wings) for name in core}
    assert {name: ms for name, ms in found.items() if ms} == {}


def test_the_engine_package_never_imports_gradio():
    users = [str(path.relative_to(ROOT)) for path in MODULES.values()
             if any(isinstance(node, (ast.Import, ast.ImportFrom))
                    and any((getattr(node, "module", None) or alias.name).split(".")[0] == "gradio"
                            for alias in node.names)
                    for node in ast.walk(ast.parse(path.read_text())))]
    assert users == []


def test_the_wings_sit_in_their_own_packages():
    flat = sorted(p.name for p in (ROOT / PACKAGE).glob("*.py"))
    assert not [name for name in flat if name.startswith("text_")], flat
    for wing in ("image", "text", "world", "studies", "cli"):
        assert (ROOT / PACKAGE / wing / "__init__.py").exists()


def test_a_cycle_would_be_found(monkeypatch):
    monkeypatch.setitem(GRAPH, "mole_core.world.pixel.config", GRAPH["mole_core.world.pixel.config"] | {"mole_core.world.pixel.build"})
    assert find_cycle() is not None


@pytest.mark.parametrize("name", ["mole_core.metrics", "mole_core.studies.image", "mole_core.studies.report"])
def test_the_generic_evaluation_knows_nothing_of_the_world(name):
    assert not {m for m in reachable(name) | {name} if m.startswith("mole_core.world.pixel")}


def test_the_world_build_and_its_quality_bars_do_not_import_each_other_back():
    assert "mole_core.world.pixel.build" not in reachable("mole_core.world.pixel.quality")
    assert "mole_core.world.pixel.evaluate" not in MODULES          # one module named evaluate: mole_core.studies.evaluate
