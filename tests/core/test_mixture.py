"""Mixture files: round trip, refusal of other LoRA files / models / granularities, atomic writes."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import mole_core.mixture as mixture_mod
from mole_core.attach import MoleConfig, attach
from mole_core.image.lora_files import save_lora
from mole_core.mixture import MixtureError, apply_mixture, load_mixture, save_mixture
from mole_core.train import TrainConfig
from tests.helpers import make_lora
from tests.helpers import keys_of, text_model, trained_setup


def test_round_trip_restores_the_gates(tmp_path):
    model, loras, files, handle, ids, out, result = trained_setup(tmp_path)
    path = save_mixture(tmp_path / "mix" / "m.safetensors", handle, files, [handle.config, TrainConfig(steps=7)],
                        result, model_id="tiny-clip")
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]          # no temp file left behind
    mix = load_mixture(path)
    assert mix.names == ["ink", "oil", "pencil"] and mix.granularity == "block" and len(mix.sha256s) == 3
    assert mix.meta["steps"] == 7 and mix.meta["final_losses"]["loss"] == 1.5
    assert mix.meta["model_id"] == "tiny-clip" and mix.meta["configs"]["TrainConfig"]["steps"] == 7
    assert set(mix.layout) == set(handle.groups)
    assert all(torch.equal(mix.gate_state[k], v) for k, v in handle.gate_state_dict().items())
    mix.check(files, model_id="tiny-clip")
    # a fresh model + attachment, gates never run: loading restores leaders, shapes and values
    fresh = text_model()
    h2 = attach(fresh, loras, MoleConfig(granularity="block"))
    apply_mixture(h2, mix, files)
    assert h2.gate_layout() == handle.gate_layout()
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).last_hidden_state, out, rtol=0, atol=0)


def test_mismatches_are_refused(tmp_path):
    model, loras, files, handle, ids, out, result = trained_setup(tmp_path)
    path = save_mixture(tmp_path / "m.safetensors", handle, files, handle.config, result, model_id="tiny-clip")
    mix = load_mixture(path)
    # another LoRA file under the same name
    changed = dataclasses.replace(loras[1], modules={k: dataclasses.replace(w, scale=w.scale * 2)
                                                     for k, w in loras[1].modules.items()})
    save_lora(changed, tmp_path / "oil2.safetensors")
    with pytest.raises(MixtureError, match="'oil'.*not the one the gates were trained with"):
        mix.check([files[0], ("oil", tmp_path / "oil2.safetensors"), files[2]])
    with pytest.raises(MixtureError, match="ink, oil, pencil"):
        mix.check([files[1], files[0], files[2]])
    with pytest.raises(MixtureError, match="trained on the model 'tiny-clip'"):
        mix.check(files, model_id="other-model")
    handle.detach()
    # another granularity
    h = attach(model, loras, MoleConfig(granularity="layer"))
    with pytest.raises(MixtureError, match="granularity"):
        apply_mixture(h, mix)
    h.detach()
    # other experts
    h = attach(model, loras[:2])
    with pytest.raises(MixtureError, match="experts"):
        apply_mixture(h, mix)
    h.detach()
    # another model (three layers instead of two): other gated groups
    bigger = text_model(layers=3)
    h = attach(bigger, [make_lora(bigger, l.name, i, 2, keys_of(bigger)) for i, l in enumerate(loras)])
    with pytest.raises(MixtureError, match="other gated groups"):
        apply_mixture(h, mix)


def test_unreadable_and_non_mixture_files(tmp_path):
    _, _, files, _, _, _, _ = trained_setup(tmp_path)
    with pytest.raises(MixtureError, match="without MoLE mixture metadata"):
        load_mixture(files[0][1])
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(MixtureError, match="not a readable"):
        load_mixture(tmp_path / "junk.safetensors")


def test_save_is_atomic(tmp_path, monkeypatch):
    _, _, files, handle, _, _, result = trained_setup(tmp_path)
    target = tmp_path / "out" / "m.safetensors"
    save_mixture(target, handle, files, handle.config, result)
    before = target.read_bytes()

    def crash(tensors, filename, metadata=None):
        open(filename, "wb").write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(mixture_mod, "save_file", crash)
    with pytest.raises(OSError):
        save_mixture(target, handle, files, handle.config, result)
    assert target.read_bytes() == before                                       # the old file is intact
    assert [p.name for p in target.parent.iterdir()] == ["m.safetensors"]      # and no temp file remains
