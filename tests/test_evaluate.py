"""Evaluation: prompts, scoring, tables and outputs.

Most tests run on a *scripted* engine that draws exactly the scene a caption describes with the world's
renderer, except where a method is told to drop a subject or change the style, and on a perfect oracle
that reads back the scene each image was drawn from (with the real world's fidelity functions). So
every number the evaluation reports can be checked by hand.
"""
from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mole_core import evaluate as ev
from mole_core.metrics import Target, WorldScorer

world = importlib.import_module("mole_core.world.render")      # the package re-exports a function `render`
world_oracle = importlib.import_module("mole_core.world.oracle")

FACE, RING, CHECKER, NIGHT = "face", "ring", "checker", "night"
TRIGGER = {s.key: s.trigger for s in world.SUBJECTS} | {s.key: s.trigger for s in world.STYLES}


@dataclass
class Entry:
    key: str
    trigger: list
    kind: str
    examples: list = field(default_factory=list)


class Bank:
    def __init__(self, keys):
        self.entries = [Entry(k, [TRIGGER[k]], "style" if k == NIGHT else "subject") for k in keys]

    def get(self, key):
        return next(e for e in self.entries if e.key == key)


@dataclass
class FakeResult:
    image: Image.Image
    seconds: float


@dataclass
class FakeMixture:
    granularity: str
    names: list
    gate: str = "sample"


class ScriptedEngine:
    """Draws the caption's scene; `drops[method]` = subjects that method fails to draw, `night` = methods
    that paint everything in the night style. Remembers which scene each image shows."""

    def __init__(self, keys, drops=None, night=()):
        self.bank, self.model_id = Bank(keys), None
        self.drops, self.night = drops or {}, set(night)
        self.scenes: dict[int, world.Scene] = {}
        self.calls, self.trained = [], []

    def default_size(self):
        return world.SIZE, world.SIZE

    def generate(self, keys, method, request, mixture=None, mask=None, rank=None, normalize=True):
        self.calls.append((tuple(keys), method, request.prompt, request.seed, mixture, mask, rank, normalize))
        scene = world.scene_from_caption(request.prompt)
        off = set(self.drops.get(method, ())) | {k for k, on in (mask or {}).items() if not on}
        if method == "base":                                   # the base model knows no subject
            off |= set(world.SUBJECT_BY_KEY)
        scene = world.Scene(tuple(o for o in scene.objects if o.identity not in off),
                            NIGHT if method in self.night else scene.style)
        image = world.render_pil(scene, np.random.default_rng(request.seed))
        self.scenes[id(image)] = scene
        return FakeResult(image, 0.01)

    def train(self, keys, mole, train, on_step=None, should_stop=None):
        self.trained.append((tuple(keys), mole.granularity, train.steps))
        for step in range(train.steps):
            on_step(step, {"loss": 1.0 / (1 + step), "task": 1.0 / (1 + step), "balance": 0.0}, [0.5, 0.5])
        return FakeMixture(mole.granularity, list(keys), mole.gate)


class PerfectOracle:
    """Reads back the scene an image was drawn from, with certainty."""

    def __init__(self, engine):
        self.engine = engine

    def read(self, images):
        out = []
        for im in images:
            scene = self.engine.scenes[id(im)]
            at = {o.position: o for o in scene.objects}
            identity = {p: {c: float(c == (at[p].identity if p in at else "empty"))
                            for c in world_oracle.IDENTITY_CLASSES} for p in world.POSITIONS}
            colour = {p: {c: float(p in at and c == at[p].colour) for c in world_oracle.COLOUR_CLASSES}
                      for p in world.POSITIONS}
            style = {s: float(s == scene.style) for s in world_oracle.STYLE_CLASSES}
            out.append(world_oracle.Reading(identity, colour, style))
        return out


def scripted(keys, **kw):
    engine = ScriptedEngine(keys, **kw)
    return engine, [WorldScorer(PerfectOracle(engine), world_oracle)]


def test_world_prompts_parse_and_balance_subjects():
    targets = [Target(k, TRIGGER[k]) for k in (FACE, RING, CHECKER, "heart")]
    prompts = ev.world_prompts(targets, 24)
    assert len(set(prompts)) == 24                            # 4 choices of 3 subjects × 6 orders
    for p in prompts:
        items = world.parse_caption(p)
        assert len(items) == 3 and len({pos for pos, _, _ in items}) == 3
    counts = [sum(t.trigger in p.split() for p in prompts) for t in targets]
    assert counts == [18, 18, 18, 18]
    styled = ev.world_prompts([Target(FACE, "zwx"), Target(NIGHT, TRIGGER[NIGHT], "style")], 4)
    assert all(world.caption_style(p) == NIGHT and "zwx" in p.split() for p in styled)
    assert all(world.parse_caption(p) for p in ev.world_plain_prompts(5))


def test_template_prompts_fill_triggers_and_refuse_unknown_slots(tmp_path):
    targets = [Target(FACE, "zwx"), Target(RING, "qlo")]
    assert ev.template_prompts(["a {1} on the left and a {0} on the right"], targets) == \
        ["a qlo on the left and a zwx on the right"]
    with pytest.raises(ValueError, match="beyond the 2 LoRAs"):
        ev.template_prompts(["a {2} on the left"], targets)
    f = tmp_path / "t.txt"
    f.write_text("# comment\n\n a {0} in the center \n")
    assert ev.read_templates(f) == ["a {0} in the center"]
    f.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="holds no template"):
        ev.read_templates(f)


def test_scores_match_a_hand_count():
    engine, scorers = scripted([FACE, RING], drops={"linear": [RING]}, night=["svd"])
    targets = [Target(FACE, "zwx"), Target(RING, "qlo")]
    prompts = ["a zwx on the left and a qlo on the right", "a qlo on the left and a zwx in the center"]
    plain = ["a red circle on the left and a blue square on the right"]
    cells = [ev.Cell("MoLE", "mole", [FACE, RING]), ev.Cell("Linear", "linear", [FACE, RING]),
             ev.Cell("SVD", "svd", [FACE, RING]), ev.Cell("Base", "base", [FACE, RING])]
    result = ev.score_cells(engine, cells, prompts, [0, 1, 2], scorers, targets, plain, steps=5)
    rows = {r["label"]: r for r in result.rows}
    assert rows["MoLE"]["caption_fidelity"] == 1.0 and rows["MoLE"]["mean_subject"] == 1.0
    assert rows["MoLE"]["caption_fidelity_ci"] == 0.0
    assert rows["Linear"]["caption_fidelity"] == 0.5                   # the ring is never drawn
    assert rows["Linear"]["subject:ring"] == 0.0 and rows["Linear"]["subject:face"] == 1.0
    assert rows["Linear"]["mean_subject"] == 0.5
    assert rows["Linear"]["base_preservation"] == 1.0                  # no trigger: drawn as the base draws it
    assert rows["SVD"]["base_preservation"] == 0.75                    # 3 positions agree, the style does not
    assert rows["SVD"]["caption_fidelity"] == 1.0                      # the captions ask for no style
    assert rows["Base"]["base_preservation"] == 1.0 and rows["Base"]["mean_subject"] == 0.0
    assert all(r["images"] == 6 and r["caption_fidelity_n"] == 6 for r in result.rows)
    # every row saw the same prompts and seeds
    drawn = {}
    for keys, method, prompt, seed, *_ in engine.calls:
        drawn.setdefault(method, []).append((prompt, seed))
    assert drawn["mole"] == drawn["linear"] == drawn["svd"]            # 6 composed + 3 plain each
    assert drawn["mole"][:6] == [(p, s) for p in prompts for s in (0, 1, 2)]
    assert sum(1 for c in engine.calls if c[1] == "base" and c[2] == plain[0]) == 3   # base drawn once per seed
    assert len(result.records) == 4 * 6 and result.records[0]["subject:face"] == 1.0


def test_cells_pass_their_settings_to_the_engine():
    engine, scorers = scripted([FACE, RING])
    mix = FakeMixture("block", [FACE, RING])
    cells = [ev.Cell("raw", "linear", [FACE, RING], normalize=False), ev.Cell("svd", "svd", [FACE, RING], rank=3),
             ev.Cell("masked", "mole", [FACE, RING], mixture=mix, mask={FACE: False, RING: True})]
    result = ev.score_cells(engine, cells, ["a zwx on the left and a qlo on the right"], [4], scorers,
                            [Target(FACE, "zwx"), Target(RING, "qlo")])
    assert [c[6:] for c in engine.calls] == [(None, False), (3, True), (None, True)]
    assert engine.calls[2][4] is mix and engine.calls[2][5] == {FACE: False, RING: True}
    masked = result.rows[2]
    assert masked["subject:face"] == 0.0 and masked["subject:ring"] == 1.0      # switched off: gone


def test_leaders_say_plainly_when_mole_does_not_win():
    engine, scorers = scripted([FACE, RING], drops={"mole": [RING]})
    targets = [Target(FACE, "zwx"), Target(RING, "qlo")]
    cells = [ev.Cell("MoLE (block)", "mole", [FACE, RING]), ev.Cell("Linear", "linear", [FACE, RING])]
    result = ev.score_cells(engine, cells, ["a zwx on the left and a qlo on the right"], [0, 1], scorers, targets)
    lines = ev.leaders(result.rows)
    assert any("caption fidelity: Linear leads" in ln and "MoLE does not win" in ln for ln in lines)
    result.rows[0]["caption_fidelity"] = 1.0                           # now a tie at 1.0
    assert any("not a clear win" in ln or "MoLE does not win" in ln for ln in ev.leaders(result.rows))
    # one composing row among references: nobody "leads"
    single = ev.score_cells(engine, [cells[1], ev.Cell("Single: face", f"single:{FACE}", [FACE, RING])],
                            ["a zwx on the left"], [0], scorers, targets)
    assert ev.leaders(single.rows) == []


def test_evaluate_trains_each_granularity_and_writes_outputs(tmp_path):
    engine, scorers = scripted([FACE, RING, NIGHT], drops={"linear": [FACE]})
    seen = []
    result = ev.evaluate(engine, [FACE, RING, NIGHT], granularities=("block", "layer"), seeds=[0, 1],
                         n_prompts=3, train_steps=4, steps=5, scorers=scorers,
                         on_progress=lambda done, total, msg: seen.append((done, total, msg)))
    assert [t[1] for t in engine.trained] == ["block", "layer"] and all(t[2] == 4 for t in engine.trained)
    labels = [r["label"] for r in result.rows]
    assert labels == ["MoLE (block)", "MoLE (layer)", "Linear (normalised)", "SVD", "Single: face",
                      "Single: ring", "Single: night", "Base model"]
    mole_calls = [c for c in engine.calls if c[1] == "mole"]
    assert {c[4].granularity for c in mole_calls} == {"block", "layer"}
    # the progress bar counts to its total and says how long is left
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen) and seen[-1][0] == seen[-1][1]
    assert "left" in seen[-1][2]
    assert result.training["MoLE (block)"]["steps"] == 4 and "plateau_step" in result.training["MoLE (block)"]
    # captions carry the style, so the night row is scored on every image
    assert result.rows[0]["subject:night_n"] == 6
    paths = ev.write_outputs(result, tmp_path / "out")
    table = paths["markdown"].read_text()
    assert all(label in table for label in labels) and "caption fidelity" in table
    data = json.loads(paths["json"].read_text())
    assert data["rows"][2]["subject:face"] == 0.0 and len(data["records"]) == 8 * 6
    assert Image.open(paths["plot"]).size[0] > 100 and Image.open(paths["samples"]).size[1] == 8 * 64


def test_evaluate_trains_per_token_gates_beside_per_sample_ones():
    engine, scorers = scripted([FACE, RING])
    result = ev.evaluate(engine, [FACE, RING], granularities=("block",), gates=("sample", "token"),
                         methods=("mole",), seeds=[0], n_prompts=2, train_steps=2, steps=5, scorers=scorers)
    assert [r["label"] for r in result.rows] == ["MoLE (block)", "MoLE (block, per-token)"]
    gates = [c[4].gate for c in engine.calls if c[1] == "mole"]
    assert gates.count("sample") == gates.count("token") > 0


def test_evaluate_uses_a_given_mixture_without_training():
    engine, scorers = scripted([FACE, RING])
    mix = FakeMixture("matrix", [FACE, RING])
    result = ev.evaluate(engine, [FACE, RING], methods=("mole", "base"), seeds=[0], n_prompts=2,
                         mixture=mix, steps=5, scorers=scorers)
    assert engine.trained == [] and [r["label"] for r in result.rows] == ["MoLE (matrix)", "Base model"]
    assert all(c[4] is mix for c in engine.calls if c[1] == "mole")


def test_evaluate_refuses_bad_input():
    engine, scorers = scripted([FACE, RING])
    with pytest.raises(ValueError, match="at least two LoRAs"):
        ev.evaluate(engine, [FACE], scorers=scorers)
    with pytest.raises(ValueError, match="Unknown evaluation method"):
        ev.evaluate(engine, [FACE, RING], methods=("mole", "dare"), scorers=scorers)


def test_without_a_scorer_the_table_says_so(tmp_path):
    engine, _ = scripted([FACE, RING])
    result = ev.evaluate(engine, [FACE, RING], methods=("linear", "base"), seeds=[0], n_prompts=1,
                         steps=5, scorers=[])
    markdown = ev.to_markdown(result)
    assert ev.NO_SCORER in markdown and "caption fidelity" not in markdown
    assert all(not math.isnan(r["seconds_per_image"]) for r in result.rows)
    assert ev.plot(result).size[0] > 100


def test_run_small_study_returns_table_dataframe_and_plot():
    engine, scorers = scripted([FACE, RING], drops={"svd": [FACE]})
    calls = []
    markdown, table, image = ev.run_small_study(engine, [FACE, RING], seeds=1, n_prompts=2, train_steps=3,
                                                steps=5, scorers=scorers, on_progress=lambda *a: calls.append(a))
    assert list(table["label"]) == ["MoLE (block)", "MoLE (block, per-token)", "Linear (normalised)", "SVD",
                                    "Single: face", "Single: ring", "Base model"]
    assert table.loc[table["label"] == "SVD", "subject:face"].item() == 0.0
    assert "| MoLE (block) |" in markdown and "SVD leads" not in markdown
    assert image.size[0] > 100 and calls and calls[-1][0] == calls[-1][1]
    # no oracle, no CLIP: the table says so instead of a number
    markdown, table, _ = ev.run_small_study(engine, [FACE, RING], seeds=1, n_prompts=1, train_steps=1, steps=5)
    assert ev.NO_SCORER in markdown and "caption_fidelity" not in table.columns


# ---------------------------------------------------------------------------------------------
# The real engine on a tiny pipeline, scored by a tiny CLIP (end to end through the CLI)

@pytest.fixture
def one_thread():
    """One torch thread for this test: on a shared 2-core machine two threads ran tiny models ~50x slower."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_cli_evaluate_end_to_end_on_a_tiny_pipeline(tmp_path, one_thread):
    from tests.test_engine import make_bank, make_model_dir
    from mole_core.cli import main
    model_dir = make_model_dir(tmp_path)
    bank = make_bank(tmp_path / "bank", model_dir)
    clip_dir = build_tiny_clip(tmp_path / "clip")
    templates = tmp_path / "templates.txt"
    long = "a photo of {0} dog and a {1} cat on the left and the right and the center and a red circle"
    templates.write_text(f"a photo of {{0}} dog\na {{1}} cat on the left\n{long}\n")
    out = tmp_path / "out"
    rc = main(["evaluate", "--model", str(model_dir), "--bank", str(bank), "--lora", "dog", "--lora", "cat",
               "--steps", "2", "--seeds", "1", "--templates", str(templates), "--denoise-steps", "2",
               "--clip", str(clip_dir), "--rank", "1", "--out", str(out)])
    assert rc in (0, None)
    data = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in data["rows"]]
    assert labels == ["MoLE (block)", "Linear (normalised)", "SVD (r=1)", "Single: dog", "Single: cat",
                      "Base model"]
    for row in data["rows"]:
        assert row["images"] == 3 and -1 <= row["clip_text"] <= 1 and -1 <= row["clip_image"] <= 1
    assert data["training"]["MoLE (block)"]["steps"] == 2
    markdown = (out / "results.md").read_text()
    assert "CLIP text-align" in markdown
    assert "these words are cut" in markdown and "red circle" in markdown      # the engine's truncation warning
    assert (out / "results.png").stat().st_size > 1000


def build_tiny_clip(folder: Path) -> Path:
    """A tiny CLIPModel folder (config-built, random weights) with tokenizer and image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel
    from tests.tiny import build_tokenizer
    tok = build_tokenizer(folder / "tok")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8)).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder
