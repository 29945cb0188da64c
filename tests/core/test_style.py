"""A style rule that holds across the code (the project style guide): no function over 80 lines in the engine, the UI, the app
or the benchmarks. Read from the source with `ast`, so a nested function counts on its own and in its parent."""
from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MAX_LINES = 80
CHECKED = ["mole_core", "ui", "bench", "app.py"]


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """(name, lines) of every function of `source` longer than `limit` lines (from `def` to its last line)."""
    return [(node.name, node.end_lineno - node.lineno + 1) for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno + 1 > limit]


def python_files() -> list[Path]:
    files = []
    for name in CHECKED:
        path = ROOT / name
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def test_the_check_counts_lines():
    """80 lines pass, 81 do not; a method and a nested function are found too."""
    def body(n, indent):
        return "\n".join(f"{indent}x{i} = {i}" for i in range(n))
    assert long_functions(f"def short():\n{body(MAX_LINES - 1, '    ')}\n") == []
    assert long_functions(f"def long():\n{body(MAX_LINES, '    ')}\n") == [("long", MAX_LINES + 1)]
    method = f"class A:\n    def m(self):\n{body(MAX_LINES, ' ' * 8)}\n"
    assert long_functions(method) == [("m", MAX_LINES + 1)]
    nested = f"def outer():\n    def inner():\n{body(MAX_LINES, ' ' * 8)}\n"
    assert long_functions(nested) == [("outer", MAX_LINES + 2), ("inner", MAX_LINES + 1)]


def test_no_function_over_80_lines():
    found = [f"{path.relative_to(ROOT)}: {name} ({lines} lines)" for path in python_files()
             for name, lines in long_functions(path.read_text())]
    assert python_files() and not found, "functions over 80 lines:\n" + "\n".join(found)


def test_no_generated_stub_is_committed():
    """Gradio writes ui/text_tab.pyi when ui.text_tab defines a component subclass (FieldNumber): .gitignore
    covers *.pyi, and none is tracked."""
    assert "*.pyi" in (ROOT / ".gitignore").read_text().split()
    try:
        tracked = subprocess.run(["git", "ls-files", "*.pyi"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        tracked = None
    if tracked is None or tracked.returncode != 0:
        pytest.skip("not a git checkout")
    assert tracked.stdout.split() == []
