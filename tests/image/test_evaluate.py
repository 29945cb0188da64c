"""The evaluation as the app and the CLI run it (mole_core.studies.evaluate): the small study, what a model is
scored with, the CLI flags, and the whole CLI on a tiny pipeline scored by a tiny CLIP.

The harness itself is tested in tests/test_study.py; the scripted engine is in tests/scripted.py.
"""
from __future__ import annotations

import argparse
import json

import pytest

from mole_core.studies import evaluate as ev
from mole_core.defaults import DEFAULT_MODEL
from mole_core.image.engine import Engine
from mole_core.studies.image import SINGLES, EvalConfig, Suite
from mole_core.world.pixel.scoring import WorldScorer, world_plain_prompts, world_prompts
from tests.helpers import build_tiny_clip
from tests.scripted import (FACE, RING, SECONDS_PER_IMAGE, SECONDS_PER_TRAIN_STEP, FakeMixture, ScriptedEngine,
                            scripted)


def test_small_study_returns_markdown_a_tidy_table_and_a_chart():
    engine, suite = scripted([FACE, RING], drops={"svd": [FACE]})
    tallies = []
    markdown, table, image = ev.run_small_study(engine, [FACE, RING], seeds=1, n_prompts=2, train_steps=3,
                                                suite=suite, on_progress=tallies.append)
    labels = ["MoLE (block)", "MoLE (block, per-token)", "Linear (normalised)", "SVD", "Single: face",
              "Single: ring", "Base model"]
    assert list(table["method"]) == labels
    assert table.loc[table["method"] == "SVD", "subject fidelity: face"].item() == 0.0
    assert "caption fidelity ±" in table.columns and "caption_fidelity_n" not in table.columns
    assert all(f"| {label} |" in markdown for label in labels) and "SVD leads" not in markdown
    assert image.size[0] > 100
    assert (tallies[-1].images_done, tallies[-1].train_steps_done) == (tallies[-1].images, 2 * 3)
    assert [(t[1], t[2], t[3]) for t in engine.trained] == [("block", "sample", 3), ("block", "token", 3)]
    assert {r.steps for r in engine.requests} == {20} and {r.seed for r in engine.requests} == {0}


def test_small_study_without_a_scorer_says_so():
    engine = ScriptedEngine([FACE, RING])           # model_id None: no oracle; no CLIP given
    markdown, table, _ = ev.run_small_study(engine, [FACE, RING], seeds=1, n_prompts=1, train_steps=1)
    assert ev.NO_SCORER in markdown and "caption fidelity" not in table.columns


def test_small_study_stopped_says_how_far_it_got():
    engine, suite = scripted([FACE, RING])
    tallies = []
    markdown, table, chart = ev.run_small_study(engine, [FACE, RING], seeds=1, n_prompts=2, train_steps=3,
                                                suite=suite, on_progress=tallies.append,
                                                should_stop=lambda: len(tallies) > 4)
    assert markdown.startswith("**Stopped.**") and "0 of 28 images and 4 of 6 gate-training steps" in markdown
    assert table is None and chart is None and engine.mixes == []


def test_small_study_seconds_counts_its_work_before_it_starts():
    engine, _ = scripted([FACE, RING])
    engine.model_id = DEFAULT_MODEL                  # the world: captions and plain captions are drawn
    seconds = ev.small_study_seconds(engine, [FACE, RING], seeds=2, n_prompts=4, train_steps=10)
    # 7 rows × 4 captions × 2 seeds + (6 non-base rows + the base) × 2 plain captions × 2 seeds; 2 trainings
    assert seconds == pytest.approx((56 + 28) * SECONDS_PER_IMAGE + 2 * 10 * SECONDS_PER_TRAIN_STEP)
    trained = ev.small_study_seconds(engine, [FACE, RING], seeds=2, n_prompts=4, train_steps=10,
                                     mixture=FakeMixture("block", [FACE, RING]))
    assert trained == pytest.approx((6 * 8 + 6 * 4) * SECONDS_PER_IMAGE)    # one MoLE row, nothing to train
    with pytest.raises(ValueError, match="at least two LoRAs"):
        ev.small_study_seconds(engine, [FACE])


def test_small_study_defaults_fit_in_three_minutes_at_the_engines_costs():
    engine = Engine()                                # the embedded world; nothing is loaded to estimate
    assert ev.small_study_seconds(engine, ["face", "checker"]) <= 180      # the app's first selection
    assert engine._pipe is None


def test_suite_for_the_world_and_for_other_models():
    world_engine = Engine()
    suite = ev.suite_for(world_engine, ["face", "night"])
    assert [type(s) for s in suite.scorers] == [WorldScorer] and suite.notes == []
    assert suite.prompts is world_prompts and suite.plain_prompts is world_plain_prompts
    other = ScriptedEngine([FACE, RING])               # no oracle in its model folder
    assert ev.suite_for(other, [FACE, RING]).scorers == [] and ev.suite_for(other, [FACE, RING]).notes == [ev.NO_SCORER]


def test_the_flags_build_the_config():
    parser = argparse.ArgumentParser()
    ev.add_arguments(parser)
    defaults = ev.config_from_args(parser.parse_args(["--out", "x"]))
    assert defaults == EvalConfig()
    args = parser.parse_args(["--lora", "face", "--lora", "ring", "--methods", "mole,ties,singles", "--gate", "sample",
                              "--gate", "token", "--rank", "4", "--density", "0.3", "--seeds", "3", "--seed-start",
                              "1000", "--steps", "7", "--lr", "0.01", "--denoise-steps", "5", "--out", "x"])
    config = ev.config_from_args(args)
    assert config.methods == ("mole", "ties", SINGLES) and config.gates == ("sample", "token")
    assert (config.mix.rank, config.mix.density) == (4, 0.3) and config.seed_list == [1000, 1001, 1002]
    assert (config.train_steps, config.lr, config.denoise_steps) == (7, 0.01, 5)


def test_evaluate_front_end_passes_the_suite_and_config_through():
    engine, suite = scripted([FACE, RING])
    result = ev.evaluate(engine, [FACE, RING], EvalConfig(methods=("linear",), seeds=1, n_prompts=1),
                         Suite(suite.scorers, lambda targets, n: ["a qlo in the center"] * n))
    assert [r.prompt for r in engine.requests] == ["a qlo in the center"]
    assert result.rows[0]["subject:ring"] == 1.0


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


def test_cli_evaluate_end_to_end_on_a_tiny_pipeline(tmp_path, one_thread, capsys):
    from mole_core.cli import main
    from tests.tiny import make_bank, make_model_dir
    model_dir = make_model_dir(tmp_path)
    bank = make_bank(tmp_path / "bank", model_dir)
    clip_dir = build_tiny_clip(tmp_path / "clip")
    templates = tmp_path / "templates.txt"
    long = "a photo of {0} dog and a {1} cat on the left and the right and the center and a red circle"
    templates.write_text(f"a photo of {{0}} dog\na {{1}} cat on the left\n{long}\n")
    out = tmp_path / "out"
    rc = main(["evaluate", "--model", str(model_dir), "--bank", str(bank), "--lora", "dog", "--lora", "cat",
               "--steps", "2", "--gate", "sample", "--seeds", "1", "--templates", str(templates), "--denoise-steps", "2",
               "--clip", str(clip_dir), "--rank", "1", "--out", str(out)])
    assert rc == 0
    data = json.loads((out / "results.json").read_text())
    labels = [r["label"] for r in data["rows"]]
    assert labels == ["MoLE (block)", "Linear (normalised)", "SVD (r=1)", "Single: dog", "Single: cat",
                      "Base model"]
    for row in data["rows"]:
        assert row["images"] == 3 and -1 <= row["clip_text"] <= 1 and -1 <= row["clip_image"] <= 1
    assert data["training"]["MoLE (block)"]["steps"] == 2
    assert data["config"]["templates"] == ["a photo of {0} dog", "a {1} cat on the left", long]
    markdown = (out / "results.md").read_text()
    assert "CLIP text-align" in markdown
    assert "these words are cut" in markdown and "red circle" in markdown      # the engine's truncation warning
    assert (out / "results.png").stat().st_size > 1000
    # before it ran, it said what it would draw: 6 rows × 3 captions, 2 gate-training steps
    assert "6 rows: 18 images and 2 gate-training steps" in capsys.readouterr().err


