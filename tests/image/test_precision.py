"""Precision and memory: `Engine(dtype=...)`, `--dtype` and `--cpu-offload` (CLI and app).

A tiny FLUX pipeline in bfloat16 on the CPU renders MoLE and the merges and trains its gates, and the gates stay
float32 (their parameters and the softmax); CPU offload is diffusers' `enable_model_cpu_offload`, refused with
a sentence where no CUDA GPU is present.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from mole_core import cli
from mole_core.attach import MoleConfig
from mole_core.image.engine import DTYPES, Engine, GenerateRequest, Mix
from mole_core.image.families import prepare
from mole_core.train import TrainConfig
from tests.image.test_engine_families import make_bank
from tests.tiny_families import SIDE, build_flux, make_family_dir

REQUEST = GenerateRequest("a photo of a", seed=3, steps=2, guidance=3.0, height=SIDE, width=SIDE)


@pytest.fixture(scope="module")
def flux_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux")
    model_dir = make_family_dir("flux", root)
    return model_dir, make_bank(root / "bank", model_dir, "flux")


def test_a_bfloat16_model_keeps_float32_gates(flux_folders):
    model_dir, bank = flux_folders
    engine = Engine(str(model_dir), str(bank), dtype=torch.bfloat16)
    assert engine.pipe.transformer.dtype == torch.bfloat16
    keys = ("a", "b")
    results = engine.compare([Mix("base"), Mix("linear", keys), Mix("mole", keys, gate="token")], REQUEST)
    images = [np.asarray(r.image, dtype=np.int16) for r in results]
    assert not np.array_equal(images[0], images[1])
    mixture = engine.train(list(keys), MoleConfig(gate="token"), TrainConfig(steps=2, lr=5e-2, batch_size=2))
    gates = engine._kept.handle.gate_parameters()
    assert gates and all(p.dtype == torch.float32 for p in gates)
    assert all(t.dtype == torch.float32 for t in mixture.gate_state.values())
    assert any(t.abs().max() > 0 for k, t in mixture.gate_state.items() if k.endswith("proj.weight"))
    trained = engine.generate(Mix("mole", keys, mixture=mixture), REQUEST)
    with engine._kept.handle.recording() as rec, torch.no_grad():
        engine._call_pipe(REQUEST, engine._latents(REQUEST))
    assert rec.entries and all(w.dtype == torch.float32 for *_, w in rec.entries)
    assert trained.image.size == (SIDE, SIDE)


def test_an_unknown_dtype_is_refused():
    with pytest.raises(ValueError, match="dtype must be one of float32, float16, bfloat16"):
        Engine("nowhere", "nowhere", dtype=torch.int8)
    assert set(DTYPES) == set(cli.DTYPE_NAMES)


def test_cpu_offload_needs_a_gpu_and_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match=r"CPU offload \(--cpu-offload\) moves each model to a CUDA GPU"):
        Engine("nowhere", "nowhere", cpu_offload=True)
    code = cli.main(["generate", "--method", "base", "--prompt", "x", "--out", str(tmp_path / "x.png"),
                     "--cpu-offload"])
    assert code == 1 and "--cpu-offload" in capsys.readouterr().err
    with pytest.raises(ValueError, match="CPU offload"):
        prepare(build_flux(tmp_path / "p"), "cpu", None, cpu_offload=True)


def test_cpu_offload_is_diffusers_model_offloading(monkeypatch, tmp_path):
    """On a (pretended) GPU machine, prepare hands the pipeline to `enable_model_cpu_offload(device=...)`
    instead of moving it, after casting it to the dtype."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    pipe = build_flux(tmp_path / "p")
    calls = []
    monkeypatch.setattr(pipe, "enable_model_cpu_offload", lambda device=None: calls.append(device), raising=False)
    monkeypatch.setattr(pipe, "to", lambda *a, **kw: calls.append(("to", a, kw)) or pipe, raising=False)
    assert prepare(pipe, "cuda", None, cpu_offload=True) is pipe
    assert calls == ["cuda"]


def test_cli_flags_reach_the_engine():
    args = cli.build_parser().parse_args(["generate", "--method", "base", "--prompt", "x", "--out", "x.png",
                                          "--dtype", "bfloat16", "--cpu-offload"])
    assert cli.engine_precision(args) == {"dtype": torch.bfloat16, "cpu_offload": True}
    args = cli.build_parser().parse_args(["train-gates", "--lora", "a", "--lora", "b", "--out", "m.safetensors"])
    assert cli.engine_precision(args) == {"dtype": None, "cpu_offload": False}
