"""Helpers the test modules share: tiny LoRAs and fixed inputs, comparisons, a tiny CLIP, the app's test world
and a local server. (Builders of whole tiny pipelines and banks are in tests/tiny.py.)"""
from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from mole_core.attach import MoleConfig, attach
from mole_core.defaults import DEFAULT_BANK, DEFAULT_MODEL
from mole_core.lora import Lora, LoraWeights
from mole_core.image.lora_files import save_lora
from mole_core.train import TrainResult
from tests.tiny import build_tokenizer, make_bank, make_model_dir


UNET_LINEAR = re.compile(r"^unet\..*(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))$")


TEXT_LINEAR = re.compile(r"^text_encoder\..*(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")


CONVS = ["unet.down_blocks.0.attentions.0.proj_in",          # 1x1
         "unet.up_blocks.1.attentions.1.proj_in",            # 1x1
         "unet.down_blocks.0.resnets.0.conv1",               # 3x3
         "unet.down_blocks.0.downsamplers.0.conv",           # 3x3, stride 2
         "unet.up_blocks.0.resnets.0.conv_shortcut"]         # 1x1, c_in != c_out


def components_of(pipe) -> nn.ModuleDict:
    return nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder})


def make_lora(model: nn.Module, name: str, seed: int, rank: int, keys) -> Lora:
    """Random A, non-zero B (so ΔW != 0), scale alpha/r = 0.75."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for key in keys:
        m = model.get_submodule(key)
        if isinstance(m, nn.Linear):
            A = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
            B = torch.randn(m.out_features, rank, generator=g) * 0.5
        else:
            A = torch.randn(rank, *m.weight.shape[1:], generator=g) / m.weight[0].numel() ** 0.5
            B = torch.randn(m.out_channels, rank, 1, 1, generator=g) * 0.5
        modules[key] = LoraWeights(A, B, 0.75)
    return Lora(name=name, modules=modules)


def pipeline_loras(comps: nn.ModuleDict) -> list[Lora]:
    """Three LoRAs of ranks 2, 3, 4 over different but overlapping modules (experts absent in some)."""
    names = [n for n, _ in comps.named_modules()]
    unet = [n for n in names if UNET_LINEAR.search(n)]
    text = [n for n in names if TEXT_LINEAR.search(n)]
    return [make_lora(comps, "alpha", 1, 2, unet + text + CONVS),
            make_lora(comps, "beta", 2, 3, unet + [k for k in text if "mlp" not in k] + CONVS[:3]),
            make_lora(comps, "gamma", 3, 4, unet + text)]


def inputs(batch: int = 2, size: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.tensor([5, 500, 900, 50][:batch]),
            torch.randn(batch, 6, 16, generator=g), torch.randint(0, 30, (batch, 9), generator=g))


@torch.no_grad()
def run(comps: nn.ModuleDict, x) -> tuple[torch.Tensor, torch.Tensor]:
    latents, t, ehs, ids = x
    return comps["unet"](latents, t, ehs).sample, comps["text_encoder"](ids).last_hidden_state


def close(a, b, tol=1e-5):
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=tol)


@torch.no_grad()
def randomise_gates(handle, x, seed=0, scale=0.05):
    """Materialise every gate with one forward, then give it random (trained-looking) weights."""
    run(handle.model, x)
    g = torch.Generator().manual_seed(seed)
    for gate in handle.gate_modules():
        assert gate.proj is not None
        gate.proj.weight.copy_(torch.randn(gate.proj.weight.shape, generator=g) * scale)
        gate.proj.bias.copy_(torch.randn(gate.proj.bias.shape, generator=g))
        gate.log_tau.fill_(-0.3)


# Linear attention / feed-forward layers, 1×1 and 3×3 convs, and text-encoder layers.
TARGETS = [
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "unet.mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "unet.up_blocks.1.attentions.1.transformer_blocks.0.ff.net.2",
    "unet.up_blocks.1.attentions.0.proj_in",
    "unet.down_blocks.0.resnets.0.conv1",
    "unet.up_blocks.0.resnets.1.conv_shortcut",
    "text_encoder.encoder.layers.0.self_attn.q_proj",
    # diffusers 0.42 converts kohya text-encoder attention keys only when an out_proj key is present
    # (it sniffs the layout from `to_out_lora`); real kohya files always have it. Our loader does not need it.
    "text_encoder.encoder.layers.0.self_attn.out_proj",
    "text_encoder.encoder.layers.1.mlp.fc1",
]


def random_lora(components, name="lora", rank=2, alpha=1.0, seed=0, targets=TARGETS, std=0.2) -> Lora:
    """A LoRA with non-zero A and B on `targets`, shaped for `components`."""
    g = torch.Generator().manual_seed(seed)
    modules = {}
    for key in targets:
        m = components.get_submodule(key)
        if isinstance(m, torch.nn.Linear):
            A, B = torch.randn(rank, m.in_features, generator=g), torch.randn(m.out_features, rank, generator=g)
        else:
            A = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
            B = torch.randn(m.out_channels, rank, 1, 1, generator=g)
        modules[key] = LoraWeights(A=A * std, B=B * std, scale=alpha / rank)
    return Lora(name=name, modules=modules)


def model_outputs(pipe, seed=123):
    """UNet noise prediction and text-encoder hidden states on fixed inputs."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    ids = pipe.tokenizer(["a red circle on the left"], padding="max_length", max_length=16,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        text = pipe.text_encoder(ids)[0]
        unet = pipe.unet(latents, 10, encoder_hidden_states=text).sample
    return unet, text


def assert_close(a, b, rtol=1e-4):
    err = (a - b).abs().max().item()
    assert err <= rtol * max(a.abs().max().item(), 1e-6), f"max abs diff {err}"


def text_model(layers=2, seed=0):
    torch.manual_seed(seed)
    return CLIPTextModel(CLIPTextConfig(vocab_size=30, hidden_size=8, intermediate_size=16, num_hidden_layers=layers,
                                        num_attention_heads=2, max_position_embeddings=16))


def keys_of(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n]


def trained_setup(tmp_path, granularity="block"):
    model = text_model()
    loras = [make_lora(model, name, i, 2, keys_of(model)) for i, name in enumerate(("ink", "oil", "pencil"))]
    files = []
    for lora in loras:
        save_lora(lora, tmp_path / f"{lora.name}.safetensors")
        files.append((lora.name, tmp_path / f"{lora.name}.safetensors"))
    handle = attach(model, loras, MoleConfig(granularity=granularity))
    ids = torch.randint(0, 30, (2, 6))
    with torch.no_grad():
        model(ids)
        for gate in handle.gate_modules():
            gate.proj.weight.normal_()
            gate.proj.bias.normal_()
            gate.log_tau.fill_(0.2)
        out = model(ids).last_hidden_state
    result = TrainResult(steps=7, final={"loss": 1.5, "task": 1.0, "balance": 1.0}, mean_gates=[0.2, 0.3, 0.5])
    return model, loras, files, handle, ids, out, result


def build_tiny_clip(folder: Path) -> Path:
    """A tiny CLIPModel folder (config-built, random weights) with tokenizer and image processor."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tok = build_tokenizer(folder / "tok")
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8)).save_pretrained(folder)
    tok.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder


SETTINGS = dict(prompt="a photo of sks dog", negative="", seed=3, steps=2, guidance=4.0)


# ---- the world the tests run on (shared with test_api.py and test_browser.py) -------------------
def world_paths(config, tmp_path_factory, prefer_default: bool = False) -> tuple[str, str]:
    """(model, bank): --model/--bank or MOLE_APP_MODEL/MOLE_APP_BANK if given; the embedded default
    when `prefer_default` and it is built; else a tiny pipeline and bank made in a temp folder."""
    model = config.getoption("--model", None) or os.environ.get("MOLE_APP_MODEL")
    bank = config.getoption("--bank", None) or os.environ.get("MOLE_APP_BANK")
    if model and bank:
        return model, bank
    if prefer_default and embedded_default_ready():
        return DEFAULT_MODEL, DEFAULT_BANK
    root = tmp_path_factory.mktemp("app_world")
    model_dir = make_model_dir(root)
    return str(model_dir), str(make_bank(root / "bank", model_dir))


def embedded_default_ready() -> bool:
    """The pixel world is built: its pipeline folder and at least two bank manifests exist."""
    return (Path(DEFAULT_MODEL) / "model_index.json").exists() and \
        len(list(Path(DEFAULT_BANK).glob("*.json"))) >= 2


def bank_digest(folder: str) -> dict[str, str]:
    """Every file of a folder tree with its hash, to prove that nothing on disk changed."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def pixels(image) -> np.ndarray:
    image = image if isinstance(image, PIL.Image.Image) else PIL.Image.open(image)
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(engine_or_studio, **options) -> tuple:
    import app
    """Start the app on a free localhost port: (demo, url)."""
    demo = app.build_demo(engine_or_studio, **options)
    demo.queue()
    engine = getattr(engine_or_studio, "engine", engine_or_studio)
    options = app.launch_options(engine)
    for attempt in range(3):    # Gradio gives up on its own server after a few seconds when the machine is busy
        try:
            _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                                    quiet=True, **options)
            return demo, url
        except ValueError as err:
            demo.close()
            if "localhost is not accessible" not in str(err) or attempt == 2:
                raise




def distinct_copy(src, dst, i: int = 0):
    """A copy of the LoRA file `src` at `dst` with one tensor scaled by (1 + 0.001·(i+1)): a valid LoRA whose
    bytes differ from every other (the bank refuses a byte-identical second upload)."""
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), framework="pt") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    first = sorted(tensors)[0]
    tensors[first] = tensors[first] * (1 + 0.001 * (i + 1))
    save_file(tensors, str(dst), metadata=metadata)
    return dst


def event(demo, api_name: str):
    """The handler a Blocks event registered under `api_name` (call it as the server would)."""
    return next(d.fn for d in demo.fns.values() if d.api_name == api_name)


def family_studio(family: str, model_dir, bank_dir, sessions):
    """The app's Studio over a tiny family folder (FLUX: its default side is not saved with the folder)."""
    from mole_core.image.engine import Engine
    from tests.tiny_families import SIDE
    from ui import session
    engine = Engine(str(model_dir), str(bank_dir))
    if family == "flux":
        engine.pipe.default_sample_size = SIDE // 8
    return session.Studio(engine, root=sessions)
