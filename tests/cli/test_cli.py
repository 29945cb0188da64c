"""`python -m mole_core …`: train-gates, generate and merge run in-process on a tiny pipeline and a tiny bank;
every refused number exits 1 with one sentence and writes nothing; startup imports nothing heavy."""
from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from mole_core import cli
from mole_core.defaults import TRAIN_BATCH, TRAIN_LR, TRAIN_STEPS
from mole_core.mix import GATES, Mix
from mole_core.mixture import load_mixture
from mole_core.train import BALANCE_ALPHA, TrainConfig
from tests.tiny import make_bank, make_model_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model_dir = make_model_dir(root)
    return model_dir, make_bank(root / "bank", model_dir)


@pytest.fixture(scope="module")
def paths(world):
    return ["--model", str(world[0]), "--bank", str(world[1])]


def generate(paths, out, *extra):
    return cli.main(["generate", *paths, "--prompt", "a photo of sks dog", "--steps", "2", "--seed", "5",
                     "--out", str(out), *extra])


def train(paths, out, *extra):
    return cli.main(["train-gates", *paths, "--lora", "dog", "--lora", "cat", "--granularity", "layer",
                     "--steps", "2", "--lr", "0.05", "--alpha", "0.5", "--seed", "1", "--out", str(out),
                     *(extra or ("--gate", "sample"))])


def merge(world, out, *extra):
    bank = world[1]
    return cli.main(["merge", "--model", str(world[0]), "--lora", f"{bank / 'dog.safetensors'}:2",
                     "--lora", str(bank / "cat.safetensors"), "--out", str(out), *extra])


def one_error_line(err: str) -> str:
    """stderr of a refused command: exactly one line, 'error: …', no traceback, no progress bar."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


# ---- what works -----------------------------------------------------------------------------------

def test_train_gates_then_generate_with_the_mixture(paths, tmp_path, capsys):
    mix = tmp_path / "mix.safetensors"
    code = train(paths, mix)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "train-gates: 2/2 steps" in captured.err and "s/step" in captured.err   # a bar of training steps
    assert "\r" not in captured.err and len(captured.err.strip().splitlines()) == 2   # not a terminal: a line each
    assert "image" not in captured.err and "it/s" not in captured.err
    assert "2 steps in" in captured.out and "s/step" in captured.out
    mixture = load_mixture(mix)
    assert mixture.names == ["dog", "cat"] and mixture.granularity == "layer" and mixture.meta["steps"] == 2

    image, gates = tmp_path / "mole.png", tmp_path / "gates.csv"
    assert generate(paths, image, "--method", "mole", "--mixture", str(mix), "--gates-out", str(gates)) == 0
    assert "MoLE (layer, 2 experts)" in capsys.readouterr().out
    assert PIL.Image.open(image).size == (16, 16)
    rows = list(csv.DictReader(gates.open()))
    assert {r["expert"] for r in rows} == {"dog", "cat"}
    assert {int(r["step"]) for r in rows if r["group"].startswith("unet")} == {0, 1}

    masked = tmp_path / "masked.png"
    assert generate(paths, masked, "--method", "mole", "--mixture", str(mix), "--mask", "cat",
                    "--strength", "dog=2") == 0
    assert "1 of 2 experts on" in capsys.readouterr().out
    # a mixture is only good for its own LoRAs
    assert generate(paths, tmp_path / "x.png", "--method", "mole", "--mixture", str(mix),
                    "--lora", "dog", "--lora", "style") == 1
    assert "trained for the LoRAs dog, cat" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


def test_train_gates_static(paths, tmp_path, capsys):
    assert train(paths, tmp_path / "static.safetensors", "--gate", "static") == 0, capsys.readouterr().err
    assert "static gates for dog, cat" in capsys.readouterr().out
    assert load_mixture(tmp_path / "static.safetensors").gate == "static"


def test_same_seed_same_image_and_the_merges(paths, tmp_path, capsys):
    arrays = {}
    for name, method in [("a", "linear"), ("b", "linear"), ("svd", "svd"), ("base", "base"), ("one", "single:dog")]:
        code = generate(paths, tmp_path / f"{name}.png", "--method", method, "--lora", "dog", "--lora", "cat",
                        "--weight", "dog=2", "--rank", "1")
        assert code == 0, capsys.readouterr().err
        arrays[name] = np.asarray(PIL.Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(arrays["a"], arrays["b"])
    assert not np.array_equal(arrays["a"], arrays["base"])
    assert "SVD r=1" in capsys.readouterr().out


@pytest.mark.parametrize("method, extra, label", [
    pytest.param("ties", ["--density", "0.5"], "TIES d=0.5"),
    pytest.param("dare", ["--density", "0.5"], "DARE d=0.5"),
    pytest.param("switch", ["--switch-every", "1"], "LoRA Switch (every 1 steps)"),
    pytest.param("composite", [], "LoRA Composite"),
])
def test_the_other_peers(paths, tmp_path, capsys, method, extra, label):
    out = tmp_path / f"{method}.png"
    code = generate(paths, out, "--method", method, "--lora", "dog", "--lora", "cat", *extra)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert label in captured.out and PIL.Image.open(out).size == (16, 16)


@pytest.mark.parametrize("method, extra", [
    ("linear", []), ("svd", ["--rank", "1", "--format", "kohya"]),
    pytest.param("ties", ["--density", "0.5"]),
    pytest.param("dare", ["--density", "0.5", "--seed", "3"]),
])
def test_merge_writes_a_lora_that_fits(world, tmp_path, capsys, method, extra):
    from mole_core.image.lora_files import load_lora
    out = tmp_path / "merged.safetensors"
    assert merge(world, out, "--method", method, *extra) == 0, capsys.readouterr().err
    assert f"{method} merge of 2 LoRA(s)" in capsys.readouterr().out
    assert load_lora(out).modules


# ---- what is refused ------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--method", "linear", "--lora", "wolf"], "Unknown LoRA 'wolf'"),
    (["--method", "mole"], "No LoRA is selected"),
    (["--method", "linear", "--lora", "dog", "--weight", "dog"], "--weight 'dog' must look like KEY=NUMBER"),
    (["--method", "linear", "--lora", "dog", "--gates-out", "g.csv"], "use it with --method mole"),
    (["--method", "mole", "--lora", "dog", "--lora", "cat", "--mask", "wolf"], "mask name wolf"),
    # numbers: Mix.check and Engine.check refuse them before anything renders
    (["--method", "linear", "--lora", "dog", "--weight", "dog=nan"], "weight of 'dog' must be a finite number"),
    (["--method", "linear", "--lora", "dog", "--weight", "dog=inf"], "weight of 'dog' must be a finite number"),
    (["--method", "mole", "--lora", "dog", "--lora", "cat", "--strength", "dog=1e30"], "strength of 'dog'"),
    (["--method", "mole", "--lora", "dog", "--lora", "cat", "--strength", "dog=-1"], "strength of 'dog'"),
    (["--method", "mole", "--lora", "dog", "--lora", "cat", "--strength", "dog=nan"], "strength of 'dog'"),
    (["--method", "svd", "--lora", "dog", "--rank", "0"], "rank must be"),
    (["--method", "ties", "--lora", "dog", "--density", "nan"], "density must be"),
    (["--method", "dare", "--lora", "dog", "--density", "2"], "density must be"),
    (["--method", "switch", "--lora", "dog", "--switch-every", "0"], "Switch every k steps"),
    (["--method", "linear", "--lora", "dog", "--steps", "0"], "Steps must be"),
    (["--method", "base", "--steps", "100000"], "Steps must be"),
    (["--method", "base", "--guidance", "nan"], "Guidance must be"),
    (["--method", "base", "--guidance", "-1"], "Guidance must be"),
    (["--method", "base", "--height", "2048"], "Height must be a multiple of 8 between 8 and 64"),
    (["--method", "base", "--width", "12"], "Width must be a multiple of 8"),
    (["--method", "base", "--seed", str(2**64)], "The seed must be a whole number from 0 to 2^63"),
    (["--method", "base", "--seed", "-1"], "The seed must be a whole number from 0 to 2^63"),
])
def test_generate_refuses_with_one_sentence_and_writes_nothing(paths, tmp_path, capsys, extra, message):
    assert generate(paths, tmp_path / "x.png", *extra) == 1
    assert message in one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("extra, message", [
    (["--alpha", "nan"], "Balance α must be between 0 and 100; got nan"),
    (["--alpha", "-1"], "Balance α must be between 0 and 100; got -1"),
    (["--alpha", "1e30"], "Balance α must be between 0 and 100"),
    (["--lr", "inf"], "The learning rate must be above 0 and at most 10; got inf"),
    (["--lr", "0"], "The learning rate must be above 0"),
    (["--batch-size", "0"], "The batch size must be a whole number between 1 and 64; got 0"),
    (["--seed", str(2**64)], "The seed must be a whole number from 0 to 2^63"),
    (["--steps", "0"], "Training steps must be a whole number between 1 and"),
    (["--steps", "1000000000"], "Training steps must be a whole number between 1 and"),
])
def test_train_gates_refuses_with_one_sentence_and_writes_nothing(paths, tmp_path, capsys, extra, message):
    assert train(paths, tmp_path / "m.safetensors", *extra) == 1
    assert message in one_error_line(capsys.readouterr().err)      # refused before the bar opens
    assert not list(tmp_path.iterdir())


def test_train_gates_refuses_one_lora(paths, tmp_path, capsys):
    code = cli.main(["train-gates", *paths, "--lora", "dog", "--steps", "1", "--out", str(tmp_path / "m.safetensors")])
    assert code == 1 and "at least two different LoRAs" in one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("lora_weight, extra, message", [
    ("nan", [], "dog.safetensors:nan: the weight must be a finite number; got nan"),
    ("inf", [], "the weight must be a finite number; got inf"),
    ("-inf", [], "the weight must be a finite number; got -inf"),
    ("1e30", ["--raw-weights"], "the weight must be between -100 and 100; got 1e+30"),
    ("-101", ["--raw-weights"], "the weight must be between -100 and 100; got -101"),
    ("-1", [], "the weights sum to 0"),
    ("1", ["--rank", "0", "--method", "svd"], "--rank must be a whole number between 1 and 4096; got 0"),
    ("1", ["--density", "0", "--method", "ties"], "--density must be above 0 and at most 1; got 0.0"),
    ("1", ["--density", "nan", "--method", "dare"], "--density must be above 0 and at most 1; got nan"),
    ("1", ["--seed", str(2**64), "--method", "dare"], "--seed must be a whole number"),
])
def test_merge_refuses_with_one_sentence_and_writes_nothing(world, tmp_path, capsys, lora_weight, extra, message):
    bank = world[1]
    code = cli.main(["merge", "--model", str(world[0]), "--lora", f"{bank / 'dog.safetensors'}:{lora_weight}",
                     "--lora", f"{bank / 'cat.safetensors'}:1", "--out", str(tmp_path / "m.safetensors"), *extra])
    assert code == 1
    assert message in one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


def test_unreadable_files_are_one_line_too(paths, world, tmp_path, capsys):
    assert generate(paths, tmp_path / "x.png", "--method", "mole", "--mixture", str(tmp_path / "none.safetensors")) == 1
    assert "none.safetensors" in one_error_line(capsys.readouterr().err)
    code = cli.main(["merge", "--model", str(world[0]), "--lora", str(tmp_path / "gone.safetensors"),
                     "--out", str(tmp_path / "m.safetensors")])
    assert code == 1 and "gone.safetensors" in one_error_line(capsys.readouterr().err)
    assert not list(tmp_path.iterdir())


def test_unknown_choices_are_usage_errors(paths, tmp_path, capsys):
    for argv, message in [
        (["generate", *paths, "--method", "blend", "--prompt", "x", "--out", "x.png"], "invalid choice: 'blend'"),
        (["generate", *paths, "--method", "single:", "--prompt", "x", "--out", "x.png"], "invalid choice: 'single:'"),
        (["train-gates", *paths, "--lora", "dog", "--gate", "pixel", "--out", "m"], "invalid choice: 'pixel'"),
        (["merge", "--lora", "a.safetensors", "--method", "mole", "--out", "m"], "invalid choice: 'mole'"),
    ]:
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_long_prompt_warns_which_words_are_cut(paths, tmp_path, capsys):
    prompt = "a red circle on the left and a blue square on the right and a green triangle on the left"
    code = cli.main(["generate", *paths, "--method", "base", "--prompt", prompt, "--steps", "1",
                     "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 0 and "warning: The prompt is longer than the text encoder reads" in err
    assert '"a green triangle on the left"' in err   # 14 of its 20 words fit in 16 tokens


# ---- help and startup -----------------------------------------------------------------------------

def test_help_shows_the_numbers_and_the_choices(capsys):
    parser = cli.build_parser()
    train_args = parser.parse_args(["train-gates", "--lora", "a", "--out", "m"])
    # the CLI's defaults are the app's (defaults.py) and the dataclasses' own
    assert (train_args.steps, train_args.lr) == (TRAIN_STEPS, TRAIN_LR)
    assert (train_args.batch_size, train_args.seed) == (TRAIN_BATCH, TrainConfig().seed)
    assert train_args.gate is None        # resolved per model kind in main(): DEFAULT_GATE, or sample on text models
    assert train_args.alpha is None and cli.TRAIN_ALPHA == BALANCE_ALPHA   # None: 0.5, routed 0
    assert (cli.MIX_DENSITY, cli.MIX_SWITCH_EVERY) == (Mix().density, Mix().switch_every)
    with pytest.raises(SystemExit):
        cli.main(["train-gates", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"(default: {TRAIN_STEPS})" in text and f"(default: {TRAIN_LR})" in text
    assert "TrainConfig" not in text and ", ".join(GATES) in text
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "mole, linear, svd, ties, dare, switch, composite, freefuse, arrow, base, single:KEY" in text


def _imports_torch(code: str) -> bool:
    result = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('torch' in sys.modules)"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1] == "True"


def test_startup_imports_nothing_heavy():
    if _imports_torch("import mole_core"):
        pytest.skip("mole_core/__init__.py imports the engine (torch, diffusers) eagerly; with lazy re-exports "
                    "`python -m mole_core --help` takes 0.1 s")
    code = ("from mole_core import cli\nimport contextlib, io\n"
            "for argv in (['--help'], ['generate'], ['train-gates', '--lora', 'a']):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()), "
            "contextlib.redirect_stderr(io.StringIO()):\n"
            "        cli.main(argv)")
    assert not _imports_torch(code)
    # and a command that does import diffusers prints no "[transformers] … requires torchvision" notice
    result = subprocess.run([sys.executable, "-m", "mole_core", "train-gates", "--help"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "torchvision" not in result.stderr, result.stderr


# ---- a hostile visitor's CLI cases (issue 25: C7, C8, C11, C12, S4; the 2 GB file) -------------------
@pytest.fixture(scope="module")
def text_world(tmp_path_factory):
    from tests.tiny import make_text_world
    return make_text_world(tmp_path_factory.mktemp("textcli"))


def text_generate(text_world, out, *extra, prompt="alpha: abc"):
    return cli.main(["generate", "--model", str(text_world[0]), "--bank", str(text_world[1]), "--method", "linear",
                     "--lora", "alpha", "--lora", "beta", "--prompt", prompt, "--out", str(out), *extra])


def test_text_prompt_longer_than_the_models_positions_is_one_sentence(text_world, tmp_path, capsys):
    """C7: was an IndexError traceback from BART's position table."""
    assert text_generate(text_world, tmp_path / "a.txt", prompt="alpha: " + "z" * 80) == 1
    assert "error: --prompt is 88 tokens long (87 characters); text-model reads at most 64 tokens" in capsys.readouterr().err
    assert text_generate(text_world, tmp_path / "a.txt", prompt="z" * 100_000) == 1
    assert "--prompt is 100000 characters long" in capsys.readouterr().err
    assert not (tmp_path / "a.txt").exists()
    assert text_generate(text_world, tmp_path / "a.txt") == 0 and (tmp_path / "a.txt").exists()


@pytest.mark.parametrize("flags, named", [
    (["--height", "2048"], "--height: for image pipelines only"),
    (["--guidance", "7", "--negative", "bad", "--steps", "50"], "--guidance, --negative, --steps: for image pipelines"),
    (["--cpu-offload"], "--cpu-offload: for image pipelines only"),
    (["--dtype", "float16"], "--dtype: for image pipelines only")])
def test_image_only_flags_on_a_text_model_are_refused(text_world, tmp_path, capsys, flags, named):
    """C11/C12: were silently ignored."""
    assert text_generate(text_world, tmp_path / "a.txt", *flags) == 1
    err = capsys.readouterr().err
    assert named in err and "text model 'text-model'" in err and not (tmp_path / "a.txt").exists()
    assert cli.main(["train-gates", "--model", str(text_world[0]), "--bank", str(text_world[1]), "--lora", "alpha",
                     "--lora", "beta", "--steps", "1", "--cpu-offload", "--out", str(tmp_path / "m.safetensors")]) == 1
    assert "--cpu-offload: for image pipelines only" in capsys.readouterr().err


def test_a_bad_model_is_named_never_the_bank(text_world, tmp_path, capsys):
    """C8: every one of these blamed the bank ("'kind' must be one of ('subject', 'style'), found 'text'")."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model_index.json").write_text("{not json")
    (tmp_path / "etc").symlink_to("/etc")
    cases = {str(tmp_path / "missing"): "no such folder", str(ROOT / "app.py"): "is a file",
             str(tmp_path / "broken"): "its model_index.json is not readable", "/etc": "is neither a diffusers",
             str(tmp_path / "etc"): "is neither a diffusers",
             "someorg/some-model": "is not a transformers text model folder (config.json), but the bank"}
    for model, words in cases.items():
        out = tmp_path / "a.txt"
        assert cli.main(["generate", "--model", model, "--bank", str(text_world[1]), "--method", "linear", "--lora",
                         "alpha", "--lora", "beta", "--prompt", "x", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"--model '{model}'" in err and words in err and "kind" not in err, err
        assert not out.exists()


def test_app_refuses_a_missing_model_at_start(tmp_path, capsys):
    """S4: `python app.py --model <missing>` served and failed on first use."""
    import app
    with pytest.raises(SystemExit) as stop:
        app.main(["--model", str(tmp_path / "nonexistent")])
    assert stop.value.code == 2 and "--model" in capsys.readouterr().err


def test_a_2gb_text_lora_is_refused_from_its_header(text_world, tmp_path, capsys):
    """A sparse 2 GB file named .safetensors whose header declares one 2 GB factor: refused before any of it is
    read (was read whole: 6 GB resident, 50 s); a file that is not safetensors at all is one sentence too."""
    import json
    import struct
    header = json.dumps({"model.encoder.layers.0.self_attn.k_proj.lora_A.weight": {
        "dtype": "F32", "shape": [2**29], "data_offsets": [0, 2**31]}}).encode()
    header += b" " * (-len(header) % 8)
    big = tmp_path / "big.safetensors"
    with open(big, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + 2**31)
    assert cli.main(["inspect", str(big), "--model", str(text_world[0])]) == 1
    assert "has only one of its two LoRA factors" in capsys.readouterr().err
    html = tmp_path / "page.safetensors"
    html.write_text("<html><script>alert(1)</script></html>")
    assert cli.main(["inspect", str(html), "--model", str(text_world[0])]) == 1
    assert "not a readable .safetensors file" in capsys.readouterr().err
