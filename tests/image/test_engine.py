"""The engine on a tiny pipeline and a tiny bank: every Mix, same seed, nothing left behind."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import PIL.Image
import pytest
import torch

from mole_core.attach import MoleConfig
from mole_core.image.engine import Engine, GenerateRequest, Mix, write_gates_csv
from mole_core.image.lora_files import load_lora
from mole_core.train import TrainConfig
from tests.tiny import LORAS, make_bank, make_model_dir

REQUEST = GenerateRequest(prompt="a photo of sks dog", negative="blue", seed=3, steps=2, guidance=4.0)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(model folder, bank folder) shared by the tests of this file."""
    root = tmp_path_factory.mktemp("engine")
    model_dir = make_model_dir(root)
    return model_dir, make_bank(root / "bank", model_dir)


@pytest.fixture
def engine(world):
    return Engine(str(world[0]), str(world[1]))


def pixels(image: PIL.Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def test_every_method_returns_an_image_and_untrained_mole_is_linear(engine):
    keys = ("dog", "cat", "style")
    mixes = [Mix("mole", keys), Mix("linear", keys), Mix("svd", keys), Mix("base"), Mix("single:cat")]
    results = engine.compare(mixes, REQUEST)
    assert [r.method for r in results] == ["mole", "linear", "svd", "base", "single:cat"]
    assert [r.mix for r in results] == mixes                     # each result carries what it rendered
    for r in results:
        assert r.image.size == (16, 16) and r.seconds > 0 and r.label
    mole, linear, svd, base, single = (pixels(r.image) for r in results)
    assert results[0].gates and all(r.gates is None for r in results[1:])
    assert [r.label for r in results] == ["MoLE (block, 3 experts, untrained)", "Linear merge", "SVD r=2",
                                          "Base model", "Single: Cat"]
    # the LoRAs do change the picture (otherwise the equalities here would prove nothing) ...
    assert np.abs(linear - base).max() > 10 and not np.array_equal(single, base)
    # ... and untrained gates (zero logits) are the equal-weight linear merge, up to float rounding
    assert np.abs(mole - linear).max() <= 1


def test_same_seed_same_latents_and_same_image(engine):
    seen = []
    prepare = engine.pipe.prepare_latents

    def spy(*args, **kwargs):
        latents = prepare(*args, **kwargs)
        seen.append(latents.clone())
        return latents

    engine.pipe.prepare_latents = spy
    mixes = [Mix("mole", ("dog", "cat")), Mix("base")]
    first = engine.compare(mixes, REQUEST)
    again = engine.compare(mixes, REQUEST)
    assert len(seen) == 4 and all(torch.equal(seen[0], s) for s in seen)
    for a, b in zip(first, again):
        assert np.array_equal(pixels(a.image), pixels(b.image)), a.method
    other = engine.generate(Mix("base"), replace(REQUEST, seed=4))
    assert not torch.equal(seen[0], seen[-1]) and not np.array_equal(pixels(other.image), pixels(first[1].image))


def test_calls_leave_the_pipeline_as_they_found_it(engine):
    before = engine.generate(Mix("base"), REQUEST)
    weights_before = {k: v.clone() for k, v in engine.pipe.unet.state_dict().items()}
    keys, weights = ("dog", "cat", "style"), {"dog": 2.0, "cat": 1.0}
    engine.compare([Mix("mole", keys, mask={"cat": False}, strengths={"dog": 0.5}),
                    Mix("linear", keys, weights=weights), Mix("svd", keys, weights=weights, rank=1),
                    Mix("single:dog"), Mix("base")], REQUEST)
    after = engine.generate(Mix("base"), REQUEST)
    assert np.array_equal(pixels(before.image), pixels(after.image))
    # the pristine weights are untouched (the MoLE attachment stays, wrapping them as `.base`)
    weights_after = {k.replace(".base.", "."): v for k, v in engine.pipe.unet.state_dict().items()}
    for name, tensor in weights_before.items():
        assert torch.equal(tensor, weights_after[name]), name


def test_all_experts_masked_is_the_base_model(engine):
    base, off = engine.compare([Mix("base"), Mix("mole", ("dog", "cat"), mask={"dog": False, "cat": False})],
                               REQUEST)
    assert np.array_equal(pixels(off.image), pixels(base.image))
    assert off.label == "MoLE (block, 0 of 2 experts on, untrained)"


def test_two_threads_get_what_they_get_alone(engine):
    import threading
    mixes = [Mix("mole", ("dog", "cat"), mask={"dog": False}),
             Mix("mole", ("dog", "cat"), mask={"cat": False}, strengths={"dog": 2.0})]
    alone = [engine.generate(mix, REQUEST) for mix in mixes]
    together = [None, None]

    def run(i):
        together[i] = engine.generate(mixes[i], REQUEST)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        assert np.array_equal(pixels(a.image), pixels(b.image))
    assert not np.array_equal(pixels(alone[0].image), pixels(alone[1].image))


def test_gates_are_recorded_per_denoising_step(engine, tmp_path):
    result = engine.generate(Mix("mole", ("dog", "cat")), REQUEST)
    unet_rows = [r for r in result.gates if r["group"].startswith("unet")]
    assert {r["step"] for r in unet_rows} == set(range(REQUEST.steps))
    assert {r["sample"] for r in unet_rows} == {0, 1}          # guidance doubles the batch
    assert {r["expert"] for r in unet_rows} == {"dog", "cat"}
    for w in {round(r["weight"], 6) for r in unet_rows}:
        assert w == pytest.approx(0.5)                          # untrained gates: equal weights
    path = write_gates_csv(result.gates, tmp_path / "gates.csv")
    assert path.read_text().splitlines()[0] == "group,step,sample,expert,weight"
    assert len(path.read_text().splitlines()) == len(result.gates) + 1


def test_trained_mixture_is_used_and_checked(engine):
    steps = []
    mixture = engine.train(["dog", "cat"], MoleConfig(granularity="block"),
                           TrainConfig(steps=2, lr=0.05, seed=0),
                           on_step=lambda step, losses, gates: steps.append(step))
    assert steps == [1, 2]
    assert list(mixture.names) == ["dog", "cat"]
    trained = engine.generate(Mix("mole", mixture=mixture), REQUEST)      # keys from the mixture
    assert trained.mix.keys == ("dog", "cat")
    untrained = engine.generate(Mix("mole", ("dog", "cat")), REQUEST)
    weights = {round(r["weight"], 6) for r in trained.gates if r["group"].startswith("unet")}
    assert weights != {0.5}                                      # trained gates are not equal weights
    assert untrained.label == "MoLE (block, 2 experts, untrained)" and trained.label == "MoLE (block, 2 experts)"
    again = engine.generate(Mix("mole", ("dog", "cat"), mixture=mixture), REQUEST)
    assert np.array_equal(pixels(trained.image), pixels(again.image))
    with pytest.raises(ValueError, match="trained for the LoRAs dog, cat"):
        engine.generate(Mix("mole", ("dog", "style"), mixture=mixture), REQUEST)


@pytest.mark.parametrize("keys, request_, message", [
    (("wolf",), REQUEST, "Unknown LoRA 'wolf'"),
    ((), REQUEST, "No LoRA is selected"),
    (("dog",), replace(REQUEST, steps=0), "Steps must be a whole number between"),
    (("dog",), replace(REQUEST, steps=10_000), "Steps must be a whole number between"),
    (("dog",), replace(REQUEST, guidance=-1.0), "Guidance must be between"),
    (("dog",), replace(REQUEST, height=20), "Height must be a multiple of 8"),
])
def test_bad_input_is_refused_with_a_sentence(engine, keys, request_, message):
    with pytest.raises(ValueError, match=message):
        engine.generate(Mix("linear", keys), request_)


def test_unknown_method_and_mask_are_refused(engine):
    with pytest.raises(ValueError, match="Unknown method 'blend'"):
        engine.generate(Mix("blend", ("dog",)), REQUEST)
    with pytest.raises(ValueError, match="Unknown LoRA 'wolf'"):
        engine.generate(Mix("single:wolf"), REQUEST)
    with pytest.raises(ValueError, match="not in the selection"):
        engine.generate(Mix("mole", ("dog", "cat"), mask={"style": False}), REQUEST)
    with pytest.raises(ValueError, match="No method is chosen"):
        engine.compare([], REQUEST)


def test_long_prompt_is_warned_with_the_cut_words(engine):
    fits = engine.check([Mix("linear", ("dog",))], REQUEST)
    assert fits == []
    words = "a red circle on the left and a blue square on the right and a green triangle in the center"
    warnings = engine.check([Mix("linear", ("dog",))], replace(REQUEST, prompt=words))
    assert len(warnings) == 1 and "prompt" in warnings[0]
    cut = engine.truncated_words(words)
    assert cut and words.endswith(cut.split()[-1]) and cut in warnings[0]
    kept = len(engine.pipe.tokenizer(words, add_special_tokens=False)["input_ids"]) - len(
        engine.pipe.tokenizer(cut, add_special_tokens=False)["input_ids"])
    assert kept == engine.pipe.tokenizer.model_max_length - 2


def test_export_and_snippet(engine, world, tmp_path, monkeypatch):
    out = engine.export(Mix("svd", ("dog", "cat"), rank=1), tmp_path / "merged.safetensors")
    assert out == tmp_path / "merged.safetensors" and out.stat().st_size > 0
    exported = load_lora(out)
    assert set(exported.modules) == set(LORAS["dog"]) | set(LORAS["cat"])
    assert {w.rank for w in exported.modules.values()} == {1}
    with pytest.raises(ValueError, match=r"Only the merges \(linear, svd, ties, dare\)"):
        engine.export(Mix("mole", ("dog", "cat")), tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    mix = Mix("linear", ("dog", "cat"), weights={"dog": 0.7, "cat": 0.3})
    code = engine.snippet([mix], REQUEST)
    # the snippet names the model and bank folders by name (as a user has them): run it from their parent
    monkeypatch.chdir(world[0].parent)
    namespace = {"kept": {}}
    exec(compile(code.replace("result.image.save(", "kept.__setitem__(result.method, result.image) or (lambda p: p)("),
                 "<snippet>", "exec"), namespace)
    assert set(namespace["kept"]) == {"linear"} and namespace["mixes"] == [mix]
    expected = engine.generate(mix, REQUEST)
    assert np.array_equal(pixels(namespace["kept"]["linear"]), pixels(expected.image))
