"""The text wing's gate-training task: the token loss of a transformers model on (prompt, target) pairs.

    task = TokenTask(model, tokenizer, pairs)
    result = train_gates(handle, task, TrainConfig(steps=300), on_step=print)     # mole_core.train

References: MoLE (Wu et al., ICLR 2024) §4 (NLP experiments); transformers' label convention (-100 is ignored).
"""
from __future__ import annotations

import torch


class TokenTask:
    """Token loss of a transformers model on (prompt, target) pairs: the target tokens are predicted.

    Causal LMs get prompt + target with the prompt positions masked out of the labels (-100);
    encoder-decoder models (config.is_encoder_decoder) get the prompt as input and the target as labels.
    """

    def __init__(self, model, tokenizer, pairs: list[tuple[str, str]], max_length: int = 128):
        if not pairs:
            raise ValueError("TokenTask needs at least one (prompt, target) pair.")
        self.model, self.tokenizer, self.pairs, self.max_length = model, tokenizer, list(pairs), max_length
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.pad_id = next(i for i in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0) if i is not None)
        self.items = [self._encode(p, t) for p, t in self.pairs]
        self.buckets: dict[int, list[int]] = {}
        for i in range(len(self.items)):
            self.buckets.setdefault(self._length(i), []).append(i)

    def _length(self, i: int) -> int:
        return len(self.items[i][0])          # the input's (seq2seq) or the whole sequence's (causal)

    def _encode(self, prompt: str, target: str) -> tuple[list[int], list[int]]:
        tok, eos = self.tokenizer, self.tokenizer.eos_token_id
        if self.seq2seq:
            return (tok(prompt).input_ids[: self.max_length], tok(target).input_ids[: self.max_length])
        p = tok(prompt).input_ids
        if eos is not None and p and p[-1] == eos:                  # e.g. CLIP appends EOS: not before the target
            p = p[:-1]
        t = tok(target, add_special_tokens=False).input_ids + ([eos] if eos is not None else [])
        ids = (p + t)[: self.max_length]
        labels = ([-100] * len(p) + t)[: self.max_length]
        return ids, labels

    def loss(self, generator: torch.Generator, batch_size: int) -> torch.Tensor:
        """The token loss of `batch_size` pairs of one input length: a random pair, and random pairs of its
        length. The inputs are never padded, so a per-sample gate (which pools over every position) sees in
        training exactly the prompt tokens it sees when the model answers that prompt alone."""
        device = self.model.device
        first = int(torch.randint(len(self.items), (1,), generator=generator))
        bucket = self.buckets[self._length(first)]
        idx = [first] + [bucket[i] for i in torch.randint(len(bucket), (batch_size - 1,), generator=generator).tolist()]
        ids, labels = zip(*(self.items[i] for i in idx))

        def pad(seqs, value):
            n = max(len(s) for s in seqs)
            return torch.tensor([list(s) + [value] * (n - len(s)) for s in seqs], device=device)

        input_ids = pad(ids, self.pad_id)
        mask = pad([[1] * len(s) for s in ids], 0)
        return self.model(input_ids=input_ids, attention_mask=mask, labels=pad(labels, -100)).loss
