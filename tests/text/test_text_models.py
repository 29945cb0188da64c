"""Real text models: any transformers causal LM or seq2seq model from a folder, with PEFT LoRA adapter folders
(adapter_config.json + adapter_model.safetensors) read by PEFT itself. Tiny random Llama and T5 built from
config, saved with save_pretrained, adapters saved by peft; nothing downloaded.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

from mole_core.lora import LoraFileError
from mole_core.merge import merge_loras, merged_weights
from mole_core.mix import Mix
from mole_core.text.engine import TextEngine, decode, is_text_model, load_text_model
from mole_core.world.text.tokenizer import build_tokenizer
from mole_core.train import TrainConfig
from mole_core.attach import MoleConfig

PROMPTS = ["reverse: abc", "upper: hello"]


def _save_world(folder: Path, kind: str) -> tuple[Path, Path]:
    """(model folder, bank with PEFT adapter folders 'a' and 'b', 'b' with an alpha pattern)."""
    torch.manual_seed(0)
    model_dir, bank = folder / kind, folder / f"{kind}-bank"
    tok = build_tokenizer(model_dir)
    if kind == "llama":
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                             pad_token_id=0, eos_token_id=1, bos_token_id=1)
        model, targets = LlamaForCausalLM(config), ["q_proj", "v_proj", "up_proj"]
    else:
        config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        model, targets = T5ForConditionalGeneration(config), ["q", "v", "wo"]
    model.save_pretrained(model_dir)
    for i, key in enumerate(("a", "b")):
        base = (LlamaForCausalLM if kind == "llama" else T5ForConditionalGeneration).from_pretrained(model_dir)
        torch.manual_seed(10 + i)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False,
                         alpha_pattern={targets[1]: 16} if key == "b" else {})
        peft_model = get_peft_model(base, cfg)
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.5)
        peft_model.save_pretrained(bank / key)
    (bank / "a.json").write_text(json.dumps({"name": "A", "kind": "text", "task": "reverse", "description": "a",
                                             "examples": [{"input": "reverse: abc", "output": "cba"},
                                                          {"input": "reverse: hey", "output": "yeh"}]}))
    return model_dir, bank


@pytest.fixture(scope="module", params=["llama", "t5"])
def world(request, tmp_path_factory):
    return request.param, *_save_world(tmp_path_factory.mktemp("textmodels"), request.param)


def _logits(model, tok, prompts=PROMPTS):
    ids = tok(prompts[0]).input_ids
    x = torch.tensor([ids])
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=x, decoder_input_ids=torch.tensor([[0, 5, 6]])).logits
        return model(input_ids=x).logits


def test_folder_kind_and_loading(world):
    kind, model_dir, bank = world
    assert is_text_model(model_dir)
    model, tok = load_text_model(model_dir)
    assert model.config.is_encoder_decoder == (kind == "t5")
    engine = TextEngine(model_dir, bank)
    assert engine.bank.keys() == ["a", "b"]                   # 'b' has no manifest: a PEFT folder needs none
    assert engine.bank.get("b").examples == []


def test_a_peft_adapter_is_read_as_peft_applies_it(world):
    """single:KEY == PeftModel.from_pretrained(base, KEY folder) (alpha patterns included); the model is left
    as found after the read."""
    kind, model_dir, bank = world
    engine = TextEngine(model_dir, bank)
    model, tok = engine.model, engine.tokenizer
    base = _logits(model, tok)
    for key in ("a", "b"):
        reference = PeftModel.from_pretrained(load_text_model(model_dir)[0], str(bank / key)).eval()
        want = _logits(reference, tok)
        assert torch.equal(_logits(model, tok), base)          # reading the adapter left the model bare
        with merged_weights(model, engine.lora(key)):
            got = _logits(model, tok)
        assert torch.allclose(got, want, atol=1e-4), (kind, key, (got - want).abs().max())
        assert not torch.allclose(got, base, atol=1e-3)
    assert not any("lora" in n for n, _ in model.named_modules())


def test_untrained_mole_is_the_linear_merge_and_one_hot_is_the_single_lora(world):
    kind, model_dir, bank = world
    engine = TextEngine(model_dir, bank)
    keys = ("a", "b")
    assert engine.answer(Mix("mole", keys), PROMPTS)[0] == engine.answer(Mix("linear", keys), PROMPTS)[0]
    engine.release()                                          # the bare model again (no MoLE attached)
    model, tok = engine.model, engine.tokenizer
    loras = [engine.lora(k) for k in keys]
    with merged_weights(model, merge_loras(loras, method="linear")):
        want = _logits(model, tok)
    handle = engine._attached(keys, MoleConfig(gate="token"))
    handle.reset_gates()
    got = _logits(model, tok)
    assert torch.allclose(got, want, atol=1e-4)
    with handle.settings(gates={"a": 0.0, "b": 1.0}):
        one_hot = _logits(model, tok)
    engine.release()
    with merged_weights(model, loras[1]):
        single = _logits(model, tok)
    assert torch.allclose(one_hot, single, atol=1e-4)


def test_gates_train_on_a_causal_and_a_seq2seq_model(world):
    kind, model_dir, bank = world
    engine = TextEngine(model_dir, bank)
    pairs = [("reverse: abc", "cba"), ("reverse: hey", "yeh")]
    mixture = engine.train(("a", "b"), MoleConfig(gate="sample"), TrainConfig(steps=6, lr=5e-2, batch_size=2),
                           pairs=pairs)
    assert mixture.meta["steps"] == 6 and any(abs(g - 0.5) > 1e-4 for g in mixture.meta["mean_gates"])
    result = engine.generate(Mix("mole", ("a", "b"), mixture=mixture), "reverse: abc")
    assert result.token_gates is not None and len(result.token_gates) == len(result.tokens)
    together = decode(engine.model, engine.tokenizer, ["reverse: abc", "upper: hello", "reverse: xyz"], 6)
    alone = [decode(engine.model, engine.tokenizer, [p], 6)[0] for p in ["reverse: abc", "upper: hello", "reverse: xyz"]]
    assert together == alone                                  # batched (no padding) == one by one


def test_bad_adapter_folders_are_refused_by_name(tmp_path, world):
    kind, model_dir, bank = world
    engine = TextEngine(model_dir, bank)
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    (bad / "adapter_model.safetensors").write_bytes(b"\0" * 16)
    from mole_core.text.lora_io import load_peft_adapter
    with pytest.raises(LoraFileError, match="broken"):
        load_peft_adapter(bad, engine.model)
    assert str(tmp_path) not in str(pytest.raises(LoraFileError, load_peft_adapter, bad, engine.model).value)
