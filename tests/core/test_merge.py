"""Merges: linear against diffusers' own multi-adapter, SVD against a dense SVD, TIES / DARE against PEFT's
definitions on the dense deltas, export, no drift, CLI."""
from __future__ import annotations

import contextlib
import re

import torch
import pytest

from mole_core.lora import LoraWeights, Lora, delta_weight
from mole_core.image.lora_files import load_lora, pipeline_components, save_lora
from mole_core.merge import (dare_delta, drop, linear_factors, merge_loras, merged_weights, svd_factors, ties_delta,
                             trim)
from tests.helpers import TARGETS, assert_close, model_outputs, random_lora


@pytest.fixture
def comps(tiny_pipe):
    return pipeline_components(tiny_pipe)


def _dW(lw: LoraWeights) -> torch.Tensor:
    return delta_weight(lw.A, lw.B, lw.scale)


def _factors(shape_a, shape_b, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [LoraWeights(A=torch.randn(r, *shape_a, generator=g), B=torch.randn(shape_b[0], r, *shape_b[1:], generator=g),
                        scale=0.5 + i) for i, r in enumerate(ranks)]


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_linear_equals_diffusers_set_adapters(tiny_pipe, comps, tmp_path, fmt):
    weights = [0.7, 1.3, -0.4]
    paths = [tmp_path / f"l{i}.safetensors" for i in range(3)]
    for i, path in enumerate(paths):
        save_lora(random_lora(comps, seed=i, rank=2 + i, alpha=1.0 + i), path, format=fmt)
    loras = [load_lora(p) for p in paths]
    for i, path in enumerate(paths):
        tiny_pipe.load_lora_weights(str(path), adapter_name=f"l{i}")
    tiny_pipe.set_adapters(["l0", "l1", "l2"], adapter_weights=weights)  # unfused: y = Wx + Σ w_i s_i B_i A_i x
    ref_unet, ref_text = model_outputs(tiny_pipe)
    tiny_pipe.unload_lora_weights()                                       # back to the plain modules

    merged = merge_loras(loras, weights, method="linear", normalize=False)
    assert merged.modules[TARGETS[0]].rank == 2 + 3 + 4                 # exact: ranks add up
    with merged_weights(comps, merged):
        ours_unet, ours_text = model_outputs(tiny_pipe)
    assert_close(ours_unet, ref_unet)
    assert_close(ours_text, ref_text)


def test_linear_normalises_weights_by_default():
    lws = _factors((6,), (5,), [2, 3])
    A, B = linear_factors(lws, [1.0, 3.0])
    expected = 0.25 * _dW(lws[0]) + 0.75 * _dW(lws[1])
    torch.testing.assert_close(B @ A, expected, rtol=1e-5, atol=1e-5)
    A, B = linear_factors(lws, [1.0, 3.0], normalize=False)
    torch.testing.assert_close(B @ A, _dW(lws[0]) + 3 * _dW(lws[1]), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="sum to zero"):
        linear_factors(lws, [1.0, -1.0])


@pytest.mark.parametrize("shape_a, shape_b", [((40,), (30,)), ((6, 3, 3), (12, 1, 1))])
def test_svd_full_rank_equals_linear(shape_a, shape_b):
    lws = _factors(shape_a, shape_b, [2, 3, 4])
    A_lin, B_lin = linear_factors(lws, [0.2, 0.5, 0.3])
    A_svd, B_svd = svd_factors(lws, [0.2, 0.5, 0.3], rank=9)
    assert A_svd.shape == (9, *shape_a) and B_svd.shape == (shape_b[0], 9, *shape_b[1:])
    torch.testing.assert_close(delta_weight(A_svd, B_svd, 1.0), delta_weight(A_lin, B_lin, 1.0),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape_a, shape_b", [((40,), (30,)), ((6, 3, 3), (12, 1, 1))])
def test_svd_rank_r_matches_dense_truncation(shape_a, shape_b):
    lws = _factors(shape_a, shape_b, [3, 4, 5], seed=3)
    weights = [0.5, -0.2, 0.7]
    dW = sum(w * _dW(lw) for w, lw in zip(weights, lws)).reshape(shape_b[0], -1).double()
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
    for r in (1, 3, 5):
        A, B = svd_factors(lws, weights, rank=r, normalize=False)
        assert A.shape[0] == r
        ours = delta_weight(A, B, 1.0).reshape(shape_b[0], -1).double()
        dense = (U[:, :r] * S[:r]) @ Vh[:r]
        assert ((ours - dense).norm() / dense.norm()).item() <= 1e-4
        # Eckart–Young: what is left over is exactly the discarded singular values
        assert (dW - ours).norm().item() == pytest.approx(S[r:].square().sum().sqrt().item(), rel=1e-4)
        assert torch.linalg.matrix_norm(dW - ours, ord=2).item() == pytest.approx(S[r].item(), rel=1e-4)
    A, B = svd_factors(lws, weights)                              # default rank: the largest input rank
    assert A.shape[0] == 5


def test_weights_one_minus_one_cancel(tiny_pipe, comps):
    lora = random_lora(comps)
    base = model_outputs(tiny_pipe)
    for method in ("linear", "svd"):
        merged = merge_loras([lora, lora], [1.0, -1.0], method=method, normalize=False)
        for lw in merged.modules.values():
            assert _dW(lw).abs().max().item() < 1e-6
        with merged_weights(comps, merged):
            out = model_outputs(tiny_pipe)
        for a, b in zip(out, base):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_union_of_modules_missing_contributes_zero(comps):
    a = random_lora(comps, seed=1, targets=TARGETS[:4])
    b = random_lora(comps, seed=2, targets=TARGETS[2:6])
    merged = merge_loras([a, b], [0.25, 0.75], method="linear")
    assert list(merged.modules) == TARGETS[:6]
    torch.testing.assert_close(_dW(merged.modules[TARGETS[0]]), 0.25 * _dW(a.modules[TARGETS[0]]))
    torch.testing.assert_close(_dW(merged.modules[TARGETS[5]]), 0.75 * _dW(b.modules[TARGETS[5]]))
    torch.testing.assert_close(_dW(merged.modules[TARGETS[3]]),
                               0.25 * _dW(a.modules[TARGETS[3]]) + 0.75 * _dW(b.modules[TARGETS[3]]))


# ---- TIES and DARE ----------------------------------------------------------------------------------

def _peft():
    merge_utils = pytest.importorskip("peft.utils.merge_utils")
    return merge_utils


def _flat(lw: LoraWeights) -> torch.Tensor:
    return _dW(lw).reshape(lw.B.shape[0], -1)


def test_dare_at_density_one_is_the_raw_linear_merge(comps):
    """Any ranks, Linear and Conv2d modules, a LoRA missing from some modules: DARE(1) == Σ w_i ΔW_i."""
    loras = [random_lora(comps, seed=i, rank=2 + i, alpha=1.0 + i) for i in range(2)]
    loras.append(random_lora(comps, seed=2, rank=4, targets=TARGETS[3:]))
    weights = [0.7, 1.3, -0.4]
    dare = merge_loras(loras, weights, method="dare", density=1.0, normalize=False)
    linear = merge_loras(loras, weights, method="linear", normalize=False)
    assert list(dare.modules) == list(linear.modules) == TARGETS
    for key, lw in dare.modules.items():
        d_out, d_in = _flat(lw).shape
        present = sum(l.modules[key].rank for l in loras if key in l.modules)
        assert lw.rank == min(present, d_out, d_in)                      # default rank Σ r_i, capped
        assert lw.A.shape[1:] == linear.modules[key].A.shape[1:] and lw.B.dim() == linear.modules[key].B.dim()
        torch.testing.assert_close(_dW(lw), _dW(linear.modules[key]), rtol=1e-4, atol=1e-5)
    assert dare.metadata["method"] == "dare" and dare.metadata["density"] == 1.0 and dare.metadata["seed"] == 0


@pytest.mark.parametrize("shape_a, shape_b", [((40,), (30,)), ((6, 3, 3), (12, 1, 1))])
def test_ties_with_agreeing_signs_equals_peft_and_the_linear_merge(shape_a, shape_b):
    """All A, B > 0, so every ΔW_i > 0: TIES at density 1 is PEFT's `ties` on the same ΔW_i exactly (the
    result has rank ≤ Σ r_i, so re-factoring loses nothing), and with normalised weights it is the
    normalised linear merge."""
    merge_utils = _peft()
    lws = [LoraWeights(lw.A.abs(), lw.B.abs(), lw.scale) for lw in _factors(shape_a, shape_b, [2, 3, 4], seed=5)]
    loras = [Lora(f"l{i}", {"m": lw}) for i, lw in enumerate(lws)]
    for normalize, weights in ((False, [0.5, 1.5, 1.0]), (True, [1.0, 2.0, 1.0])):
        merged = merge_loras(loras, weights, method="ties", density=1.0, normalize=normalize)
        used = merged.metadata["weights"]
        with pytest.warns(UserWarning, match="no pruning"):            # PEFT warns at density 1
            theirs = merge_utils.ties([_dW(lw) for lw in lws], torch.tensor(used), 1.0)
        torch.testing.assert_close(_dW(merged.modules["m"]), theirs, rtol=1e-4, atol=1e-5)
    assert used == pytest.approx([0.75, 1.5, 0.75])                     # normalised to mean 1 for TIES
    linear = merge_loras(loras, weights, method="linear")
    torch.testing.assert_close(_dW(merged.modules["m"]), _dW(linear.modules["m"]), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_delta_is_peft_ties_and_the_merge_is_its_truncated_svd(density):
    """Mixed signs, any density: our dense TIES == PEFT's `ties`; merge_loras re-factors it by a truncated SVD."""
    merge_utils = _peft()
    lws = _factors((6, 3, 3), (12, 1, 1), [2, 3, 4], seed=7)
    taus, weights = [_flat(lw) for lw in lws], [0.5, -0.2, 0.9]
    with pytest.warns(UserWarning) if density == 1 else contextlib.nullcontext():
        theirs = merge_utils.ties(taus, torch.tensor(weights), density)
    ours = ties_delta(taus, weights, density)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    merged = merge_loras([Lora(f"l{i}", {"m": lw}) for i, lw in enumerate(lws)], weights, method="ties",
                         density=density, normalize=False, rank=5)
    U, S, Vh = torch.linalg.svd(theirs.double(), full_matrices=False)
    truncated = (U[:, :5] * S[:5]) @ Vh[:5]
    got = _flat(merged.modules["m"]).double()
    assert merged.modules["m"].A.shape == (5, 6, 3, 3) and merged.modules["m"].B.shape == (12, 5, 1, 1)
    assert ((got - truncated).norm() / truncated.norm()).item() < 1e-4


def test_trim_and_drop_keep_the_expected_fraction():
    g = torch.Generator().manual_seed(0)
    tau = torch.randn(100, 120, generator=g)
    for density in (0.1, 0.35, 0.8):
        kept = trim(tau, density)
        assert int((kept != 0).sum()) == int(density * tau.numel())    # TIES: exactly the top-k ...
        assert kept.abs().min() == 0 and tau.abs()[kept != 0].min() >= tau.abs()[kept == 0].max()   # ... by |τ|
        dropped = drop(tau, density, torch.Generator().manual_seed(1))
        survivors = dropped != 0
        assert abs(survivors.float().mean().item() - density) < 0.02     # DARE: about density of them ...
        torch.testing.assert_close(dropped[survivors], tau[survivors] / density)   # ... rescaled by 1/density
    taus = [torch.randn(50, 60, generator=g) for _ in range(2)]
    dare = dare_delta(taus, [0.5, 0.5], 0.3, torch.Generator().manual_seed(2))
    assert abs((dare != 0).float().mean().item() - (1 - 0.7 ** 2)) < 0.02       # union of two drops
    assert int((ties_delta(taus, [1.0, 1.0], 0.3) != 0).sum()) <= 2 * int(0.3 * 3000)


def test_dare_is_deterministic_by_seed(comps):
    loras = [random_lora(comps, seed=i, rank=2 + i) for i in range(3)]
    for method in ("dare", "dare_ties"):
        a, b = (merge_loras(loras, method=method, density=0.4, seed=3) for _ in range(2))
        c = merge_loras(loras, method=method, density=0.4, seed=4)
        assert all(torch.equal(a.modules[k].A, b.modules[k].A) and torch.equal(a.modules[k].B, b.modules[k].B)
                   for k in a.modules)
        assert not torch.allclose(_dW(a.modules[TARGETS[0]]), _dW(c.modules[TARGETS[0]]))
    linear = merge_loras(loras, method="linear")
    assert not torch.allclose(_dW(a.modules[TARGETS[0]]), _dW(linear.modules[TARGETS[0]]), atol=1e-3)


def test_bad_density_is_refused(comps):
    loras = [random_lora(comps, seed=i) for i in range(2)]
    for method in ("ties", "dare", "dare_ties"):
        for density in (None, 0, -0.5, 1.5, float("nan")):
            with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
                merge_loras(loras, method=method, density=density)
    merge_loras(loras, method="linear", density=None)                  # the other methods take none
    with pytest.raises(ValueError, match="unknown merge method 'magic'"):
        merge_loras(loras, method="magic")


@pytest.mark.parametrize("method, fmt", [("linear", "diffusers"), ("svd", "kohya"), ("svd", "diffusers"),
                                         ("ties", "kohya"), ("dare", "diffusers")])
def test_exported_file_reloaded_by_diffusers_reproduces_merge(tiny_pipe, comps, tmp_path, method, fmt):
    loras = [random_lora(comps, seed=i, rank=3) for i in range(3)]
    merged = merge_loras(loras, [0.5, 0.3, 0.2], method=method, rank=4, density=0.5)
    with merged_weights(comps, merged):
        ours = model_outputs(tiny_pipe)
    path = tmp_path / "merged.safetensors"
    save_lora(merged, path, format=fmt)
    tiny_pipe.load_lora_weights(str(path), adapter_name="merged")
    ref = model_outputs(tiny_pipe)
    for a, b in zip(ours, ref):
        assert_close(a, b)


def test_switching_methods_twenty_times_is_bit_identical(tiny_pipe, comps):
    loras = [random_lora(comps, seed=i) for i in range(3)]
    merges = {m: merge_loras(loras, method=m) for m in ("linear", "svd")}
    pristine = {k: comps.get_submodule(k).weight.detach().clone() for k in TARGETS}
    base = model_outputs(tiny_pipe)
    first = {}
    for i in range(20):
        for method, merged in merges.items():
            with merged_weights(comps, merged):
                out = model_outputs(tiny_pipe)
            first.setdefault(method, out)
            assert all(torch.equal(a, b) for a, b in zip(out, first[method]))
    assert not torch.equal(first["linear"][0], base[0])
    assert all(torch.equal(a, b) for a, b in zip(model_outputs(tiny_pipe), base))
    assert all(torch.equal(comps.get_submodule(k).weight, w) for k, w in pristine.items())


def test_merged_weights_restores_on_error(comps):
    key = TARGETS[0]
    before = comps.get_submodule(key).weight.detach().clone()
    good = random_lora(comps, targets=[key])
    bad = Lora("bad", {**good.modules, TARGETS[1]: LoraWeights(torch.ones(2, 3), torch.ones(3, 2), 1.0)})
    with pytest.raises(ValueError, match="ΔW has shape"):
        with merged_weights(comps, bad):
            pass
    assert torch.equal(comps.get_submodule(key).weight, before)


def test_cli_inspect_and_merge(tiny_pipe, comps, tmp_path, capsys):
    from mole_core import cli

    model_dir = tmp_path / "model"
    tiny_pipe.save_pretrained(model_dir)
    files = []
    for i, fmt in enumerate(["diffusers", "kohya"]):
        files.append(tmp_path / f"l{i}.safetensors")
        save_lora(random_lora(comps, seed=i, rank=2), files[-1], format=fmt)

    assert cli.main(["inspect", str(files[1]), "--model", str(model_dir)]) == 0
    out = capsys.readouterr().out
    assert "kohya" in out and "verdict" in out and "ok" in out

    (tmp_path / "bad.ckpt").write_bytes(b"not really")
    assert cli.main(["inspect", str(tmp_path / "bad.ckpt")]) == 1
    assert "pickle" in capsys.readouterr().out

    out_file = tmp_path / "out.safetensors"
    assert cli.main(["merge", "--model", str(model_dir), "--lora", f"{files[0]}:0.6", "--lora", str(files[1]),
                     "--method", "svd", "--rank", "3", "--raw-weights", "--format", "kohya",
                     "--out", str(out_file)]) == 0
    merged = load_lora(out_file)
    assert merged.format == "kohya" and {w.rank for w in merged.modules.values()} == {3}
    expected = merge_loras([load_lora(f) for f in files], [0.6, 1.0], method="svd", rank=3, normalize=False)
    for key, lw in expected.modules.items():
        torch.testing.assert_close(_dW(merged.modules[key]), _dW(lw), rtol=1e-5, atol=1e-6)

    assert cli.main(["merge", "--model", str(model_dir), "--lora", str(files[0]), "--lora", f"{files[1]}:-1",
                     "--method", "linear", "--out", str(tmp_path / "x.safetensors")]) == 1   # weights sum to 0
    assert re.search(r"sum to (0|zero)\b", capsys.readouterr().err)
