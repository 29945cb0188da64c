"""Merges: linear against diffusers' own multi-adapter, SVD against a dense SVD, export, no drift, CLI."""
from __future__ import annotations

import torch
import pytest

from mole_core.lora import LoraWeights, Lora, delta_weight, load_lora, pipeline_components, save_lora
from mole_core.merge import linear_factors, merge_loras, merged_weights, svd_factors
from tests.test_lora import TARGETS, assert_close, model_outputs, random_lora


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


@pytest.mark.parametrize("method, fmt", [("linear", "diffusers"), ("svd", "kohya"), ("svd", "diffusers")])
def test_exported_file_reloaded_by_diffusers_reproduces_merge(tiny_pipe, comps, tmp_path, method, fmt):
    loras = [random_lora(comps, seed=i, rank=3) for i in range(3)]
    merged = merge_loras(loras, [0.5, 0.3, 0.2], method=method, rank=4)
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
    assert "sum to zero" in capsys.readouterr().err
