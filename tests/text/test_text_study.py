"""The text study's pieces (mole_core/studies/text.py) on a tiny random text world: scores, LoraHub's weights,
every method row, the tables."""
from __future__ import annotations

import pytest

from mole_core.merge import merge_loras, merged_weights
from mole_core.text.engine import TextEngine
from mole_core.studies.text import (TextStudyConfig, full_loss, lorahub_weights, markdown, method_rows, part_b, pool,
                                  run_rows, score, similarity, with_train)
from tests.tiny import make_text_world


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    model_dir, bank = make_text_world(tmp_path_factory.mktemp("textstudy"))
    return TextEngine(model_dir, bank)


def test_similarity_and_score():
    assert similarity("abc", "abc") == 1.0 and similarity("", "") == 1.0 and similarity("", "ab") == 0.0
    assert similarity("abcd", "abxd") == 0.75 and similarity("ab", "ba") == 0.0
    s = score(["cba", "xy"], [("reverse: abc", "cba"), ("reverse: yx", "xy")])
    assert s["exact_match"] == 1.0 and s["correct"] == 2 and s["ci95"][1] == 1.0 and s["similarity"] == 1.0


def test_lorahub_finds_weights_that_lower_the_loss_and_leaves_the_model_as_found(engine):
    pairs = [("alpha: abc", "cba"), ("alpha: xyz", "zyx")]
    model, tok = engine.model, engine.tokenizer
    base = full_loss(model, tok, pairs)
    w = lorahub_weights(engine, ["alpha", "beta"], pairs, budget=12)
    assert len(w) == 2 and all(-1.5 <= x <= 1.5 for x in w)
    with merged_weights(model, merge_loras([engine.lora("alpha"), engine.lora("beta")], w, normalize=False)):
        fitted = full_loss(model, tok, pairs)
    assert fitted + 0.05 * sum(abs(x) for x in w) <= base + 1e-6      # never worse than the start (w = 0)
    assert full_loss(model, tok, pairs) == base


def test_every_method_row_runs_and_the_tables_render(engine):
    cfg = with_train(TextStudyConfig(items=3, granularities=("block",), gates=("sample",), lorahub_budget=6), steps=2)
    pairs = [("alpha: abc", "cba"), ("beta: xyz", "zyx")]
    rows = method_rows(engine, ["alpha", "beta"], pairs, cfg, singles=True, oracle={"alpha": "alpha", "beta": "beta"})
    labels = [label for label, _, _ in rows]
    assert labels == ["base", "Oracle (own LoRA per task)", "alpha alone", "beta alone", "linear (NLA)", "PEMs (sum)",
                      "SVD r=4", "TIES", "DARE", "LoraHub", "Arrow (PEFT, training-free)", "MoLE untrained",
                      "MoLE prompt gate (default)", "MoLE block, per-sample"]
    tasks = {"alpha": [("alpha: abc", "cba")], "beta": [("beta: xyz", "zyx")]}
    out = run_rows(engine, rows, tasks, log=lambda m: None)
    assert set(out) == set(labels) and out["LoraHub"]["weights"].keys() == {"alpha", "beta"}
    assert out["MoLE untrained"]["tasks"] == {t: {**v} for t, v in out["linear (NLA)"]["tasks"].items()}
    for task in tasks:                        # the oracle row answers each task with its own LoRA
        assert out["Oracle (own LoRA per task)"]["tasks"][task]["correct"] == out[f"{task} alone"]["tasks"][task]["correct"]
    table = markdown({"config": {"items": 3}, "A": {"keys": ["alpha", "beta"], "methods": out},
                      "B": {"alpha beta": {"methods": out}}})
    assert "### Part A" in table and "### Part B" in table and "| LoraHub |" in table


def test_part_b_and_the_pools():
    assert pool(("reverse", "upper"), ["chop", "reverse", "double", "upper", "first"], 4) == \
        ["reverse", "upper", "chop", "double"]


def test_part_b_on_a_composed_task(engine, monkeypatch):
    import mole_core.studies.text as ts
    monkeypatch.setattr(ts, "task_items", lambda key, n, seed, held_out=True: [(f"{key}: abc", "cba")] * n)
    cfg = with_train(TextStudyConfig(items=2, shots=2, granularities=("block",), gates=("token",),
                                     merges=("linear",), prompt_gate=False), steps=2)
    cell = part_b(engine, ("alpha", "beta"), ["alpha", "beta"], cfg, log=lambda m: None)
    assert cell["task"] == "alpha beta" and len(cell["shots"]) == 2
    assert list(cell["methods"]) == ["base", "linear (NLA)", "MoLE untrained", "MoLE block, per-token"]
