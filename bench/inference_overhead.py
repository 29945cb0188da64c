"""MoLE inference overhead: one UNet forward with three rank-16 LoRAs, ours vs diffusers' unfused
multi-adapter vs the base UNet vs our linear merge applied; plus one gate-training step vs one plain
LoRA-training step (seconds and peak memory).

SD 1.5-sized `UNet2DConditionModel()` with random weights, 64×64 latents, batch 2 (as under
classifier-free guidance), 77 text tokens; the LoRAs sit on every attention projection (to_q, to_k,
to_v, to_out.0) and feed-forward layer (ff.net.0.proj, ff.net.2) of the transformer blocks.
  base             the UNet alone
  diffusers        `unet.load_lora_adapter` ×3 + `set_adapters(weights=1/3 each)`: PEFT's unfused layers
  mole             `attach(..., MoleConfig("block"))`: one stacked rank-48 LoRA per module + block gates
  linear merge     `merged_weights(merge_loras(...))`: ΔW added into W (the forward costs the base's)
Training (each in a fresh subprocess so peak memory is its own): one AdamW step of
  gate training    MoLE attached, only the gates train, L = MSE + 0.5 · L_balance
  LoRA training    one rank-16 PEFT LoRA on the same modules (`unet.add_adapter`), its A/B train, L = MSE
Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak RSS (ru_maxrss)
minus its RSS after the model was built. Times are medians; nothing is asserted.

    python bench/inference_overhead.py              # full SD 1.5 UNet (~860 M parameters)
    python bench/inference_overhead.py --small      # a small UNet, to check the script quickly
    python bench/inference_overhead.py --repeats 5 --train-steps 3 --device cuda
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from torch import nn  # noqa: E402

from mole_core.attach import MoleConfig, attach  # noqa: E402
from mole_core.lora import Lora  # noqa: E402
from bench.common import RANK, random_loras, target_paths  # noqa: E402
from mole_core.merge import merge_loras, merged_weights  # noqa: E402

N_LORAS, BATCH = 3, 2


def build_unet(small: bool) -> UNet2DConditionModel:
    torch.manual_seed(0)
    if small:
        return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    return UNet2DConditionModel()  # the default config is SD 1.5's


def peft_state_dict(lora: Lora) -> dict[str, torch.Tensor]:
    """diffusers/PEFT keys without alphas (read as scale 1): the scale is folded into B."""
    sd = {}
    for key, w in lora.modules.items():
        path = key.split(".", 1)[1]
        sd[f"{path}.lora_A.weight"] = w.A.clone()
        sd[f"{path}.lora_B.weight"] = (w.B * w.scale).clone()
    return sd


def inputs(unet, device, dtype, size=64):
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(BATCH, unet.config.in_channels, size, size, generator=g)
    ehs = torch.randn(BATCH, 77, unet.config.cross_attention_dim, generator=g)
    return latents.to(device, dtype), torch.tensor([500] * BATCH, device=device), ehs.to(device, dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> tuple[float, object]:
    """Median seconds of `repeats` calls after one warm-up call; returns the last output too."""
    out = fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


# ---- inference -----------------------------------------------------------------------------------

def run_inference(args, device, dtype) -> dict:
    """Rounds of one forward per method (methods interleaved, so load changes hit all alike); medians."""
    unet = build_unet(args.small).to(device, dtype).eval()
    comps = nn.ModuleDict({"unet": unet})
    paths = target_paths(unet)
    loras = random_loras(unet, paths, N_LORAS)
    merged = merge_loras(loras, method="linear")
    x = inputs(unet, device, dtype)
    res = {"modules": len(paths)}

    @contextmanager
    def diffusers_adapters():                                  # PEFT's unfused layers, weights 1/3 each
        for lora in loras:
            unet.load_lora_adapter({k: v.to(device, dtype) for k, v in peft_state_dict(lora).items()},
                                   adapter_name=lora.name, prefix=None)
        unet.set_adapters([lora.name for lora in loras], weights=[1 / N_LORAS] * N_LORAS)
        yield
        unet.unload_lora()
        assert not any("lora" in n for n, _ in unet.named_parameters()), "diffusers adapters were not removed"

    @contextmanager
    def mole():                                                # untrained gates cost the same as trained ones
        handle = attach(comps, loras, MoleConfig(granularity="block"))
        res["mole_gates"] = len(handle.groups)
        yield
        handle.detach()

    @contextmanager
    def linear():
        start = time.perf_counter()
        with merged_weights(comps, merged):
            sync(device)
            res["merge_apply"] = time.perf_counter() - start
            yield

    methods = {"base": nullcontext, "diffusers": diffusers_adapters, "mole": mole, "linear": linear}
    times = {m: [] for m in methods}
    outs = {}
    with torch.no_grad():
        for round_ in range(args.repeats + 1):                 # round 0 is the warm-up
            for name, setting in methods.items():
                with setting():
                    sync(device)
                    start = time.perf_counter()
                    outs[name] = unet(*x).sample
                    sync(device)
                    if round_ > 0:
                        times[name].append(time.perf_counter() - start)
    res.update({m: statistics.median(t) for m, t in times.items()})
    scale = outs["base"].float().abs().mean()
    res["diff_mole_vs_diffusers"] = float((outs["mole"].float() - outs["diffusers"].float()).abs().max() / scale)
    res["diff_mole_vs_linear"] = float((outs["mole"].float() - outs["linear"].float()).abs().max() / scale)
    return res


# ---- training (one mode per subprocess) ----------------------------------------------------------

def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def run_train(args, device, dtype, mode: str) -> dict:
    unet = build_unet(args.small).to(device, dtype)
    comps = nn.ModuleDict({"unet": unet})
    paths = target_paths(unet)
    x = inputs(unet, device, dtype)
    target = torch.randn_like(x[0])
    for p in unet.parameters():
        p.requires_grad_(False)
    if args.grad_checkpointing:
        unet.enable_gradient_checkpointing()
        unet.train()
    if mode == "gates":
        handle = attach(comps, random_loras(unet, paths, N_LORAS), MoleConfig(granularity="block"))
        with torch.no_grad():
            unet(*x)                                               # materialise the gates
        params = handle.gate_parameters()
    else:
        unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, init_lora_weights="gaussian", target_modules=paths))
        params = [p for n, p in unet.named_parameters() if "lora_" in n]   # PEFT's own naming
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = rss_bytes()

    def step():
        loss = torch.nn.functional.mse_loss(unet(*x).sample.float(), target.float())
        if mode == "gates":
            loss = loss + 0.5 * handle.balance_loss()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    seconds, _ = timed(step, device, args.train_steps)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else rss_bytes()
    return {"seconds": seconds, "peak_extra_bytes": peak - before, "trainable": sum(p.numel() for p in params)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="a small UNet instead of SD 1.5's")
    ap.add_argument("--repeats", type=int, default=3, help="timed rounds (after one warm-up round)")
    ap.add_argument("--train-steps", type=int, default=2, help="timed training steps per mode (after one warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | float16 (CUDA default)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--grad-checkpointing", action="store_true", help="gradient checkpointing in both training modes")
    ap.add_argument("--no-train", action="store_true", help="skip the training comparison")
    ap.add_argument("--train-mode", choices=["gates", "lora"], help=argparse.SUPPRESS)   # subprocess use
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))

    if args.train_mode:
        print(json.dumps(run_train(args, device, dtype, args.train_mode)))
        return

    print(f"UNet {'small' if args.small else 'SD 1.5'}, {device} {dtype}, torch threads {torch.get_num_threads()}, "
          f"batch {BATCH}, 64x64 latents, {N_LORAS} LoRAs of rank {RANK}")
    r = run_inference(args, device, dtype)
    print(f"{r['modules']} adapted modules; MoLE block gates: {r['mole_gates']}")
    print(f"  base                     {r['base'] * 1e3:9.1f} ms")
    print(f"  diffusers unfused x3     {r['diffusers'] * 1e3:9.1f} ms   {r['diffusers'] / r['base']:.3f}x base")
    print(f"  MoLE (block)             {r['mole'] * 1e3:9.1f} ms   {r['mole'] / r['base']:.3f}x base, "
          f"{r['mole'] / r['diffusers']:.3f}x diffusers unfused")
    print(f"  linear merge applied     {r['linear'] * 1e3:9.1f} ms   {r['linear'] / r['base']:.3f}x base "
          f"(+ {r['merge_apply'] * 1e3:.0f} ms once to merge and apply)")
    print(f"  max |MoLE - diffusers| / mean|base| = {r['diff_mole_vs_diffusers']:.2e} (untrained MoLE = equal weights);"
          f" vs linear merge {r['diff_mole_vs_linear']:.2e}")
    print("  targets: MoLE <= 1.0x diffusers unfused, <= 1.25x base")
    if args.no_train:
        return
    results = {}
    for mode in ("gates", "lora"):
        cmd = [sys.executable, __file__, "--train-mode", mode, "--repeats", str(args.repeats),
               "--train-steps", str(args.train_steps), "--device", args.device]
        cmd += ["--small"] if args.small else []
        cmd += ["--dtype", args.dtype] if args.dtype else []
        cmd += ["--threads", str(args.threads)] if args.threads else []
        cmd += ["--grad-checkpointing"] if args.grad_checkpointing else []
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
    g, l = results["gates"], results["lora"]
    mem = "peak extra GPU memory" if device.type == "cuda" else "peak extra RSS"
    print(f"training step, batch {BATCH}{', gradient checkpointing' if args.grad_checkpointing else ''}:")
    print(f"  gate training (MoLE)     {g['seconds']:8.2f} s/step   {mem} {g['peak_extra_bytes'] / 2**20:8.0f} MiB   "
          f"{g['trainable']} trainable parameters")
    print(f"  plain LoRA training      {l['seconds']:8.2f} s/step   {mem} {l['peak_extra_bytes'] / 2**20:8.0f} MiB   "
          f"{l['trainable']} trainable parameters")
    print(f"  ratio gate / LoRA        {g['seconds'] / l['seconds']:.3f}x time, "
          f"{g['peak_extra_bytes'] / max(l['peak_extra_bytes'], 1):.3f}x memory")


if __name__ == "__main__":
    main()
