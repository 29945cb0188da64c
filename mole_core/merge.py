"""Arithmetic merges of LoRAs: the baselines MoLE is compared with.

    ΔW = Σ_i w_i s_i B_i A_i                       (w normalised to Σ w_i = 1 unless asked otherwise)
    linear: that ΔW exactly, as one LoRA of rank Σ r_i (the scaled factors concatenated)
    svd:    the best rank-r approximation of that ΔW (truncated SVD, float32), computed from the thin
            factors: QR of the stacked B's and of the stacked A's, SVD of the small R×R core.
    ties:   TIES on the task tensors τ_i = s_i B_i A_i (dense, per module): trim each to its top
            `density` fraction by magnitude, elect the majority sign per entry, mean of the agreeing w_i τ_i
    dare:   DARE: drop each entry of τ_i with probability 1 − density, rescale by 1/density, Σ w_i τ_i
            ("dare_ties": TIES's elect + disjoint mean instead of the sum)
TIES and DARE are PEFT's `ties` / `dare_linear` / `dare_ties` (peft `utils/merge_utils.py`), but on ΔW
instead of on A and B, so LoRAs of any ranks merge; the result is re-factored to a LoRA by a truncated
SVD of rank r (default Σ r_i, at most min(d_out, d_in)) — a sparsified ΔW is no longer low-rank, so this
is the one place where a dense SVD runs.

The factor functions are pure tensor functions; `merge_loras` applies them per module of a `Lora`;
`merged_weights` puts a (merged) LoRA into a model for the duration of a `with` block and hands back
the pristine weights bit-identically afterwards.

References: MoLE (Wu et al., ICLR 2024) for NLA / SVD baselines; TIES (Yadav et al., NeurIPS 2023, arXiv
2306.01708); DARE (Yu et al., ICML 2024, arXiv 2311.03099); peft `utils/merge_utils.py` (pure merge
functions, the TIES / DARE conventions) and kohya-ss `networks/svd_merge_lora.py` (the dense SVD we avoid).
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


MERGE_METHODS = ("linear", "svd", "ties", "dare", "dare_ties")
SPARSE_METHODS = ("ties", "dare", "dare_ties")             # work entry by entry on ΔW; need a density


def _module_shape(loras_weights: list[LoraWeights], weights: list[float]) -> tuple[int, tuple]:
    """(d_out, A's tail shape) shared by all the LoRAs of one module; ValueError if they differ."""
    if len(loras_weights) != len(weights) or not loras_weights:
        raise ValueError(f"need one weight per LoRA and at least one LoRA; got {len(loras_weights)} LoRA(s) "
                         f"and {len(weights)} weight(s).")
    tail = tuple(loras_weights[0].A.shape[1:])        # (d_in,) or (c_in, kh, kw)
    d_out = loras_weights[0].B.shape[0]
    for lw in loras_weights:
        if tuple(lw.A.shape[1:]) != tail or lw.B.shape[0] != d_out:
            raise ValueError(f"cannot merge LoRAs of different module shapes: A {tuple(lw.A.shape)} / "
                             f"B {tuple(lw.B.shape)} vs A (r, {', '.join(map(str, tail))}) / B ({d_out}, r, …).")
    return d_out, tail


def _stack(loras_weights: list[LoraWeights], weights: list[float]) -> tuple[torch.Tensor, torch.Tensor, tuple]:
    """[w_1 s_1 B_1 … w_N s_N B_N] (d_out, R) and [A_1; …; A_N] (R, d_in·kh·kw) in float32, plus A's tail shape."""
    d_out, tail = _module_shape(loras_weights, weights)
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
    A, B = _balanced(Q_b @ U[:, :r], S[:r], Vh[:r] @ Q_a.T)
    return _unflatten(A, B, tail)


def _balanced(U: torch.Tensor, S: torch.Tensor, Vh: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U diag(S) Vh as LoRA factors with √S on each side: A = √S Vh (r, d_in'), B = U √S (d_out, r)."""
    root = S.sqrt()
    return root[:, None] * Vh, U * root


# ---- TIES and DARE: per entry of the dense task tensors, then re-factored --------------------------

def trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trim: keep the ⌊density·numel⌋ entries of largest magnitude, zero the rest (peft `prune`,
    "magnitude"). density 1 keeps everything."""
    if density >= 1:
        return tau
    keep = torch.zeros(tau.numel(), dtype=torch.bool, device=tau.device)
    keep[tau.abs().reshape(-1).topk(int(density * tau.numel())).indices] = True
    return tau * keep.reshape(tau.shape)


def drop(tau: torch.Tensor, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE drop and rescale: each entry survives with probability `density` (drawn from the CPU
    `generator`), survivors × 1/density (peft `prune`, "random", rescale=True). density 1 keeps everything."""
    if density >= 1:
        return tau
    keep = torch.rand(tau.shape, generator=generator) < density
    return tau * keep.to(tau.device) / density


def elect_signs(taus: torch.Tensor, method: str = "total") -> torch.Tensor:
    """TIES elect: taus (N, ...) -> bool (N, ...), True where τ_i's sign is the majority sign γ, the sign of
    Σ_i τ_i ("total") or of Σ_i sign(τ_i) ("frequency"); γ = + on a tie, zeros never agree
    (peft `calculate_majority_sign_mask`)."""
    signs = taus.sign()
    votes = taus.sum(0) if method == "total" else signs.sum(0)
    return signs == torch.where(votes >= 0, 1.0, -1.0)


def disjoint_merge(weighted: torch.Tensor, agree: torch.Tensor) -> torch.Tensor:
    """TIES disjoint merge: per entry, Σ of the agreeing w_i τ_i / how many agree (at least 1) (peft)."""
    return (weighted * agree).sum(0) / agree.sum(0).clamp_min(1)


def ties_delta(taus: list[torch.Tensor], weights, density: float, sign_method: str = "total") -> torch.Tensor:
    """TIES of task tensors τ_i (any equal shapes): trim, elect on the trimmed τ_i, disjoint mean of w_i τ_i.
    Equals peft `ties(taus, weights, density, sign_method)`."""
    trimmed = torch.stack([trim(t.float(), density) for t in taus])                    # (N, ...)
    w = torch.tensor([float(x) for x in weights]).view(-1, *[1] * (trimmed.dim() - 1))
    return disjoint_merge(trimmed * w.to(trimmed.device), elect_signs(trimmed, sign_method))


def dare_delta(taus: list[torch.Tensor], weights, density: float, generator: torch.Generator | None = None,
               ties: bool = False) -> torch.Tensor:
    """DARE of task tensors τ_i: drop + rescale each, then Σ_i w_i τ_i (peft `dare_linear`) or, with
    ties=True, TIES's elect + disjoint mean (peft `dare_ties`)."""
    dropped = torch.stack([drop(t.float(), density, generator) for t in taus])         # (N, ...)
    w = torch.tensor([float(x) for x in weights]).view(-1, *[1] * (dropped.dim() - 1))
    weighted = dropped * w.to(dropped.device)
    return disjoint_merge(weighted, elect_signs(dropped)) if ties else weighted.sum(0)


def _check_density(density) -> float:
    if density is None or not 0 < float(density) <= 1:
        raise ValueError(f"density must be in (0, 1] (the fraction of each ΔW's entries kept); got {density}.")
    return float(density)


def _refactored(loras_weights: list[LoraWeights], weights: list[float], merge, rank: int | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """merge([τ_1 … τ_N], weights) on the flattened task tensors τ_i = s_i B_i A_i (d_out, d_in'), then its
    rank-r truncated SVD as factors (float32, scale 1). Default r = Σ r_i; r is capped at min(d_out, d_in')."""
    d_out, tail = _module_shape(loras_weights, weights)
    taus = [delta_weight(lw.A, lw.B, lw.scale).reshape(d_out, -1) for lw in loras_weights]
    dW = merge(taus, weights)                                                           # (d_out, d_in')
    rank = sum(lw.rank for lw in loras_weights) if rank is None else int(rank)
    if rank < 1:
        raise ValueError(f"merge rank must be at least 1, got {rank}.")
    r = min(rank, *dW.shape)
    U, S, Vh = torch.linalg.svd(dW, full_matrices=False)   # dense: the sparsified ΔW has no thin factors
    A, B = _balanced(U[:, :r], S[:r], Vh[:r])
    return _unflatten(A, B, tail)


def ties_factors(loras_weights: list[LoraWeights], weights, density: float, rank: int | None = None,
                 normalize: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """TIES merge of one module's LoRAs (`ties_delta` on their ΔW_i), re-factored to rank r (default Σ r_i).

    The disjoint merge already averages, so normalised weights sum to N here (mean 1): with equal weights
    that is TIES's own λ = 1, and where every τ_i agrees in sign at density 1 the result is the normalised
    linear merge. normalize=False uses the weights as given (peft passes them unchanged).
    """
    w = [x * len(loras_weights) for x in normalized(weights)] if normalize else normalized(weights, False)
    density = _check_density(density)
    return _refactored(loras_weights, w, lambda taus, ws: ties_delta(taus, ws, density), rank)


def dare_factors(loras_weights: list[LoraWeights], weights, density: float, rank: int | None = None,
                 normalize: bool = True, generator: torch.Generator | None = None, ties: bool = False
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """DARE merge of one module's LoRAs (`dare_delta` on their ΔW_i), re-factored to rank r (default Σ r_i).

    Weights as for linear (sum 1) or, with ties=True, as for TIES (mean 1). At density 1 DARE is the linear
    merge. The drops are drawn from `generator` (CPU), so a seeded generator repeats them.
    """
    n = len(loras_weights) if ties else 1
    w = [x * n for x in normalized(weights)] if normalize else normalized(weights, False)
    density = _check_density(density)
    return _refactored(loras_weights, w, lambda taus, ws: dare_delta(taus, ws, density, generator, ties), rank)


def merge_loras(loras: list[Lora], weights=None, method: str = "linear", rank: int | None = None,
                normalize: bool = True, name: str = "merged", density: float | None = None, seed: int = 0) -> Lora:
    """One LoRA from several, per module over the union of their modules (a LoRA without a module
    contributes zero there). Weights default to equal; they are normalised once, over all LoRAs (to sum 1;
    to sum N for the disjoint-mean methods "ties" / "dare_ties", see `ties_factors`).

    method "linear": exact, rank Σ r_i per module. method "svd": rank `rank` (default: largest input rank).
    "ties", "dare" (= dare_linear), "dare_ties": need `density` in (0, 1]; rank `rank` (default: Σ r_i of
    the module's LoRAs). DARE draws its drops from torch.Generator().manual_seed(seed), module after module
    in order, so the same seed gives the same LoRA. Every merged module has scale 1.
    """
    # 1. check inputs
    if not loras:
        raise ValueError("merge_loras needs at least one LoRA.")
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method '{method}' (expected one of {', '.join(MERGE_METHODS)}).")
    if method in SPARSE_METHODS:
        density = _check_density(density)
    weights = normalized([1.0] * len(loras) if weights is None else weights, normalize)
    if len(weights) != len(loras):
        raise ValueError(f"{len(loras)} LoRA(s) but {len(weights)} weight(s).")
    if normalize and method in ("ties", "dare_ties"):
        weights = [w * len(loras) for w in weights]          # disjoint mean: weights of mean 1
    generator = torch.Generator().manual_seed(int(seed))

    # 2. merge module by module (weights already final: normalize=False below)
    keys = list(dict.fromkeys(k for lora in loras for k in lora.modules))
    modules = {}
    for key in keys:
        present = [(lora.modules[key], w) for lora, w in zip(loras, weights) if key in lora.modules]
        lws, ws = [p[0] for p in present], [p[1] for p in present]
        try:
            if method == "linear":
                A, B = linear_factors(lws, ws, normalize=False)
            elif method == "svd":
                A, B = svd_factors(lws, ws, rank=rank, normalize=False)
            elif method == "ties":
                A, B = ties_factors(lws, ws, density, rank=rank, normalize=False)
            else:
                A, B = dare_factors(lws, ws, density, rank=rank, normalize=False, generator=generator,
                                    ties=method == "dare_ties")
        except ValueError as e:
            raise ValueError(f"module '{key}': {e}") from e
        modules[key] = LoraWeights(A=A, B=B, scale=1.0)
    metadata = {"merged_from": [lora.name for lora in loras], "weights": weights, "method": method,
                "rank": rank, "normalize": normalize}
    if method in SPARSE_METHODS:
        metadata["density"] = density
    if method in ("dare", "dare_ties"):
        metadata["seed"] = int(seed)
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
