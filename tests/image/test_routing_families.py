"""Trigger routing (the default gate, mix.DEFAULT_GATE = "routed") on every family, on tiny pipelines built from
config and opened from their folders: SD 1.x, SDXL (two CLIP encoders, concatenated hidden states, pooled
embeddings), SD3 (CLIP-L, CLIP-G and T5 in one joint sequence) and FLUX (T5 text in the joint attention, CLIP
pooled). Through the Engine and through `generate --method mole` with no --gate:

- a prompt without triggers renders the base model bit for bit; a prompt naming a trigger differs from it;
- the triggers are split by the real tokenizer kinds (CLIP's BPE with merges: "catdog" -> ca · t · dog</w>;
  T5's sentencepiece Unigram: ▁cat · d · o · g; a trigger phrase of two words, "sks style"), and every text
  encoder finds them with its own tokenizer; the denoiser finds each encoder's tokens inside its text;
- the image tokens' attention mass on each expert's phrase is recorded (SD3 / FLUX: inside the joint sequence,
  the softmax over text and image tokens, as an explicit softmax gives it);
- where routing cannot run (a LoRA without a trigger) one sentence says so, the engine warns, the CLI prints it,
  the image's label says that the per-token gate ran (an evaluation refuses such a LoRA: its captions name
  each trigger).
"""
from __future__ import annotations

import json
import math

import numpy as np
import PIL.Image
import pytest
import torch
from transformers import T5TokenizerFast

from mole_core.cli import main as cli
from mole_core.defaults import DEFAULT_GATE
from mole_core.image.engine import Engine, GenerateRequest, Mix
from mole_core.image.families import components, load_pipeline, pipeline_encoders
from mole_core.lora import Lora, LoraWeights
from mole_core.image.lora_files import save_lora
from mole_core.routing import TriggerRouter, trigger_token_ids
from tests import tiny_families
from tests.tiny import WORDS

TRIGGERS = {"a": ["catdog"], "b": ["sks style"]}        # one word split into pieces; a phrase of two words
PLAIN = "a red circle on the left"                      # no trigger
NAMED = "a catdog on the left"                          # expert a's trigger
SIZE = {"sd": 16}                                       # default sides: SD tiny 16 px, the others 32 px

# Modules LoRAs usually adapt, text encoders and both streams of the joint blocks included.
TARGETS = {
    "sd": ["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
           "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
           "unet.up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2",
           "text_encoder.encoder.layers.0.self_attn.q_proj"],
    "sdxl": ["unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
             "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_v",
             "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2",
             "text_encoder.encoder.layers.0.self_attn.q_proj", "text_encoder_2.encoder.layers.1.mlp.fc1"],
    "sd3": ["transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_k_proj",
            "transformer.transformer_blocks.1.ff.net.2", "transformer.transformer_blocks.0.ff_context.net.2",
            "text_encoder.encoder.layers.0.self_attn.q_proj", "text_encoder_2.encoder.layers.0.mlp.fc2"],
    "flux": ["transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.add_q_proj",
             "transformer.transformer_blocks.1.ff.net.2", "transformer.single_transformer_blocks.0.proj_mlp",
             "transformer.single_transformer_blocks.1.attn.to_k", "text_encoder.encoder.layers.0.self_attn.q_proj"],
}


def split_t5_tokenizer() -> T5TokenizerFast:
    """A sentencepiece (Unigram) T5 tokenizer with '▁word' pieces and single letters, so an unknown word such as
    "catdog" is split into pieces (▁cat · d · o · g), as T5 splits rare trigger words."""
    letters = sorted({c for w in WORDS for c in w})
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("▁" + w, -1.0) for w in WORDS] + \
        [(c, -3.0) for c in letters] + [("▁", -2.0)]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=tiny_families.T5_LENGTH)


def make_bank(folder, model_dir, family, triggers=TRIGGERS):
    """Two random LoRAs on the family's TARGETS with these triggers, saved in diffusers format with manifests."""
    comps = components(load_pipeline(str(model_dir)))
    (folder / "examples").mkdir(parents=True)
    for i, key in enumerate(("a", "b")):
        g = torch.Generator().manual_seed(10 + i)
        modules = {}
        for target in TARGETS[family]:
            m = comps.get_submodule(target)
            modules[target] = LoraWeights(A=torch.randn(2, m.in_features, generator=g) * 0.5,
                                          B=torch.randn(m.out_features, 2, generator=g) * 0.5, scale=1.0)
        save_lora(Lora(key, modules, family=family), folder / f"{key}.safetensors")
        image = f"examples/{key}.png"
        PIL.Image.fromarray(np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / image)
        (folder / f"{key}.json").write_text(json.dumps({
            "name": key.upper(), "trigger": triggers[key], "base_model": family,
            "examples": [{"image": image, "caption": f"a photo of {' '.join(triggers[key]) or key}"}]}))
    return folder


def family_dir(family, root):
    """The tiny pipeline of `family` saved as a folder, its T5 (SD3, FLUX) with the splitting tokenizer."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny_families, "build_t5_tokenizer", split_t5_tokenizer)
        return tiny_families.make_family_dir(family, root)


@pytest.fixture(scope="module", params=["sd", "sdxl", "sd3", "flux"])
def setup(request, tmp_path_factory):
    family = request.param
    root = tmp_path_factory.mktemp(f"route_{family}")
    model_dir = family_dir(family, root)
    bank = make_bank(root / "bank", model_dir, family)
    return family, model_dir, bank, Engine(str(model_dir), str(bank))


def ask(family, prompt) -> GenerateRequest:
    side = SIZE.get(family, tiny_families.SIDE)
    return GenerateRequest(prompt, seed=5, steps=2, guidance=3.0, height=side, width=side)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_every_encoder_splits_the_triggers_and_finds_them(setup):
    """Each text encoder's own tokenizer splits "catdog" into pieces and reads "sks style" as two tokens; after a
    render with both triggers every encoder marked both experts, and the denoiser found them in its text."""
    family, _, _, engine = setup
    encoders = pipeline_encoders(engine.pipe)
    assert len(encoders) == {"sd": 1, "sdxl": 2, "sd3": 3, "flux": 2}[family]
    for name, (_, tokenizer) in encoders.items():
        (a,), (b,) = trigger_token_ids(tokenizer, TRIGGERS, ["a", "b"])
        assert len(a) >= 3 and len(b) == 2, (name, tokenizer.convert_ids_to_tokens(list(a)))
    engine.generate(Mix("mole", ("a", "b"), gate=DEFAULT_GATE), ask(family, "a catdog and a sks style square"))
    router = engine._kept.handle.router
    for name in encoders:                        # the prompt's encoding (the negative prompt's has no trigger)
        assert any(maps.amax((0, 1)).tolist() == [1.0, 1.0] for encoder, _, maps in router.recorded
                   if encoder == name), name
    assert router.denoiser_tokens.amax((0, 1)).tolist() == [1.0, 1.0]
    assert router.masses and all(m[..., 0].sum() > 0 and m[..., 1].sum() > 0 for m in router.masses.values())


def test_default_gate_is_the_base_without_triggers_and_routes_with_one(setup):
    """The Engine with the default gate (routed, untrained): a trigger-free prompt is the base image exactly; a
    prompt naming one trigger differs from the base and from the prompt naming the other."""
    family, _, _, engine = setup
    keys, routed = ("a", "b"), Mix("mole", ("a", "b"), gate=DEFAULT_GATE)
    base, mole = engine.compare([Mix("base"), routed], ask(family, PLAIN))
    assert "trigger-routed" in mole.label and "routing off" not in mole.label
    assert np.array_equal(pixels(mole.image), pixels(base.image)), "no trigger: the base model, bit for bit"
    base_a, mole_a, mole_b = (engine.generate(m, ask(family, p)) for m, p in
                              ((Mix("base"), NAMED), (routed, NAMED), (routed, "a sks style on the left")))
    assert not np.array_equal(pixels(mole_a.image), pixels(base_a.image))
    assert engine._kept.handle.router.present[engine.family.denoiser].tolist() == [False, True]
    linear = engine.generate(Mix("linear", keys), ask(family, NAMED))
    assert not np.array_equal(pixels(mole_a.image), pixels(linear.image)), "routed is not the linear merge"
    assert not engine.check([routed], ask(family, NAMED)), "no warning where routing runs"


def test_separate_phrases_run_on_every_family(setup, monkeypatch):
    """The default's rule for prompts naming several subjects (each trigger phrase encoded on its own, by every
    text encoder, T5 included; the cross-attention bias where a UNet has one), here from two subjects on: the
    image changes, and a trigger-free prompt is still the base model bit for bit."""
    from mole_core.mix import ROUTED
    family, _, _, engine = setup
    routed, prompt = Mix("mole", ("a", "b"), gate=DEFAULT_GATE), "a catdog on the left and a sks style square"
    before = engine.generate(routed, ask(family, prompt)).image
    monkeypatch.setitem(ROUTED, "route_compose_from", 2)
    after = engine.generate(routed, ask(family, prompt)).image
    assert not np.array_equal(pixels(after), pixels(before))
    base, mole = engine.compare([Mix("base"), routed], ask(family, PLAIN))
    assert np.array_equal(pixels(mole.image), pixels(base.image))


def test_cli_generate_mole_without_gate_routes(setup, tmp_path, capsys):
    """`generate --method mole` with no --gate on the family's folder: the base image without triggers, another
    image with one; the label names the routed gate."""
    family, model_dir, bank, _ = setup
    side = str(SIZE.get(family, tiny_families.SIDE))

    def generate(method, prompt, name):
        args = ["generate", "--model", str(model_dir), "--bank", str(bank), "--method", method, "--prompt", prompt,
                "--steps", "2", "--seed", "5", "--height", side, "--width", side, "--out", str(tmp_path / name)]
        assert cli(args + (["--lora", "a", "--lora", "b"] if method == "mole" else [])) == 0
        return pixels(PIL.Image.open(tmp_path / name))

    assert np.array_equal(generate("mole", PLAIN, "m0.png"), generate("base", PLAIN, "b0.png"))
    assert "trigger-routed" in capsys.readouterr().out
    assert not np.array_equal(generate("mole", NAMED, "m1.png"), generate("base", NAMED, "b1.png"))


def test_joint_attention_mass_is_the_softmax_over_the_joint_sequence():
    """JointRecordingProcessor's masses (the fused kernel's log-sum-exp, the trigger keys only) are the explicit
    softmax over all text and image keys, summed over each expert's tokens and averaged over heads; the output
    is scaled dot-product attention."""
    router = TriggerRouter(torch.nn.ModuleDict({"transformer": torch.nn.Linear(2, 2)}), 2)
    g = torch.Generator().manual_seed(0)
    B, H, L, T, d = 2, 3, 5, 7, 8
    q, k, v = (torch.randn(B, H, L + T, d, generator=g) for _ in range(3))
    tokens = torch.zeros(B, L, 2)
    tokens[0, 1, 0] = tokens[0, 2, 0] = tokens[1, 4, 1] = tokens[0, 4, 1] = 1.0
    router.denoiser_tokens = tokens
    router.columns = tokens.amax((0, 2)).nonzero().flatten()
    router.column_tokens = tokens[:, router.columns]
    out = router.joint_attention(q, k, v, text_start=0, image=slice(L, L + T))       # FLUX: [text, image]
    probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)                 # (B, H, S, S)
    expected = probs[:, :, L:, :L].mean(1) @ tokens                                   # (B, T, 2)
    torch.testing.assert_close(router.masses[T], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-4, atol=1e-5)
    router.masses = {}
    router.joint_attention(q, k, v, text_start=T, image=slice(0, T))                 # SD3: [image, text]
    expected = probs[:, :, :T, T:T + L].mean(1) @ tokens
    torch.testing.assert_close(router.masses[T], expected, rtol=1e-4, atol=1e-6)


def test_a_lora_without_trigger_falls_back_visibly(tmp_path, capsys):
    """A LoRA without a trigger: the engine says so in one sentence, the image is the per-token gate's (its
    label says routing is off), the CLI prints the warning; an evaluation refuses the LoRA with a sentence."""
    from mole_core.defaults import Limits
    from mole_core.studies.image import EvalConfig, plan_evaluation
    model_dir = family_dir("flux", tmp_path)
    bank = make_bank(tmp_path / "bank", model_dir, "flux", triggers={"a": ["catdog"], "b": []})
    engine = Engine(str(model_dir), str(bank), limits=Limits.local())
    routed, request = Mix("mole", ("a", "b"), gate=DEFAULT_GATE), ask("flux", NAMED)
    warnings = engine.check([routed], request)
    assert len(warnings) == 1 and "'b' has no trigger word" in warnings[0] and "per-token gate" in warnings[0]
    got, token = engine.compare([routed, Mix("mole", ("a", "b"), gate="token")], request)
    assert "routing off" in got.label and "trigger-routed" not in got.label
    assert np.array_equal(pixels(got.image), pixels(token.image)), "the per-token gate ran"
    side = str(tiny_families.SIDE)
    assert cli(["generate", "--model", str(model_dir), "--bank", str(bank), "--method", "mole", "--lora", "a",
                "--lora", "b", "--prompt", NAMED, "--steps", "2", "--height", side, "--width", side,
                "--out", str(tmp_path / "m.png")]) == 0
    out = capsys.readouterr()
    assert "warning: The LoRA 'b' has no trigger word" in out.err and "routing off" in out.out
    with pytest.raises(ValueError, match="'b' has no trigger word"):      # an evaluation asks for each trigger
        plan_evaluation(engine.bank, ["a", "b"], EvalConfig(methods=("mole", "base"), gates=("routed",)))
