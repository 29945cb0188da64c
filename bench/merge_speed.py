"""SVD merge speed: ours (thin-factor QR + small SVD) vs PEFT `add_weighted_adapter(combination_type="svd")`
vs a dense `torch.linalg.svd` of ΔW, on a Stable Diffusion 1.5-sized UNet with random weights.

Three rank-16 LoRAs on every attention projection (to_q, to_k, to_v, to_out.0) and feed-forward layer
(ff.net.0.proj, ff.net.2); merged with weights 0.5 / 0.3 / 0.2 to rank 16. Prints the times, the
ratios and the largest relative difference (Frobenius, per module) between the three results.
Times are CPU seconds of this process (wall seconds shown alongside). Nothing is asserted.

    python bench/merge_speed.py                 # full SD 1.5 UNet config (~860 M parameters, ~3.5 GB)
    python bench/merge_speed.py --small         # a small UNet, to check the script quickly
    python bench/merge_speed.py --peft-thin     # also time PEFT with svd_full_matrices=False
    python bench/merge_speed.py --threads 8     # torch CPU threads (default 1)
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from peft.tuners.lora import LoraModel  # noqa: E402

from mole_core.lora import delta_weight  # noqa: E402
from bench.common import RANK, random_loras, target_paths  # noqa: E402
from mole_core.merge import merge_loras  # noqa: E402

WEIGHTS = [0.5, 0.3, 0.2]


def build_unet(small: bool) -> UNet2DConditionModel:
    if small:
        return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    return UNet2DConditionModel()  # the default config is SD 1.5's


def peft_model(unet, paths, loras) -> LoraModel:
    """The same three LoRAs as PEFT adapters l0, l1, l2 (alpha = scale · rank)."""
    model = None
    for lora in loras:
        cfg = LoraConfig(r=RANK, lora_alpha=lora.modules[f"unet.{paths[0]}"].scale * RANK, target_modules=paths)
        if model is None:
            model = LoraModel(unet, cfg, lora.name)
        else:
            model.peft_config[lora.name] = cfg
            model.inject_adapter(model.model, lora.name)
        for p in paths:
            layer, w = unet.get_submodule(p), lora.modules[f"unet.{p}"]
            layer.lora_A[lora.name].weight.data.copy_(w.A)
            layer.lora_B[lora.name].weight.data.copy_(w.B)
    return model


def dense_svd(loras, paths) -> dict[str, torch.Tensor]:
    out = {}
    for p in paths:
        dW = sum(w * delta_weight(l.modules[f"unet.{p}"].A, l.modules[f"unet.{p}"].B, l.modules[f"unet.{p}"].scale)
                 for w, l in zip(WEIGHTS, loras))
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        out[p] = (U[:, :RANK] * S[:RANK]) @ Vh[:RANK]
    return out


def max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(((a[p] - b[p]).norm() / b[p].norm()).item() for p in a)


def timed(fn):
    """(result, seconds of CPU time of this process). CPU time, not wall time: on a shared machine the
    wall clock also counts the time other jobs held the cores."""
    t0, w0 = time.process_time(), time.perf_counter()
    result = fn()
    t, wall = time.process_time() - t0, time.perf_counter() - w0
    print(f"  … {t:.2f} s CPU, {wall:.2f} s wall", flush=True)
    return result, t


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a small UNet instead of the SD 1.5 config")
    parser.add_argument("--peft-thin", action="store_true", help="also time PEFT with svd_full_matrices=False")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads for all three (default 1: on a shared, busy CPU more threads make "
                             "every small LAPACK call wait on its thread pool and the times meaningless)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    # 1. model and LoRAs
    unet = build_unet(args.small).eval()
    paths = target_paths(unet)
    loras = random_loras(unet, paths)
    n_params = sum(p.numel() for p in unet.parameters())
    print(f"UNet: {n_params / 1e6:.0f} M parameters; {len(paths)} target modules; 3 LoRAs of rank {RANK}; "
          f"torch threads {torch.get_num_threads()}")

    with torch.no_grad():
        # torch loads its LAPACK kernels lazily on the first call: pay that before any timing
        torch.linalg.svd(torch.linalg.qr(torch.randn(64, 8))[0])

        # 2. ours
        merged, t_ours = timed(lambda: merge_loras(loras, WEIGHTS, method="svd", rank=RANK, normalize=False))
        ours = {p: delta_weight(merged.modules[f"unet.{p}"].A, merged.modules[f"unet.{p}"].B, 1.0) for p in paths}
        # 3. dense SVD of ΔW
        dense, t_dense = timed(lambda: dense_svd(loras, paths))
        # 4. PEFT (its default: full_matrices=True), optionally also thin
        model = peft_model(unet, paths, loras)
        _, t_peft = timed(lambda: model.add_weighted_adapter(["l0", "l1", "l2"], WEIGHTS, "svd_merge",
                                                              combination_type="svd", svd_rank=RANK))
        peft = {p: unet.get_submodule(p).get_delta_weight("svd_merge").float() for p in paths}
        t_thin = None
        if args.peft_thin:
            _, t_thin = timed(lambda: model.add_weighted_adapter(["l0", "l1", "l2"], WEIGHTS, "svd_thin",
                                                                  combination_type="svd", svd_rank=RANK,
                                                                  svd_full_matrices=False))

    # 5. report
    print("CPU seconds:")
    print(f"ours (QR + small SVD)             {t_ours:9.2f} s")
    print(f"dense torch.linalg.svd of ΔW      {t_dense:9.2f} s   ratio dense/ours {t_dense / t_ours:7.1f}x")
    print(f"PEFT add_weighted_adapter('svd')  {t_peft:9.2f} s   ratio PEFT/ours  {t_peft / t_ours:7.1f}x")
    if t_thin is not None:
        print(f"PEFT, svd_full_matrices=False     {t_thin:9.2f} s   ratio PEFT/ours  {t_thin / t_ours:7.1f}x")
    print(f"max relative difference (Frobenius, per module): ours vs dense {max_rel_diff(ours, dense):.2e}, "
          f"ours vs PEFT {max_rel_diff(ours, peft):.2e}, PEFT vs dense {max_rel_diff(peft, dense):.2e}")


if __name__ == "__main__":
    main()
