"""What the text world's build and its quality bars share: the build's settings, the model's config, the
random streams, the log, and loading the built model.

References: transformers `BartConfig` / `AutoModelForSeq2SeqLM.from_pretrained`; nanoGPT `GPTConfig`.
"""
from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import BartConfig

REPO_ROOT = Path(__file__).resolve().parents[3]
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]   # attention (self + cross) and MLP Linears


@dataclass
class TextBuildConfig:
    """Sizes and step counts of one build; `quick_config()` gives the tiny version the tests run."""
    out: Path = REPO_ROOT                 # root receiving assets/text-world/ and text_bank/
    seed: int = 0                         # every stage derives its seed from this
    quick: bool = False                   # tiny models, few steps (a check that the build runs)
    threads: int = 1                      # torch intra-op threads (a shared 2-core machine: see world.config)
    # the base model: a tiny encoder-decoder (BART layout: learned absolute positions; see build.py for why
    # not T5, whose relative-only positions left the encoder's letters unordered)
    d_model: int = 128
    d_ff: int = 512
    layers: int = 3                       # encoder layers = decoder layers
    heads: int = 4
    base_steps: int = 2500
    base_batch: int = 64
    base_lr: float = 5e-4                # BART is post-LayerNorm: at 2e-3 it stalled at loss 2.97 (measured)
    # the LoRAs (peft LoraConfig on LORA_TARGETS of every block)
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_steps: int = 600
    lora_batch: int = 64
    lora_lr: float = 2e-3
    lora_prior: float = 0.25              # share of base-task items in a LoRA's batches (prior preservation)
    loras: tuple = ()                     # stage loras: only these keys (empty: every LoRA task)
    # the bars
    eval_items: int = 100                 # held-out items per task
    examples: int = 16                    # (input, output) pairs in each manifest (gate-training data)

    @property
    def model_dir(self) -> Path:
        return Path(self.out) / "assets" / "text-world"

    @property
    def bank_dir(self) -> Path:
        return Path(self.out) / "text_bank"

    @classmethod
    def quick_config(cls, out: Path, seed: int = 0) -> "TextBuildConfig":
        return cls(out=out, seed=seed, quick=True, d_model=32, d_ff=64, layers=1, heads=2, base_steps=40,
                   base_batch=16, lora_rank=4, lora_alpha=4.0, lora_steps=10, lora_batch=16, eval_items=20,
                   examples=4)

    def model_config(self, vocab_size: int) -> BartConfig:
        return BartConfig(vocab_size=vocab_size, d_model=self.d_model, encoder_layers=self.layers,
                          decoder_layers=self.layers, encoder_attention_heads=self.heads,
                          decoder_attention_heads=self.heads, encoder_ffn_dim=self.d_ff, decoder_ffn_dim=self.d_ff,
                          max_position_embeddings=64, dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
                          activation_function="gelu", pad_token_id=0, eos_token_id=1, bos_token_id=1,
                          decoder_start_token_id=0, forced_eos_token_id=None, scale_embedding=False)


def rng_for(cfg: TextBuildConfig, stream: str) -> np.random.Generator:
    """An independent random stream per named purpose, fixed by the build seed."""
    return np.random.default_rng([cfg.seed, zlib.crc32(stream.encode())])


_T0 = time.perf_counter()


def log(message: str) -> None:
    print(f"[textworld {time.perf_counter() - _T0:7.1f}s] {message}", flush=True)


def set_threads(n: int) -> None:
    torch.set_num_threads(n)
