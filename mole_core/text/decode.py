"""Greedy decoding for seq2seq and causal LMs (the text world's and any other), batched without padding.

Prompts are grouped by their token length, so no batch holds padding: a per-sample MoLE gate (the mean
over a sample's tokens) then sees exactly the tokens it would see alone, and batched == one by one. Every
decoding step is one full forward pass of the model (encoder included, no key/value cache), like one
denoising step of a pipeline: a per-sample gate of the decoder pools over the whole answer so far.

References: transformers `GenerationMixin.greedy_search` (the loop it replaces, kept free of the cache
so MoLE's per-pass gates stay well defined).
"""
from __future__ import annotations

import torch


@torch.no_grad()
def decode(model, tokenizer, prompts: list[str], max_new_tokens: int = 24, batch_size: int = 128) -> list[list[int]]:
    """The greedy answer tokens of each prompt (no special tokens), for seq2seq and causal LMs.

    Prompts are grouped by token length, so no batch holds padding (batched == one by one, also for a
    per-sample gate), and every step is one full forward pass without a key/value cache: step k of a
    recording is the pass that chose answer token k. At most `batch_size` prompts go through at once.
    """
    seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
    eos = model.config.eos_token_id if model.config.eos_token_id is not None else tokenizer.eos_token_id
    encoded = []
    for p in prompts:
        ids = tokenizer(p).input_ids
        if not seq2seq and eos is not None and ids and ids[-1] == eos:
            ids = ids[:-1]                              # a causal LM continues the prompt: no EOS before it
        encoded.append(ids)
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    answers: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    special = set(tokenizer.all_special_ids)
    chunks = [same[b:b + batch_size] for same in groups.values() for b in range(0, len(same), batch_size)]
    for indices in chunks:
        x = torch.tensor([encoded[i] for i in indices], device=device)                   # (B, T)
        if seq2seq:
            out = torch.full((len(indices), 1), model.config.decoder_start_token_id, device=device)
        done = torch.zeros(len(indices), dtype=torch.bool, device=device)
        new = []
        for _ in range(max_new_tokens):
            logits = (model(input_ids=x, decoder_input_ids=out, use_cache=False) if seq2seq
                      else model(input_ids=x, use_cache=False)).logits
            nxt = logits[:, -1].argmax(-1)
            if eos is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos), nxt)
                done |= nxt == eos
            new.append(nxt)
            if seq2seq:
                out = torch.cat([out, nxt[:, None]], 1)
            else:
                x = torch.cat([x, nxt[:, None]], 1)
            if bool(done.all()):
                break
        rows = torch.stack(new, 1).tolist()
        for i, row in zip(indices, rows):
            row = row[:row.index(eos)] if eos is not None and eos in row else row
            answers[i] = [t for t in row if t not in special]
    return answers


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int = 20, batch_size: int = 128) -> list[str]:
    """The greedy answer to each prompt, as text (special tokens dropped)."""
    return [tokenizer.decode(ids, skip_special_tokens=True)
            for ids in decode(model, tokenizer, prompts, max_new_tokens, batch_size)]
