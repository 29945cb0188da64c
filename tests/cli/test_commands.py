"""Every subcommand of `python -m mole_core`, image and text, runs with only its required arguments on the
embedded worlds (the defaults). The slow defaults (a whole gate training, a whole evaluation) are marked
slow; each has a fast run beside it that adds only smaller counts."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from mole_core import cli
from mole_core.defaults import DEFAULT_BANK, DEFAULT_MODEL
from mole_core.text.engine import DEFAULT_TEXT_BANK, DEFAULT_TEXT_MODEL

IMAGE, TEXT = Path(DEFAULT_BANK), Path(DEFAULT_TEXT_BANK)
TEXT_MODEL = ["--model", DEFAULT_TEXT_MODEL]

# (world, command) -> (its required arguments only, what it writes under the output folder)
REQUIRED = {
    ("image", "inspect"): ([str(IMAGE / "face.safetensors")], None),
    ("image", "merge"): (["--lora", str(IMAGE / "face.safetensors"), "--lora", str(IMAGE / "checker.safetensors"),
                          "--out", "{out}/merged.safetensors"], "merged.safetensors"),
    ("image", "generate"): (["--method", "base", "--prompt", "a zwx in the center", "--out", "{out}/image.png"],
                            "image.png"),
    ("image", "train-gates"): (["--lora", "face", "--lora", "checker", "--out", "{out}/mix.safetensors"],
                               "mix.safetensors"),
    ("image", "evaluate"): (["--out", "{out}/results"], "results/results.md"),
    ("text", "inspect"): ([str(TEXT / "reverse.safetensors"), *TEXT_MODEL], None),
    ("text", "merge"): ([*TEXT_MODEL, "--lora", str(TEXT / "reverse.safetensors"), "--lora",
                         str(TEXT / "upper.safetensors"), "--out", "{out}/merged.safetensors"], "merged.safetensors"),
    ("text", "generate"): ([*TEXT_MODEL, "--method", "base", "--prompt", "reverse: planet", "--out", "{out}/a.txt"],
                           "a.txt"),
    ("text", "train-gates"): ([*TEXT_MODEL, "--lora", "reverse", "--lora", "upper", "--out", "{out}/mix.safetensors"],
                              "mix.safetensors"),
    ("text", "evaluate"): ([*TEXT_MODEL, "--out", "{out}/results"], "results/results.md"),
}
SLOW = {("image", "train-gates"), ("image", "evaluate"), ("text", "train-gates"), ("text", "evaluate")}
# the fast run of a slow default: the same required arguments and smaller counts
SMALLER = {("image", "train-gates"): ["--steps", "2"],
           ("image", "evaluate"): ["--steps", "2", "--seeds", "1", "--prompts", "1", "--denoise-steps", "2"],
           ("text", "train-gates"): ["--steps", "2"],
           ("text", "evaluate"): ["--lora", "reverse", "--lora", "upper", "--items", "2", "--steps", "2"]}


def subcommands() -> set[str]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(action.choices)


def test_every_subcommand_is_run_here_for_both_worlds():
    assert {command for _, command in REQUIRED} == subcommands()
    assert {world for world, _ in REQUIRED} == {"image", "text"}
    assert all(len([k for k in REQUIRED if k[1] == c]) == 2 for c in subcommands())
    assert set(SMALLER) == SLOW


def run(world: str, command: str, tmp_path, capsys, extra=()) -> str:
    if not (Path(DEFAULT_MODEL) / "model_index.json").exists():
        pytest.skip("the embedded world is not in this checkout")
    arguments, writes = REQUIRED[(world, command)]
    argv = [command, *(a.replace("{out}", str(tmp_path)) for a in arguments), *extra]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 0, f"python -m mole_core {' '.join(argv)} exited {code}: {err[-2000:]}"
    if writes:
        assert (tmp_path / writes).stat().st_size > 0, f"{command} wrote no {writes}"
    return out + err


FAST = sorted(set(REQUIRED) - SLOW)


@pytest.mark.parametrize("world, command", FAST, ids=[f"{w}-{c}" for w, c in FAST])
def test_with_only_the_required_arguments(world, command, tmp_path, capsys):
    run(world, command, tmp_path, capsys)


@pytest.mark.slow
@pytest.mark.parametrize("world, command", sorted(SLOW), ids=[f"{w}-{c}" for w, c in sorted(SLOW)])
def test_slow_defaults_with_only_the_required_arguments(world, command, tmp_path, capsys):
    run(world, command, tmp_path, capsys)


@pytest.mark.parametrize("world, command", sorted(SLOW), ids=[f"{w}-{c}" for w, c in sorted(SLOW)])
def test_slow_defaults_with_smaller_counts(world, command, tmp_path, capsys):
    output = run(world, command, tmp_path, capsys, SMALLER[(world, command)])
    if (world, command) == ("image", "evaluate"):
        # the default gate is one row (it was once split into letters: "MoLE (block), MoLE (block), ...")
        rows = [line for line in (tmp_path / "results" / "results.md").read_text().splitlines()
                if line.startswith("| MoLE")]
        assert len(rows) == 1 and "trigger-routed" in rows[0], rows
        assert "the bank's first two" in output and "timed on this machine" in output
