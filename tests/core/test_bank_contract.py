"""One bank contract (mole_core.bank): the image bank and the text bank answer the same questions the same way.

Each bank is a copy of one entry of the shipped bank (lora_bank/, text_bank/) plus a manifest without its LoRA
file (a broken entry); both go through the same checks.
"""
from __future__ import annotations

import json
import shutil

import pytest

from mole_core.bank import BankEntryLike, LoraBank, UnknownLora, usable_entry
from mole_core.defaults import DEFAULT_BANK
from mole_core.text.engine import DEFAULT_TEXT_BANK
from mole_core.image.bank import Bank
from mole_core.lora import Lora
from mole_core.text.bank import TextBank


def _copy_entry(src, dst, key, drop_examples=False):
    manifest = json.loads((src / f"{key}.json").read_text())
    if drop_examples:                       # the image examples are files of their own; not needed here
        manifest["examples"] = []
    (dst / f"{key}.json").write_text(json.dumps(manifest))
    shutil.copyfile(src / f"{key}.safetensors", dst / f"{key}.safetensors")


@pytest.fixture(params=["image", "text"])
def bank(request, tmp_path):
    """A bank of the wing: one good entry ('good'; its trigger given as a string) and one broken ('orphan')."""
    src, cls = (DEFAULT_BANK, Bank) if request.param == "image" else (DEFAULT_TEXT_BANK, TextBank)
    src = type(tmp_path)(src)
    if not src.is_dir():
        pytest.skip("the shipped bank is not in this checkout")
    key = sorted(p.stem for p in src.glob("*.safetensors"))[0]
    _copy_entry(src, tmp_path, key, drop_examples=request.param == "image")
    (tmp_path / f"{key}.json").rename(tmp_path / "good.json")
    (tmp_path / f"{key}.safetensors").rename(tmp_path / "good.safetensors")
    manifest = json.loads((tmp_path / "good.json").read_text())
    (tmp_path / "good.json").write_text(json.dumps({**manifest, "trigger": "word"}))
    (tmp_path / "orphan.json").write_text(json.dumps({"name": "Orphan", "kind": manifest["kind"]}))
    return cls(tmp_path)


def test_both_banks_keep_the_contract(bank):
    assert isinstance(bank, LoraBank)
    entries = bank.entries                                   # a property on both
    assert all(isinstance(e, BankEntryLike) for e in entries)
    assert bank.keys() == [e.key for e in entries] == ["good", "orphan"]
    assert bank.usable_keys() == ["good"]
    good, orphan = bank.get("good"), bank.get("orphan")      # get finds a broken entry too
    assert good.error is None and good.trigger == ["word"]   # a string trigger is a list of one word
    assert orphan.error and orphan.trigger == [] and orphan.lora_path is None
    assert isinstance(good.default_weight, float) and isinstance(good.examples, list)


def test_unknown_and_broken_keys_fail_the_same_way(bank):
    with pytest.raises(KeyError) as info:
        bank.get("nope")
    assert isinstance(info.value, UnknownLora)
    assert str(info.value) == "Unknown LoRA 'nope': the bank holds good."   # the sentence, without quotes
    with pytest.raises(ValueError, match="Unknown LoRA 'nope'"):
        usable_entry(bank, "nope")
    with pytest.raises(ValueError, match="of the bank cannot be used"):
        usable_entry(bank, "orphan")
    with pytest.raises(ValueError):
        bank.load("orphan")
    assert usable_entry(bank, "good") is bank.get("good")


def test_load_names_the_lora_by_its_key_and_rescan_reads_again(bank):
    lora = bank.load("good")
    assert isinstance(lora, Lora) and lora.name == "good" and lora.modules
    assert bank.load("good") is lora                         # read once
    (bank.folder / "orphan.json").unlink()
    bank.rescan()
    assert bank.keys() == ["good"]
