"""The README's "## CLI" section runs as written.

Every line of its bash blocks is a `python -m mole_core …` or `python -m mole_core.world …` command; they run
in order (the `generate` lines read what `train-gates` wrote) in a fresh folder that links the embedded
world's `assets/` and `lora_bank/`, and each must exit 0 and write what its `--out` / `--gates-out` name.
By default the lines run in this process (`cli.main`, about 5 s of imports saved per line) with tiny
settings for the long ones (TINY), and the world build is left out; `-m slow` runs every line exactly as
written, each in its own `python`, with the world built `--quick`.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLI = ["python", "-m", "mole_core"]
WORLD = ["python", "-m", "mole_core.world"]
# command -> flags set for the default run (replaced where the line has them, added where not)
TINY = {
    "train-gates": {"--steps": "2"},
    "evaluate": {"--steps": "2", "--seeds": "1", "--prompts": "1", "--denoise-steps": "2", "--items": "2"},
}
OUTPUT_FLAGS = ("--out", "--gates-out")


def cli_section(readme: Path = ROOT / "README.md") -> str:
    text = readme.read_text()
    return text.split("\n## CLI\n", 1)[1].split("\n## ", 1)[0]


def commands(section: str) -> list[list[str]]:
    """The bash blocks' lines as argv lists (continuation lines joined, comments dropped)."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.S):
        lines += [shlex.split(line, comments=True) for line in block.replace("\\\n", " ").splitlines()]
    return [argv for argv in lines if argv]


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


def in_python(argv: list[str], folder: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, *argv[1:]], cwd=folder, env=env, capture_output=True, text=True,
                            timeout=3600)
    return result.returncode, result.stderr


def run_lines(lines: list[list[str]], folder: Path, run) -> list[tuple[str, float]]:
    """run(argv, folder) -> (exit code, stderr) for each line in `folder` (embedded world linked in); assert
    exit 0 and its outputs; -> timings."""
    for name in ("assets", "lora_bank", "text_bank"):
        if (ROOT / name).exists():
            (folder / name).symlink_to(ROOT / name)
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


def test_every_line_is_a_command_that_writes_under_out():
    lines = commands(cli_section())
    assert lines and any(argv[:3] == CLI for argv in lines) and any(argv[:3] == WORLD for argv in lines)
    for argv in lines:
        assert argv[:3] in (CLI, WORLD), shlex.join(argv)
        assert not any(arg.startswith("[") for arg in argv), f"optional parts must be lines of their own: {argv}"
        for out in outputs(argv):
            assert out.startswith("out/"), f"{shlex.join(argv)} writes outside out/"
    ignored = subprocess.run(["git", "check-ignore", "-q", "out/x.png"], cwd=ROOT)
    assert ignored.returncode == 0, ".gitignore must ignore out/"


def test_cli_lines_run_with_tiny_settings(tmp_path, capsys):
    lines = [with_flags(argv, TINY.get(argv[3], {})) for argv in commands(cli_section()) if argv[:3] == CLI]
    run_lines(lines, tmp_path, lambda argv, folder: in_process(argv, folder, capsys))


@pytest.mark.slow
def test_cli_lines_run_as_written(tmp_path):
    lines = [argv if argv[:3] == CLI else [*argv, "--quick"] for argv in commands(cli_section())]
    run_lines(lines, tmp_path, in_python)
