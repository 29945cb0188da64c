"""Arithmetic merges of LoRAs: the baselines MoLE is compared with.

    ΔW = Σ_i w_i s_i B_i A_i                       (w normalised to Σ w_i = 1 unless asked otherwise)
    linear: that ΔW exactly, as one LoRA of rank Σ r_i (the scaled factors concatenated)
    svd:    the best rank-r approximation of that ΔW (truncated SVD, float32), computed from the thin
            factors: QR of the stacked B's and of the stacked A's, SVD of the small R×R core.

The factor functions are pure tensor functions; `merge_loras` applies them per module of a `Lora`;
`merged_weights` puts a (merged) LoRA into a model for the duration of a `with` block and hands back
the pristine weights bit-identically afterwards.

References: MoLE (Wu et al., ICLR 2024) for NLA / SVD baselines; peft `utils/merge_utils.py` (pure merge
functions) and kohya-ss `networks/svd_merge_lora.py` (the dense SVD we avoid).
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from mole_core.lora import Lora, LoraWeights, delta_weight, weight_module


def normalized(weights, normalize: bool = True) -> list[float]:
    """w_i / Σ w_j when normalize, else the weights as given. Σ w_j = 0 cannot be normalised: ValueError."""
    weights = [float(w) for w in weights]
    if not normalize:
        return weights
    total = sum(weights)
    if abs(total) < 1e-12:
        raise ValueError(f"merge weights {weights} sum to zero and cannot be normalised to sum 1; "
                         f"pass raw weights (normalize=False / --raw-weights) to use them as given.")
    return [w / total for w in weights]


def _stack(loras_weights: list[LoraWeights], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """[w_1 s_1 B_1 … w_N s_N B_N] (d_out, R) and [A_1; …; A_N] (R, d_in·kh·kw) in float32, plus A's tail shape."""
    if len(loras_weights) != len(weights) or not loras_weights:
        raise ValueError(f"need one weight per LoRA and at least one LoRA; got {len(loras_weights)} LoRA(s) "
                         f"and {len(weights)} weight(s).")
    tail = tuple(loras_weights[0].A.shape[1:])        # (d_in,) or (c_in, kh, kw)
    d_out = loras_weights[0].B.shape[0]
    for lw in loras_weights:
        if tuple(lw.A.shape[1:]) != tail or lw.B.shape[0] != d_out:
            raise ValueError(f"cannot merge LoRAs of different module shapes: A {tuple(lw.A.shape)} / "
                             f"B {tuple(lw.B.shape)} vs A (r, {', '.join(map(str, tail))}) / B ({d_out}, r, …).")
    A = torch.cat([lw.A.float().reshape(lw.rank, -1) for lw in loras_weights], dim=0)              # (R, d_in')
    B = torch.cat([w * lw.scale * lw.B.float().reshape(d_out, lw.rank)
                   for lw, w in zip(loras_weights, weights)], dim=1)                                  # (d_out, R)
    return A, B, tail


def _unflatten(A: torch.Tensor, B: torch.Tensor, tail: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """Back to module layout: Linear A (r, d_in), B (d_out, r); Conv A (r, c_in, kh, kw), B (d_out, r, 1, 1)."""
    if len(tail) == 1:
        return A.contiguous(), B.contiguous()
    r = A.shape[0]
    return A.reshape(r, *tail).contiguous(), B.reshape(B.shape[0], r, 1, 1).contiguous()


def linear_factors(loras_weights: list[LoraWeights], weights, normalize: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact linear merge as thin factors: B A = Σ_i w_i s_i B_i A_i, scale 1, rank Σ r_i.

    A = [A_1; …; A_N], B = [w_1 s_1 B_1 … w_N s_N B_N] (float32). Weights are normalised to sum 1
    unless normalize=False; negative weights are allowed.
    """
    A, B, tail = _stack(loras_weights, normalized(weights, normalize))
    return _unflatten(A, B, tail)


def svd_factors(loras_weights: list[LoraWeights], weights, rank: int | None = None, normalize: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-r truncated SVD of ΔW = Σ_i w_i s_i B_i A_i as thin factors (float32, scale 1).

    With B_cat (d_out, R) and A_cat (R, d_in) from `linear_factors`, ΔW = B_cat A_cat and
        B_cat = Q_b R_b,  A_catᵀ = Q_a R_a            (reduced QR)
        R_b R_aᵀ = U S Vᵀ                              (SVD of the small core, at most R×R)
        ΔW = (Q_b U) S (Q_a V)ᵀ
    so the result is B = Q_b U_r √S_r, A = √S_r (Q_a V_r)ᵀ; no dense d_out×d_in SVD is ever run.
    Default r = the largest input rank; r is capped at the rank the core can have.
    Conv layers are flattened over c_in·kh·kw and reshaped back.
    """
    A_cat, B_cat, tail = _stack(loras_weights, normalized(weights, normalize))
    rank = max(lw.rank for lw in loras_weights) if rank is None else int(rank)
    if rank < 1:
        raise ValueError(f"svd merge rank must be at least 1, got {rank}.")
    Q_b, R_b = torch.linalg.qr(B_cat)                  # (d_out, k_b), (k_b, R)
    Q_a, R_a = torch.linalg.qr(A_cat.T)                # (d_in', k_a), (k_a, R)
    U, S, Vh = torch.linalg.svd(R_b @ R_a.T)           # core (k_b, k_a)
    r = min(rank, S.shape[0])
    root = S[:r].sqrt()
    B = (Q_b @ U[:, :r]) * root                        # (d_out, r)
    A = root[:, None] * (Vh[:r] @ Q_a.T)               # (r, d_in')
    return _unflatten(A, B, tail)


def merge_loras(loras: list[Lora], weights=None, method: str = "linear", rank: int | None = None,
                normalize: bool = True, name: str = "merged") -> Lora:
    """One LoRA from several, per module over the union of their modules (a LoRA without a module
    contributes zero there). Weights default to equal; they are normalised once, over all LoRAs.

    method "linear": exact, rank Σ r_i per module. method "svd": rank `rank` (default: largest input rank).
    Every merged module has scale 1.
    """
    if not loras:
        raise ValueError("merge_loras needs at least one LoRA.")
    if method not in ("linear", "svd"):
        raise ValueError(f"unknown merge method '{method}' (expected 'linear' or 'svd').")
    weights = normalized([1.0] * len(loras) if weights is None else weights, normalize)
    if len(weights) != len(loras):
        raise ValueError(f"{len(loras)} LoRA(s) but {len(weights)} weight(s).")
    keys = list(dict.fromkeys(k for lora in loras for k in lora.modules))
    modules = {}
    for key in keys:
        present = [(lora.modules[key], w) for lora, w in zip(loras, weights) if key in lora.modules]
        lws, ws = [p[0] for p in present], [p[1] for p in present]
        try:
            if method == "linear":
                A, B = linear_factors(lws, ws, normalize=False)
            else:
                A, B = svd_factors(lws, ws, rank=rank, normalize=False)
        except ValueError as e:
            raise ValueError(f"module '{key}': {e}") from e
        modules[key] = LoraWeights(A=A, B=B, scale=1.0)
    metadata = {"merged_from": [lora.name for lora in loras], "weights": weights, "method": method,
                "rank": rank, "normalize": normalize}
    return Lora(name=name, modules=modules, path=None, format="diffusers", metadata=metadata)


@contextmanager
def merged_weights(components: nn.Module, lora: Lora):
    """Inside the block each target weight is W_pristine + ΔW (ΔW from `delta_weight`, math in float32).
    Wrapped modules (a MoLE or PEFT layer around the Linear / Conv2d) are merged into their base weight.

    The pristine tensors are never written to: the parameter is pointed at a new tensor and pointed
    back on exit, so the model is bit-identical afterwards and repeated use never drifts.
    """
    pristine: dict[str, torch.Tensor] = {}
    try:
        for key, lw in lora.modules.items():
            weight = weight_module(components, key).weight
            pristine[key] = weight.data
            dW = delta_weight(lw.A, lw.B, lw.scale).to(weight.device)
            if dW.shape != weight.shape:
                raise ValueError(f"{lora.path or lora.name}: module '{key}': ΔW has shape {tuple(dW.shape)}, "
                                 f"the weight {tuple(weight.shape)}.")
            weight.data = (weight.data.float() + dW).to(weight.dtype)
        yield components
    finally:
        for key, W in pristine.items():
            weight_module(components, key).weight.data = W
