"""The text half: text LoRAs on a transformers seq2seq model (the text world, mole_core.world.text) and the
TextEngine. Equivalences on a tiny random encoder-decoder (BART layout) built from config; nothing downloaded. When the built text world
is in the repo (assets/text-world, text_bank), its shipped LoRAs are checked against their bars on a few
held-out items.
"""
import json
from pathlib import Path

import pytest
import torch

from mole_core.attach import MoleConfig, attach
from mole_core.lora import Lora, LoraFileError, LoraWeights
from mole_core.image.lora_files import load_lora
from mole_core.merge import merge_loras, merged_weights
from mole_core.mix import Mix
from mole_core.text.engine import DEFAULT_TEXT_BANK, DEFAULT_TEXT_MODEL, TextEngine
from mole_core.text.bank import TextBank
from mole_core.world.text import (BANK_TASKS, DISTRACTOR_TASKS, LORA_TASKS, composed, greedy, load_model, load_text_lora,
                                save_text_lora)
from mole_core.world.text.build import batch_tensors
from mole_core.world.text.config import LORA_TARGETS, TextBuildConfig
from mole_core.world.text.quality import BARS, held_out_sets, score
from mole_core.world.text.tasks import is_held_out, sample_items
from mole_core.world.text.tokenizer import build_tokenizer
from mole_core.train import TrainConfig, train_gates
from mole_core.text.task import TokenTask
from transformers import BartForConditionalGeneration

PROMPTS = ["reverse: abc", "upper: hello", "reverse upper: xyz", "copy: abcd"]


def random_lora(model, name: str, seed: int, rank: int = 4, std: float = 0.3) -> Lora:
    """A random LoRA on every attention / MLP Linear of `model` (B non-zero, so it changes outputs)."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for key, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and key.rsplit(".", 1)[-1] in LORA_TARGETS:
            modules[key] = LoraWeights(A=torch.randn(rank, m.in_features, generator=g) * std,
                                       B=torch.randn(m.out_features, rank, generator=g) * std, scale=0.5)
    return Lora(name=name, modules=modules)


@pytest.fixture
def tiny(tmp_path_factory):
    """(model, tokenizer, bank folder with two random LoRAs 'alpha' and 'beta')."""
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("textworld")
    tok = build_tokenizer(folder / "model")
    model = BartForConditionalGeneration(TextBuildConfig.quick_config(folder).model_config(len(tok))).eval()
    bank = folder / "bank"
    bank.mkdir()
    for i, key in enumerate(("alpha", "beta")):
        save_text_lora(random_lora(model, key, seed=i + 1), bank / f"{key}.safetensors")
        (bank / f"{key}.json").write_text(json.dumps({
            "name": key.capitalize(), "kind": "text", "task": key, "trigger": key, "description": f"{key} task",
            "examples": [{"input": f"{key}: abc", "output": "cba"}, {"input": f"{key}: xyz", "output": "XYZ"}]}))
    return model, tok, bank


def logits(model, tok, prompts=("reverse: abc", "reverse: hey")):
    """Teacher-forced logits on a fixed batch (same length prompts: no padding)."""
    enc = tok(list(prompts), return_tensors="pt")
    dec = torch.tensor([[0, 5, 6, 7]] * len(prompts))
    with torch.no_grad():
        return model(input_ids=enc.input_ids, decoder_input_ids=dec).logits


def test_text_lora_file_round_trip(tiny, tmp_path):
    model, _, _ = tiny
    lora = random_lora(model, "x", seed=7)
    path = save_text_lora(lora, tmp_path / "x.safetensors")
    back = load_text_lora(path)
    assert set(back.modules) == set(lora.modules)
    for key, w in lora.modules.items():
        b = back.modules[key]
        assert torch.allclose(b.scale * b.B @ b.A, w.scale * w.B @ w.A, atol=1e-5)
    with pytest.raises(LoraFileError):        # the pipeline reader refuses a bare model's keys (why lora_io exists)
        load_lora(path)


def test_untrained_mole_equals_linear_merge(tiny):
    model, tok, bank = tiny
    loras = [load_text_lora(bank / f"{k}.safetensors", name=k) for k in ("alpha", "beta")]
    with merged_weights(model, merge_loras(loras, method="linear")):
        want = logits(model, tok)
    for gate in ("sample", "token"):
        handle = attach(model, loras, MoleConfig(gate=gate))
        try:
            got = logits(model, tok)
        finally:
            handle.detach()
        assert torch.allclose(got, want, atol=1e-4), (gate, (got - want).abs().max())
    engine = TextEngine((model, tok), bank)
    keys = ("alpha", "beta")
    mole, _, _ = engine.answer(Mix("mole", keys), PROMPTS)
    linear, _, _ = engine.answer(Mix("linear", keys), PROMPTS)
    assert mole == linear


def test_one_hot_gate_equals_single_lora(tiny):
    model, tok, bank = tiny
    loras = [load_text_lora(bank / f"{k}.safetensors", name=k) for k in ("alpha", "beta")]
    with merged_weights(model, loras[1]):
        want = logits(model, tok)
    base = logits(model, tok)
    handle = attach(model, loras, MoleConfig())
    try:
        with handle.settings(gates={"alpha": 0.0, "beta": 1.0}):
            got = logits(model, tok)
    finally:
        handle.detach()
    assert torch.allclose(got, want, atol=1e-4)
    assert torch.equal(logits(model, tok), base)          # detached: bit-identical base
    engine = TextEngine((model, tok), bank)
    with merged_weights(model, loras[1]):
        direct = greedy(model, tok, PROMPTS, engine.max_new_tokens)
    assert engine.answer(Mix("single:beta"), PROMPTS)[0] == direct


def test_gate_training_lowers_token_loss(tiny):
    model, tok, bank = tiny
    loras = [load_text_lora(bank / f"{k}.safetensors", name=k) for k in ("alpha", "beta")]
    pairs = [(f"reverse: {w}", w[::-1]) for w in ("abc", "hello", "xyz", "mole")]
    batch = batch_tensors(tok, pairs)
    handle = attach(model, loras, MoleConfig(gate="token"))
    try:
        with torch.no_grad():
            before = model(**batch).loss.item()
        result = train_gates(handle, TokenTask(model, tok, pairs), TrainConfig(steps=15, lr=5e-2, batch_size=4,
                                                                               balance_alpha=0.0))
        with torch.no_grad():
            after = model(**batch).loss.item()
    finally:
        handle.detach()
    assert result.steps == 15
    assert after < before, (before, after)


def test_engine_compare_and_refusals(tiny):
    model, tok, bank = tiny
    engine = TextEngine((model, tok), bank)
    keys = ("alpha", "beta")
    mixes = [Mix("mole", keys), Mix("mole", keys, gate="token"), Mix("linear", keys), Mix("svd", keys, rank=2),
             Mix("ties", keys), Mix("dare", keys), Mix("base"), Mix("single:alpha")]
    base_before = logits(model, tok)
    results = engine.compare(mixes, "reverse upper: abc")
    assert [r.method for r in results] == [m.method for m in mixes]
    assert all(isinstance(r.text, str) and r.seconds > 0 for r in results)
    assert results[0].gates and results[2].gates is None
    base_text = engine.generate(Mix("base"), "copy: abc").text
    engine.release()
    assert base_text == greedy(model, tok, ["copy: abc"], 24)[0]   # experts off == the bare model
    assert torch.equal(logits(model, tok), base_before)     # every call left the model as it found it
    for bad in (Mix("switch", keys), Mix("single:nope")):
        with pytest.raises(ValueError):
            engine.generate(bad, "copy: abc")
    with pytest.raises(ValueError, match="'freefuse' works per denoising step"):
        engine.generate(Mix("freefuse", keys), "copy: abc")
    with pytest.raises(ValueError, match="Regions place experts in an image"):
        engine.generate(Mix("mole", keys, regions={"alpha": "left"}), "copy: abc")
    mixture = engine.train(keys, MoleConfig(), TrainConfig(steps=3, lr=1e-2, batch_size=2))
    assert mixture.names == list(keys)
    assert engine.generate(Mix("mole", keys, mixture=mixture), "alpha: abc").label.startswith("MoLE (block")


def test_tiny_bank_manifests_parse(tiny, tmp_path):
    _, _, bank = tiny
    entries = TextBank(bank).entries
    assert [e.key for e in entries] == ["alpha", "beta"] and all(e.error is None for e in entries)
    assert entries[0].examples[0] == ("alpha: abc", "cba")
    (tmp_path / "broken.json").write_text('{"kind": "subject"}')
    assert TextBank(tmp_path).entries[0].error


def test_tasks_and_held_out_words():
    assert composed("reverse", "upper").item("abc") == ("reverse upper: abc", "CBA")
    assert composed("drop", "upper").item("abc") == ("drop upper: abc", "BC")
    assert DISTRACTOR_TASKS["swap"].item("abcde") == ("swap: abcde", "badce")
    assert len(LORA_TASKS) >= 5 and len(BANK_TASKS) == 16 and not set(LORA_TASKS) & set(DISTRACTOR_TASKS)
    import numpy as np
    from mole_core.world.text.tasks import BASE_TASKS
    items = sample_items(LORA_TASKS["reverse"], np.random.default_rng(0), 50, held_out=True)
    assert all(is_held_out(p.split(": ")[1]) for p, _ in items)
    copies = sample_items(BASE_TASKS["copy"], np.random.default_rng(0), 50)
    assert {a.isupper() for _, a in copies} == {True, False}      # the base writes capitals too (upper's LoRA needs it)


def test_tokenizer_round_trip(tmp_path):
    from transformers import AutoTokenizer
    build_tokenizer(tmp_path)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "reverse upper: abc XYZ 12 + 7"
    ids = tok(text).input_ids
    assert ids[-1] == tok.eos_token_id and len(ids) == len(text) - len("reverse upper") + 3 + 1   # 2 word tokens, eos
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.tokenize("copy: xheadq") == ["copy", ":", " ", *"xheadq"]       # words inside an input: letters
    assert tok.tokenize("drop upper: ab") == ["drop", " ", "upper", ":", " ", "a", "b"]


# ---- the shipped text world ---------------------------------------------------------------------

BUILT = (Path(DEFAULT_TEXT_MODEL) / "config.json").exists() and Path(DEFAULT_TEXT_BANK).is_dir()
needs_world = pytest.mark.skipif(not BUILT, reason="the text world is not built (python -m mole_core.world.text build)")


@needs_world
def test_shipped_bank_manifests_parse():
    entries = TextBank(DEFAULT_TEXT_BANK).entries
    assert {e.key for e in entries} == set(BANK_TASKS)
    for e in entries:
        assert e.error is None and e.trigger == [e.key] and e.task == e.key and len(e.examples) >= 4
        assert all(not is_held_out(i.split(": ", 1)[1]) for i, _ in e.examples)
        role = json.loads((Path(DEFAULT_TEXT_BANK) / f"{e.key}.json").read_text())["role"]
        assert role == ("main" if e.key in LORA_TASKS else "distractor")


def test_a_bank_that_is_no_folder_says_so(tmp_path):
    """A missing bank folder, or a file given as one, is named as such (not "it has no LoRA")."""
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(ValueError, match="The bank folder '.*missing' does not exist"):
        TextBank(tmp_path / "missing").get("reverse")
    with pytest.raises(ValueError, match="The bank folder '.*file.json' is not a folder"):
        TextBank(tmp_path / "file.json").get("reverse")
    with pytest.raises(KeyError, match="Unknown LoRA 'reverse': the bank holds no LoRAs"):
        TextBank(tmp_path).get("reverse")


def _report_bars():
    return json.loads((Path(DEFAULT_TEXT_MODEL) / "build_report.json").read_text())["stages"]["eval"]["bars"]


@needs_world
def test_shipped_loras_match_their_report_on_10_items():
    """The shipped files are the ones measured: each LoRA that passed its bar answers 9 of its first 10
    held-out items (the first 10 of the report's 100), each main LoRA too."""
    model, tok = load_model(DEFAULT_TEXT_MODEL)
    sets = held_out_sets(TextBuildConfig(), 10)
    bars = _report_bars()
    for key in BANK_TASKS:
        if key in LORA_TASKS or bars[f"lora_{key}_exact_match"]["passed"]:
            with merged_weights(model, load_text_lora(Path(DEFAULT_TEXT_BANK) / f"{key}.safetensors")):
                assert score(model, tok, sets[key])["exact_match"] >= 0.9, key


@needs_world
def test_build_report_bars_pass():
    """Every LoRA's bar is in the report with its role; every main one passed; a failed one says so."""
    bars = _report_bars()
    assert set(bars) == {f"lora_{k}_exact_match" for k in BANK_TASKS}
    for key, bar in ((k.removeprefix("lora_").removesuffix("_exact_match"), b) for k, b in bars.items()):
        assert bar["role"] == ("main" if key in LORA_TASKS else "distractor")
        assert bar["bar"] == BARS["lora"] and bar["passed"] == (bar["figure"] >= bar["bar"])
    assert all(bars[f"lora_{k}_exact_match"]["passed"] for k in LORA_TASKS), bars


@pytest.mark.slow
def test_quick_build_runs(tmp_path):
    from mole_core.world.text.build import run_build
    report = run_build(TextBuildConfig.quick_config(tmp_path))
    assert set(report["stages"]) == {"base", "loras", "eval"}
    assert (tmp_path / "text_bank" / "reverse.safetensors").exists()
    assert load_model(tmp_path / "assets" / "text-world")[0].config.is_encoder_decoder
