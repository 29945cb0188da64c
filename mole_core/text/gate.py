"""Prompt gates: MoLE for text models with ONE decision per sample, read from the instruction.

    handle = attach_text(model, loras, MoleConfig(gate="prompt"))       # the layers take forced weights
    gate = PromptGate(len(loras))
    result = train_prompt_gate(handle, gate, model, tokenizer, pairs, TrainConfig(steps=100, lr=5e-2))
    ids = answer_with_prompt_gate(handle, gate, model, tokenizer, prompts, max_new_tokens=24)

Why: the paper's gate (mole_core.layers) reads the experts' outputs pooled over a block's own tokens. In an
encoder-decoder, the decoder's blocks never see the instruction when they write the first letters, and a
per-sample pool of the decoder's tokens mixes the answer so far into the decision: on the text world (5 task
LoRAs, one instruction word each) every learned MoLE row stayed near a constant mix (bench/results/text/).

The prompt gate decides from the prompt, before anything is written:
  1. z = the mean over the prompt's tokens of the base model's last hidden states, from an adapter-free pass
     (every expert masked off, which is the base model exactly): the encoder's output for a seq2seq model,
     the prompt positions of the last layer for a causal LM.  (B, d)
  2. G = softmax(proj(layer_norm(z)) / τ), proj a zero-initialised Linear(d, N), τ = exp(log_tau).  (B, N)
  3. G is given to every gated module of the model (encoder and decoder) as its forced weights
     (`MoleHandle.settings(gates=G)`) for the whole answer; masks and strengths still apply on top.
An untrained gate gives G_i = 1/N: the equal-weight linear merge, as the other gate kinds.

Training is MoLE's: L = L_task + α·L_balance with only the gate's parameters moving (the token loss of the
mixed model on (prompt, target) pairs, backpropagated through G). z does not depend on the gate, so it is
computed once per pair before the first step; a step costs one forward + backward of the mixed model.

The attachment's own per-group gates are MoLE's static gates (MoleConfig.gate == "prompt" makes attach build
them, mole_core.attach) and stay at zero logits: the forced weights replace them in every forward. A mixture
file holds the prompt gate's tensors as 'prompt.log_tau', 'prompt.proj.weight', 'prompt.proj.bias' beside
the groups' (`prompt_state` / `split_state`).

References: MoLE (Wu et al., ICLR 2024) §3 (gate, balance loss); X-LoRA (Buehler & Buehler, 2024; PEFT's
`XLoraModel`: gates from the hidden states of an adapter-free first pass); LoraRetriever (Zhao et al., 2024)
and LoRAuter (routing task LoRAs by an embedding of the instruction-prefixed input).
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

from mole_core.text.task import TokenTask
from mole_core.train import TrainConfig, TrainResult

PREFIX = "prompt."                               # the prompt gate's tensors in a mixture's gate state


class PromptGate(nn.Module):
    """The prompt's last hidden states (B, T, d) + their mask (B, T) -> expert weights (B, N).

    u = layer_norm(h_t) per token; a = softmax_t(q · u_t) over the prompt's tokens (attention pooling with one
    learned query q; q = 0 at start is the mean over tokens); z = layer_norm(Σ_t a_t u_t); G = softmax(proj(z) / τ).
    q, proj and τ are created at the first call (or by `materialise`), zero-initialised: equal weights until
    trained."""

    def __init__(self, n_experts: int):
        super().__init__()
        self.n_experts = n_experts
        self.log_tau = nn.Parameter(torch.zeros(()))       # τ = exp(log_tau), 1 at start
        self.register_parameter("query", None)             # (d,) attention-pooling query
        self.register_module("proj", None)                 # Linear(d, N)

    def materialise(self, d: int, device=None) -> None:
        if self.proj is not None:
            if self.proj.in_features != d:
                raise ValueError(f"The prompt gate was built for hidden states of size {self.proj.in_features}, "
                                 f"found {d} (another model?).")
            return
        proj = nn.Linear(d, self.n_experts, device=device, dtype=torch.float32)
        nn.init.zeros_(proj.weight)
        nn.init.zeros_(proj.bias)
        self.proj = proj
        self.query = nn.Parameter(torch.zeros(d, device=device))

    def reset(self) -> None:
        """Back to untrained: equal weights (the projection is kept, zeroed)."""
        with torch.no_grad():
            for p in self.parameters():
                p.zero_()

    def forward(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        u = F.layer_norm(h.float(), (h.shape[-1],))                             # (B, T, d)
        self.materialise(u.shape[-1], u.device)
        scores = (u @ self.query).masked_fill(mask == 0, float("-inf"))         # (B, T)
        z = (torch.softmax(scores, dim=-1).unsqueeze(-1) * u).sum(1)            # (B, d)
        logits = self.proj(F.layer_norm(z, (z.shape[-1],)))                     # (B, N)
        return torch.softmax(logits / self.log_tau.float().exp(), dim=-1)      # (B, N)


def prompt_state(gate: PromptGate) -> dict[str, torch.Tensor]:
    """The gate's tensors under PREFIX, for a mixture file."""
    return {PREFIX + k: v.detach().clone() for k, v in gate.state_dict().items()}


def split_state(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the groups' gate state, the prompt gate's state without PREFIX) of a mixture's gate state."""
    groups = {k: v for k, v in state.items() if not k.startswith(PREFIX)}
    prompt = {k[len(PREFIX):]: v for k, v in state.items() if k.startswith(PREFIX)}
    return groups, prompt


def load_prompt_state(gate: PromptGate, state: dict[str, torch.Tensor], where: str = "the mixture") -> None:
    """Load `split_state`'s prompt part into `gate`; ValueError naming what is missing or of the wrong shape."""
    need = {"log_tau", "query", "proj.weight", "proj.bias"}
    if set(state) != need:
        raise ValueError(f"{where}: a prompt gate needs the tensors {', '.join(PREFIX + k for k in sorted(need))}; "
                         f"found {', '.join(PREFIX + k for k in sorted(state)) or 'none'}.")
    w = state["proj.weight"]
    if w.dim() != 2 or w.shape[0] != gate.n_experts or tuple(state["proj.bias"].shape) != (gate.n_experts,) \
            or tuple(state["query"].shape) != (w.shape[1],):
        raise ValueError(f"{where}: the prompt gate's weight must be ({gate.n_experts}, d) for {gate.n_experts} "
                         f"experts; found {tuple(w.shape)}.")
    gate.proj, gate.query = None, None
    gate.materialise(w.shape[1], gate.log_tau.device)
    with torch.no_grad():
        gate.log_tau.copy_(state["log_tau"])
        gate.proj.weight.copy_(w)
        gate.proj.bias.copy_(state["proj.bias"])
        gate.query.copy_(state["query"])


# ---- the prompt's states ----------------------------------------------------------------------------

def is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def prompt_ids(tokenizer, prompt: str, seq2seq: bool) -> list[int]:
    """The prompt's token ids as the decoder (mole_core.text.decode) and TokenTask feed them."""
    ids = tokenizer(prompt).input_ids
    eos = tokenizer.eos_token_id
    if not seq2seq and eos is not None and ids and ids[-1] == eos:
        ids = ids[:-1]                                  # a causal LM continues the prompt: no EOS before it
    return ids


@torch.no_grad()
def prompt_states(handle, model, ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(h (B, T, d), mask (B, T)): the base model's last hidden states over each prompt (every expert off),
    prompts of any lengths padded with an attention mask (mask 0 at padded positions)."""
    device = next(model.parameters()).device
    x, mask = _pad(ids, 0, device), _pad([[1] * len(s) for s in ids], 0, device)        # (B, T)
    with handle.settings(mask=[False] * len(handle.expert_names)):                        # the base model
        if is_seq2seq(model):
            hidden = model.get_encoder()(input_ids=x, attention_mask=mask).last_hidden_state
        else:
            hidden = model(input_ids=x, attention_mask=mask, output_hidden_states=True,
                           use_cache=False).hidden_states[-1]                              # (B, T, d)
    return hidden.float(), mask


# ---- answering ----------------------------------------------------------------------------------------

def prompt_weights(handle, gate: PromptGate, model, tokenizer, prompts: list[str]) -> torch.Tensor:
    """G (B, N): the prompt gate's decision for each prompt (no gradient)."""
    seq2seq = is_seq2seq(model)
    h, mask = prompt_states(handle, model, [prompt_ids(tokenizer, p, seq2seq) for p in prompts])
    with torch.no_grad():
        return gate(h, mask)


# ---- training -----------------------------------------------------------------------------------------

def train_prompt_gate(handle, gate: PromptGate, model, tokenizer, pairs: list[tuple[str, str]],
                      config: TrainConfig, alpha: float, on_step=None, should_stop=None) -> TrainResult:
    """Optimise only `gate` so that the expert it picks explains each pair's answer; return the losses.

    A mixture of experts at the level of a whole answer (Jacobs et al., 1991): with L_i(x, y) the summed token
    loss of the answer y under expert i alone (one-hot forced weights), the gate maximises
    log Σ_i G_i(x) exp(−L_i(x, y)), whose gradient pulls G(x) towards the posterior of the expert that wrote y.
    No task labels are needed (a pair may come from any LoRA's examples, or from a task no single LoRA knows).
    L_task is that negative log-likelihood per answer token (mean over pairs); L_balance = −Σ_i log q_i with q
    the mean of G over all pairs (MoLE's). z and L do not depend on the gate, so both are computed once before
    the first step (N forward passes of the model per pair, batched) and every step is full-batch over the pairs
    (config.batch_size only sets how many pairs share a forward pass then). on_step(step, {"loss", "task",
    "balance"}, mean_gates) after every step; should_stop() polled before each.
    """
    # 1. data: z of every prompt and L of every pair under every expert alone, once
    start = time.perf_counter()                      # the seconds reported include this pass
    task = TokenTask(model, tokenizer, pairs)
    seq2seq = is_seq2seq(model)
    h_all, m_all = prompt_states(handle, model, [prompt_ids(tokenizer, p, seq2seq) for p, _ in task.pairs])
    nll, tokens = expert_losses(handle, task, max(config.batch_size, 16))                              # (P, N), (P,)
    device = h_all.device
    gate.to(device)
    gate.materialise(h_all.shape[-1], device)
    torch.manual_seed(config.seed)

    # 2. only the gate trains (the model is never run again here)
    params = list(gate.parameters())
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    history, stopped, mean = [], False, []
    posterior = torch.softmax(-nll, dim=-1)                                         # (P, N): who wrote y
    # 3. the loop
    for step in range(1, config.steps + 1):
        if should_stop is not None and should_stop():
            stopped = True
            break
        G = gate(h_all, m_all)                                                      # (P, N)
        task_loss = -(posterior * torch.log(G.clamp_min(1e-30))).sum(-1).mean()    # CE to the posterior
        q = G.mean(0)                                                               # (N,)
        balance = -torch.log(q.clamp_min(1e-12)).sum()
        loss = task_loss + alpha * balance
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        parts = {"loss": loss.item(), "task": task_loss.item(), "balance": balance.item()}
        history.append(parts)
        mean = [float(v) for v in q.detach()]
        if on_step is not None:
            on_step(step, parts, mean)
    return TrainResult(steps=len(history), final=history[-1] if history else {}, mean_gates=mean,
                       history=history, seconds=time.perf_counter() - start, stopped=stopped)


@torch.no_grad()
def expert_losses(handle, task: TokenTask, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(L (P, N): the summed token loss of each pair's target under each expert alone, tokens (P,): the
    target tokens counted). Pairs go through in groups of one input length (no padded input)."""
    model, n = task.model, len(handle.expert_names)
    device = next(model.parameters()).device
    nll = torch.zeros(len(task.items), n, device=device)
    tokens = torch.zeros(len(task.items), device=device)
    batches = [b[i:i + batch_size] for b in task.buckets.values() for i in range(0, len(b), batch_size)]
    for idx in batches:
        ids, labels = zip(*(task.items[i] for i in idx))
        x = _pad(ids, task.pad_id, device)
        y = _pad(labels, -100, device)
        if not task.seq2seq:                                 # a causal LM's logit t predicts token t + 1
            y = y[:, 1:]
        tokens[idx] = (y != -100).sum(1).float()
        for i in range(n):
            with handle.settings(gates=F.one_hot(torch.tensor(i), n).float().expand(len(idx), n)):
                logits = model(input_ids=x, attention_mask=torch.ones_like(x), labels=_pad(labels, -100, device),
                               use_cache=False).logits
            if not task.seq2seq:
                logits = logits[:, :-1]
            ce = F.cross_entropy(logits.float().transpose(1, 2), y, ignore_index=-100, reduction="none")   # (B, T)
            nll[idx, i] = ce.sum(1)
    return nll, tokens


def _pad(seqs, value, device) -> torch.Tensor:
    n = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (n - len(s)) for s in seqs], device=device)


def attach_prompt_gate(handle) -> PromptGate:
    """The handle's prompt gate, registered (once) in `handle.gates` under 'prompt', so the handle's
    gate_state_dict (what a mixture file holds) carries its tensors as 'prompt.*'."""
    if "prompt" not in handle.gates:
        handle.gates["prompt"] = PromptGate(len(handle.expert_names))
    return handle.gates["prompt"]


def decode_with_weights(handle, G: torch.Tensor, model, tokenizer, prompts: list[str],
                        max_new_tokens: int) -> list[list[int]]:
    """Greedy answers (mole_core.text.decode) with the forced expert weights G (B, N) row b for prompt b,
    kept for the whole answer. Prompts go through in groups of one token length, in their order, as decode
    batches them, so each batch's rows of G line up with its samples."""
    from mole_core.text.decode import decode
    seq2seq = is_seq2seq(model)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(prompt_ids(tokenizer, p, seq2seq)), []).append(i)
    answers: list[list[int]] = [[] for _ in prompts]
    for idx in groups.values():
        with handle.settings(gates=G[idx]):
            out = decode(model, tokenizer, [prompts[i] for i in idx], max_new_tokens, batch_size=len(idx))
        for i, ids in zip(idx, out):
            answers[i] = ids
    return answers
