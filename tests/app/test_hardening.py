"""Hardening: what a careless or hostile caller sends is refused early, with a sentence naming the field or the
file (never a server folder), and nothing that is refused changes the model, the bank or the queue.

Each test here pins a behaviour the engine before the `Mix` API (commit 3aac668) did not have. Most run on the
tiny pipeline of tests/tiny.py with a bank of tiny LoRAs (tests/test_engine.py); the request and training
checks that name the model's side run on the embedded 32×32 pixel world (nothing is rendered there).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import struct
import threading
import time
import zlib
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
from mole_core.image.bank import Bank
from mole_core.defaults import DEFAULT_BANK, DEFAULT_MODEL, Limits
from mole_core.image.engine import Engine, GenerateRequest, Mix
from mole_core.locks import FairLock
from mole_core.lora import MAX_ABS, weight_module
from mole_core.image.lora_files import inspect_lora, load_lora, save_lora
from mole_core.mixture import META_KEY, MixtureError, load_mixture, save_mixture
from mole_core.train import TrainConfig
from tests.tiny import BLOCK, LORAS, UP, make_bank, make_model_dir
from tests.helpers import distinct_copy, trained_setup

REQUEST = GenerateRequest(prompt="a photo of sks dog", negative="blue", seed=3, steps=2, guidance=4.0)
KEYS = ("dog", "cat")
NAN, INF = float("nan"), float("inf")
TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
KOHYA_TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(model folder, bank folder) of the tiny pipeline, under a folder whose name must never reach a message."""
    root = tmp_path_factory.mktemp("hardening") / "server_secret"
    model_dir = make_model_dir(root)
    return model_dir, make_bank(root / "bank", model_dir)


@pytest.fixture(scope="module")
def engine(world):
    return Engine(str(world[0]), str(world[1]))


@pytest.fixture(scope="module")
def pixel_engine():
    """The embedded world (32×32 images; its LoRAs face, ring, …): only checks run on it, nothing is drawn."""
    return Engine()


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def tree(folder: Path) -> dict[str, str]:
    """Every file under `folder` -> sha256 of its bytes (to prove a folder did not change)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


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
def test_mix_refuses_non_finite_and_absurd_numbers(engine, mix, message):
    with pytest.raises(ValueError, match=message):
        mix.check()
    with pytest.raises(ValueError, match=message):         # the engine checks before it draws anything
        engine.generate(mix, REQUEST)


def test_export_never_writes_a_lora_the_engine_refuses(engine, tmp_path):
    fine = engine.export(Mix("linear", KEYS, weights={"dog": 3.0, "cat": 1.0}, normalize=False), tmp_path / "ok.safetensors")
    assert set(load_lora(fine).modules) == {k for key in KEYS for k in LORAS[key]}
    out = tmp_path / "absurd.safetensors"
    with pytest.raises(ValueError):
        engine.export(Mix("linear", KEYS, weights={"dog": 1e30, "cat": 1.0}, normalize=False), out)
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

def test_lora_with_huge_finite_weights_is_refused_naming_the_tensor(engine, tmp_path):
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "huge.safetensors"
    save_file({f"{TO_Q}.lora_A.weight": torch.randn(2, 8, generator=g) * 1e30,
               f"{TO_Q}.lora_B.weight": torch.randn(8, 2, generator=g)}, str(path))
    assert torch.isfinite(load_file_tensors(path)[f"{TO_Q}.lora_A.weight"]).all()      # finite, just absurd
    message = rf"huge.safetensors: tensor '{TO_Q}.lora_A.weight' holds values up to 2.\d+e\+30"
    with pytest.raises(ValueError, match=message):
        load_lora(path)
    info = inspect_lora(path, engine.components)
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


# ---- c. mixture files ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixture_parts(tmp_path_factory):
    """(metadata dict, gate tensors) of a valid mixture file, and a server-ish folder to write variants to."""
    tmp = tmp_path_factory.mktemp("mixtures")
    _, _, files, handle, _, _, result = trained_setup(tmp)
    good = save_mixture(tmp / "good.safetensors", handle, files, handle.config, result, model_id="tiny")
    handle.detach()
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()[META_KEY]), {k: f.get_tensor(k) for k in f.keys()}
    folder = tmp / "server_secret"
    folder.mkdir()
    return meta, tensors, folder


def _write_mixture(folder, name, raw: str, tensors) -> Path:
    path = folder / name
    save_file(tensors, str(path), metadata={"format": "pt", META_KEY: raw})
    return path


def _without_names(meta):
    return json.dumps({k: v for k, v in meta.items() if k != "names"})


@pytest.mark.parametrize("raw, message", [
    (lambda m: json.dumps([m]), "the mixture metadata must be a JSON object; found list"),
    (_without_names, "metadata 'names' must be a list of LoRA names; found None"),
    (lambda m: json.dumps({**m, "names": "face"}), "metadata 'names' must be a list of LoRA names; found 'face'"),
    (lambda m: json.dumps({**m, "granularity": "pixel"}), "metadata 'granularity' must be one of matrix, layer"),
    (lambda m: json.dumps({**m, "mole_config": {**m["mole_config"], "gate": "bogus"}}),
     "metadata 'mole_config' must be an object whose 'gate' is one of sample, token"),
    (lambda m: json.dumps({**m, "mole_config": "block"}), "metadata 'mole_config' must be an object"),
    (lambda m: json.dumps(m)[:-5], r"its 'mole.mixture' metadata is not valid JSON"),
], ids=["list", "no-names", "names-str", "granularity", "gate-kind", "mole_config-str", "broken-json"])
def test_mixture_with_bad_metadata_is_refused_naming_the_file(mixture_parts, raw, message):
    meta, tensors, folder = mixture_parts
    path = _write_mixture(folder, "upload.safetensors", raw(meta), tensors)
    with pytest.raises(MixtureError) as e:
        load_mixture(path)
    assert str(e.value).startswith("upload.safetensors: ") and message in str(e.value)
    assert str(folder) not in str(e.value) and "server_secret" not in str(e.value)
    with pytest.raises(MixtureError, match=r"^mine.safetensors: "):       # an upload's own name, when given
        load_mixture(path, display="mine.safetensors")


@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_mixture_with_non_finite_or_huge_gates_is_refused_at_load(mixture_parts, poison):
    meta, tensors, folder = mixture_parts
    key = sorted(k for k in tensors if k.endswith("proj.weight"))[0]
    bad = dict(tensors)
    bad[key] = tensors[key].clone()
    if poison == "nan":
        bad[key][0, 0] = NAN
    else:
        bad[key] = bad[key] * 1e30
    path = _write_mixture(folder, f"{poison}.safetensors", json.dumps(meta), bad)
    with pytest.raises(MixtureError, match=rf"^{poison}.safetensors: gate tensor '{key}' is empty, not finite or holds "
                                           rf"values above 10000; the file is refused"):
        load_mixture(path)
    load_mixture(_write_mixture(folder, "fine.safetensors", json.dumps(meta), tensors))   # the good one loads


def test_mixture_with_an_empty_gate_tensor_is_refused_at_load(mixture_parts):
    meta, tensors, folder = mixture_parts
    path = _write_mixture(folder, "empty.safetensors", json.dumps(meta), {**tensors, "extra.log_tau": torch.zeros(0)})
    with pytest.raises(MixtureError, match=r"^empty.safetensors: "):
        load_mixture(path)


@pytest.fixture(scope="module")
def mixture(engine):
    """Gates trained on the tiny model (its model_name is the folder name, 'model')."""
    return engine.train(list(KEYS), MoleConfig(), TrainConfig(steps=2, batch_size=1, lr=0.05, seed=0))


def test_mixture_of_another_model_is_refused_even_after_a_good_one_was_checked(engine, mixture):
    assert mixture.meta["model_id"] == engine.model_name == "model"
    assert engine.check([Mix("mole", mixture=mixture)], REQUEST) == []             # checked once, cached
    elsewhere = dataclasses.replace(mixture, meta={**mixture.meta, "model_id": "x"})   # same LoRA files
    with pytest.raises(MixtureError, match="was trained on the model 'x', not 'model'"):
        engine.check([Mix("mole", mixture=elsewhere)], REQUEST)
    with pytest.raises(MixtureError, match="was trained on the model 'x', not 'model'"):
        engine.generate(Mix("mole", mixture=elsewhere), REQUEST)


# ---- d. a non-finite image is an error, not a black picture ------------------------------------------------------

def _overflowing_lora(engine, path: Path) -> Path:
    """Every value 1e4 (at MAX_ABS, so the file passes the load checks) on a chain of layers without a norm in
    between (GEGLU, ff out, proj_out): the activations pass float32's range."""
    tensors = {}
    for block in ("unet.down_blocks.0.attentions.0", "unet.up_blocks.1.attentions.0"):
        for target in (f"{block}.transformer_blocks.0.ff.net.0.proj", f"{block}.transformer_blocks.0.ff.net.2",
                       f"{block}.proj_out"):
            weight = weight_module(engine.components, target).weight       # under a MoLE wrapper, if any
            ones = (1,) * (weight.dim() - 2)
            tensors[f"{target}.lora_A.weight"] = torch.full((64, weight.shape[1], *weight.shape[2:]), MAX_ABS)
            tensors[f"{target}.lora_B.weight"] = torch.full((weight.shape[0], 64, *ones), MAX_ABS)
    save_file(tensors, str(path))
    return path


def test_a_lora_that_overflows_the_model_gives_an_error_not_a_black_image(engine, tmp_path):
    before = engine.generate(Mix("base"), REQUEST)
    session = engine.bank.overlay(tmp_path / "session")
    src = _overflowing_lora(engine, tmp_path / "boom.safetensors")
    assert load_lora(src).name == "boom"                                   # passes every load check
    engine.add_to_bank(src, {"name": "Boom"}, bank=session)
    for mix in (Mix("single:boom"), Mix("linear", ("boom", "dog")), Mix("mole", ("boom", "dog"))):
        with pytest.raises(ValueError, match=r"The image came out as NaN/Inf \(not a picture\)"):
            engine.generate(mix, REQUEST, bank=session)
    after = engine.generate(Mix("base"), REQUEST)                          # and the model is as it was
    assert np.array_equal(pixels(before.image), pixels(after.image))


@pytest.mark.parametrize("where, bad", [("unet", INF), ("unet", NAN), ("vae", NAN)])
def test_a_non_finite_model_output_is_an_error(engine, monkeypatch, where, bad):
    """The UNet's noise prediction (what a LoRA or a gate changes) or the decoded image holds Inf / NaN: an
    error, whatever caused it, and the next call is as before."""
    before = engine.generate(Mix("base"), REQUEST)
    model = getattr(engine.pipe, where)
    forward = model.forward

    def poisoned(*args, **kwargs):
        out = forward(*args, **kwargs)
        sample = out[0] if isinstance(out, tuple) else out.sample
        sample[:, :, 0, 0] = bad
        return out

    monkeypatch.setattr(model, "forward" if where == "unet" else "decode",
                        poisoned if where == "unet" else _poison_decode(model.decode, bad))
    with pytest.raises(ValueError, match=r"The image came out as NaN/Inf \(not a picture\)"):
        engine.generate(Mix("base"), REQUEST)
    monkeypatch.undo()
    assert np.array_equal(pixels(engine.generate(Mix("base"), REQUEST).image), pixels(before.image))


def _poison_decode(decode, bad):
    def poisoned(latents, *args, **kwargs):
        out = decode(latents, *args, **kwargs)
        (out[0] if isinstance(out, tuple) else out.sample)[:, :, 0, 0] = bad
        return out
    return poisoned


# ---- e. the bank ----------------------------------------------------------------------------------------------

@pytest.fixture
def bank_dir(world, tmp_path):
    """A copy of the tiny bank under a folder whose name must not reach any message."""
    folder = tmp_path / "server_secret" / "bank"
    shutil.copytree(world[1], folder)
    return folder


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width × height pixels but holds no pixel data (nothing to decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", b"not deflate data") + chunk(b"IEND", b""))
    return path


def test_bank_lists_every_entry_broken_ones_naming_files_only(bank_dir):
    lora = (bank_dir / "dog.safetensors").read_bytes()
    (bank_dir / "loose.safetensors").write_bytes(lora)                        # a LoRA without manifest
    (bank_dir / "ghost.json").write_text(json.dumps({"name": "Ghost"}))       # a manifest without LoRA
    (bank_dir / "plain.safetensors").write_bytes(lora)                        # fine, but no examples
    (bank_dir / "plain.json").write_text(json.dumps({"name": "Plain", "trigger": "sks"}))
    bank = Bank(bank_dir)
    assert bank.keys() == ["cat", "dog", "ghost", "loose", "plain", "style"]
    errors = {e.key: e.error for e in bank.entries}
    assert errors == {"cat": None, "dog": None, "style": None, "plain": None,
                      "loose": "loose.safetensors: no manifest loose.json beside it.",
                      "ghost": "ghost.json: manifest without its LoRA file ghost.safetensors."}
    plain = bank.get("plain")
    assert (plain.name, plain.trigger, plain.examples) == ("Plain", ["sks"], [])


def test_example_outside_the_bank_folder_breaks_the_entry(bank_dir):
    (bank_dir.parent / "x.png").write_bytes((bank_dir / "examples" / "dog_0.png").read_bytes())   # it exists
    manifest = json.loads((bank_dir / "dog.json").read_text())
    manifest["examples"].append({"image": "../x.png", "caption": "out"})
    (bank_dir / "dog.json").write_text(json.dumps(manifest))
    bank = Bank(bank_dir)
    assert bank.get("dog").error == "dog.json: examples[2] image '../x.png' lies outside the bank folder."
    assert bank.get("cat").error is None
    with pytest.raises(ValueError, match="lies outside the bank folder"):
        bank.load("dog")


def test_clean_removes_only_leftovers(bank_dir):
    examples = bank_dir / "examples"
    leftovers = [bank_dir / ".x.safetensors.abc.tmp", examples / "x_0.png"]   # temp file; image of no entry
    kept = [examples / "dog_5.png",                      # not in the manifest, but its entry exists
            examples / "my_photo.png", bank_dir / "notes.txt", bank_dir / ".gitattributes", bank_dir / "x.tmp"]
    for path in leftovers + kept:
        path.write_bytes(b"x")
    before = {p: h for p, h in tree(bank_dir).items() if bank_dir / p not in leftovers}
    bank = Bank(bank_dir)
    entries = [dataclasses.astuple(e) for e in bank.entries]
    assert sorted(bank.clean()) == sorted(leftovers)
    assert tree(bank_dir) == before
    assert [dataclasses.astuple(e) for e in Bank(bank_dir).entries] == entries


def test_overlay_lists_shared_then_own_and_writes_only_its_own(engine, bank_dir, tmp_path):
    shared = Bank(bank_dir)
    shared_before = tree(bank_dir)
    session = shared.overlay(tmp_path / "session")
    assert session.keys() == ["cat", "dog", "style"]
    src = tmp_path / "upload" / "green.safetensors"
    src.parent.mkdir()
    distinct_copy(bank_dir / "dog.safetensors", src)
    image = bank_dir / "examples" / "dog_0.png"
    entry = session.add(src, {"name": "Green"}, images=[(image, "a green sks")], components=engine.components)
    assert entry.error is None and entry.lora_path == tmp_path / "session" / "green.safetensors"
    assert session.keys() == ["cat", "dog", "style", "green"] and shared.keys() == ["cat", "dog", "style"]
    assert tree(tmp_path / "session") == {"green.safetensors": tree(src.parent)["green.safetensors"],
                                          "green.json": tree(tmp_path / "session")["green.json"],
                                          "examples/green_0.png": shared_before["examples/dog_0.png"]}
    assert tree(bank_dir) == shared_before                                    # the shared folder is untouched
    assert session.load("dog").path == str(bank_dir / "dog.safetensors")      # shared entries read from there
    with pytest.raises(ValueError, match="The bank already has an entry 'dog': choose another name"):
        session.add(src, {"name": "Dog again"}, key="dog")
    assert sorted(tree(tmp_path / "session")) == ["examples/green_0.png", "green.json", "green.safetensors"]


def test_a_session_bank_entry_is_that_sessions_only(engine, tmp_path):
    session = engine.bank.overlay(tmp_path / "session")
    src = tmp_path / "green.safetensors"
    distinct_copy(engine.bank.get("dog").lora_path, src)          # dog's LoRA, one tensor × 1.001
    engine.add_to_bank(src, {"name": "Green"}, bank=session)
    mine = engine.generate(Mix("single:green"), REQUEST, bank=session)
    dog = engine.generate(Mix("single:dog"), REQUEST)
    assert mine.label == "Single: Green" and np.abs(pixels(mine.image) - pixels(dog.image)).max() <= 3
    with pytest.raises(ValueError, match="Unknown LoRA 'green'"):
        engine.generate(Mix("single:green"), REQUEST)
    assert "green" not in engine.bank.keys()


def test_a_300_character_name_is_refused_with_a_sentence(bank_dir):
    bank, before = Bank(bank_dir), tree(bank_dir)
    with pytest.raises(ValueError) as e:
        bank.add(bank_dir / "dog.safetensors", {"name": "Long"}, key="k" * 300, display="long.safetensors")
    message = str(e.value)
    assert message.startswith("long.safetensors: the name must give a bank key of 1 to 64 letters")
    assert f"(got '{'k' * 40}…')" in message and len(message) < 250
    assert tree(bank_dir) == before


def test_an_example_image_over_the_pixel_limit_is_refused_before_decoding(bank_dir, tmp_path):
    bank, before = Bank(bank_dir), tree(bank_dir)
    huge = _png_header(tmp_path / "huge.png", 5000, 5000)
    with pytest.raises(OSError):                       # there is nothing to decode: decoding would fail
        with PIL.Image.open(huge) as im:
            im.load()
    with pytest.raises(ValueError, match=r"^huge.png: the example image is 5000×5000 pixels; the limit is "
                                         r"16,777,216 pixels\.$"):
        bank.add(bank_dir / "dog.safetensors", {"name": "Big"}, images=[huge], key="big")
    with pytest.raises(ValueError, match=r"^dog_0.png: the example image is 16×16 pixels; the limit is 100 pixels"):
        bank.add(bank_dir / "dog.safetensors", {"name": "Big"}, images=[bank_dir / "examples" / "dog_0.png"],
                 key="big", max_pixels=100)
    assert tree(bank_dir) == before


def test_a_misfit_upload_is_named_by_its_display_name_only(engine, bank_dir, tmp_path):
    upload = tmp_path / "server_secret" / "uploads" / "tmp123"
    upload.mkdir(parents=True)
    save_file({f"{TO_Q.replace('attn1.to_q', 'attn2.to_k')}.lora_A.weight": torch.randn(4, 2048),
               f"{TO_Q.replace('attn1.to_q', 'attn2.to_k')}.lora_B.weight": torch.randn(8, 4)},
              str(upload / "x.safetensors"))
    with pytest.raises(ValueError) as e:
        Bank(bank_dir).add(upload / "x.safetensors", {"name": "XL"}, components=engine.components,
                           display="mine.safetensors")
    assert "expected A (4, 16)" in str(e.value)
    assert "server_secret" not in str(e.value) and str(e.value).startswith("mine.safetensors: ")


def test_bank_lora_errors_name_the_file_not_the_bank_folder(engine, bank_dir):
    (bank_dir / "cut.safetensors").write_bytes((bank_dir / "dog.safetensors").read_bytes()[:100])
    (bank_dir / "cut.json").write_text(json.dumps({"name": "Cut"}))
    bank = Bank(bank_dir)
    report = bank.validate(engine.components)
    assert report["cut"].startswith("cut.safetensors: not a readable .safetensors file")
    with pytest.raises(ValueError) as e:
        engine.generate(Mix("single:cut"), REQUEST, bank=bank)
    assert "cut.safetensors" in str(e.value) and "server_secret" not in str(e.value)


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


# ---- g. the MoLE attachment is keyed by what the Mix asks for ---------------------------------------------------

def _groups(result) -> set[str]:
    return {r["group"] for r in result.gates}


def test_untrained_mole_gets_the_granularity_it_asks_for(engine, world, mixture):
    block = engine.generate(Mix("mole", KEYS, granularity="block"), REQUEST)
    layer = engine.generate(Mix("mole", KEYS, granularity="layer"), REQUEST)
    fresh = Engine(str(world[0]), str(world[1])).generate(Mix("mole", KEYS, granularity="layer"), REQUEST)
    assert block.label == "MoLE (block, 2 experts, untrained)"
    assert layer.label == "MoLE (layer, 2 experts, untrained)"
    layers = {f"{BLOCK}.attn1", f"{BLOCK}.attn2", f"{BLOCK}.ff", f"{UP}.attn1", f"{UP}.attn2", f"{UP}.ff"}
    assert _groups(block) == {"unet.down_blocks.0.attentions.0", "unet.up_blocks.1.attentions.0"}
    assert _groups(layer) == _groups(fresh) == layers
    assert {round(r["weight"], 6) for r in layer.gates} == {0.5}
    # a trained mixture in between: the next untrained call neither keeps its gates nor its granularity
    trained = engine.generate(Mix("mole", mixture=mixture), REQUEST)
    assert trained.label == "MoLE (block, 2 experts)" and {round(r["weight"], 6) for r in trained.gates} != {0.5}
    again = engine.generate(Mix("mole", KEYS, granularity="layer", gate="token"), REQUEST)
    assert again.label == "MoLE (layer, per-token, 2 experts, untrained)"
    assert _groups(again) == layers and {round(r["weight"], 6) for r in again.gates} == {0.5}


# ---- h. the fair lock -------------------------------------------------------------------------------------------

def _wait_until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.001)


def test_fair_lock_yields_to_waiters_in_arrival_order_and_is_reentrant():
    lock, order = FairLock(), []

    def waiter(name):
        with lock:
            order.append(name)

    with lock:
        assert lock.yield_to_waiters() is False                       # nobody waits: no hand-over
        with lock:                                                    # reentrant
            threads = []
            for i, name in enumerate(("first", "second", "third")):
                threads.append(threading.Thread(target=waiter, args=(name,)))
                threads[-1].start()
                _wait_until(lambda: lock.waiting() == i + 1)          # queued in this order
            assert lock.yield_to_waiters() is True                    # everyone queued before goes first ...
            order.append("holder")                                    # ... then the holder is back
            assert lock.waiting() == 0
        order.append("holder, depth 1")                               # still held after the inner exit
        late = threading.Thread(target=waiter, args=("late",))
        late.start()
        _wait_until(lambda: lock.waiting() == 1)
        assert order == ["first", "second", "third", "holder", "holder, depth 1"]
    late.join(10)
    for t in threads:
        t.join(10)
    assert order[-1] == "late" and lock.waiting() == 0
    with pytest.raises(RuntimeError, match="released by a thread that does not hold it"):
        lock.release()


# ---- i. training gives way to others between steps, and trains the same gates ----------------------------------

TRAIN = TrainConfig(steps=30, batch_size=1, lr=0.05, seed=0)   # the hand-over is after step 1 by construction


def _train_with_a_visitor(engine, visitor: Mix):
    """Train; after step 1, another thread asks for `visitor`. Returns (mixture, visitor's result, the number
    of training steps done when the visitor's image was drawn, steps done when its call returned)."""
    steps, log, threads = [], {}, []
    call_pipe = engine._call_pipe

    def spy(*args, **kwargs):
        log["drawn_at"] = len(steps)
        return call_pipe(*args, **kwargs)

    def visit():
        log["result"] = engine.generate(visitor, REQUEST)
        log["returned_at"] = len(steps)

    def on_step(step, losses, gates):
        steps.append(step)
        if step == 1:
            threads.append(threading.Thread(target=visit))
            threads[0].start()
            _wait_until(lambda: engine._lock.waiting() == 1)          # the visitor is queued for the model

    engine._call_pipe = spy
    try:
        mixture = engine.train(list(KEYS), MoleConfig(), TRAIN, on_step=on_step)
    finally:
        del engine._call_pipe
        for t in threads:
            t.join(60)
    assert steps == list(range(1, TRAIN.steps + 1))
    return mixture, log.get("result"), log.get("drawn_at"), log.get("returned_at")


def _same_gates(a, b) -> bool:
    return set(a.gate_state) == set(b.gate_state) and all(torch.equal(a.gate_state[k], b.gate_state[k])
                                                          for k in a.gate_state)


@pytest.fixture(scope="module")
def trained_alone(engine):
    return engine.train(list(KEYS), MoleConfig(), TRAIN)


def test_an_image_asked_for_during_training_comes_after_one_step(engine, trained_alone):
    alone = engine.generate(Mix("base"), REQUEST)
    mixture, result, drawn_at, returned_at = _train_with_a_visitor(engine, Mix("base"))
    assert drawn_at == 1 and returned_at < TRAIN.steps             # between steps 1 and 2, long before the end
    assert np.array_equal(pixels(result.image), pixels(alone.image))
    assert _same_gates(mixture, trained_alone)                     # training went on exactly as alone


@pytest.mark.parametrize("visitor", [Mix("mole", ("dog", "style")), Mix("mole", KEYS, granularity="layer")],
                         ids=["other-keys", "other-granularity"])
def test_a_mole_image_asked_for_during_training_does_not_disturb_it(engine, world, trained_alone, visitor):
    alone = Engine(str(world[0]), str(world[1])).generate(visitor, REQUEST)
    mixture, result, drawn_at, returned_at = _train_with_a_visitor(engine, visitor)
    assert drawn_at == 1 and returned_at < TRAIN.steps
    assert np.array_equal(pixels(result.image), pixels(alone.image)) and result.label == alone.label
    assert _same_gates(mixture, trained_alone)
