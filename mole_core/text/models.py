"""Opening a text model: any transformers seq2seq or causal LM folder with its tokenizer.

    model, tokenizer = load_model("assets/text-world")      # or a flan-t5 / Llama folder of your own

References: transformers `AutoModelForSeq2SeqLM` / `AutoModelForCausalLM` / `AutoTokenizer`.
"""
from __future__ import annotations

from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer


def load_model(model_dir: str | Path, device: str = "cpu"):
    """(model, tokenizer) of any transformers seq2seq or causal LM folder (the built world is a seq2seq one),
    with plain `from_pretrained` calls; a ValueError names the folder."""
    name = Path(model_dir).name
    try:
        config = AutoConfig.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ValueError(f"'{name}' is not a transformers model folder (no readable config.json).") from e
    cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(str(model_dir)).to(device).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as e:
        raise ValueError(f"'{name}': cannot load a {cls.__name__.removeprefix('AutoModelFor')} model and its "
                         f"tokenizer: {e}") from e
    return model, tokenizer
