"""MoLE inference overhead: one denoiser forward with three rank-16 LoRAs, ours vs diffusers' unfused
multi-adapter vs the base model vs our linear merge applied; plus (UNet only) one gate-training step vs one
plain LoRA-training step (seconds and peak memory).

Two denoisers (--family):
  sd    SD 1.5-sized `UNet2DConditionModel()` with random weights, 64×64 latents, batch 2 (as under
        classifier-free guidance), 77 text tokens; the LoRAs sit on every attention projection (to_q, to_k,
        to_v, to_out.0) and feed-forward layer (ff.net.0.proj, ff.net.2) of the transformer blocks (160).
  flux  a FLUX.1-shaped `FluxTransformer2DModel` at the real width (24 heads × 128 = 3072, joint_attention_dim
        4096, pooled_projection_dim 768, in_channels 64, RoPE axes (16, 56, 56)) but few blocks
        (--double-blocks, --single-blocks) and few tokens (--image-side² image tokens, --text-tokens), random
        weights, batch 1 (FLUX is guidance-distilled: no doubled batch). LoRAs on every attention and
        feed-forward projection: double blocks' attn.to_q/k/v, attn.to_out.0, attn.add_q/k/v_proj,
        attn.to_add_out, ff.net.0.proj, ff.net.2, ff_context.net.0.proj, ff_context.net.2; single blocks'
        attn.to_q/k/v, proj_mlp, proj_out.
Methods:
  base             the denoiser alone
  diffusers        `load_lora_adapter` ×3 + `set_adapters(weights=1/3 each)`: PEFT's unfused layers
  mole             `attach(..., MoleConfig("block"))`: one stacked rank-48 LoRA per module + block gates
  routed           the default gate (`generate --method mole` with no --gate: mix.DEFAULT_GATE "routed"):
                   per-token block gates, trigger-routed, untrained, on a text that names each LoRA's trigger
                   (one phrase per LoRA); a stand-in text encoder hands the router the bench's text states, and
                   one untimed forward before the timed one fills the attention masses (a later denoising step)
  linear merge     `merged_weights(merge_loras(...))`: ΔW added into W (the forward costs the base's: the
                   noise check)
Timing: one warm-up round, then --rounds rounds of one forward per method; the methods are interleaved in
every round (and the order rotates from round to round), so a load change hits all alike. Reported: the
median and the min–max of each method's times, and for each ratio the median (min–max) of the per-round
ratios. The clock (--clock): on the CPU with one thread the process's CPU time (time.process_time), which
other jobs on a shared machine disturb far less than wall time (they still share caches and memory
bandwidth); wall time on CUDA (synchronised) or with several threads; both are printed. On a shared CPU read
the spread before the median.
Training (UNet only; each in a fresh subprocess so peak memory is its own): one AdamW step of
  gate training    MoLE attached, only the gates train, L = MSE + 0.5 · L_balance
  LoRA training    one rank-16 PEFT LoRA on the same modules (`unet.add_adapter`), its A/B train, L = MSE
Peak memory: torch.cuda.max_memory_allocated on a GPU; on the CPU the process's peak RSS (ru_maxrss)
minus its RSS after the model was built. Times are medians; nothing is asserted.

    python bench/inference_overhead.py                       # full SD 1.5 UNet (~860 M parameters)
    python bench/inference_overhead.py --small --rounds 3    # a small UNet, to check the script quickly
    python bench/inference_overhead.py --family flux --markdown bench/results/overhead_flux.md
    python bench/inference_overhead.py --rounds 10 --train-steps 3 --device cuda --dtype float16
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from diffusers import UNet2DConditionModel  # noqa: E402
from peft import LoraConfig  # noqa: E402
from torch import nn  # noqa: E402

from mole_core.attach import MoleConfig, attach  # noqa: E402
from mole_core.defaults import DEFAULT_GATE  # noqa: E402
from mole_core.lora import Lora  # noqa: E402
from mole_core.mix import mole_config_for  # noqa: E402
from bench.common import RANK, random_loras, target_paths  # noqa: E402
from mole_core.merge import merge_loras, merged_weights  # noqa: E402

N_LORAS, BATCH = 3, 2
METHODS = ("base", "diffusers", "mole", "routed", "linear")
FLUX_DOUBLE = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2")
FLUX_SINGLE = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")


def build_unet(small: bool) -> UNet2DConditionModel:
    torch.manual_seed(0)
    if small:
        return UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
                                    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8)
    return UNet2DConditionModel()  # the default config is SD 1.5's


def build_flux(args):
    """FLUX.1's widths (FluxTransformer2DModel's defaults), --double-blocks / --single-blocks blocks."""
    from diffusers import FluxTransformer2DModel
    torch.manual_seed(0)
    return FluxTransformer2DModel(num_layers=args.double_blocks, num_single_layers=args.single_blocks,
                                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                                  pooled_projection_dim=768, in_channels=64, guidance_embeds=False,
                                  axes_dims_rope=(16, 56, 56))


def flux_target_paths(model) -> list[str]:
    """Every attention / feed-forward projection of the double and single blocks, in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and (
        (n.startswith("transformer_blocks.") and n.split(".", 2)[2] in FLUX_DOUBLE) or
        (n.startswith("single_transformer_blocks.") and n.split(".", 2)[2] in FLUX_SINGLE))]


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


def flux_inputs(model, args, device, dtype) -> dict:
    """Packed image tokens (1, side², 64), T5-wide text (1, T, 4096), pooled CLIP (1, 768), t ∈ [0, 1], ids."""
    from diffusers import FluxPipeline
    g = torch.Generator().manual_seed(1)
    side, cfg = args.image_side, model.config
    return {"hidden_states": torch.randn(1, side * side, cfg.in_channels, generator=g).to(device, dtype),
            "encoder_hidden_states": torch.randn(1, args.text_tokens, cfg.joint_attention_dim,
                                                 generator=g).to(device, dtype),
            "pooled_projections": torch.randn(1, cfg.pooled_projection_dim, generator=g).to(device, dtype),
            "timestep": torch.tensor([0.5], device=device, dtype=dtype),
            "img_ids": FluxPipeline._prepare_latent_image_ids(1, side, side, device, dtype),
            "txt_ids": torch.zeros(args.text_tokens, 3, device=device, dtype=dtype)}


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


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


# ---- inference -----------------------------------------------------------------------------------

@dataclass
class Setup:
    """A denoiser to time: the model, its ModuleDict of networks (LoRA keys '<network>.<path>'), the LoRAs
    and one forward pass returning a tensor."""
    title: str
    model: nn.Module
    comps: nn.ModuleDict
    loras: list
    forward: Callable[[], torch.Tensor]
    text: torch.Tensor | None = None       # the text states the denoiser reads (B, L, D)


def on(device):
    """Build models straight on a GPU (random init there is seconds, not a minute on the host's CPU)."""
    return torch.device(device) if device.type == "cuda" else nullcontext()


def unet_setup(args, device, dtype) -> Setup:
    with on(device):
        unet = build_unet(args.small)
    unet = unet.to(device, dtype).eval()
    paths = target_paths(unet)
    x = inputs(unet, device, dtype)
    return Setup(f"UNet {'small' if args.small else 'SD 1.5'}, batch {BATCH}, 64x64 latents, 77 text tokens",
                 unet, nn.ModuleDict({"unet": unet}), random_loras(unet, paths, N_LORAS), lambda: unet(*x).sample, x[2])


def flux_setup(args, device, dtype) -> Setup:
    with on(device):
        model = build_flux(args)
    model = model.to(device, dtype).eval()
    paths = flux_target_paths(model)
    # bench.common.random_loras keys its LoRAs 'unet.<path>'; the same draws, keyed for the transformer
    loras = [Lora(name=l.name, modules={"transformer." + k.split(".", 1)[1]: w for k, w in l.modules.items()})
             for l in random_loras(model, paths, N_LORAS)]
    x = flux_inputs(model, args, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    return Setup(f"FLUX-shaped transformer, width 3072, {args.double_blocks} double + {args.single_blocks} single "
                 f"blocks ({n_params / 1e6:.0f} M parameters), batch 1, {args.image_side}x{args.image_side} = "
                 f"{args.image_side ** 2} image tokens, {args.text_tokens} text tokens",
                 model, nn.ModuleDict({"transformer": model}), loras, lambda: model(**x).sample,
                 x["encoder_hidden_states"])


def spread(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def run_inference(setup: Setup, args, device, dtype, log=print) -> dict:
    """Rounds of one forward per method (methods interleaved, order rotating, so load changes hit all
    alike); per-method times and per-round ratios."""
    model, comps, loras = setup.model, setup.comps, setup.loras
    merged = merge_loras(loras, method="linear")
    clock = args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" else "wall")
    res = {"modules": len(loras[0].modules), "merge_apply": [], "clock": clock}

    @contextmanager
    def diffusers_adapters():                                  # PEFT's unfused layers, weights 1/3 each
        for lora in loras:
            model.load_lora_adapter({k: v.to(device, dtype) for k, v in peft_state_dict(lora).items()},
                                    adapter_name=lora.name, prefix=None)
        model.set_adapters([lora.name for lora in loras], weights=[1 / N_LORAS] * N_LORAS)
        yield
        model.unload_lora()
        assert not any("lora" in n for n, _ in model.named_parameters()), "diffusers adapters were not removed"

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
            res["merge_apply"].append(time.perf_counter() - start)
            yield

    settings = {"base": nullcontext, "diffusers": diffusers_adapters, "mole": mole, "linear": linear,
                "routed": lambda: default_gate(setup)}
    times = {m: [] for m in METHODS}
    walls = {m: [] for m in METHODS}
    outs = {}
    with torch.no_grad():
        for round_ in range(args.rounds + 1):                  # round 0 is the warm-up
            order = METHODS[round_ % len(METHODS):] + METHODS[:round_ % len(METHODS)]
            for name in order:
                with settings[name]():
                    sync(device)
                    start, cpu_start = time.perf_counter(), time.process_time()
                    out = setup.forward()
                    sync(device)
                    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
                if round_ > 0:
                    times[name].append(cpu if res["clock"] == "cpu" else wall)
                    walls[name].append(wall)
                outs[name] = out
            log(f"  round {round_}{' (warm-up)' if round_ == 0 else ''}: " +
                (", ".join(f"{m} {times[m][-1] * 1e3:.0f} ms ({walls[m][-1] * 1e3:.0f} wall)" for m in order)
                 if round_ else ", ".join(order)) + f"  [load {load_average()}]")
    res["times"], res["walls"] = times, walls
    res["wall"] = {m: spread(t) for m, t in walls.items()}
    res.update({m: spread(t) for m, t in times.items()})
    ratio = lambda a, b: [x / y for x, y in zip(times[a], times[b])]        # per round, paired
    res["ratios"] = {"mole/diffusers": spread(ratio("mole", "diffusers")), "mole/base": spread(ratio("mole", "base")),
                     "diffusers/base": spread(ratio("diffusers", "base")), "linear/base": spread(ratio("linear", "base")),
                     **routed_ratios(ratio, spread)}
    scale = outs["base"].float().abs().mean()
    res["diff_mole_vs_diffusers"] = float((outs["mole"].float() - outs["diffusers"].float()).abs().max() / scale)
    res["diff_mole_vs_linear"] = float((outs["mole"].float() - outs["linear"].float()).abs().max() / scale)
    res["lora_effect"] = float((outs["diffusers"].float() - outs["base"].float()).abs().max() / scale)
    return res


def report_inference(r: dict, args, header: str) -> list[str]:
    """The results as Markdown lines (printed, and written with --markdown)."""
    rat = r["ratios"]
    clock_words = ("process CPU time (time.process_time: the work of this process, much less sensitive than "
                   "wall time to other jobs on a shared CPU; one torch thread)" if r["clock"] == "cpu"
                   else "wall time (time.perf_counter, synchronised on CUDA)")
    fmt = lambda s: f"{s[0]:.3f} ({s[1]:.3f}–{s[2]:.3f})"
    ms = lambda s: f"{s[0] * 1e3:,.1f} ({s[1] * 1e3:,.1f}–{s[2] * 1e3:,.1f})"
    label = {"base": "base", "diffusers": f"diffusers unfused ×{N_LORAS} (`load_lora_adapter` + `set_adapters`)",
             "mole": f"MoLE (block, {r['mole_gates']} gates)", "linear": "linear merge applied",
             "routed": "MoLE default gate (block, per-token, trigger-routed)"}
    vs_base = {"base": "1", "diffusers": fmt(rat["diffusers/base"]), "mole": fmt(rat["mole/base"]),
               "linear": fmt(rat["linear/base"]), "routed": fmt(rat["routed/base"])}
    lines = [header, "",
             f"{r['modules']} adapted modules, {N_LORAS} LoRAs of rank {RANK}; {args.rounds} timed rounds after one "
             f"warm-up, methods interleaved (order rotating per round). Clock: {clock_words}. Times: median "
             f"(min–max) over rounds; ratios: median (min–max) of the per-round ratios.", "",
             f"| method | ms per forward ({r['clock']}) | vs base | vs diffusers unfused | wall ms |",
             "|---|---|---|---|---|"]
    for m in METHODS:
        lines.append(f"| {label[m]} | {ms(r[m])} | {vs_base[m]} | "
                     f"{fmt(rat[m + '/diffusers']) if m in ('mole', 'routed') else ('1' if m == 'diffusers' else '')} | "
                     f"{ms(r['wall'][m])} |")
    lines += ["",
              f"- MoLE / diffusers unfused: {fmt(rat['mole/diffusers'])} (target ≤ 1.0)",
              f"- MoLE / base: {fmt(rat['mole/base'])} (target ≤ 1.10)",
              *routed_lines(rat, fmt),
              f"- linear merge applied / base (the same work: the noise check): {fmt(rat['linear/base'])}",
              f"- untrained MoLE vs diffusers' equal-weight adapters: max |difference| = "
              f"{r['diff_mole_vs_diffusers']:.2e} of mean |base output| (the LoRAs themselves move the output by "
              f"{r['lora_effect']:.2e}); vs the linear merge {r['diff_mole_vs_linear']:.2e}",
              f"- merging and applying the linear merge once: median {statistics.median(r['merge_apply']) * 1e3:,.0f} ms",
              "", f"Per-round times (ms, {r['clock']}; wall in brackets):", "",
              "| round | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
    for i in range(args.rounds):
        lines.append(f"| {i + 1} | " + " | ".join(f"{r['times'][m][i] * 1e3:,.1f} ({r['walls'][m][i] * 1e3:,.0f})"
                                                    for m in METHODS) + " |")
    return lines


# ---- the default (routed) gate -------------------------------------------------------------------

class WordTokenizer:
    """Word-level ids for the stand-in text encoder (0 is end and padding)."""
    bos_token_id, eos_token_id, pad_token_id = None, 0, 0

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, add_special_tokens: bool = False):
        return SimpleNamespace(input_ids=[self.vocab.setdefault(w, len(self.vocab) + 1) for w in text.split()])


class StandInEncoder(nn.Module):
    """Stands for the text encoder: returns the bench's text states, so the router finds the triggers' positions
    in the denoiser's text as it does in a pipeline call (the encoder runs once per image, not per step)."""

    def __init__(self, states: torch.Tensor):
        super().__init__()
        self.states = states

    def forward(self, input_ids, output_hidden_states=None, **kwargs):
        """The bench's states for the bench's text; for another batch (the router re-encoding each trigger
        phrase on its own, route_encode="separate") the first row's states at that batch and length."""
        if input_ids.shape == self.states.shape[:2]:
            return (self.states,)
        B, L = input_ids.shape
        row = self.states[:1, :L]
        if row.shape[1] < L:
            row = torch.cat([row, row[:, -1:].expand(1, L - row.shape[1], -1)], 1)
        return (row.expand(B, -1, -1),)


@contextmanager
def default_gate(setup: Setup):
    """The default gate attached as the engine attaches it (untrained), the text encoded once with each LoRA's
    trigger at the start of a third of the text (phrases of L/3 tokens), and one untimed forward (the
    previous denoising step: it records the attention masses the timed forward routes the pixels by)."""
    handle = attach(setup.comps, setup.loras, mole_config_for("block", DEFAULT_GATE))
    B, L, _ = setup.text.shape
    tokenizer, encoder = WordTokenizer(), StandInEncoder(setup.text)
    handle.set_triggers({"text_encoder": (encoder, tokenizer)}, {l.name: f"trigger-{l.name}" for l in setup.loras})
    words = [f"w{j}" for j in range(L)]
    for i, lora in enumerate(setup.loras):
        words[1 + i * L // len(setup.loras)] = f"trigger-{lora.name}"
    ids = torch.tensor([tokenizer(" ".join(words)).input_ids] * B)
    saved = setup.text.clone()
    setup.text.copy_(encoder(ids)[0])     # the denoiser reads what the hooked encoder returned, as in a pipeline
    try:                                  # (route_encode="separate" splices each trigger phrase encoded alone)
        setup.forward()
        yield handle
    finally:
        setup.text.copy_(saved)
        handle.detach()


def routed_ratios(ratio, spread) -> dict:
    return {"routed/base": spread(ratio("routed", "base")), "routed/diffusers": spread(ratio("routed", "diffusers")),
            "routed/mole": spread(ratio("routed", "mole"))}


def routed_lines(rat: dict, fmt) -> list[str]:
    return [f"- MoLE default gate / base: {fmt(rat['routed/base'])} (target ≤ 1.15)",
            f"- MoLE default gate / diffusers unfused: {fmt(rat['routed/diffusers'])}; "
            f"/ per-sample MoLE: {fmt(rat['routed/mole'])}"]

# ---- compute ops per forward, and CUDA-graphed times ----------------------------------------------

def mole_variants(setup: Setup) -> dict:
    """The MoLE attachments the op counts and graphed times cover (context managers): per-sample, and the
    product's default gate attached with its triggers named in the text, as it is timed (`default_gate`)."""
    @contextmanager
    def per_sample():
        handle = attach(setup.comps, setup.loras, MoleConfig(granularity="block"))
        yield
        handle.detach()

    return {"MoLE per-sample": per_sample, f"MoLE default gate ({DEFAULT_GATE})": lambda: default_gate(setup)}


def ops_target_lines(counts: dict, n: int) -> list[str]:
    """'+X per adapted module' for per-sample MoLE and the default gate, and the issue's target."""
    base, lines = counts["base"], []
    for name, c in counts.items():
        if name.startswith("MoLE"):
            lines.append(f"- {name}: +{(c - base) / n:.2f} ops per adapted module (target ≤ 4)")
    return lines


def run_ops_and_graphs(setup: Setup, args, device, dtype, log=print) -> list[str]:
    """Markdown lines: compute ops per forward (bench/ops.py: aten ops that reach a kernel, views left out;
    on CUDA about one launch each) for base, diffusers unfused, MoLE per-sample and MoLE's default gate; on
    CUDA also each one's time with the forward compiled with torch.compile(mode="reduce-overhead") (replayed
    CUDA graphs) beside its eager time (median of --rounds after 3 warm-up calls, wall time, synchronised)."""
    from bench.ops import count_ops
    model, loras = setup.model, setup.loras
    n = len(loras[0].modules)
    counts, graphed, eager, notes = {}, {}, {}, []

    def measure(name):
        with torch.no_grad():
            setup.forward()                                        # gates materialised, leaders known
            counts[name] = sum(count_ops(setup.forward).values())
            if device.type != "cuda":
                return
            for mode, store in (("eager", eager), ("graphed", graphed)):
                torch._dynamo.reset()
                if mode == "graphed":
                    model.forward = torch.compile(type(model).forward.__get__(model), mode="reduce-overhead",
                                                  dynamic=False)
                try:
                    for _ in range(3):
                        setup.forward()
                    store[name] = timed(setup.forward, device, args.rounds)[0]
                except Exception as error:                     # capture failed: say so, keep the eager figure
                    notes.append(f"{name}: graphs failed ({type(error).__name__}: {str(error)[:120]})")
                finally:
                    vars(model).pop("forward", None)

    measure("base")
    for lora in loras:                                             # diffusers' unfused adapters, as run_inference
        model.load_lora_adapter({k: v.to(device, dtype) for k, v in peft_state_dict(lora).items()},
                                adapter_name=lora.name, prefix=None)
    model.set_adapters([lora.name for lora in loras], weights=[1 / N_LORAS] * N_LORAS)
    measure("diffusers unfused")
    model.unload_lora()
    for name, attached in mole_variants(setup).items():
        with attached():
            measure(name)
    base = counts["base"]
    lines = ["", f"Compute ops per forward (bench/ops.py: aten ops reaching a kernel, views left out; on CUDA about "
                 f"one launch each), {n} adapted modules:", ""]
    for name, c in counts.items():
        extra = "" if name == "base" else f" (+{(c - base) / n:.2f} per adapted module)"
        lines.append(f"- ops per forward, {name}: {c:,}{extra}")
    lines += ops_target_lines(counts, n)
    if graphed or eager:
        lines += ["", "CUDA graphs (torch.compile mode reduce-overhead) beside eager, ms per forward (wall):", "",
                  "| method | eager | graphed | graphed / base graphed |", "|---|---|---|---|"]
        for name in counts:
            g, e = graphed.get(name), eager.get(name)
            ratio = f"{g / graphed['base']:.3f}" if g and graphed.get("base") else ""
            lines.append(f"| {name} | {e * 1e3:,.2f} | " + (f"{g * 1e3:,.2f}" if g else "failed") + f" | {ratio} |"
                         if e else f"| {name} | | | |")
    lines += [f"- {note}" for note in notes]
    for line in lines:
        log(line)
    return lines


# ---- training (one mode per subprocess) ----------------------------------------------------------

def rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


def run_train(args, device, dtype, mode: str) -> dict:
    with on(device):
        unet = build_unet(args.small)
    unet = unet.to(device, dtype)
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
    ap.add_argument("--family", choices=["sd", "flux"], default="sd", help="the denoiser: SD 1.5 UNet or FLUX-shaped")
    ap.add_argument("--small", action="store_true", help="sd: a small UNet instead of SD 1.5's")
    ap.add_argument("--rounds", "--repeats", dest="rounds", type=int, default=10,
                    help="timed rounds after one warm-up round (--repeats: the old name)")
    ap.add_argument("--double-blocks", type=int, default=2, help="flux: double (MMDiT) blocks (FLUX.1: 19)")
    ap.add_argument("--single-blocks", type=int, default=4, help="flux: single blocks (FLUX.1: 38)")
    ap.add_argument("--image-side", type=int, default=16, help="flux: image tokens per side (1024 px: 64)")
    ap.add_argument("--text-tokens", type=int, default=64, help="flux: T5 tokens (FLUX.1: 256 / 512)")
    ap.add_argument("--train-steps", type=int, default=2, help="timed training steps per mode (after one warm-up)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) | float16 (CUDA default) | bfloat16")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--clock", choices=["auto", "cpu", "wall"], default="auto",
                    help="what the ratios use: process CPU time or wall time (auto: CPU time on the CPU with one "
                         "thread, wall time on CUDA or with several threads)")
    ap.add_argument("--grad-checkpointing", action="store_true", help="gradient checkpointing in both training modes")
    ap.add_argument("--no-ops", action="store_true", help="skip the op counts (and, on CUDA, the graphed times)")
    ap.add_argument("--no-train", action="store_true", help="skip the training comparison (flux never trains)")
    ap.add_argument("--markdown", type=Path, help="also write the inference results as Markdown to this file")
    ap.add_argument("--train-mode", choices=["gates", "lora"], help=argparse.SUPPRESS)   # subprocess use
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA GPU is visible to torch (torch.cuda.is_available() is False).")
    dtype = getattr(torch, args.dtype or ("float16" if device.type == "cuda" else "float32"))
    if args.clock == "auto" and args.threads > 1:
        args.clock = "wall"                      # CPU time sums the threads: not a latency any more

    if args.train_mode:
        print(json.dumps(run_train(args, device, dtype, args.train_mode)))
        return

    setup = (flux_setup if args.family == "flux" else unet_setup)(args, device, dtype)
    where = f"{device} {str(dtype).replace('torch.', '')}, torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        where += f", {torch.cuda.get_device_name(device)}"
    print(f"{setup.title}; {where}; load average at start {load_average()}", flush=True)
    load_start = load_average()
    r = run_inference(setup, args, device, dtype, log=lambda s: print(s, flush=True))
    command = "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, Path.cwd()), *sys.argv[1:]])
    header = "\n".join([f"## Inference overhead: {setup.title}", "",
                        f"`{command}`", "",
                        f"{where}; load average (1, 5, 15 min) {load_start} at the start, {load_average()} at the end "
                        f"(`os.getloadavg`; {os.cpu_count()} CPUs). Finished {time.strftime('%Y-%m-%d %H:%M')}."])
    lines = report_inference(r, args, header)
    if not args.no_ops:
        lines += run_ops_and_graphs(setup, args, device, dtype, log=lambda s: None)
    print("\n".join(lines), flush=True)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.markdown}")
    if args.no_train or args.family != "sd":
        return
    results = {}
    for mode in ("gates", "lora"):
        cmd = [sys.executable, __file__, "--train-mode", mode, "--train-steps", str(args.train_steps),
               "--device", args.device, "--threads", str(args.threads)]
        cmd += ["--small"] if args.small else []
        cmd += ["--dtype", args.dtype] if args.dtype else []
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
