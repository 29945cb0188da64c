"""Defaults shared by the engine, the CLI, the app, the evaluation and the world build (a leaf module:
it imports nothing of the package, so anything may import it).

Limits are what a server accepts from a request. The defaults are sized for a public Space on a
small CPU (one visitor cannot hold the shared model queue for long); `python app.py --local`
(or `Limits.local()`) raises them for a private machine, and the CLI uses the local limits.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = str(PACKAGE_ROOT / "assets" / "pixel-world")   # the embedded default pipeline
DEFAULT_BANK = str(PACKAGE_ROOT / "lora_bank")                  # its LoRA bank

# Classifier-free guidance by default, measured on the embedded world (LoRA found in 120 images, alone with
# its trigger): night 0.98 at 2, 0.95 at 2.5, 0.90 at 3; checker 0.99 at 2, 0.80 at 4; face 0.91 at 2,
# 0.93 at 3, 0.89 at 4, 0.84 at 6. SD 1.5 checkpoints usually want about 7.5.
DEFAULT_GUIDANCE = 2.5
DEFAULT_DENOISE_STEPS = 20

# Gate training as the app, the CLI (train-gates, evaluate) and the small study start it: the study's protocol
# (150 steps, lr 1e-3, batch 4; about 20 s on 2 quiet cores with per-token gates). TrainConfig's own 400 steps
# at lr 1e-4 are the paper's settings (at 1e-4, 60 steps left the gates at 0.495 / 0.505). The default gate
# kind is the study's best (README, "The MoLE study on the pixel world").
TRAIN_STEPS = 150
TRAIN_LR = 1e-3
TRAIN_BATCH = 4
DEFAULT_GATE = "routed"


# What a job costs on the embedded world before this machine has timed itself (mole_core.costs: the app and
# `evaluate` time every kind at start-up, then keep a running mean of their own runs). Measured on this
# project's 2-core CPU machine, quiet (load under 1.5), one torch thread, 32×32 images: seconds per denoising
# step of one image (guidance batches two) for the base model, a merge (or one LoRA), LoRA Switch, MoLE with
# per-sample and with per-token (or routed) gates, two experts; and per gate-training step at batch 4, two
# experts (per-token gates formed every expert's output at every pixel when this was measured). Under load the
# ratios held: merge 1.25×, Switch 1.9×, MoLE per sample 1.3×, per token 2.6× the base model's step.
COSTS = {"denoise_step": 0.022, "denoise_step_merge": 0.0275, "denoise_step_switch": 0.042,
         "denoise_step_mole_sample": 0.0286, "denoise_step_mole_token": 0.057,
         "train_step_sample": 0.107, "train_step_token": 0.126}


@dataclass(frozen=True)
class Limits:
    """Largest counts a request may ask for (each refused above with a message naming the field)."""
    denoise_steps: int = 100        # denoising steps of one image
    train_steps: int = 500          # gate-training steps of one run
    side_factor: int = 2            # image side at most this × the model's default side
    guidance: float = 30.0          # classifier-free guidance scale
    study_seeds: int = 8            # the in-app study: seeds × prompts images per method
    study_prompts: int = 8
    experts: int = 8                # LoRAs in one mixture / comparison
    upload_bytes: int = 256 * 2**20 # one uploaded LoRA file
    upload_pixels: int = 4096 * 4096  # one uploaded example image

    @classmethod
    def local(cls) -> "Limits":
        """For a private machine: long runs allowed (still finite)."""
        return cls(denoise_steps=1000, train_steps=100_000, side_factor=4, study_seeds=1000, study_prompts=100,
                   experts=32)
