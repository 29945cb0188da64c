"""`generate --region KEY=WHERE` and `--method freefuse`, `evaluate --regions caption --methods ...,freefuse` on the
embedded pixel world, as tests/cli/test_commands.py runs every subcommand; bad --region values are refused with a
sentence naming the flag (and never a server path), and nothing is written."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from mole_core import cli
from mole_core.defaults import DEFAULT_MODEL

PROMPT = "a zwx on the left and a vkt on the right"


def world():
    if not (Path(DEFAULT_MODEL) / "model_index.json").exists():
        pytest.skip("the embedded world is not in this checkout")


def generate(tmp_path, capsys, *extra, name="image.png"):
    argv = ["generate", "--lora", "face", "--lora", "checker", "--prompt", PROMPT, "--steps", "4",
            "--out", str(tmp_path / name), *extra]
    code = cli.main(argv)
    out, err = capsys.readouterr()
    return code, out + err


@pytest.mark.slow
def test_generate_with_regions_and_with_freefuse(tmp_path, capsys):
    world()
    mask = np.zeros((32, 32), np.uint8)
    mask[:, 16:] = 255
    PIL.Image.fromarray(mask).save(tmp_path / "right.png")
    code, out = generate(tmp_path, capsys, "--method", "mole", "--region", "face=left",
                         "--region", f"checker={tmp_path / 'right.png'}", name="placed.png")
    assert code == 0 and "regions" in out, out
    code, out = generate(tmp_path, capsys, "--method", "mole", "--region", "face=whole", name="whole.png")
    code2, out2 = generate(tmp_path, capsys, "--method", "mole", name="plain.png")
    assert code == code2 == 0
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "whole.png")),
                          np.asarray(PIL.Image.open(tmp_path / "plain.png")))
    code, out = generate(tmp_path, capsys, "--method", "freefuse", name="fused.png")
    assert code == 0 and "FreeFuse" in out and (tmp_path / "fused.png").stat().st_size > 0


@pytest.mark.parametrize("item, words", [("face", "--region 'face' must look like KEY=WHERE"),
                                         ("face=upper", "--region face 'upper' is neither a preset"),
                                         ("face=0,0,1.5,1", "--region face box"),
                                         ("face=/srv/data/nowhere.png", "'nowhere.png'"),
                                         ("ring=left", "not in the selection")])
def test_bad_region_values_are_refused_naming_the_flag(tmp_path, capsys, item, words):
    world()
    code, out = generate(tmp_path, capsys, "--method", "mole", "--region", item)
    assert code != 0 and words in out and "/srv" not in out, out
    assert not (tmp_path / "image.png").exists()


def test_text_generate_refuses_region(tmp_path, capsys):
    from mole_core.text.engine import DEFAULT_TEXT_MODEL
    if not Path(DEFAULT_TEXT_MODEL).exists():
        pytest.skip("the embedded text world is not in this checkout")
    code = cli.main(["generate", "--model", DEFAULT_TEXT_MODEL, "--method", "base", "--prompt", "reverse: planet",
                     "--region", "reverse=left", "--out", str(tmp_path / "a.txt")])
    out, err = capsys.readouterr()
    assert code != 0 and "--region" in out + err


@pytest.mark.slow
def test_evaluate_with_freefuse_and_regions_from_the_caption(tmp_path, capsys):
    world()
    code = cli.main(["evaluate", "--lora", "face", "--lora", "checker", "--methods", "linear,freefuse,mole",
                     "--regions", "caption", "--steps", "2", "--seeds", "1", "--prompts", "1", "--denoise-steps", "2",
                     "--out", str(tmp_path / "results")])
    out, err = capsys.readouterr()
    assert code == 0, err[-2000:]
    rows = [line.split("|")[1].strip() for line in (tmp_path / "results" / "results.md").read_text().splitlines()
            if line.startswith("| ") and not line.startswith("| method")]
    assert rows[:2] == ["Linear (normalised)", "FreeFuse"]
    assert rows[2].startswith("MoLE") and rows[3] == rows[2] + " + regions from caption", rows
    assert "2 gate-training steps" in out                                   # one training for both MoLE rows
