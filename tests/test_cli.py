"""`python -m mole_core train-gates` and `generate`, run in-process on a tiny pipeline and a tiny bank."""
from __future__ import annotations

import csv

import numpy as np
import PIL.Image
import pytest

from mole_core import cli
from mole_core.mixture import load_mixture
from tests.test_engine import make_bank, make_model_dir


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = make_model_dir(root)
    return ["--model", str(model_dir), "--bank", str(make_bank(root / "bank", model_dir))]


def generate(paths, out, *extra):
    return cli.main(["generate", *paths, "--prompt", "a photo of sks dog", "--steps", "2", "--seed", "5",
                     "--out", str(out), *extra])


def test_train_gates_then_generate_with_the_mixture(paths, tmp_path, capsys):
    mix = tmp_path / "mix.safetensors"
    code = cli.main(["train-gates", *paths, "--lora", "dog", "--lora", "cat", "--granularity", "layer",
                     "--steps", "2", "--lr", "0.05", "--alpha", "0.5", "--seed", "1", "--out", str(mix)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "train-gates" in captured.err and "2/2" in captured.err          # the progress bar
    mixture = load_mixture(mix)
    assert mixture.names == ["dog", "cat"] and mixture.granularity == "layer" and mixture.meta["steps"] == 2

    image, gates = tmp_path / "mole.png", tmp_path / "gates.csv"
    assert generate(paths, image, "--method", "mole", "--mixture", str(mix), "--gates-out", str(gates)) == 0
    out = capsys.readouterr().out
    assert "MoLE (layer, 2 experts)" in out
    assert PIL.Image.open(image).size == (16, 16)
    rows = list(csv.DictReader(gates.open()))
    assert {r["expert"] for r in rows} == {"dog", "cat"}
    assert {int(r["step"]) for r in rows if r["group"].startswith("unet")} == {0, 1}

    masked = tmp_path / "masked.png"
    assert generate(paths, masked, "--method", "mole", "--mixture", str(mix), "--mask", "cat") == 0
    assert "1 of 2 experts on" in capsys.readouterr().out
    # a mixture is only good for its own LoRAs
    assert generate(paths, tmp_path / "x.png", "--method", "mole", "--mixture", str(mix),
                    "--lora", "dog", "--lora", "style") == 1
    assert "trained for the LoRAs dog, cat" in capsys.readouterr().err


def test_same_seed_same_image_and_every_method(paths, tmp_path, capsys):
    arrays = {}
    for name, method in [("a", "linear"), ("b", "linear"), ("svd", "svd"), ("base", "base"), ("one", "single:dog")]:
        code = generate(paths, tmp_path / f"{name}.png", "--method", method, "--lora", "dog", "--lora", "cat",
                        "--weight", "dog=2", "--rank", "1")
        assert code == 0, capsys.readouterr().err
        arrays[name] = np.asarray(PIL.Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(arrays["a"], arrays["b"])
    assert not np.array_equal(arrays["a"], arrays["base"])
    assert "SVD r=1" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--method", "linear", "--lora", "wolf"], "Unknown LoRA 'wolf'"),
    (["--method", "linear", "--lora", "dog", "--steps", "0"], "Steps must be"),
    (["--method", "mole"], "No LoRA is selected"),
    (["--method", "linear", "--lora", "dog", "--weight", "dog"], "must look like KEY=NUMBER"),
    (["--method", "linear", "--lora", "dog", "--gates-out", "g.csv"], "use it with --method mole"),
    (["--method", "blend", "--lora", "dog"], "Unknown method 'blend'"),
])
def test_bad_input_exits_1_with_a_sentence(paths, tmp_path, capsys, extra, message):
    assert generate(paths, tmp_path / "x.png", *extra) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_train_gates_refuses_one_lora(paths, tmp_path, capsys):
    code = cli.main(["train-gates", *paths, "--lora", "dog", "--steps", "1", "--out", str(tmp_path / "m.safetensors")])
    assert code == 1 and "at least two different LoRAs" in capsys.readouterr().err
    assert not (tmp_path / "m.safetensors").exists()


def test_long_prompt_warns_which_words_are_cut(paths, tmp_path, capsys):
    prompt = "a red circle on the left and a blue square on the right and a green triangle on the left"
    code = cli.main(["generate", *paths, "--method", "base", "--prompt", prompt, "--steps", "1",
                     "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 0 and "warning: The prompt is longer than the text encoder reads" in err
    assert '"a green triangle on the left"' in err   # 14 of its 20 words fit in 16 tokens
