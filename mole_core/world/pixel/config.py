"""What the world's build and its quality bars share: the build's settings, the bank's LoRAs, the build's
random streams, its log and the way the built pipeline is loaded.

`mole_core.world.pixel.build` trains the world with these and `mole_core.world.pixel.quality` measures it with them;
neither imports the other's module-level code (build calls quality's `stage_eval` as its last stage).

References: diffusers `StableDiffusionPipeline.from_pretrained`; DreamBooth (Ruiz et al., 2023) for the
rare-token triggers the LoRA specs name.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from diffusers import StableDiffusionPipeline

from mole_core.defaults import DEFAULT_GUIDANCE
from mole_core.world.pixel import render as world

REPO_ROOT = Path(__file__).resolve().parents[3]
# P(1, 2, 3 objects) in a LoRA's scenes as the eval bar and the examples draw them: a style is asked for
# with more three-object scenes, where its trigger lands at late text positions (see render.caption)
SCENE_OBJECTS_P = {"subject": (0.45, 0.4, 0.15), "style": (0.3, 0.3, 0.4)}


@dataclass
class BuildConfig:
    """Sizes and step counts of one build; `quick_config()` gives the tiny version the tests run."""
    out: Path = REPO_ROOT                 # root receiving assets/pixel-world/ and lora_bank/
    seed: int = 0                         # every stage derives its seed from this
    quick: bool = False                   # tiny models, few steps (tests)
    threads: int = 1                      # torch intra-op threads: 1, because on a shared 2-core machine
                                          # two OpenMP threads spin-wait on each other (measured 6x slower)
    # VAE
    vae_channels: tuple = (32, 64)        # one downsampling: 32x32 image -> 4x16x16 latent
    vae_steps: int = 500
    vae_batch: int = 24
    vae_lr: float = 2e-3
    vae_kl: float = 1e-6                  # KL weight (SD uses ~1e-6: nearly a plain autoencoder)
    decoder_steps: int = 600              # decoder-only fine-tuning on subject/night-rich scenes
    # text encoder + UNet
    text_hidden: int = 64
    text_layers: int = 3
    unet_channels: tuple = (64, 96)
    unet_heads: int = 4
    base_steps: int = 1000
    base_batch: int = 32
    base_lr: float = 1e-3
    base2_steps: int = 800                # second training cycle (stage base2) at base_lr / 2
    base3_steps: int = 600                # third cycle (stage base3) at base_lr / 4
    empty_caption_p: float = 0.1          # caption dropout, so classifier-free guidance works
    # oracle
    oracle_steps: int = 1500
    oracle_batch: int = 64
    # LoRAs
    loras: tuple = ()                     # stage loras: only these keys (empty: every LoRA of the bank)
    lora_rank: int = 8
    lora_convs: bool = True               # also the UNet's resnet convs: attention alone learned the
                                          # subjects' look poorly (face found in 0.38 of images)
    lora_text_encoder: bool = True        # also the text encoder, so the trigger word gets a meaning
    lora_steps: int = 300                 # measured on the shipped base: checker found 0.50 at 150 steps, 0.75 at 300
    lora_batch: int = 16                  # instance images per step
    lora_prior_batch: int = 8             # prior-preservation images (captions without the trigger)
    lora_style_prior_batch: int = 12      # ... for a style LoRA, which changes every pixel
    lora_lr: float = 2e-3
    lora_subject_objects_p: tuple = SCENE_OBJECTS_P["subject"]  # training scenes' P(1, 2, 3 objects) for subjects; more
                                          # multi-object scenes (0.25, 0.4, 0.35) did not help (rank 16): checker 0.88 -> 0.69
    lora_style_objects_p: tuple = SCENE_OBJECTS_P["style"]      # ... for styles: night found 0.75 -> 0.80, preservation
                                          # 0.71 -> 0.87 against (0.45, 0.4, 0.15) (with 12 prior images)
    n_examples: int = 12                  # example images per manifest
    # evaluation / generation
    eval_images: int = 120                # generated images for the base bar (half 1-, half 2-object)
    eval_lora_images: int = 120           # per LoRA, with its trigger (≥ 100, as the base bar)
    eval_preserve_images: int = 40        # per LoRA, captions without its trigger
    eval_oracle_images: int = 1000        # clean renders for the oracle bar
    steps: int = 20                       # sampler steps used for evaluation and examples
    guidance: float = DEFAULT_GUIDANCE    # classifier-free guidance for evaluation: what the app draws with

    @classmethod
    def quick_config(cls, out: Path, seed: int = 0) -> "BuildConfig":
        return cls(out=out, seed=seed, quick=True, vae_channels=(16, 32), vae_steps=30, vae_batch=8, decoder_steps=10,
                   text_hidden=32, text_layers=1, unet_channels=(32, 32), unet_heads=2, base_steps=30, base2_steps=10, base3_steps=5,
                   base_batch=8, oracle_steps=60, oracle_batch=32, lora_rank=4, lora_steps=6, lora_batch=4,
                   lora_prior_batch=2, lora_style_prior_batch=2, n_examples=8, eval_images=8, eval_lora_images=4,
                   eval_preserve_images=4, eval_oracle_images=64, steps=4)

    @property
    def model_dir(self) -> Path:
        return Path(self.out) / "assets" / "pixel-world"

    @property
    def bank_dir(self) -> Path:
        return Path(self.out) / "lora_bank"


# ---------------------------------------------------------------------------------------------
# Log, random streams, the built pipeline

def log(msg: str) -> None:
    """One timestamped line of the build's log (stdout, flushed)."""
    print(f"[world {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# each stage's random stream (numpy) and torch seed offset
STREAMS = {"vae": 1, "decoder": 6, "base": 2, "base2": 7, "oracle": 3, "loras": 4, "examples": 5, "base3": 8,
           "eval": 1000}


def rng_for(cfg: BuildConfig, stage: str) -> np.random.Generator:
    """One independent random stream per stage (evaluation streams never meet training ones)."""
    return np.random.default_rng([cfg.seed, STREAMS[stage]])


def load_pipeline(model_dir: Path) -> StableDiffusionPipeline:
    """The built world as a plain diffusers pipeline (no safety checker, no progress bars, frozen): the
    project's one pipeline loader, `mole_core.image.families.load_pipeline`."""
    from mole_core.image.families import load_pipeline as load
    return load(str(model_dir))


# ---------------------------------------------------------------------------------------------
# The LoRA bank

@dataclass
class LoraSpec:
    """One LoRA of the bank: a subject or a style of the world."""
    key: str          # file stem in lora_bank/ and the oracle's identity / style name
    trigger: str
    name: str
    description: str
    kind: str         # "subject" | "style"

    def scene(self, rng: np.random.Generator, objects_p: tuple | None = None) -> world.Scene:
        """A scene showing this LoRA's subject or style, with 1, 2 or 3 objects drawn with probabilities
        `objects_p` (default: the mix the eval bar and the examples use; training sets its own)."""
        p = objects_p or SCENE_OBJECTS_P[self.kind]
        n = int(rng.choice([1, 2, 3], p=p))
        if self.kind == "subject":
            return world.sample_scene(rng, n_objects=n, force_subject=self.key)
        return world.sample_scene(rng, n_objects=n, style=self.key)


def lora_specs() -> list[LoraSpec]:
    """Every LoRA of the bank: one per subject of the world, then one per style."""
    return ([LoraSpec(s.key, s.trigger, s.name, s.description, "subject") for s in world.SUBJECTS]
            + [LoraSpec(s.key, s.trigger, s.name, s.description, "style") for s in world.STYLES])
