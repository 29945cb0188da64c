"""Mixture files: round trip, refusal of other LoRA files / models / granularities, atomic writes; a file that is
not a good mixture (bad metadata, gates that are not finite, too large or empty) is refused at load, naming the
file and never the folder it lies in."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import mole_core.mixture as mixture_mod
from mole_core.attach import MoleConfig, attach
from mole_core.image.lora_files import save_lora
from mole_core.mixture import META_KEY, MixtureError, apply_mixture, load_mixture, save_mixture
from mole_core.train import TrainConfig
from tests.helpers import make_lora
from tests.helpers import keys_of, text_model, trained_setup

NAN = float("nan")


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


# ---- files that are not a good mixture: refused at load, naming the file ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mixture_parts(tmp_path_factory):
    """(metadata dict, gate tensors) of a valid mixture file, and a server-ish folder to write variants to."""
    tmp = tmp_path_factory.mktemp("mixtures")
    _, _, files, handle, _, _, result = trained_setup(tmp)
    good = save_mixture(tmp / "good.safetensors", handle, files, handle.config, result, model_id="tiny")
    handle.detach()
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()[META_KEY]), {k: f.get_tensor(k) for k in f.keys()}
    folder = tmp / "server_secret"
    folder.mkdir()
    return meta, tensors, folder


def _write_mixture(folder, name, raw: str, tensors) -> Path:
    path = folder / name
    save_file(tensors, str(path), metadata={"format": "pt", META_KEY: raw})
    return path


def _without_names(meta):
    return json.dumps({k: v for k, v in meta.items() if k != "names"})


@pytest.mark.parametrize("raw, message", [
    (lambda m: json.dumps([m]), "the mixture metadata must be a JSON object; found list"),
    (_without_names, "metadata 'names' must be a list of LoRA names; found None"),
    (lambda m: json.dumps({**m, "names": "face"}), "metadata 'names' must be a list of LoRA names; found 'face'"),
    (lambda m: json.dumps({**m, "granularity": "pixel"}), "metadata 'granularity' must be one of matrix, layer"),
    (lambda m: json.dumps({**m, "mole_config": {**m["mole_config"], "gate": "bogus"}}),
     "metadata 'mole_config' must be an object whose 'gate' is one of sample, token"),
    (lambda m: json.dumps({**m, "mole_config": "block"}), "metadata 'mole_config' must be an object"),
    (lambda m: json.dumps(m)[:-5], r"its 'mole.mixture' metadata is not valid JSON"),
], ids=["list", "no-names", "names-str", "granularity", "gate-kind", "mole_config-str", "broken-json"])
def test_mixture_with_bad_metadata_is_refused_naming_the_file(mixture_parts, raw, message):
    meta, tensors, folder = mixture_parts
    path = _write_mixture(folder, "upload.safetensors", raw(meta), tensors)
    with pytest.raises(MixtureError) as e:
        load_mixture(path)
    assert str(e.value).startswith("upload.safetensors: ") and message in str(e.value)
    assert str(folder) not in str(e.value) and "server_secret" not in str(e.value)
    with pytest.raises(MixtureError, match=r"^mine.safetensors: "):       # an upload's own name, when given
        load_mixture(path, display="mine.safetensors")


@pytest.mark.parametrize("poison", ["nan", "huge"])
def test_mixture_with_non_finite_or_huge_gates_is_refused_at_load(mixture_parts, poison):
    meta, tensors, folder = mixture_parts
    key = sorted(k for k in tensors if k.endswith("proj.weight"))[0]
    bad = dict(tensors)
    bad[key] = tensors[key].clone()
    if poison == "nan":
        bad[key][0, 0] = NAN
    else:
        bad[key] = bad[key] * 1e30
    path = _write_mixture(folder, f"{poison}.safetensors", json.dumps(meta), bad)
    with pytest.raises(MixtureError, match=rf"^{poison}.safetensors: gate tensor '{key}' is empty, not finite or holds "
                                           rf"values above 10000; the file is refused"):
        load_mixture(path)
    load_mixture(_write_mixture(folder, "fine.safetensors", json.dumps(meta), tensors))   # the good one loads


def test_mixture_with_an_empty_gate_tensor_is_refused_at_load(mixture_parts):
    meta, tensors, folder = mixture_parts
    path = _write_mixture(folder, "empty.safetensors", json.dumps(meta), {**tensors, "extra.log_tau": torch.zeros(0)})
    with pytest.raises(MixtureError, match=r"^empty.safetensors: "):
        load_mixture(path)
