"""Hardening: what a careless or hostile caller sends is refused early, with a sentence naming the field or the
file (never a server folder), and nothing that is refused changes the model, the bank or the queue.

Each test here pins a behaviour the engine before the `Mix` API (commit 3aac668) did not have. Most run on the
tiny pipeline of tests/tiny.py with a bank of tiny LoRAs (tests/test_engine.py); the request and training
checks that name the model's side run on the embedded 32×32 pixel world (nothing is rendered there).
"""
from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mole_core.atomic import write_text
from mole_core.attach import MoleConfig
from mole_core.defaults import DEFAULT_BANK, DEFAULT_MODEL, Limits
from mole_core.image.engine import Engine, GenerateRequest, Mix
from mole_core.lora import MAX_ABS, weight_module
from mole_core.image.lora_files import inspect_lora, load_lora, save_lora
from mole_core.mixture import save_mixture
from mole_core.train import TrainConfig
from tests.tiny import LORAS
from tests.helpers import trained_setup

REQUEST = GenerateRequest(prompt="a photo of sks dog", negative="blue", seed=3, steps=2, guidance=4.0)
KEYS = ("dog", "cat")
NAN, INF = float("nan"), float("inf")
TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA_TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def pixel_engine():
    """The embedded world (32×32 images; its LoRAs face, ring, …): only checks run on it, nothing is drawn."""
    return Engine()


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ---- a. numbers that cannot be right: refused with a sentence naming the field --------------------------------

WEIGHT = "The weight of 'dog' must be a finite number"
STRENGTH = r"The strength of 'dog' must be a finite number between 0 and 10"
DENSITY = "The density must be above 0 and at most 1"
RANK = "The rank must be a whole number between 1 and 4096"


@pytest.mark.parametrize("mix, message", [
    pytest.param(Mix("linear", KEYS, weights={"dog": NAN, "cat": 1.0}), WEIGHT, id="weight-nan"),
    pytest.param(Mix("linear", KEYS, weights={"dog": INF, "cat": 1.0}), WEIGHT, id="weight-inf"),
    pytest.param(Mix("svd", KEYS, weights={"dog": -INF, "cat": 1.0}, normalize=False), WEIGHT, id="weight-minus-inf"),
    pytest.param(Mix("linear", KEYS, weights={"dog": 1e30, "cat": 1.0}, normalize=False), WEIGHT, id="weight-1e30-raw"),
    pytest.param(Mix("mole", KEYS, strengths={"dog": NAN}), STRENGTH, id="strength-nan"),
    pytest.param(Mix("mole", KEYS, strengths={"dog": 1e30}), STRENGTH, id="strength-1e30"),
    pytest.param(Mix("mole", KEYS, strengths={"dog": -1.0}), STRENGTH, id="strength-negative"),
    pytest.param(Mix("ties", KEYS, density=NAN), DENSITY, id="density-nan"),
    pytest.param(Mix("ties", KEYS, density=1e30), DENSITY, id="density-1e30"),
    pytest.param(Mix("dare", KEYS, density=0.0), DENSITY, id="density-0"),
    pytest.param(Mix("svd", KEYS, rank=0), RANK, id="rank-0"),
    pytest.param(Mix("svd", KEYS, rank=1.5), RANK, id="rank-1.5"),
    pytest.param(Mix("svd", KEYS, rank=10**9), RANK, id="rank-1e9"),
    pytest.param(Mix("svd", KEYS, rank=True), RANK, id="rank-bool"),
])
def test_mix_refuses_non_finite_and_absurd_numbers(tiny_engine, mix, message):
    with pytest.raises(ValueError, match=message):
        mix.check()
    with pytest.raises(ValueError, match=message):         # the engine checks before it draws anything
        tiny_engine.generate(mix, REQUEST)


def test_export_never_writes_a_lora_the_engine_refuses(tiny_engine, tmp_path):
    fine = tiny_engine.export(Mix("linear", KEYS, weights={"dog": 3.0, "cat": 1.0}, normalize=False), tmp_path / "ok.safetensors")
    assert set(load_lora(fine).modules) == {k for key in KEYS for k in LORAS[key]}
    out = tmp_path / "absurd.safetensors"
    with pytest.raises(ValueError):
        tiny_engine.export(Mix("linear", KEYS, weights={"dog": 1e30, "cat": 1.0}, normalize=False), out)
    assert not out.exists()


@pytest.mark.parametrize("change, message", [
    ({"seed": 2**63}, r"The seed must be a whole number from 0 to 2\^63 − 1; got 9223372036854775808"),
    ({"seed": -1}, r"The seed must be a whole number from 0 to 2\^63 − 1"),
    ({"seed": 1.5}, r"The seed must be a whole number"),
    ({"steps": 101}, "Steps must be a whole number between 1 and 100; got 101"),
    ({"steps": 2.0}, "Steps must be a whole number between 1 and 100"),
    ({"height": 2048}, r"Height must be a multiple of 8 between 8 and 64 \(2× this model's side\); got 2048"),
    ({"width": 72}, "Width must be a multiple of 8 between 8 and 64"),
    ({"guidance": NAN}, "Guidance must be between 0 and 30; got nan"),
    ({"guidance": INF}, "Guidance must be between 0 and 30; got inf"),
    ({"prompt": None}, "The prompt must be text"),
], ids=["seed-2^63", "seed-negative", "seed-float", "steps-over-limit", "steps-float", "height-2048",
        "width-72", "guidance-nan", "guidance-inf", "prompt-none"])
def test_request_refuses_what_the_model_cannot_draw(pixel_engine, change, message):
    mixes = [Mix("base"), Mix("linear", ("face", "ring"))]
    assert pixel_engine.check(mixes, GenerateRequest("a zwx on the left", steps=100, height=64, width=64)) == []
    with pytest.raises(ValueError, match=message):
        pixel_engine.check(mixes, replace(GenerateRequest("a zwx on the left"), **change))


def test_limits_are_the_engines_own():
    strict = Engine(DEFAULT_MODEL, DEFAULT_BANK, limits=Limits(denoise_steps=10, experts=2))
    request = GenerateRequest("a zwx", steps=10)
    assert strict.check([Mix("linear", ("face", "ring"))], request) == []
    with pytest.raises(ValueError, match="Steps must be a whole number between 1 and 10; got 11"):
        strict.check([Mix("base")], replace(request, steps=11))
    with pytest.raises(ValueError, match="At most 2 LoRAs can be combined here; 3 are selected"):
        strict.check([Mix("linear", ("face", "ring")), Mix("single:heart")], request)
    with pytest.raises(ValueError, match="At most 2 LoRAs can be mixed here; 3 are selected"):
        strict.check_train(["face", "ring", "heart"], MoleConfig(), TrainConfig(steps=5))


LR = "The learning rate must be above 0 and at most 10"
ALPHA = "Balance α must be between 0 and 100"
BATCH = "The batch size must be a whole number between 1 and 64"


@pytest.mark.parametrize("mole, train, message", [
    (MoleConfig(), TrainConfig(steps=5, lr=INF), LR + "; got inf"),
    (MoleConfig(), TrainConfig(steps=5, lr=NAN), LR + "; got nan"),
    (MoleConfig(), TrainConfig(steps=5, lr=0.0), LR),
    (MoleConfig(), TrainConfig(steps=5, balance_alpha=NAN), ALPHA + "; got nan"),
    (MoleConfig(), TrainConfig(steps=5, balance_alpha=-1.0), ALPHA + "; got -1.0"),
    (MoleConfig(), TrainConfig(steps=5, batch_size=0), BATCH + "; got 0"),
    (MoleConfig(), TrainConfig(steps=5, batch_size=-1), BATCH + "; got -1"),
    (MoleConfig(), TrainConfig(steps=501), "Training steps must be a whole number between 1 and 500; got 501"),
    (MoleConfig(), TrainConfig(steps=5, seed=2**63), r"The seed must be a whole number from 0 to 2\^63"),
    (MoleConfig(granularity="pixel"), TrainConfig(steps=5), "Unknown granularity 'pixel'"),
], ids=["lr-inf", "lr-nan", "lr-0", "alpha-nan", "alpha-negative", "batch-0", "batch-negative",
        "steps-over-limit", "seed-2^63", "granularity"])
def test_check_train_refuses_non_finite_and_absurd_settings(pixel_engine, mole, train, message):
    pixel_engine.check_train(["face", "ring"], MoleConfig(), TrainConfig(steps=5))      # the good one passes
    with pytest.raises(ValueError, match=message):
        pixel_engine.check_train(["face", "ring"], mole, train)


# ---- b. LoRA files with absurd numbers or rank 0 ---------------------------------------------------------------

def test_lora_with_huge_finite_weights_is_refused_naming_the_tensor(tiny_engine, tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "huge.safetensors"
    save_file({f"{TO_Q}.lora_A.weight": torch.randn(2, 8, generator=g) * 1e30,
               f"{TO_Q}.lora_B.weight": torch.randn(8, 2, generator=g)}, str(path))
    assert torch.isfinite(load_file_tensors(path)[f"{TO_Q}.lora_A.weight"]).all()      # finite, just absurd
    message = rf"huge.safetensors: tensor '{TO_Q}.lora_A.weight' holds values up to 2.\d+e\+30"
    with pytest.raises(ValueError, match=message):
        load_lora(path)
    info = inspect_lora(path, tiny_engine.components)
    assert info["ok"] is False and info["verdict"] != "ok"
    assert f"tensor '{TO_Q}.lora_A.weight' holds values up to" in info["verdict"]


def load_file_tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("alpha, shown", [("NaN", "nan"), ("Infinity", "inf"), ("1e30", "5e+29")])
def test_lora_with_non_finite_or_huge_scale_is_refused_naming_the_module(tmp_path, alpha, shown):
    path = tmp_path / "alpha.safetensors"
    save_file({f"{TO_Q}.lora_A.weight": torch.ones(2, 8), f"{TO_Q}.lora_B.weight": torch.ones(8, 2)}, str(path),
              metadata={"format": "pt", "lora_adapter_metadata": '{"unet.r": 2, "unet.lora_alpha": %s}' % alpha})
    with pytest.raises(ValueError, match=rf"alpha.safetensors: module '{TO_Q}' has the scale alpha/rank = {re.escape(shown)};"):
        load_lora(path)


@pytest.mark.parametrize("name, state, tensor", [
    ("peft0.safetensors", {f"{TO_Q}.lora_A.weight": torch.zeros(0, 8), f"{TO_Q}.lora_B.weight": torch.zeros(8, 0)},
     f"{TO_Q}.lora_A.weight"),
    ("kohya0.safetensors", {f"{KOHYA_TO_Q}.lora_down.weight": torch.zeros(0, 8),
                            f"{KOHYA_TO_Q}.lora_up.weight": torch.zeros(8, 0),
                            f"{KOHYA_TO_Q}.alpha": torch.tensor(1.0)}, f"{KOHYA_TO_Q}.lora_down.weight"),
])
def test_rank_zero_lora_is_refused_with_a_message(tmp_path, name, state, tensor):
    path = tmp_path / name
    save_file(state, str(path))
    with pytest.raises(ValueError, match=rf"{name}: tensor '{tensor}' is empty \(shape \(0, 8\)\): a LoRA of rank 0"):
        load_lora(path)                   # a ValueError, not a ZeroDivisionError (alpha / 0) or a reshape error
    assert "rank 0" in inspect_lora(path)["verdict"]


# ---- d. a non-finite image is an error, not a black picture ------------------------------------------------------

def _overflowing_lora(tiny_engine, path: Path) -> Path:
    """Every value 1e4 (at MAX_ABS, so the file passes the load checks) on a chain of layers without a norm in
    between (GEGLU, ff out, proj_out): the activations pass float32's range."""
    tensors = {}
    for block in ("unet.down_blocks.0.attentions.0", "unet.up_blocks.1.attentions.0"):
        for target in (f"{block}.transformer_blocks.0.ff.net.0.proj", f"{block}.transformer_blocks.0.ff.net.2",
                       f"{block}.proj_out"):
            weight = weight_module(tiny_engine.components, target).weight       # under a MoLE wrapper, if any
            ones = (1,) * (weight.dim() - 2)
            tensors[f"{target}.lora_A.weight"] = torch.full((64, weight.shape[1], *weight.shape[2:]), MAX_ABS)
            tensors[f"{target}.lora_B.weight"] = torch.full((weight.shape[0], 64, *ones), MAX_ABS)
    save_file(tensors, str(path))
    return path


def test_a_lora_that_overflows_the_model_gives_an_error_not_a_black_image(tiny_engine, tmp_path):
    before = tiny_engine.generate(Mix("base"), REQUEST)
    session = tiny_engine.bank.overlay(tmp_path / "session")
    src = _overflowing_lora(tiny_engine, tmp_path / "boom.safetensors")
    assert load_lora(src).name == "boom"                                   # passes every load check
    tiny_engine.add_to_bank(src, {"name": "Boom"}, bank=session)
    for mix in (Mix("single:boom"), Mix("linear", ("boom", "dog")), Mix("mole", ("boom", "dog"))):
        with pytest.raises(ValueError, match=r"The image came out as NaN/Inf \(not a picture\)"):
            tiny_engine.generate(mix, REQUEST, bank=session)
    after = tiny_engine.generate(Mix("base"), REQUEST)                          # and the model is as it was
    assert np.array_equal(pixels(before.image), pixels(after.image))


@pytest.mark.parametrize("where, bad", [("unet", INF), ("unet", NAN), ("vae", NAN)])
def test_a_non_finite_model_output_is_an_error(tiny_engine, monkeypatch, where, bad):
    """The UNet's noise prediction (what a LoRA or a gate changes) or the decoded image holds Inf / NaN: an
    error, whatever caused it, and the next call is as before."""
    before = tiny_engine.generate(Mix("base"), REQUEST)
    model = getattr(tiny_engine.pipe, where)
    forward = model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        sample[:, :, 0, 0] = bad
        return out

    monkeypatch.setattr(model, "forward" if where == "unet" else "decode",
                        poisoned if where == "unet" else _poison_decode(model.decode, bad))
    with pytest.raises(ValueError, match=r"The image came out as NaN/Inf \(not a picture\)"):
        tiny_engine.generate(Mix("base"), REQUEST)
    monkeypatch.undo()
    assert np.array_equal(pixels(tiny_engine.generate(Mix("base"), REQUEST).image), pixels(before.image))


def _poison_decode(decode, bad):
    def poisoned(latents, *args, **kwargs):
        out = decode(latents, *args, **kwargs)
        (out[0] if isinstance(out, tuple) else out.sample)[:, :, 0, 0] = bad
        return out
    return poisoned


# ---- f. file modes ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_usual_mode(tmp_path, umask, mode):
    _, loras, files, handle, _, _, result = trained_setup(tmp_path / "setup")
    old = os.umask(umask)
    try:
        save_lora(loras[0], tmp_path / "out" / "lora.safetensors")
        save_mixture(tmp_path / "out" / "mix.safetensors", handle, files, handle.config, result)
        write_text(tmp_path / "out" / "note.json", "{}")
    finally:
        os.umask(old)
    handle.detach()
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "out").iterdir()}
    assert modes == {"lora.safetensors": mode, "mix.safetensors": mode, "note.json": mode}
