"""The study harness (mole_core.studies.image) and its reports (mole_core.studies.report), on the scripted engine of
tests/scripted.py: every number they report can be checked by hand."""
from __future__ import annotations

import json
import math

import pytest
from PIL import Image

from mole_core.studies import report
from mole_core.studies import image as st
from mole_core.metrics import Target
from mole_core.mix import Mix
from tests.scripted import (CHECKER, FACE, NIGHT, RING, SECONDS_PER_IMAGE, SECONDS_PER_TRAIN_STEP, Bank,
                            FakeMixture, scripted, world)

FACE_RING = [Target(FACE, "zwx"), Target(RING, "qlo")]
TWO = "a zwx on the left and a qlo on the right"


def config(**changes) -> st.EvalConfig:
    return st.EvalConfig(**{"seeds": 1, "n_prompts": 2, "train_steps": 2, "denoise_steps": 5, "gates": ("sample",),
                            **changes})


def test_scores_match_a_hand_count():
    engine, suite = scripted([FACE, RING], drops={"linear": [RING]}, night=["svd"])
    prompts = [TWO, "a qlo on the left and a zwx in the center"]
    plain = ["a red circle on the left and a blue square on the right"]
    cells = [st.Cell("MoLE", Mix("mole", [FACE, RING])), st.Cell("Linear", Mix("linear", [FACE, RING])),
             st.Cell("SVD", Mix("svd", [FACE, RING])), st.Cell("Base", Mix("base"))]
    result = st.score_cells(engine, cells, config(seeds=3), FACE_RING, prompts, plain, suite.scorers)
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
    assert rows["MoLE"]["gates"] == {FACE: 0.5, RING: 0.5} and rows["Linear"]["gates"] == {}
    # every row saw the same prompts and seeds; the base model drew the plain captions once per seed
    drawn = {}
    for mix, request in zip(engine.mixes, engine.requests):
        drawn.setdefault(mix.method, []).append((request.prompt, request.seed, request.steps))
    assert drawn["mole"] == drawn["linear"] == drawn["svd"]            # 6 composed + 3 plain each
    assert drawn["mole"][:6] == [(p, s, 5) for p in prompts for s in (0, 1, 2)]
    assert drawn["base"].count((plain[0], 0, 5)) == 1 and len(drawn["base"]) == 6 + 3
    assert len(result.records) == 4 * 6 and result.records[0]["subject:face"] == 1.0


def test_each_cell_hands_its_whole_mix_to_the_engine():
    engine, suite = scripted([FACE, RING])
    mixture = FakeMixture("block", [FACE, RING])
    mixes = [Mix("linear", [FACE, RING], normalize=False), Mix("svd", [FACE, RING], rank=3),
             Mix("mole", [FACE, RING], mixture=mixture, mask={FACE: False, RING: True})]
    result = st.score_cells(engine, [st.Cell(f"row {i}", m) for i, m in enumerate(mixes)], config(), FACE_RING,
                            [TWO], (), suite.scorers)
    assert engine.mixes == mixes and engine.mixes[2].mixture is mixture
    masked = result.rows[2]
    assert masked["subject:face"] == 0.0 and masked["subject:ring"] == 1.0      # switched off: gone
    assert masked["mask"] == {FACE: False, RING: True} and masked["keys"] == [FACE, RING]


def test_every_mix_method_is_a_row_built_from_the_config_mix():
    engine, suite = scripted([FACE, RING])
    methods = ("mole", "linear", "svd", "ties", "dare", "switch", "composite", "base", f"single:{RING}")
    cfg = config(methods=methods, mix=Mix(rank=2, density=0.3, switch_every=3, normalize=False), n_prompts=1)
    result = st.evaluate(engine, [FACE, RING], cfg, suite)
    labels = [r["label"] for r in result.rows]
    assert labels == ["MoLE (block)", "Linear (raw weights)", "SVD (r=2)", "TIES (d=0.3, r=2)", "DARE (d=0.3, r=2)",
                      "LoRA Switch (every 3 steps)", "LoRA Composite", "Base model", "Single: ring"]
    by_method = {m.method: m for m in engine.mixes}
    assert set(by_method) == set(methods)
    for method in ("linear", "svd", "ties", "dare", "switch", "composite"):
        mix = by_method[method]
        assert mix.keys == (FACE, RING) and (mix.rank, mix.density, mix.switch_every, mix.normalize) == (2, 0.3, 3, False)
    assert by_method["base"].keys == () and by_method[f"single:{RING}"].keys == ()
    assert result.rows[-1]["keys"] == [RING] and result.rows[-2]["keys"] == []


def test_a_row_named_twice_is_refused():
    engine, suite = scripted([FACE, RING])
    with pytest.raises(ValueError, match="same name"):
        st.evaluate(engine, [FACE, RING], config(methods=("singles", f"single:{RING}")), suite)


def test_leaders_say_plainly_when_mole_does_not_win():
    engine, suite = scripted([FACE, RING], drops={"mole": [RING]})
    cells = [st.Cell("MoLE (block)", Mix("mole", [FACE, RING])), st.Cell("Linear", Mix("linear", [FACE, RING]))]
    result = st.score_cells(engine, cells, config(seeds=2), FACE_RING, [TWO], (), suite.scorers)
    lines = report.leaders(result.rows)
    assert any("caption fidelity: Linear leads" in ln and "MoLE does not win" in ln for ln in lines)
    result.rows[0]["caption_fidelity"] = 1.0                           # now both at 1.0, MoLE first
    lines = report.leaders(result.rows)
    assert any(ln.startswith("caption fidelity: MoLE (block) leads") and "not a clear win" in ln for ln in lines)
    # one composing row among references: nobody "leads"
    single = st.score_cells(engine, [cells[1], st.Cell("Single: face", Mix(f"single:{FACE}"))], config(),
                            FACE_RING, ["a zwx on the left"], (), suite.scorers)
    assert report.leaders(single.rows) == []


def test_evaluate_trains_each_granularity_and_writes_outputs(tmp_path):
    engine, suite = scripted([FACE, RING, NIGHT], drops={"linear": [FACE]})
    cfg = config(granularities=("block", "layer"), seeds=2, n_prompts=3, train_steps=4)
    result = st.evaluate(engine, [FACE, RING, NIGHT], cfg, suite)
    assert [(t[1], t[3]) for t in engine.trained] == [("block", 4), ("layer", 4)]
    labels = [r["label"] for r in result.rows]
    assert labels == ["MoLE (block)", "MoLE (layer)", "Linear (normalised)", "SVD", "Single: face",
                      "Single: ring", "Single: night", "Base model"]
    assert {m.mixture.granularity for m in engine.mixes if m.method == "mole"} == {"block", "layer"}
    assert result.training["MoLE (block)"]["steps"] == 4 and "plateau_step" in result.training["MoLE (block)"]
    # captions carry the style, so the night row is scored on every image
    assert result.rows[0]["subject:night_n"] == 6
    # the engine checked every row's Mix and the request before anything was drawn
    first_mixes, first_request = engine.checked[0]
    assert [m.method for m in first_mixes][:2] == ["mole", "mole"] and first_request.steps == 5
    paths = report.write_outputs(result, tmp_path / "out", extra={"config": cfg.to_dict()})
    table = paths["markdown"].read_text()
    assert all(label in table for label in labels) and "caption fidelity" in table
    data = json.loads(paths["json"].read_text())
    assert data["rows"][2]["subject:face"] == 0.0 and len(data["records"]) == 8 * 6
    assert data["config"]["granularities"] == ["block", "layer"] and data["config"]["mix"] == "Mix('mole', ())"
    assert Image.open(paths["plot"]).size[0] > 100
    grid = Image.open(paths["samples"]).convert("L")     # 8 rows of 64-px images, a caption line per caption
    assert grid.size[1] >= 8 * 64 + 3 * 16
    label_column = grid.crop((0, 20, 40, 20 + 8 * 64))   # the rows' names are written left of the images
    assert min(label_column.getdata()) < 128


def test_evaluate_trains_per_token_gates_beside_per_sample_ones():
    engine, suite = scripted([FACE, RING])
    result = st.evaluate(engine, [FACE, RING], config(gates=("sample", "token"), methods=("mole",)), suite)
    assert [r["label"] for r in result.rows] == ["MoLE (block)", "MoLE (block, per-token)"]
    gates = [m.mixture.gate for m in engine.mixes if m.method == "mole"]
    assert gates.count("sample") == gates.count("token") > 0


def test_evaluate_uses_a_given_mixture_without_training():
    engine, suite = scripted([FACE, RING])
    mixture = FakeMixture("matrix", [FACE, RING])
    result = st.evaluate(engine, [FACE, RING], config(methods=("mole", "base")), suite, mixture=mixture)
    assert engine.trained == [] and [r["label"] for r in result.rows] == ["MoLE (matrix)", "Base model"]
    assert all(m.mixture is mixture for m in engine.mixes if m.method == "mole")


def test_evaluate_refuses_bad_input():
    engine, suite = scripted([FACE, RING])
    with pytest.raises(ValueError, match="at least two LoRAs"):
        st.evaluate(engine, [FACE], config(), suite)
    with pytest.raises(ValueError, match="Unknown evaluation method"):
        st.evaluate(engine, [FACE, RING], config(methods=("mole", "unicorn")), suite)
    with pytest.raises(ValueError, match="Seeds per caption must be a whole number of at least 1; got 0"):
        st.evaluate(engine, [FACE, RING], config(seeds=0), suite)
    with pytest.raises(ValueError, match="trained for face, checker"):
        st.evaluate(engine, [FACE, RING], config(), suite, mixture=FakeMixture("block", [FACE, CHECKER]))
    assert engine.mixes == [] and engine.trained == []


def test_a_session_bank_is_used_for_every_call():
    engine, suite = scripted([CHECKER])                  # the engine's own bank lacks face and ring
    session = Bank([FACE, RING])
    result = st.evaluate(engine, [FACE, RING], config(), suite, bank=session)
    assert [r["label"] for r in result.rows][:2] == ["MoLE (block)", "Linear (normalised)"]
    assert len(engine.banks) > len(engine.mixes) and all(b is session for b in engine.banks)


def test_the_plan_counts_the_work_that_is_then_done():
    engine, suite = scripted([FACE, RING])
    cfg = config(gates=("sample", "token"), seeds=2, n_prompts=3, train_steps=5)
    plan = st.plan_evaluation(engine.bank, [FACE, RING], cfg, suite)
    # 7 rows × 3 captions × 2 seeds, then 2 plain captions × 2 seeds for the 6 non-base rows and the base once
    assert plan.work == st.Work(images=7 * 3 * 2 + 7 * 2 * 2, train_steps=2 * 5)
    assert st.estimate_seconds(plan.work, 0.5, 0.1) == pytest.approx(70 * 0.5 + 10 * 0.1)
    tallies = []
    st.evaluate(engine, [FACE, RING], cfg, suite, on_progress=tallies.append)
    assert len(engine.mixes) == plan.work.images
    assert sum(t[3] for t in engine.trained) == plan.work.train_steps
    # the first report comes before any work, with the time the engine expects
    first = tallies[0]
    assert (first.images_done, first.train_steps_done, first.doing) == (0, 0, "starting")
    assert first.seconds_left == pytest.approx(70 * SECONDS_PER_IMAGE + 10 * SECONDS_PER_TRAIN_STEP)
    assert "about 36 s left" in first.message


def test_progress_counts_images_and_training_steps_apart():
    engine, suite = scripted([FACE, RING])
    tallies = []
    st.evaluate(engine, [FACE, RING], config(methods=("mole", "base"), train_steps=3), suite,
                on_progress=tallies.append)
    steps = [t for t in tallies if "gate-training step" in t.doing]
    images = [t for t in tallies if ": image" in t.doing]
    assert [t.train_steps_done for t in steps] == [1, 2, 3] and all(t.images_done == 0 for t in steps)
    assert [t.images_done for t in images] == list(range(1, len(images) + 1))
    assert all(t.train_steps_done == 3 for t in images)
    last = tallies[-1]
    assert (last.images_done, last.train_steps_done) == (last.images, last.train_steps) == (len(images), 3)
    assert "images" in last.message and "3/3 gate-training steps" in last.message
    fractions = [t.fraction for t in tallies]
    assert fractions == sorted(fractions) and fractions[0] < 0.01 and last.fraction == 1.0
    assert any("trigger-free captions" in t.doing for t in images)


@pytest.mark.parametrize("stop_after, done", [(2, "0 of 12 images and 2 of 4 gate-training steps"),
                                              (6, "2 of 12 images and 4 of 4 gate-training steps")])
def test_a_stop_ends_the_run_at_the_next_unit(stop_after, done):
    engine, suite = scripted([FACE, RING])
    tallies = []
    with pytest.raises(st.Stopped, match=done):
        st.evaluate(engine, [FACE, RING], config(methods=("mole", "base"), gates=("sample", "token")), suite,
                    on_progress=tallies.append, should_stop=lambda: len(tallies) > stop_after)
    units = len(tallies) - 1                                    # the first report is "starting"
    assert units == stop_after and len(engine.mixes) == tallies[-1].images_done


def test_training_line_says_whether_the_loss_fell_or_rose():
    log = {"steps": 2, "seconds": 0.4, "first_loss": 0.0751, "final_loss": 0.3801, "plateau_step": 0,
           "plateau_seconds": 0.2}
    rose = report.training_line("MoLE (block)", log)
    assert "rose 0.0751 → 0.3801" in rose and "drop by step" not in rose
    fell = report.training_line("MoLE (block)", {**log, "final_loss": 0.0408, "plateau_step": 1})
    assert "fell 0.0751 → 0.0408, 90% of the drop by step 1 (0.2 s)" in fell
    assert "did not move" in report.training_line("x", {**log, "final_loss": 0.0751})


def test_tidy_table_rounds_to_three_decimals_and_drops_raw_columns():
    engine, suite = scripted([FACE, RING], drops={"linear": [RING]})
    result = st.evaluate(engine, [FACE, RING], config(methods=("mole", "linear"), seeds=3, n_prompts=1), suite)
    result.rows[0]["caption_fidelity"] = 2 / 3
    table = report.tidy_table(result.rows)
    assert list(table["method"]) == ["MoLE (block)", "Linear (normalised)"]
    assert table.loc[0, "caption fidelity"] == 0.667 and table.loc[1, "caption fidelity"] == 0.5
    assert table.loc[1, "subject fidelity: ring"] == 0.0 and table.loc[0, "gate: face"] == 0.5
    assert not [c for c in table.columns if c.endswith(("_n", "_ci")) or c in ("keys", "mask", "gates", "label")]
    numbers = [v for c in table.columns if c not in ("method", "images") for v in table[c] if v is not None]
    assert all(round(float(v), 3) == float(v) for v in numbers if not math.isnan(float(v)))


def test_the_plot_legend_covers_no_bar():
    engine, suite = scripted([FACE, RING])
    result = st.evaluate(engine, [FACE, RING], config(methods=("mole", "linear", "svd", "singles", "base")), suite)
    fig = report.bar_figure(result)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    ax = fig.axes[0]
    legend = ax.get_legend().get_window_extent(renderer)
    bars = [p.get_window_extent(renderer) for p in ax.patches]
    assert len(bars) == 6 * 3 and all(b.height > 0 for b in bars[:3])
    assert not any(legend.overlaps(b) for b in bars)
    assert fig.bbox.contains(legend.x0, legend.y0) and fig.bbox.contains(legend.x1, legend.y1)   # inside the image


def test_without_a_scorer_only_timings_are_shown():
    engine, _ = scripted([FACE, RING])
    result = st.evaluate(engine, [FACE, RING], config(methods=("linear", "base")), st.Suite(notes=["no scorer"]))
    markdown = report.to_markdown(result)
    assert "- no scorer" in markdown and "caption fidelity" not in markdown
    assert all(not math.isnan(r["seconds_per_image"]) for r in result.rows)
    assert engine.requests[0].prompt == "a photo of zwx and a photo of qlo"       # no suite captions
    assert report.plot(result).size[0] > 100


def test_template_prompts_fill_triggers_and_refuse_unknown_slots(tmp_path):
    assert st.template_prompts(["a {1} on the left and a {0} on the right"], FACE_RING) == \
        ["a qlo on the left and a zwx on the right"]
    with pytest.raises(ValueError, match="beyond the 2 LoRAs"):
        st.template_prompts(["a {2} on the left"], FACE_RING)
    f = tmp_path / "t.txt"
    f.write_text("# comment\n\n a {0} in the center \n")
    assert st.read_templates(f) == ["a {0} in the center"]
    f.write_text("# only a comment\n")
    with pytest.raises(ValueError, match="holds no template"):
        st.read_templates(f)
    engine, suite = scripted([FACE, RING])
    st.evaluate(engine, [FACE, RING], config(methods=("base",), templates=("a {0} in the center",)), suite)
    assert [r.prompt for r in engine.requests[:1]] == ["a zwx in the center"]
    assert len(engine.requests) == 1 + 2                   # the caption, then two trigger-free ones
    assert world.parse_caption(engine.requests[0].prompt) == [("center", FACE, None)]
