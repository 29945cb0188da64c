"""The bank: scanning, broken entries reported (not fatal), validation, atomic add."""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from PIL import Image

from mole_core.image.bank import Bank
from mole_core.image.lora_files import pipeline_components, save_lora
from tests.helpers import TARGETS, random_lora


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
