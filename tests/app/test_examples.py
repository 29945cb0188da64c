"""Every example prompt the app offers composes what it names on the shipped world with the defaults: MoLE
with the default gate (trigger routing, untrained as a first Compare runs it), seed 0, the default steps and
guidance; the world's oracle finds each named subject at its place. The README's routed `generate` line
(after its `train-gates`) is checked the same way, slow."""
from __future__ import annotations

import pytest

import app
from ui import compare_tab
from mole_core.defaults import DEFAULT_DENOISE_STEPS, DEFAULT_GATE, DEFAULT_GUIDANCE, TRAIN_BATCH, TRAIN_LR, TRAIN_STEPS
from mole_core.image.engine import GenerateRequest
from mole_core.mix import Mix, mole_config_for
from mole_core.train import TrainConfig
from mole_core.world.pixel import oracle as world_oracle


@pytest.fixture(scope="module")
def oracle(world_engine):
    return world_oracle.Oracle.load(f"{world_engine.model_id}/oracle")


def reads(oracle, image, caption: str) -> list[bool]:
    return world_oracle.items_satisfied(oracle.read([image])[0], caption)


def test_the_examples_are_pairs_that_select_their_loras(world_engine):
    examples = compare_tab.prompt_examples(world_engine.bank)
    assert len(examples) >= 2
    for caption in examples:
        keys = compare_tab.example_keys(world_engine.bank, caption)
        assert len(keys) == 2 and all(world_engine.bank.get(k).kind == "subject" for k in keys), caption


@pytest.mark.parametrize("index", [0, 1])
def test_each_app_example_draws_every_subject_it_names(world_engine, oracle, index):
    examples = compare_tab.prompt_examples(world_engine.bank)
    if index >= len(examples):
        pytest.skip("fewer examples")
    caption = examples[index]
    keys = compare_tab.example_keys(world_engine.bank, caption)
    request = GenerateRequest(prompt=caption, seed=0, steps=DEFAULT_DENOISE_STEPS, guidance=DEFAULT_GUIDANCE)
    result = world_engine.generate(Mix("mole", keys, gate=DEFAULT_GATE), request)
    assert reads(oracle, result.image, caption) == [True, True], caption


def readme_routed_example() -> tuple[list[str], str, int]:
    """(LoRA keys of its `train-gates`, prompt and seed of its `generate --method mole`) as README.md writes them."""
    import re
    import shlex
    from pathlib import Path
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text().replace("\\\n", " ")
    lines = [shlex.split(line) for line in text.splitlines() if line.startswith("python -m mole_core ")]
    train = next(w for w in lines if w[3] == "train-gates" and "--model" not in w)
    generate = next(w for w in lines if w[3] == "generate" and w[w.index("--method") + 1] == "mole")
    assert "--gate" not in train, "the README's example trains the default gate"
    keys = [train[i + 1] for i, w in enumerate(train) if w == "--lora"]
    return keys, generate[generate.index("--prompt") + 1], int(generate[generate.index("--seed") + 1])


@pytest.mark.slow
def test_the_readme_routed_generate_example_draws_both(world_engine, oracle):
    """README: `train-gates --lora face --lora ring` (the default gate: routed), then `generate --method mole
    --mixture ... --prompt "a zwx on the left and a qlo on the right" --seed S`, read from README.md itself."""
    keys, caption, seed = readme_routed_example()
    mixture = world_engine.train(keys, mole_config_for("block", DEFAULT_GATE),
                                 TrainConfig(steps=TRAIN_STEPS, lr=TRAIN_LR, batch_size=TRAIN_BATCH, seed=0,
                                             balance_alpha=0.0))
    request = GenerateRequest(prompt=caption, seed=seed, steps=DEFAULT_DENOISE_STEPS, guidance=DEFAULT_GUIDANCE)
    result = world_engine.generate(Mix("mole", tuple(keys), mixture=mixture), request)
    assert reads(oracle, result.image, caption) == [True, True], (caption, seed)
