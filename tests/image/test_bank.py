"""The bank: scanning, broken entries reported (not fatal), validation, atomic add; overlays (a visitor's own
uploads), leftovers cleaned, and what an upload gets wrong refused with a sentence naming the user's file only."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from mole_core.image.bank import Bank
from mole_core.image.engine import GenerateRequest, Mix
from mole_core.image.lora_files import pipeline_components, save_lora
from tests.helpers import TARGETS, bank_digest, distinct_copy, pixels, random_lora

REQUEST = GenerateRequest(prompt="a photo of sks dog", negative="blue", seed=3, steps=2, guidance=4.0)
TO_Q = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"


@pytest.fixture
def comps(tiny_pipe):
    return pipeline_components(tiny_pipe)


def _manifest(name, **extra):
    return {"name": name, "trigger": ["sks"], "description": f"{name} test LoRA", "base_model": "tiny-sd",
            "kind": "subject", "default_weight": 0.8, **extra}


def _image(path, color=(255, 0, 0)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), color).save(path)
    return path


def _snapshot(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def bank_dir(comps, tmp_path):
    """Two good entries, and four broken ones of different kinds."""
    folder = tmp_path / "bank"
    folder.mkdir()
    _image(folder / "examples" / "red_0.png")
    save_lora(random_lora(comps, seed=1), folder / "red.safetensors")
    (folder / "red.json").write_text(json.dumps(_manifest(
        "Red", examples=[{"image": "examples/red_0.png", "caption": "a photo of sks"}])))
    save_lora(random_lora(comps, seed=2), folder / "blue.safetensors", format="kohya")
    (folder / "blue.json").write_text(json.dumps({**_manifest("Blue"), "kind": "style", "trigger": "blue style"}))
    save_lora(random_lora(comps, seed=3), folder / "nomanifest.safetensors")
    (folder / "orphan.json").write_text(json.dumps(_manifest("Orphan")))
    (folder / "badjson.safetensors").write_bytes((folder / "red.safetensors").read_bytes())
    (folder / "badjson.json").write_text("{not json")
    (folder / "badkind.safetensors").write_bytes((folder / "red.safetensors").read_bytes())
    (folder / "badkind.json").write_text(json.dumps({**_manifest("K"), "kind": "landscape"}))
    return folder


def test_scan_lists_good_and_broken_entries(bank_dir):
    bank = Bank(bank_dir)
    errors = {e.key: e.error for e in bank.entries}
    assert set(errors) == {"red", "blue", "nomanifest", "orphan", "badjson", "badkind"}
    assert errors["red"] is None and errors["blue"] is None
    assert errors["nomanifest"] == "nomanifest.safetensors: no manifest nomanifest.json beside it."
    assert errors["orphan"] == "orphan.json: manifest without its LoRA file orphan.safetensors."
    assert errors["badjson"].startswith("badjson.json: not valid JSON: ")
    assert errors["badkind"] == "badkind.json: 'kind' must be one of ('subject', 'style'), found 'landscape'."
    assert not any(str(bank_dir) in e for e in errors.values() if e)     # files are named, not the folder

    red = bank.get("red")
    assert (red.name, red.trigger, red.kind, red.default_weight) == ("Red", ["sks"], "subject", 0.8)
    assert red.examples == [(bank_dir / "examples" / "red_0.png", "a photo of sks")]
    assert bank.get("blue").trigger == ["blue style"] and bank.get("blue").kind == "style"

    lora = bank.load("red")
    assert lora.name == "red" and set(lora.modules) == set(TARGETS)
    assert bank.load("red") is lora                                   # cached
    with pytest.raises(ValueError, match="no manifest"):
        bank.load("nomanifest")
    with pytest.raises(KeyError, match="Unknown LoRA 'green'"):
        bank.get("green")


def test_validate_reports_a_misfit_without_refusing_the_rest(bank_dir, comps):
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    from safetensors.torch import save_file
    save_file({f"{key}.lora_A.weight": torch.randn(4, 2048), f"{key}.lora_B.weight": torch.randn(8, 4)},
              bank_dir / "xl.safetensors")
    (bank_dir / "xl.json").write_text(json.dumps(_manifest("XL")))
    bank = Bank(bank_dir)
    report = bank.validate(comps)
    assert report["red"] is None and report["blue"] is None
    assert "expected A (4, 16)" in report["xl"] and "found A (4, 2048)" in report["xl"]
    assert bank.get("xl").error == report["xl"]
    assert report["badjson"] is not None


def test_add_copies_file_manifest_and_images(bank_dir, comps, tmp_path):
    src = tmp_path / "green.safetensors"
    save_lora(random_lora(comps, seed=7), src, format="kohya")
    img = _image(tmp_path / "g.png", (0, 255, 0))
    bank = Bank(bank_dir)
    entry = bank.add(src, _manifest("Green"), images=[(img, "a green sks"), img], components=comps)
    assert entry.error is None and entry.name == "Green"
    assert entry.examples == [(bank_dir / "examples/green_0.png", "a green sks"),
                              (bank_dir / "examples/green_1.png", "")]
    assert (bank_dir / "green.safetensors").read_bytes() == src.read_bytes()
    assert json.loads((bank_dir / "green.json").read_text())["examples"][0]["image"] == "examples/green_0.png"
    assert "green" in Bank(bank_dir).keys()
    assert not list(bank_dir.rglob("*.tmp"))


def test_add_of_bad_input_leaves_the_folder_unchanged(bank_dir, comps, tmp_path):
    bank = Bank(bank_dir)
    before = _snapshot(bank_dir)
    img = _image(tmp_path / "ok.png")

    (tmp_path / "cut.safetensors").write_bytes((bank_dir / "red.safetensors").read_bytes()[:100])
    save_lora(random_lora(comps, seed=8), tmp_path / "nan.safetensors")   # save_lora refuses NaN: poison the file
    from safetensors.torch import load_file, save_file
    tensors = load_file(tmp_path / "nan.safetensors")
    next(iter(tensors.values()))[0, 0] = float("nan")
    save_file(tensors, str(tmp_path / "nan.safetensors"))
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"
    from safetensors.torch import save_file
    save_file({f"{key}.lora_A.weight": torch.randn(4, 2048), f"{key}.lora_B.weight": torch.randn(8, 4)},
              tmp_path / "xl.safetensors")
    (tmp_path / "fake.png").write_bytes(b"not an image")
    good = tmp_path / "good.safetensors"
    save_lora(random_lora(comps, seed=9), good)

    cases = [
        (tmp_path / "cut.safetensors", _manifest("Cut"), [img], "truncated"),
        (tmp_path / "nan.safetensors", _manifest("NaN"), [img], "NaN/Inf"),
        (tmp_path / "xl.safetensors", _manifest("XL"), [img], "expected A"),
        (good, {**_manifest("Good"), "kind": "portrait"}, [img], "'kind' must be one of"),
        (good, _manifest("Good"), [tmp_path / "fake.png"], "cannot be read as an image"),
        (good, _manifest("Good"), [tmp_path / "missing.png"], "missing.png"),
        (bank_dir / "red.safetensors", _manifest("Red again"), [img], "already has an entry 'red'"),
    ]
    for src, manifest, images, message in cases:
        with pytest.raises(ValueError, match=message):
            bank.add(src, manifest, images=images, components=comps)
        assert _snapshot(bank_dir) == before, f"folder changed after a failed add of {src.name}"


# ---- the tiny world's bank: broken entries, overlays, uploads refused by name ----------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_bank_dir(tiny_world, tmp_path):
    """A copy of the tiny bank under a folder whose name must not reach any message."""
    folder = tmp_path / "server_secret" / "bank"
    shutil.copytree(tiny_world[1], folder)
    return folder


def _png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares width × height pixels but holds no pixel data (nothing to decode)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", b"not deflate data") + chunk(b"IEND", b""))
    return path


def test_bank_lists_every_entry_broken_ones_naming_files_only(tiny_bank_dir):
    lora = (tiny_bank_dir / "dog.safetensors").read_bytes()
    (tiny_bank_dir / "loose.safetensors").write_bytes(lora)                        # a LoRA without manifest
    (tiny_bank_dir / "ghost.json").write_text(json.dumps({"name": "Ghost"}))       # a manifest without LoRA
    (tiny_bank_dir / "plain.safetensors").write_bytes(lora)                        # fine, but no examples
    (tiny_bank_dir / "plain.json").write_text(json.dumps({"name": "Plain", "trigger": "sks"}))
    bank = Bank(tiny_bank_dir)
    assert bank.keys() == ["cat", "dog", "ghost", "loose", "plain", "style"]
    errors = {e.key: e.error for e in bank.entries}
    assert errors == {"cat": None, "dog": None, "style": None, "plain": None,
                      "loose": "loose.safetensors: no manifest loose.json beside it.",
                      "ghost": "ghost.json: manifest without its LoRA file ghost.safetensors."}
    plain = bank.get("plain")
    assert (plain.name, plain.trigger, plain.examples) == ("Plain", ["sks"], [])


def test_example_outside_the_bank_folder_breaks_the_entry(tiny_bank_dir):
    (tiny_bank_dir.parent / "x.png").write_bytes((tiny_bank_dir / "examples" / "dog_0.png").read_bytes())   # it exists
    manifest = json.loads((tiny_bank_dir / "dog.json").read_text())
    manifest["examples"].append({"image": "../x.png", "caption": "out"})
    (tiny_bank_dir / "dog.json").write_text(json.dumps(manifest))
    bank = Bank(tiny_bank_dir)
    assert bank.get("dog").error == "dog.json: examples[2] image '../x.png' lies outside the bank folder."
    assert bank.get("cat").error is None
    with pytest.raises(ValueError, match="lies outside the bank folder"):
        bank.load("dog")


def test_clean_removes_only_leftovers(tiny_bank_dir):
    examples = tiny_bank_dir / "examples"
    leftovers = [tiny_bank_dir / ".x.safetensors.abc.tmp", examples / "x_0.png"]   # temp file; image of no entry
    kept = [examples / "dog_5.png",                      # not in the manifest, but its entry exists
            examples / "my_photo.png", tiny_bank_dir / "notes.txt", tiny_bank_dir / ".gitattributes", tiny_bank_dir / "x.tmp"]
    for path in leftovers + kept:
        path.write_bytes(b"x")
    before = {p: h for p, h in bank_digest(tiny_bank_dir).items() if tiny_bank_dir / p not in leftovers}
    bank = Bank(tiny_bank_dir)
    entries = [dataclasses.astuple(e) for e in bank.entries]
    assert sorted(bank.clean()) == sorted(leftovers)
    assert bank_digest(tiny_bank_dir) == before
    assert [dataclasses.astuple(e) for e in Bank(tiny_bank_dir).entries] == entries


def test_overlay_lists_shared_then_own_and_writes_only_its_own(tiny_engine, tiny_bank_dir, tmp_path):
    shared = Bank(tiny_bank_dir)
    shared_before = bank_digest(tiny_bank_dir)
    session = shared.overlay(tmp_path / "session")
    assert session.keys() == ["cat", "dog", "style"]
    src = tmp_path / "upload" / "green.safetensors"
    src.parent.mkdir()
    distinct_copy(tiny_bank_dir / "dog.safetensors", src)
    image = tiny_bank_dir / "examples" / "dog_0.png"
    entry = session.add(src, {"name": "Green"}, images=[(image, "a green sks")], components=tiny_engine.components)
    assert entry.error is None and entry.lora_path == tmp_path / "session" / "green.safetensors"
    assert session.keys() == ["cat", "dog", "style", "green"] and shared.keys() == ["cat", "dog", "style"]
    assert bank_digest(tmp_path / "session") == {"green.safetensors": bank_digest(src.parent)["green.safetensors"],
                                          "green.json": bank_digest(tmp_path / "session")["green.json"],
                                          "examples/green_0.png": shared_before["examples/dog_0.png"]}
    assert bank_digest(tiny_bank_dir) == shared_before                                    # the shared folder is untouched
    assert session.load("dog").path == str(tiny_bank_dir / "dog.safetensors")      # shared entries read from there
    with pytest.raises(ValueError, match="The bank already has an entry 'dog': choose another name"):
        session.add(src, {"name": "Dog again"}, key="dog")
    assert sorted(bank_digest(tmp_path / "session")) == ["examples/green_0.png", "green.json", "green.safetensors"]


def test_a_session_bank_entry_is_that_sessions_only(tiny_engine, tmp_path):
    session = tiny_engine.bank.overlay(tmp_path / "session")
    src = tmp_path / "green.safetensors"
    distinct_copy(tiny_engine.bank.get("dog").lora_path, src)          # dog's LoRA, one tensor × 1.001
    tiny_engine.add_to_bank(src, {"name": "Green"}, bank=session)
    mine = tiny_engine.generate(Mix("single:green"), REQUEST, bank=session)
    dog = tiny_engine.generate(Mix("single:dog"), REQUEST)
    assert mine.label == "Single: Green" and np.abs(pixels(mine.image) - pixels(dog.image)).max() <= 3
    with pytest.raises(ValueError, match="Unknown LoRA 'green'"):
        tiny_engine.generate(Mix("single:green"), REQUEST)
    assert "green" not in tiny_engine.bank.keys()


def test_a_300_character_name_is_refused_with_a_sentence(tiny_bank_dir):
    bank, before = Bank(tiny_bank_dir), bank_digest(tiny_bank_dir)
    with pytest.raises(ValueError) as e:
        bank.add(tiny_bank_dir / "dog.safetensors", {"name": "Long"}, key="k" * 300, display="long.safetensors")
    message = str(e.value)
    assert message.startswith("long.safetensors: the name must give a bank key of 1 to 64 letters")
    assert f"(got '{'k' * 40}…')" in message and len(message) < 250
    assert bank_digest(tiny_bank_dir) == before


def test_an_example_image_over_the_pixel_limit_is_refused_before_decoding(tiny_bank_dir, tmp_path):
    bank, before = Bank(tiny_bank_dir), bank_digest(tiny_bank_dir)
    huge = _png_header(tmp_path / "huge.png", 5000, 5000)
    with pytest.raises(OSError):                       # there is nothing to decode: decoding would fail
        with PIL.Image.open(huge) as im:
            im.load()
    with pytest.raises(ValueError, match=r"^huge.png: the example image is 5000×5000 pixels; the limit is "
                                         r"16,777,216 pixels\.$"):
        bank.add(tiny_bank_dir / "dog.safetensors", {"name": "Big"}, images=[huge], key="big")
    with pytest.raises(ValueError, match=r"^dog_0.png: the example image is 16×16 pixels; the limit is 100 pixels"):
        bank.add(tiny_bank_dir / "dog.safetensors", {"name": "Big"}, images=[tiny_bank_dir / "examples" / "dog_0.png"],
                 key="big", max_pixels=100)
    assert bank_digest(tiny_bank_dir) == before


def test_a_misfit_upload_is_named_by_its_display_name_only(tiny_engine, tiny_bank_dir, tmp_path):
    upload = tmp_path / "server_secret" / "uploads" / "tmp123"
    upload.mkdir(parents=True)
    save_file({f"{TO_Q.replace('attn1.to_q', 'attn2.to_k')}.lora_A.weight": torch.randn(4, 2048),
               f"{TO_Q.replace('attn1.to_q', 'attn2.to_k')}.lora_B.weight": torch.randn(8, 4)},
              str(upload / "x.safetensors"))
    with pytest.raises(ValueError) as e:
        Bank(tiny_bank_dir).add(upload / "x.safetensors", {"name": "XL"}, components=tiny_engine.components,
                           display="mine.safetensors")
    assert "expected A (4, 16)" in str(e.value)
    assert "server_secret" not in str(e.value) and str(e.value).startswith("mine.safetensors: ")


def test_bank_lora_errors_name_the_file_not_the_bank_folder(tiny_engine, tiny_bank_dir):
    (tiny_bank_dir / "cut.safetensors").write_bytes((tiny_bank_dir / "dog.safetensors").read_bytes()[:100])
    (tiny_bank_dir / "cut.json").write_text(json.dumps({"name": "Cut"}))
    bank = Bank(tiny_bank_dir)
    report = bank.validate(tiny_engine.components)
    assert report["cut"].startswith("cut.safetensors: not a readable .safetensors file")
    with pytest.raises(ValueError) as e:
        tiny_engine.generate(Mix("single:cut"), REQUEST, bank=bank)
    assert "cut.safetensors" in str(e.value) and "server_secret" not in str(e.value)
