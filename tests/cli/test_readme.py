"""The README and every page of docs/ as a user reads them: their commands run as written, their links resolve.

Commands: every ```bash block of README.md and docs/*.md is run, line by line, unless the line just above its
fence says `<!-- not run: REASON -->` (a template with your own paths, a push to your own Space). The lines are
`python -m mole_core …` or `python -m mole_core.world …`; they run in file order (a `generate` line reads what a
`train-gates` line above it wrote) in a fresh folder per page that links the embedded worlds, and each must exit 0
and write what its `--out` / `--gates-out` name, under `out/`. By default they run in this process (`cli.main`,
about 5 s of imports saved per line) with tiny settings for the long ones (TINY), the world build left out and the
`evaluate` lines only parsed (PARSED_ONLY); `-m slow` runs every line exactly as written, each in its own
`python`, with the world built `--quick`. A line of a
not-run block still has to parse: `python -m mole_core` lines with the CLI's own parser, `python app.py` lines
against the app's flags. The README's two commands (install + start the app; the test suite) are what CI runs.

Python: every ```python block not marked so defines every name it uses (checked here); `-m slow` runs each.
Links: every relative link and image of those pages names a file of the repository (and a heading of it, for
`page.md#anchor`).
"""
from __future__ import annotations

import ast
import builtins
import os
import re
import shlex
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CLI = ["python", "-m", "mole_core"]
WORLD = ["python", "-m", "mole_core.world"]
APP = ["python", "app.py"]
# lines run by CI itself rather than here (.ci/run installs, then runs the suite this test is part of)
RUN_BY_CI = {"pip install -r requirements.txt && python app.py": "CI installs; tests/test_app.py starts the app",
             "python -m pytest -q": "the suite this test belongs to"}
# command -> flags set for the default run (replaced where the line has them, added where not)
TINY = {"train-gates": {"--steps": "2"}}
# commands whose lines the default run only parses (with the CLI's own parser) and leaves to -m slow: even with
# tiny counts each costs 8-12 s (a calibration, a gate training, a table of rows; LoraHub's 40 evaluations for
# text), and tests/cli/test_commands.py runs the same verb on both worlds with the same small counts by default
PARSED_ONLY = {"evaluate"}
OUTPUT_FLAGS = ("--out", "--gates-out")
NOT_RUN = re.compile(r"<!-- not run: (.+?) -->\s*$")


def blocks(page: Path, language: str) -> list[tuple[str, str | None]]:
    """(code, the reason it is not run, or None) of every ```language block of `page`."""
    out, lines = [], page.read_text().split("\n")
    for i, line in enumerate(lines):
        if line.strip() == f"```{language}":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            mark = NOT_RUN.search(lines[i - 1]) if i else None
            out.append(("\n".join(lines[i + 1:end]) + "\n", mark.group(1) if mark else None))
    return out


def commands(code: str) -> list[list[str]]:
    """A bash block's lines as argv lists (continuation lines joined, comments dropped)."""
    lines = [shlex.split(line, comments=True) for line in code.replace("\\\n", " ").splitlines()]
    return [argv for argv in lines if argv]


def runnable(page: Path) -> list[list[str]]:
    return [argv for code, reason in blocks(page, "bash") if reason is None for argv in commands(code)
            if " ".join(argv) not in RUN_BY_CI]


def with_flags(argv: list[str], flags: dict[str, str]) -> list[str]:
    argv = list(argv)
    for flag, value in flags.items():
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
    return argv


def outputs(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in OUTPUT_FLAGS]


def in_process(argv: list[str], folder: Path, capsys) -> tuple[int, str]:
    from mole_core import cli
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        code = cli.main(argv[3:])
    finally:
        os.chdir(cwd)
    return code, capsys.readouterr().err


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def in_python(argv: list[str], folder: Path) -> tuple[int, str]:
    result = subprocess.run([sys.executable, *argv[1:]], cwd=folder, env=environment(), capture_output=True,
                            text=True, timeout=3600)
    return result.returncode, result.stderr


def linked_folder(folder: Path) -> Path:
    """`folder` with the embedded worlds linked in, as the repository root has them."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("assets", "lora_bank", "text_bank"):
        if (ROOT / name).exists() and not (folder / name).exists():
            (folder / name).symlink_to(ROOT / name)
    return folder


def run_lines(lines: list[list[str]], folder: Path, run) -> list[tuple[str, float]]:
    """run(argv, folder) -> (exit code, stderr) for each line in `folder` (embedded worlds linked in); assert
    exit 0 and its outputs; -> timings."""
    linked_folder(folder)
    timings = []
    for argv in lines:
        start = time.perf_counter()
        code, err = run(argv, folder)
        timings.append((shlex.join(argv[2:5]), time.perf_counter() - start))
        assert code == 0 and "Traceback" not in err, f"{shlex.join(argv)}\n{err[-3000:]}"
        for out in outputs(argv):
            path = folder / out
            assert path.is_file() or (path.is_dir() and any(path.iterdir())), f"{shlex.join(argv)} wrote no {out}"
    print("\n".join(f"{seconds:6.1f} s  {what}" for what, seconds in timings))
    return timings


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ---- commands -----------------------------------------------------------------------------------
def test_the_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    assert text.startswith("---\ntitle: MoLE Studio")                        # the Space's front-matter first
    first = blocks(ROOT / "README.md", "bash")[0]
    assert [" ".join(argv) for argv in commands(first[0])] == list(RUN_BY_CI)
    ignored = subprocess.run(["git", "check-ignore", "-q", "out/x.png"], cwd=ROOT)
    assert ignored.returncode == 0, ".gitignore must ignore out/"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_command_is_one_the_tests_run_or_a_marked_template(page, capsys):
    """Runnable lines are CLI lines writing under out/; a template's lines parse with the CLI's or the app's
    own flags (so a renamed flag cannot hide in a page)."""
    import app
    from mole_core import cli
    for argv in runnable(page):
        assert argv[:3] in (CLI, WORLD), f"{page_id(page)}: {shlex.join(argv)} is neither run here nor marked"
        assert not any(arg.startswith("[") for arg in argv), f"optional parts must be lines of their own: {argv}"
        for out in outputs(argv):
            assert out.startswith("out/"), f"{page_id(page)}: {shlex.join(argv)} writes outside out/"
    with pytest.raises(SystemExit):
        app.main(["--help"])
    app_flags = set(re.findall(r"--[\w-]+", capsys.readouterr().out))
    for code, reason in blocks(page, "bash"):
        if reason is None:
            continue
        for argv in commands(code):
            if argv[:3] == CLI:
                cli.build_parser().parse_args(argv[3:])                     # SystemExit on an unknown flag
            elif argv[:2] == APP:
                assert {a for a in argv if a.startswith("--")} <= app_flags, f"{page_id(page)}: {shlex.join(argv)}"


# pages whose lines the default run leaves to -m slow: each repeats a verb the README and CLI.md run already
# (a bfloat16 generate) and costs 40-50 s on 2 shared cores (docs/STUDY.md's evaluate is only parsed: PARSED_ONLY)
SLOW_PAGES = {"docs/MODELS.md"}


@pytest.mark.parametrize("page", [pytest.param(p, marks=[pytest.mark.slow] if page_id(p) in SLOW_PAGES else [],
                                               id=page_id(p))
                                  for p in PAGES if any(a[:3] == CLI for a in runnable(p))])
def test_commands_run_with_tiny_settings(page, tmp_path, capsys):
    from mole_core import cli
    lines = [argv for argv in runnable(page) if argv[:3] == CLI]
    for argv in lines:
        if argv[3] in PARSED_ONLY:
            cli.build_parser().parse_args(argv[3:])                         # SystemExit on an unknown flag
    lines = [with_flags(argv, TINY.get(argv[3], {})) for argv in lines if argv[3] not in PARSED_ONLY]
    run_lines(lines, tmp_path, lambda argv, folder: in_process(argv, folder, capsys))


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if runnable(p)], ids=page_id)
def test_commands_run_as_written(page, tmp_path):
    lines = [argv if argv[:3] == CLI else [*argv, "--quick"] for argv in runnable(page)]
    run_lines(lines, tmp_path, in_python)


# ---- python -------------------------------------------------------------------------------------
def python_blocks() -> list[tuple[Path, int, str]]:
    return [(page, i, code) for page in PAGES for i, (code, reason) in enumerate(blocks(page, "python"))
            if reason is None]


def undefined_names(code: str) -> set[str]:
    """Names a snippet reads that it never imports, assigns or binds (builtins aside)."""
    tree = ast.parse(code)
    bound = set(dir(builtins))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - bound


@pytest.mark.parametrize("page, index, code", python_blocks(), ids=lambda v: page_id(v) if isinstance(v, Path) else None)
def test_python_snippets_define_what_they_use(page, index, code):
    assert not undefined_names(code), f"{page_id(page)} python block {index}: {sorted(undefined_names(code))}"


@pytest.mark.slow
@pytest.mark.parametrize("page, index, code", python_blocks(), ids=lambda v: page_id(v) if isinstance(v, Path) else None)
def test_python_snippets_run(page, index, code, tmp_path):
    folder = linked_folder(tmp_path)
    (folder / "snippet.py").write_text(code)
    result = subprocess.run([sys.executable, "snippet.py"], cwd=folder, env=environment(), capture_output=True,
                            text=True, timeout=3600)
    assert result.returncode == 0, result.stderr[-3000:]


# ---- links and packaging ------------------------------------------------------------------------
def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_relative_link_resolves(page):
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    links = re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)
    for link in links:
        if re.match(r"[a-z]+:", link):
            continue                                            # https:, mailto: — not a file of the repository
        path, _, anchor = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists() and (target == ROOT or ROOT in target.parents), f"{page_id(page)}: {link} names no file here"
        if anchor and target.suffix == ".md":
            assert anchor in anchors(target), f"{page_id(page)}: {link}: no such heading in {target.name}"


def test_pyproject_installs_what_requirements_txt_does():
    """`pip install .` and `pip install -r requirements.txt` give the same packages and pins (nevergrad: the
    LoraHub peer)."""
    def parsed(lines):
        return {re.split(r"[=<>~\[ ]", line, maxsplit=1)[0].lower(): line.replace(" ", "") for line in lines}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [line.strip() for line in (ROOT / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    assert parsed(project["dependencies"]) == parsed(requirements)
    assert "nevergrad" in parsed(project["dependencies"])
