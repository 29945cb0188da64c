"""Greedy decoding for the text world's models, batched without padding.

Prompts are grouped by their token length, so no batch holds padding: a per-sample MoLE gate (the mean
over a sample's tokens) then sees exactly the tokens it would see alone, and batched == one by one. Every
decoding step is one full forward pass of the model (encoder included, no key/value cache), like one
denoising step of a pipeline: a per-sample gate of the decoder pools over the whole answer so far.

References: transformers `GenerationMixin.greedy_search` (the loop it replaces, kept free of the cache
so MoLE's per-pass gates stay well defined).
"""
from __future__ import annotations

from collections import defaultdict

import torch


@torch.no_grad()
def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 20, batch_size: int = 128) -> list[str]:
    """The greedy answer to each prompt (special tokens dropped)."""
    by_length: dict[int, list[int]] = defaultdict(list)
    encoded = [tokenizer(p).input_ids for p in prompts]
    for i, ids in enumerate(encoded):
        by_length[len(ids)].append(i)
    answers: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    start, eos = model.config.decoder_start_token_id, model.config.eos_token_id
    for indices in by_length.values():
        for b in range(0, len(indices), batch_size):
            chunk = indices[b:b + batch_size]
            input_ids = torch.tensor([encoded[i] for i in chunk], device=device)          # (B, T)
            out = torch.full((len(chunk), 1), start, dtype=torch.long, device=device)     # (B, 1)
            done = torch.zeros(len(chunk), dtype=torch.bool, device=device)
            for _ in range(max_new_tokens):
                logits = model(input_ids=input_ids, decoder_input_ids=out, use_cache=False).logits
                nxt = logits[:, -1].argmax(-1)                                           # (B,)
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                out = torch.cat([out, nxt[:, None]], dim=1)
                done |= nxt == eos
                if bool(done.all()):
                    break
            for i, row in zip(chunk, out[:, 1:].tolist()):
                answers[i] = tokenizer.decode(row[:row.index(eos)] if eos in row else row, skip_special_tokens=True)
    return answers
