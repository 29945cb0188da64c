"""The pixel world: renderer, captions, tokenizer, the shipped pipeline, oracle and LoRA bank; the world as an
evaluation suite (captions and the oracle's scorer); the build's wiring."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mole_core.world.pixel import render as world
from mole_core.metrics import Target
from mole_core.world.pixel.oracle import (Oracle, accuracy_on_renders, caption_fidelity, items_satisfied,
                                    subject_fidelity)
from mole_core.world.pixel.scoring import WorldScorer, shipped_oracle, speaks_world, world_plain_prompts, world_prompts
from mole_core.world.pixel.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "assets" / "pixel-world"
BANK = REPO / "lora_bank"
MANIFEST_KEYS = {"name", "trigger", "description", "base_model", "kind", "default_weight", "examples"}


# ---------------------------------------------------------------------------------------------
# Renderer, captions, parser, tokenizer

def test_render_is_32x32_rgb_and_seeds_matter():
    scene = world.Scene((world.WorldObject("left", "circle", "red"),))
    a = world.render(scene, np.random.default_rng(0))
    b = world.render(scene, np.random.default_rng(0))
    c = world.render(scene, np.random.default_rng(1))
    assert a.shape == (32, 32, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)              # same seed, same image
    assert not np.array_equal(a, c)          # jitter: another seed, another image
    # the red circle is on the left: reddest pixels in the left third
    redness = a[..., 0].astype(int) - a[..., 1:].mean(-1)
    assert redness[:, :11].max() > 100 and redness[:, 21:].max() < 30


def test_night_style_is_dark_with_outlines():
    scene = world.Scene((world.WorldObject("center", "square", "yellow"),), style="night")
    img = world.render(scene, np.random.default_rng(0)).astype(int)
    assert img[:, :6].mean() < 60                        # dark background
    assert img[16, 16].sum() > 300                       # the yellow square
    assert img.sum(-1).min() < 40                        # black outline pixels


def test_caption_examples():
    scene = world.Scene((world.WorldObject("left", "circle", "red"), world.WorldObject("right", "square", "blue")))
    assert world.caption(scene) == "a red circle on the left and a blue square on the right"
    scene = world.Scene((world.WorldObject("left", "face", None), world.WorldObject("center", "triangle", "green")),
                        style="night")
    assert world.caption(scene) == "a zwx on the left and a green triangle in the center in nyq style"


def test_parse_caption_round_trips_random_scenes():
    rng = np.random.default_rng(0)
    subjects = tuple(s.key for s in world.SUBJECTS)
    for _ in range(300):
        scene = world.sample_scene(rng, subjects=subjects, style=str(rng.choice(world.STYLE_KEYS)))
        text = world.caption(scene)
        assert world.parse_caption(text) == [(o.position, o.identity, o.colour) for o in scene.objects]
        assert world.scene_from_caption(text) == scene
    assert world.parse_caption("") == []


@pytest.mark.parametrize("bad", ["a red on the left", "a red circle at the left", "red circle on the left",
                                 "a qqq on the right"])
def test_parse_caption_rejects_bad_grammar(bad):
    with pytest.raises(ValueError, match="cannot parse world caption"):
        world.parse_caption(bad)


def test_tokenizer_makes_every_world_word_one_token(tmp_path):
    tok = build_tokenizer(tmp_path)
    for word in world.WORDS:
        assert len(tok.tokenize(word)) == 1, word
    longest = ("a red circle on the left and a blue square in the center and a green triangle on the right "
               "in nyq style")
    ids = tok(longest).input_ids
    assert len(ids) == len(longest.split()) + 2 <= tok.model_max_length
    assert tok.tokenize("hello") == ["h", "e", "l", "l", "o</w>"]       # other words still tokenize


# ---------------------------------------------------------------------------------------------
# The shipped world

def test_shipped_pipeline_loads_with_plain_diffusers_and_generates():
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "sample"
    assert pipe.tokenizer.tokenize("zwx") == ["zwx</w>"]
    image = pipe("a red circle on the left", num_inference_steps=4, guidance_scale=4.0,
                 generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (32, 32)
    assert np.asarray(image).std() > 5          # an image, not a flat colour


@pytest.fixture(scope="module")
def oracle():
    return Oracle.load(MODEL / "oracle")


def test_shipped_oracle_reads_clean_renders(oracle):
    acc = accuracy_on_renders(oracle, np.random.default_rng(12345), 200)
    assert acc["item_accuracy"] >= 0.98, acc


def test_oracle_reads_pil_and_tensor_alike_and_scores_captions(oracle):
    rng = np.random.default_rng(7)
    scenes = [world.sample_scene(rng, subjects=tuple(s.key for s in world.SUBJECTS)) for _ in range(40)]
    pil = [world.render_pil(s, np.random.default_rng(i)) for i, s in enumerate(scenes)]
    tensor = torch.from_numpy(np.stack([np.asarray(p) for p in pil])).permute(0, 3, 1, 2).float() / 255
    from_pil, from_tensor = oracle.read(pil), oracle.read(tensor)
    assert [r.objects() for r in from_pil] == [r.objects() for r in from_tensor]
    captions = [world.caption(s) for s in scenes]
    assert caption_fidelity(from_pil, captions) >= 0.95
    # the same images against shuffled captions mostly fail
    assert caption_fidelity(from_pil, captions[1:] + captions[:1]) < 0.6
    # subject fidelity: a face where the caption puts it
    face_img = world.render_pil(world.Scene((world.WorldObject("right", "face", None),)), rng)
    circle_img = world.render_pil(world.Scene((world.WorldObject("right", "circle", "yellow"),)), rng)
    reads = oracle.read([face_img, circle_img])
    assert subject_fidelity(reads[:1], ["a zwx on the right"], "zwx") > 0.9
    assert subject_fidelity(reads[1:], ["a zwx on the right"], "face") < 0.1
    assert items_satisfied(reads[1], "a yellow circle on the right") == [True]
    with pytest.raises(ValueError, match="no caption mentions"):
        subject_fidelity(reads[:1], ["a red circle on the left"], "zwx")
    with pytest.raises(ValueError, match="float tensors"):
        oracle.read(torch.zeros(1, 3, 16, 16))


def _manifests():
    return sorted(BANK.glob("*.json"))


def test_bank_has_every_subject_and_style():
    names = {p.stem for p in _manifests()}
    assert names == {s.key for s in world.SUBJECTS} | {s.key for s in world.STYLES}


@pytest.mark.parametrize("manifest", _manifests(), ids=lambda p: p.stem)
def test_shipped_manifest_is_complete_and_its_files_exist(manifest):
    data = json.loads(manifest.read_text())
    assert set(data) == MANIFEST_KEYS
    assert data["base_model"] == "pixel-world" and data["kind"] in ("subject", "style")
    assert isinstance(data["trigger"], list) and len(data["trigger"]) == 1
    assert data["name"] and data["description"] and data["default_weight"] == 1.0
    assert (BANK / f"{manifest.stem}.safetensors").is_file()
    assert 8 <= len(data["examples"]) <= 16
    for ex in data["examples"]:
        assert set(ex) == {"image", "caption"}
        assert data["trigger"][0] in ex["caption"].split()
        world.parse_caption(ex["caption"])
        with Image.open(BANK / ex["image"]) as im:
            assert im.format == "PNG" and im.size == (32, 32)


def test_shipped_loras_fit_the_shipped_pipeline_in_both_formats():
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from mole_core.image.lora_files import load_lora, pipeline_components, validate_lora
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    components = pipeline_components(pipe)
    formats = set()
    for manifest in _manifests():
        path = BANK / f"{manifest.stem}.safetensors"
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
        formats.add("kohya" if all(k.startswith(("lora_unet_", "lora_te_")) for k in keys) else "diffusers")
        lora = load_lora(path)
        validate_lora(lora, components)
        assert len(lora.modules) > 0
    assert formats == {"kohya", "diffusers"}


# ---------------------------------------------------------------------------------------------
# The build itself

@pytest.mark.slow
def test_quick_build_regenerates_everything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mole_core.world", "build", "--quick", "--out", str(tmp_path)],
                            cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "BAR base objects correct" in result.stdout
    model = tmp_path / "assets" / "pixel-world"
    report = json.loads((model / "build_report.json").read_text())
    from mole_core.world.pixel.build import STAGES
    assert set(report["stages"]) == set(STAGES)
    from diffusers import StableDiffusionPipeline
    pipe = StableDiffusionPipeline.from_pretrained(model)
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 32
    assert (model / "oracle" / "model.safetensors").is_file()
    assert len(list((tmp_path / "lora_bank").glob("*.json"))) == len(world.SUBJECTS) + len(world.STYLES)


def test_build_refuses_an_unknown_lora_before_training(tmp_path):
    from mole_core.world.pixel.build import BuildConfig, stage_loras
    cfg = BuildConfig.quick_config(tmp_path)
    cfg.loras = ("face", "unicorn")
    with pytest.raises(ValueError, match=r"unknown LoRA\(s\) \['unicorn'\]"):
        stage_loras(cfg)
    assert not (tmp_path / "lora_bank" / "face.safetensors").exists()


def test_lora_scenes_show_their_subject_or_style_with_the_asked_object_counts():
    from mole_core.world.pixel.build import lora_specs
    rng = np.random.default_rng(0)
    for spec in lora_specs():
        for p, n in (((1, 0, 0), 1), ((0, 0, 1), 3)):
            scene = spec.scene(rng, p)
            assert len(scene.objects) == n
            if spec.kind == "subject":
                assert [o.identity for o in scene.objects].count(spec.key) == 1
            else:
                assert scene.style == spec.key


def test_the_world_is_measured_at_the_guidance_the_app_draws_with():
    from mole_core.image.engine import DEFAULT_GUIDANCE, GenerateRequest
    from mole_core.world.pixel.build import BuildConfig
    report = json.loads((REPO / "assets" / "pixel-world" / "build_report.json").read_text())
    assert BuildConfig().guidance == DEFAULT_GUIDANCE == GenerateRequest("x").guidance
    assert report["stages"]["eval"]["settings"]["guidance_scale"] == DEFAULT_GUIDANCE
    assert all(bar["passed"] for bar in report["stages"]["eval"]["bars"].values())


# ---------------------------------------------------------------------------------------------
# The world as an evaluation suite

def test_world_prompts_parse_and_balance_subjects():
    trigger = {s.key: s.trigger for s in world.SUBJECTS}
    targets = [Target(k, trigger[k]) for k in ("face", "ring", "checker", "heart")]
    prompts = world_prompts(targets, 24)
    assert len(set(prompts)) == 24                            # 4 choices of 3 subjects × 6 orders
    for p in prompts:
        items = world.parse_caption(p)
        assert len(items) == 3 and len({pos for pos, _, _ in items}) == 3
    counts = [sum(t.trigger in p.split() for p in prompts) for t in targets]
    assert counts == [18, 18, 18, 18]
    night = Target("night", world.STYLE_BY_KEY["night"].trigger, "style")
    styled = world_prompts([Target("face", "zwx"), night], 4)
    assert all(world.caption_style(p) == "night" and "zwx" in p.split() for p in styled)
    plain = world_plain_prompts(5)
    assert len(plain) == 5 and all(len(world.parse_caption(p)) == 2 for p in plain)
    assert not any(t in p.split() for p in plain for t in world.SUBJECT_BY_TRIGGER)
    assert speaks_world(targets + [night]) and not speaks_world([Target("dog", "sks")])


def test_world_scorer_on_clean_renders():
    assert shipped_oracle(MODEL) == MODEL / "oracle" and shipped_oracle(MODEL / "unet") is None
    scorer = WorldScorer.load(shipped_oracle(MODEL))
    rng = np.random.default_rng(123)
    face, ring = world.SUBJECT_BY_KEY["face"], world.SUBJECT_BY_KEY["ring"]
    scenes = [world.Scene((world.WorldObject("left", "face", None), world.WorldObject("right", "ring", None)))
              for _ in range(8)]
    images = [world.render_pil(s, rng) for s in scenes]
    captions = [world.caption(s) for s in scenes]
    targets = [Target("face", face.trigger), Target("ring", ring.trigger), Target("heart", "hjt")]
    scores = scorer.score(images, captions, targets)
    assert scores["caption_fidelity"].mean() >= 0.9
    assert scores["subject:face"].mean() >= 0.9 and scores["subject:ring"].mean() >= 0.9
    assert np.isnan(scores["subject:heart"]).all()            # no caption asks for the heart
    # the captions swapped: the subjects are not where the caption puts them
    swapped = [c.replace("left", "X").replace("right", "left").replace("X", "right") for c in captions]
    assert scorer.score(images, swapped, targets)["subject:face"].mean() <= 0.5
    # an image agrees with itself; a different scene does not fully
    np.testing.assert_allclose(scorer.preservation(images, images), 1.0)
    other = [world.render_pil(world.Scene((world.WorldObject("center", "square", "blue"),)), rng)
             for _ in range(8)]
    assert scorer.preservation(images, other).mean() < 0.7


def test_build_eval_stage_runs_the_quality_bars_from_the_command_line(tmp_path, monkeypatch):
    from mole_core.world import __main__ as world_main
    from mole_core.world.pixel import build, quality
    assert build.stage_eval is quality.stage_eval
    seen = []
    monkeypatch.setattr(build, "stage_eval", lambda cfg: seen.append(cfg) or {"bars": {}})
    world_main.main(["build", "--stage", "eval", "--out", str(tmp_path)])
    assert [cfg.out for cfg in seen] == [tmp_path]
    report = json.loads((tmp_path / "assets" / "pixel-world" / "build_report.json").read_text())
    assert report["stages"]["eval"]["bars"] == {}
