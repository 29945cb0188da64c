"""Trigger routing for per-token MoLE gates (ours, not in the paper): MoleConfig(gate="token", route="trigger").

Each expert i has trigger word(s) (a bank entry's `trigger`; a word, several words, a phrase). The routing
term tells every token / pixel which expert's subject it belongs to, from signals the model computes anyway:

- text tokens (the text encoders' modules, the denoiser's modules that read the text: a UNet's cross-attention
  keys / values, an SD3 / FLUX transformer's context stream and the text part of FLUX's single blocks):
  r_i(j) = 1 when token j belongs to expert i's trigger, else 0;
- pixels / image tokens (every other denoiser module reading the image): r_i(p) = the attention mass of
  image token p on expert i's trigger tokens, Σ_{j ∈ trig_i} softmax_k(q_p·k_k / √d)_j, averaged over heads,
  taken from the most recent attention that reads the text at that resolution — a UNet's cross-attention
  (attn2; the softmax runs over the text tokens), an SD3 / FLUX joint attention (the softmax runs over the
  whole joint sequence, text and image tokens) — in this forward pass when one ran already, else from the
  previous denoiser call on the same text (the previous denoising step).

The gate's weights become   G_i(p) ∝ G_i^gate(p) · (r_i(p) + ε)^β     (= softmax(logits/τ + β log(r + ε)))
with β a per-gate Parameter (MoleConfig.route_beta at start; learnable unless route_learn_beta=False).
A token / pixel with the same r for every expert (no trigger in the prompt, a trigger-free token) keeps the
gate's weights exactly in proportion, so β = 0 or a prompt without triggers is the per-token gate.

Which text tokens count as expert i's (MoleConfig.route_tokens):
  "trigger"  only the trigger's own tokens (a trigger that the tokenizer splits into several pieces, CLIP's BPE
             or T5's sentencepiece, or a phrase of several words: every piece of the sequence);
  "phrase"   from the trigger up to the next token of another expert's trigger (CLIP's text encoder is
             causal: "on the left" after "zwx" carries where the zwx goes); special tokens never count.
Every text encoder finds the triggers with its own tokenizer (SDXL: both CLIPs; SD3: both CLIPs and T5; FLUX:
CLIP and T5), so a trigger is found in each encoder's tokens however that encoder splits it.
route_pixels=False routes only the text tokens (no attention maps are recorded, processors untouched).
route_norm: "mass" uses r as above; "share" divides each pixel's masses by their sum over experts
(r_i = m_i / (Σ_j m_j + ε)), so only which expert a pixel attends to counts, not how much; "spatial" first
divides each expert's map by its mean over the image (m_i(p) / mean_q m_i(q)), then shares: on small models
the text mentioned first takes most of the attention everywhere, and only the contrast between places says
where a subject goes (as Prompt-to-Prompt normalises a token's map over the image).
"balanced" scales each expert's masses until every expert holds the same total share of the image (Sinkhorn's
alternate scaling, as FreeFuse balances its concept maps); "argmax" gives each pixel wholly to the expert with the
highest spatially normalised mass.
route_encode="separate" (text side): in a prompt naming route_compose_from or more triggers, each trigger phrase
is encoded on its own — the prompt's preamble (its tokens before the first trigger) + that phrase + the prompt's
ending, through the same hooked encoder, so its text-encoder tokens are that expert's — and its states are
spliced into the prompt's (every hidden state the encoder returns): a phrase named later no longer reads the
earlier ones through a causal encoder, where an unknown trigger word spoils what follows it.
route_attend = λ > 0 (UNet cross-attention only): in the same prompts each pixel's attention logits get
λ·log(r_i(p) + ε) on expert i's text tokens and λ·log ε on the tokens after the last phrase (end token and
padding, the causal encoder's summary of the whole prompt); measured on the world, the summary is what keeps
the third-named subject from being drawn at all (docs/results_default_composition.md).
route_absent="off": an expert whose trigger is in no prompt of a network's call is switched off in that call;
no trigger at all = the base model there, bit for bit (the attention processors then run the original code).

How the trigger positions reach the denoiser: a forward pre-hook on each text encoder (the attached networks'
text encoders and those given to `set_triggers`, e.g. FLUX's and SD3's T5, which no LoRA adapts) reads its
input ids and records, with a forward hook, the encoder's outputs (its last hidden state and the penultimate
one, which SDXL and SD3 read). A pre-hook on the denoiser finds each recorded output inside each row of its
`encoder_hidden_states` (exact equality, at any token offset and feature offset: SDXL concatenates its two
encoders along the features, SD3 its CLIPs along the features and T5 after them along the tokens), and so
knows each sample's trigger positions. Rows that match nothing (prompt_embeds passed directly, SDXL's zeroed
empty negative prompt) get r = 0: the per-token gate. The attention masses are computed by recording
processors installed on the denoiser's attention modules for the attachment's lifetime:
`RecordingAttnProcessor` on a UNet's cross-attention (the classic AttnProcessor computation: probs =
softmax(QKᵀ/√d), out = probs V, equal to SDPA up to float rounding), `JointRecordingProcessor` on SD3's /
FLUX's joint attention (the fused attention kernel also returns each query's log-sum-exp, so the masses cost
one product of the image queries with the few trigger keys: the softmax over all keys is never computed twice).
Detach restores the original processors. Where routing cannot work, `route_problem` says why in one sentence.

References: Prompt-to-Prompt (Hertz et al., 2022) for cross-attention maps as a subject's layout;
MoLE (Wu et al., ICLR 2024) for the gates this term biases; diffusers `JointAttnProcessor2_0` (SD3) and
`FluxAttnProcessor` (FLUX), whose computation the joint recording processor repeats.
"""
from __future__ import annotations

from contextlib import contextmanager

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

ROUTES = ("none", "trigger")
ROUTE_TOKENS = ("trigger", "phrase")
ROUTE_NORMS = ("mass", "share", "spatial", "balanced", "argmax")
ROUTE_ABSENT = ("keep", "off")
ROUTE_ENCODE = ("joint", "separate")
DENOISERS = ("unet", "transformer")
_KEEP = 16           # text-encoder outputs remembered for matching
# Modules of an SD3 / FLUX transformer that read the text tokens (the context stream of the joint blocks).
_TEXT_SIDE = re.compile(r"(^|\.)(context_embedder|add_[qkv]_proj|to_add_out|ff_context)(\.|$)")


def untriggered(triggers: dict[str, list[str] | str]) -> list[str]:
    """The experts of {expert: trigger words} that have no trigger word."""
    return [name for name, words in triggers.items()
            if not [w for w in ([words] if isinstance(words, str) else words or []) if w.strip()]]


def route_problem(model: nn.Module | None, triggers: dict[str, list[str]] | None = None) -> str | None:
    """One sentence saying why trigger routing cannot run on `model` with these triggers ({expert: words}),
    or None when it can: it needs a pipeline's networks (a ModuleDict with a "unet" or a "transformer") and a
    trigger word for every expert. model=None checks the triggers alone."""
    if model is not None and (not isinstance(model, nn.ModuleDict) or not any(d in model for d in DENOISERS)):
        return ("Trigger routing reads a diffusers pipeline's text encoders and its UNet's or transformer's "
                "attention; this model has neither, so the gate is the per-token gate, unrouted.")
    missing = untriggered(triggers or {})
    if missing:
        return (f"The LoRA{'s' if len(missing) > 1 else ''} {', '.join(repr(m) for m in missing)} "
                f"{'have' if len(missing) > 1 else 'has'} no trigger word (the manifest's \"trigger\"), so the "
                f"routed gate cannot tell where {'they go' if len(missing) > 1 else 'it goes'}: this MoLE runs "
                f"the per-token gate instead, unrouted.")
    return None


def trigger_token_ids(tokenizer, triggers: dict[str, list[str] | str], names: list[str]) -> list[list[tuple[int, ...]]]:
    """Per expert (in `names` order) the token-id sequences of its trigger words (no special tokens)."""
    out = []
    for name in names:
        words = triggers.get(name) or []
        words = [words] if isinstance(words, str) else list(words)
        seqs = []
        for w in words:
            ids = tuple(tokenizer(w, add_special_tokens=False).input_ids)
            if ids:
                seqs.append(ids)
        out.append(seqs)
    return out


def trigger_positions(input_ids: torch.Tensor, trigger_ids: list[list[tuple[int, ...]]], tokens: str = "trigger",
                      special: set[int] | None = None) -> torch.Tensor:
    """(B, L) token ids -> (B, L, N) float: 1 where token j belongs to expert i (see `route_tokens`)."""
    ids = input_ids.detach().cpu().tolist()
    B, L, N = len(ids), len(ids[0]) if ids else 0, len(trigger_ids)
    out = torch.zeros(B, L, N)
    special = special or set()
    for b, row in enumerate(ids):
        owner = [-1] * L
        for i, seqs in enumerate(trigger_ids):
            for seq in seqs:
                n = len(seq)
                for j in range(L - n + 1):
                    if tuple(row[j:j + n]) == seq:
                        for k in range(j, j + n):
                            owner[k] = i
                            out[b, k, i] = 1.0
        if tokens == "phrase":
            current = -1
            for j in range(L):
                if owner[j] >= 0:
                    current = owner[j]
                elif current >= 0 and row[j] not in special:
                    out[b, j, current] = 1.0
    return out


class RecordingAttnProcessor:
    """Cross-attention that also stores each pixel's attention mass on every expert's trigger tokens."""

    def __init__(self, router: "TriggerRouter", original):
        self.router, self.original = router, original

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        tokens = self.router.denoiser_tokens
        if getattr(self.router.runtime, "all_off", False) or self.router.all_absent(self.router.denoiser):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if encoder_hidden_states is None or tokens is None or attn.spatial_norm is not None \
                or attn.group_norm is not None or getattr(attn, "residual_connection", False):
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch_size, seq_len, _ = encoder_hidden_states.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch_size)
        bias = self.router.attention_bias(hidden_states.shape[1], batch_size, seq_len)   # (B, T, L) or None
        if bias is not None:                                   # route_attend: pixels keep to their phrase
            bias = bias.repeat_interleave(attn.heads, 0).to(hidden_states.dtype)        # (B·heads, T, L)
            attention_mask = bias if attention_mask is None else attention_mask + bias
        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)
        query, key, value = attn.head_to_batch_dim(query), attn.head_to_batch_dim(key), attn.head_to_batch_dim(value)
        probs = attn.get_attention_scores(query, key, attention_mask)          # (B·heads, T, L)
        out = attn.batch_to_head_dim(torch.bmm(probs, value))
        if tokens.shape[0] == batch_size and tokens.shape[1] == seq_len:
            p = probs.reshape(batch_size, -1, *probs.shape[1:]).float().mean(1)  # (B, T, L)
            self.router.store_mass(p.shape[1], p @ tokens.to(p.device))          # (B, T, N)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        return out / attn.rescale_output_factor


def attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled dot-product attention (B, H, S, d) and each query's log Σ_k exp(q·k/√d) (B, H, S), from one
    fused kernel where torch has one (CPU flash attention, CUDA memory-efficient attention), else in chunks."""
    try:
        if q.device.type == "cpu":
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
            return out, lse
        if q.device.type == "cuda":
            out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[:2]
            return out, lse[..., :q.shape[2]]
    except (RuntimeError, NotImplementedError):
        pass                                           # a layout or dtype the kernel refuses: the plain way
    out = F.scaled_dot_product_attention(q, k, v)
    scale = 1 / math.sqrt(q.shape[-1])
    lse = torch.cat([(qc.float() @ k.float().transpose(-1, -2) * scale).logsumexp(-1)
                     for qc in q.split(1024, dim=2)], dim=2)
    return out, lse


class JointRecordingProcessor:
    """SD3's / FLUX's joint attention that also stores each image token's attention mass on every expert's
    trigger tokens (the softmax over the whole joint sequence). `layout`: "flux" (diffusers FluxAttnProcessor:
    text tokens first; single blocks carry text and image in one sequence) or "sd3" (JointAttnProcessor2_0:
    image tokens first). Without triggers in the call (or any input it does not know) the original runs."""

    def __init__(self, router: "TriggerRouter", original, layout: str):
        self.router, self.original, self.layout = router, original, layout

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        router = self.router
        if attention_mask is not None or not router.recording_active():
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if self.layout == "flux":
            return self._flux(attn, hidden_states, encoder_hidden_states, *args, **kwargs)
        if encoder_hidden_states is None:              # SD3.5's image-only second attention: no text to attend
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        return self._sd3(attn, hidden_states, encoder_hidden_states)

    def _flux(self, attn, hidden_states, encoder_hidden_states=None, image_rotary_emb=None):
        """diffusers FluxAttnProcessor.__call__, with the attention through `TriggerRouter.joint_attention`."""
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))                  # (B, T, H, d)
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        L = self.router.denoiser_tokens.shape[1]                          # text first: [text (L), image (T)]
        out = self.router.joint_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                          text_start=0, image=slice(L, query.shape[1]))
        hidden_states = out.transpose(1, 2).flatten(2, 3).to(query.dtype)   # (B, S, H·d)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[1](attn.to_out[0](hidden_states.contiguous()))
            return hidden_states, attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states

    def _sd3(self, attn, hidden_states, encoder_hidden_states):
        """diffusers JointAttnProcessor2_0.__call__, with the attention through `TriggerRouter.joint_attention`."""
        B, T = hidden_states.shape[0], hidden_states.shape[1]

        def heads(x, norm=None):                                           # (B, S, H·d) -> (B, H, S, d)
            x = x.view(B, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
            return norm(x) if norm is not None else x

        query = heads(attn.to_q(hidden_states), attn.norm_q)
        key = heads(attn.to_k(hidden_states), attn.norm_k)
        value = heads(attn.to_v(hidden_states))
        query = torch.cat([query, heads(attn.add_q_proj(encoder_hidden_states), attn.norm_added_q)], dim=2)
        key = torch.cat([key, heads(attn.add_k_proj(encoder_hidden_states), attn.norm_added_k)], dim=2)
        value = torch.cat([value, heads(attn.add_v_proj(encoder_hidden_states))], dim=2)
        out = self.router.joint_attention(query, key, value, text_start=T, image=slice(0, T))   # [image, text]
        out = out.transpose(1, 2).reshape(B, -1, out.shape[1] * out.shape[-1]).to(query.dtype)
        hidden_states, encoder_hidden_states = out[:, :T], out[:, T:]
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        return hidden_states, encoder_hidden_states


def _joint_layout(processor) -> str | None:
    """"flux" / "sd3" for the joint-attention processors JointRecordingProcessor repeats, else None."""
    name = type(processor).__name__
    return {"FluxAttnProcessor": "flux", "FluxAttnProcessor2_0": "flux", "JointAttnProcessor2_0": "sd3"}.get(name)


class TriggerRouter:
    """The routing maps of one attachment and the hooks that fill them (see the module docstring)."""

    def __init__(self, model: nn.Module, n_experts: int, tokens: str = "trigger", norm: str = "mass",
                 eps: float = 1e-3, pixels: bool = True, absent: str = "keep", encode: str = "joint",
                 attend: float = 0.0, compose_from: int = 2):
        problem = route_problem(model)
        if problem:
            raise ValueError(f'route="trigger" needs a pipeline\'s networks (a ModuleDict with "unet" or '
                             f'"transformer" and its text encoders, as families.components gives). {problem}')
        self.model, self.n, self.tokens, self.norm, self.eps = model, n_experts, tokens, norm, eps
        self.denoiser = next(d for d in DENOISERS if d in model)   # "unet" | "transformer"
        self.pixels = pixels                           # route pixels by attention mass (else text tokens only)
        self.absent = absent                           # "off": experts whose trigger no prompt of the call has
        self.encoders: dict[str, nn.Module] = {n: m for n, m in model.items() if n != self.denoiser}
        self.present: dict[str, torch.Tensor] = {}     # network -> (N,) bool of the current call (route_absent)
        self._absent: dict[str, bool] = {}             # network -> no expert present (decided in the pre-hooks)
        self._log_present: dict[str, torch.Tensor] = {}   # network -> (N,) 0 / -inf where some expert is absent
        self.stamp = 0                                 # +1 per stored attention map in a denoiser pass
        self.versions: dict[int, int] = {}             # image tokens T -> maps stored for T in this pass: routed
                                                       # weights and log maps are reused while it stays the same
        self._logmaps: dict[tuple, torch.Tensor | None] = {}   # (network, role, T, version) -> log(r + ε)
        self.trigger_ids: dict[str, list[list[tuple[int, ...]]]] = {}   # encoder -> per expert, its id sequences
        self.special: dict[str, set[int]] = {}         # encoder -> its special token ids
        self.text_maps: dict[str, torch.Tensor] = {}   # encoder -> (B, L, N) of its current call
        self.recorded: list[tuple[str, list[torch.Tensor], torch.Tensor]] = []   # (encoder, [outputs (B, L, d)],
                                                                                  #  maps (B, L, N))
        self.denoiser_tokens: torch.Tensor | None = None   # (B, L, N) trigger positions of the denoiser's text
        self.columns: torch.Tensor | None = None       # (C,) text positions some expert owns in some row
        self.column_tokens: torch.Tensor | None = None  # (B, C, N) denoiser_tokens at those positions
        self.masses: dict[int, torch.Tensor] = {}      # image tokens T -> (B, T, N) attention masses
        self.unknown_attention: list[str] = []         # joint attention modules whose processor is not known
        self._prev_text: torch.Tensor | None = None
        self._attend_text: tuple[torch.Tensor, torch.Tensor] | None = None   # route_attend's text side
        self._roles: dict[str, str | None] = {}
        self._handles: list = []
        self._processors: dict[str, object] = {}
        self.runtime = None                            # layers.Runtime of the attachment (its mask)
        self.encode = encode                           # "separate": each trigger phrase encoded on its own
        self.attend = attend                           # λ of the cross-attention bias (0: none)
        self.compose_from = compose_from               # rows naming this many experts: separate / attend act
        self.input_ids: dict[str, torch.Tensor] = {}   # encoder -> the input ids of its current call
        self._nested = False                           # inside a re-encoding (route_encode="separate")

    @property
    def unet_tokens(self) -> torch.Tensor | None:
        """The denoiser's trigger positions (the name from when only UNets routed)."""
        return self.denoiser_tokens

    # ---- triggers ------------------------------------------------------------------------------
    def set_triggers(self, tokenizers, triggers: dict, names: list[str]) -> None:
        """tokenizers: one tokenizer (used for every text encoder of the attached model) or {encoder name:
        tokenizer | (encoder module, tokenizer)}; a module is given for encoders outside the attached model
        (FLUX's and SD3's T5) and is hooked too."""
        if not isinstance(tokenizers, dict):
            tokenizers = {name: tokenizers for name in self.encoders}
        for name, value in tokenizers.items():
            module, tokenizer = value if isinstance(value, tuple) else (self.encoders.get(name), value)
            if module is None:
                raise ValueError(f"No text encoder '{name}' in the attached model; pass (module, tokenizer) for it.")
            if self.encoders.get(name) is not module:
                self.encoders[name] = module
                if self._handles:                      # installed already: hook the new encoder too
                    self._hook_encoder(name, module)
            self.trigger_ids[name] = trigger_token_ids(tokenizer, triggers, names)
            self.special[name] = {i for i in (getattr(tokenizer, "bos_token_id", None), tokenizer.eos_token_id,
                                              tokenizer.pad_token_id) if i is not None}
        self._prev_text = self.denoiser_tokens = None   # positions of the old triggers are stale

    def _untriggered(self, device) -> torch.Tensor:
        """(N,) bool: experts no encoder has trigger words for (they always count as present)."""
        has = [any(seqs[i] for seqs in self.trigger_ids.values()) for i in range(self.n)]
        return torch.tensor([not h for h in has], device=device)

    # ---- hooks ---------------------------------------------------------------------------------
    def install(self) -> None:
        if self._handles:
            return
        for name, module in self.encoders.items():
            self._hook_encoder(name, module)
        denoiser = self.model[self.denoiser]
        self._handles.append(denoiser.register_forward_pre_hook(self._denoiser_pre, with_kwargs=True))
        if not self.pixels:
            return
        self.unknown_attention = []
        for name, module in denoiser.named_modules():
            processor = getattr(module, "processor", None)
            if processor is None or not hasattr(module, "set_processor"):
                continue
            if self.denoiser == "unet" and getattr(module, "is_cross_attention", False):
                self._processors[name] = processor
                module.processor = RecordingAttnProcessor(self, processor)
            elif self.denoiser == "transformer" and _joint_layout(processor):
                self._processors[name] = processor
                module.processor = JointRecordingProcessor(self, processor, _joint_layout(processor))
            elif self.denoiser == "transformer":
                self.unknown_attention.append(f"{name} ({type(processor).__name__})")

    def _hook_encoder(self, name: str, module: nn.Module) -> None:
        self._handles.append(module.register_forward_pre_hook(
            lambda m, args, kwargs, name=name: self._text_pre(name, args, kwargs), with_kwargs=True))
        self._handles.append(module.register_forward_hook(
            lambda m, args, output, name=name: self._text_post(name, output)))

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        denoiser = self.model[self.denoiser]
        for name, proc in self._processors.items():
            denoiser.get_submodule(name).processor = proc
        self._processors = {}
        self.reset()

    @contextmanager
    def aside(self, **changes):
        """Runs inside leave the call's routing state as it was (regional passes: mole_core/image/regional.py): the
        maps, present experts and recorded texts are kept aside and put back on exit; `changes` (e.g. absent="keep")
        hold inside only."""
        kept = {k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in vars(self).items()
                if k not in ("model", "encoders", "_handles", "_processors", "runtime")}
        try:
            vars(self).update(changes)
            yield self
        finally:
            vars(self).update(kept)

    def reset(self) -> None:
        self.text_maps, self.recorded, self.denoiser_tokens, self.masses, self._prev_text = {}, [], None, {}, None
        self.columns = self.column_tokens = None
        self.present, self._absent, self._log_present, self._logmaps, self.stamp = {}, {}, {}, {}, 0
        self.versions, self._attend_text = {}, None

    def _set_present(self, network: str, maps: torch.Tensor | None, device=None) -> None:
        """Which experts a network's call names (maps (B, L, N) on the host; None: unknown, nothing is off), and
        what the layers read of it: a Python bool for "none present" and the (N,) log term on `device` (host
        work here, in a pre-hook, so that no forward syncs with the device)."""
        self._logmaps = {}
        if maps is None:
            for d in (self.present, self._absent, self._log_present):
                d.pop(network, None)
            return
        present = self._present(maps)
        self.present[network] = present
        self._absent[network] = not bool(present.any())
        if bool(present.all()):
            self._log_present.pop(network, None)
        else:
            log = torch.zeros(self.n).masked_fill(~present.cpu(), float("-inf"))
            self._log_present[network] = log.to(device) if device is not None else log

    def _text_pre(self, name: str, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None or name not in self.trigger_ids:
            self.text_maps.pop(name, None)
            self._set_present(name, None)
            self.input_ids.pop(name, None)
            return
        self.input_ids[name] = ids
        self.text_maps[name] = trigger_positions(ids, self.trigger_ids[name], self.tokens, self.special[name])
        self._set_present(name, self.text_maps[name], ids.device)

    def _text_post(self, name: str, output):
        """Record the encoder's last hidden state and (when asked for) its penultimate one: what pipelines read.
        route_encode="separate": first each trigger's phrase is re-encoded on its own (`_encode_separately`)."""
        maps = self.text_maps.get(name)
        if maps is None or self._nested:
            return
        if self.encode == "separate":
            output = self._encode_separately(name, output)
            maps = self.text_maps[name]
        hidden = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", None)
        states = getattr(output, "hidden_states", None)
        candidates = [h.detach() for h in (hidden, states[-2] if states and len(states) > 1 else None)
                      if torch.is_tensor(h) and h.dim() == 3]
        if candidates:
            self.recorded.append((name, candidates, maps))
            self.recorded = self.recorded[-_KEEP:]
        return output

    @torch.no_grad()
    def _encode_separately(self, name: str, output):
        """The encoder's output with the states of each trigger phrase replaced by those of the phrase encoded on
        its own (`phrase_prompts`: the prompt's preamble + that phrase), in rows naming route_compose_from experts
        or more (at least two); the
        other tokens (preamble, end, padding) keep the joint encoding. The re-encoding runs through the same
        hooked encoder (so its own LoRA tokens are routed to that phrase's expert), then this call's maps are
        put back."""
        ids = self.input_ids[name]
        spans = phrase_spans(trigger_positions(ids, self.trigger_ids[name], "phrase", self.special[name]))
        batch, where = phrase_prompts(ids, spans, self.compose_from)
        if batch is None:
            return output
        saved = [(d, d.get(name)) for d in (self.text_maps, self.present, self._absent, self._log_present)]
        hidden_wanted = getattr(output, "hidden_states", None) is not None
        self._nested = True
        try:
            alone = self.encoders[name](batch, output_hidden_states=hidden_wanted)
        finally:
            self._nested = False
            self.input_ids[name] = ids
            for d, value in saved:                # this call's maps and presence back (the nested call set them)
                if value is None:
                    d.pop(name, None)
                else:
                    d[name] = value
            self._logmaps = {}
        return splice_states(output, alone, where)

    def _denoiser_pre(self, module, args, kwargs):
        position = 2 if self.denoiser == "unet" else 1       # UNet(sample, t, ehs); transformers(x, ehs, ...)
        ehs = kwargs.get("encoder_hidden_states", args[position] if len(args) > position else None)
        self.stamp, self.versions, self._logmaps = 0, {}, {}   # a new pass: its maps are computed anew
        if ehs is None:
            self.denoiser_tokens, self.masses, self._attend_text = None, {}, None
            return
        prev = self._prev_text
        same = prev is not None and prev.shape == ehs.shape and torch.equal(prev, ehs.detach())
        if same and self.denoiser_tokens is not None:
            return                                      # the same text as the previous step: the same positions
        if not same:
            self.masses = {}                            # another text (training batch): no stale maps
        self._prev_text = ehs.detach()
        tokens, matched = self._match(ehs.detach())
        # text we did not see encoded: nothing is switched off
        self._set_present(self.denoiser, tokens if matched else None, ehs.device)
        self.denoiser_tokens = tokens.to(ehs.device)
        self._attend_text = self._attend_terms(tokens, ehs.device)
        columns = tokens.amax((0, 2)).nonzero().flatten()   # on the CPU: no device sync
        self.columns = columns.to(ehs.device)
        self.column_tokens = tokens[:, columns].to(ehs.device)

    def _match(self, ehs: torch.Tensor) -> tuple[torch.Tensor, bool]:
        """(B, L, N) trigger positions of each row of the denoiser's text (B, L, D): every recorded encoder
        output found inside the row (any token / feature offset) lends its map to those tokens."""
        B, L, D = ehs.shape
        tokens, matched = torch.zeros(B, L, self.n), False
        widths = {h.shape[-1] for _, candidates, _ in self.recorded for h in candidates}
        for b in range(B):
            row, found = ehs[b], set()
            for _, candidates, maps in reversed(self.recorded):
                for hidden in candidates:
                    place = _locate(row, hidden, widths)
                    if place is None or place[1:] in found:
                        continue
                    k, t0, f0 = place
                    found.add((t0, f0))
                    n = hidden.shape[1]
                    tokens[b, t0:t0 + n] = torch.maximum(tokens[b, t0:t0 + n], maps[k])
                    matched = True
                    break
        return tokens, matched

    def _present(self, maps: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the expert's trigger is in some prompt of the call; an expert without trigger words
        (none given, or set_triggers never called) always counts as present."""
        return (maps.sum((0, 1)) > 0) | self._untriggered(maps.device)

    def all_absent(self, network: str) -> bool:
        """route_absent="off" and no expert's trigger in this call of `network` (a Python bool: no sync)."""
        return self.absent == "off" and self._absent.get(network, False)

    def log_present(self, network: str) -> torch.Tensor | None:
        """(N,) 0 for a present expert, -inf for an absent one (route_absent="off"); None when all count."""
        return self._log_present.get(network) if self.absent == "off" else None

    def recording_active(self) -> bool:
        """Joint attention records masses: the denoiser's text has trigger tokens, some expert is on."""
        return (self.columns is not None and self.columns.numel() > 0 and not self.all_absent(self.denoiser)
                and not getattr(self.runtime, "all_off", False))

    def store_mass(self, T: int, mass: torch.Tensor) -> None:
        self.masses[T] = mass.detach()
        self.stamp += 1                                # the pixels' maps changed: routed weights are recomputed
        self.versions[T] = self.versions.get(T, 0) + 1

    def joint_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, text_start: int,
                        image: slice) -> torch.Tensor:
        """Attention (B, H, S, d) over a joint sequence whose text tokens start at `text_start`; stores the
        image queries' masses on the trigger tokens: exp(q·k_trig/√d − lse) summed per expert, mean over heads."""
        out, lse = attention_lse(q, k, v)                                   # (B, H, S, d), (B, H, S)
        if self.column_tokens.shape[0] == q.shape[0]:
            q_img = q[:, :, image]                                          # (B, H, T, d)
            k_trig = k[:, :, text_start + self.columns]                     # (B, H, C, d)
            scores = (q_img @ k_trig.transpose(-1, -2)).float() / math.sqrt(q.shape[-1])
            probs = torch.exp(scores - lse[:, :, image, None].float()).mean(1)   # (B, T, C)
            self.store_mass(probs.shape[1], probs @ self.column_tokens)        # (B, T, N)
        return out

    # ---- the routing term ----------------------------------------------------------------------
    def role(self, key: str | None) -> str | None:
        """What a transformer module's tokens are: "text" (the context stream), "joint" (FLUX's single
        blocks: text then image) or "image"; None for UNet modules (told apart by their token count)."""
        if key is None or self.denoiser != "transformer":
            return None
        if key not in self._roles:
            path = key.split(".", 1)[1] if "." in key else key
            self._roles[key] = "text" if _TEXT_SIDE.search(path) else \
                "joint" if path.startswith("single_transformer_blocks.") else "image"
        return self._roles[key]

    def _pixels(self, T: int) -> torch.Tensor | None:
        m = self.masses.get(T)
        if m is None or self.norm == "mass":
            return m
        if self.norm == "balanced":
            return balanced_shares(m, self.eps)
        if self.norm in ("spatial", "argmax"):                     # each expert's map over its own mean:
            m = m / (m.mean(1, keepdim=True) + self.eps)              # where, not how much (mention order)
        if self.norm == "argmax":
            return hard_shares(m)
        return m / (m.sum(-1, keepdim=True) + self.eps)

    def _attend_terms(self, tokens: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """route_attend's text side, on the host once per text (no device sync in a forward): the trigger
        positions (B, N, L) of the rows naming route_compose_from experts or more (at least two; 0 elsewhere) and
        λ-free log ε on the tokens after each such row's last phrase (B, 1, L). None when off or no row qualifies."""
        if not self.attend:
            return None
        several = (tokens.amax(1) > 0).sum(-1) >= max(2, self.compose_from)         # (B,) enough phrases
        if not bool(several.any()):
            return None
        position = torch.arange(tokens.shape[1])
        last = torch.where(tokens.amax(-1) > 0, position, -1).amax(-1, keepdim=True)   # (B, 1) last phrase token
        ending = ((position > last) & several[:, None]).float()                         # (B, L)
        text = (tokens.float() * several[:, None, None]).transpose(1, 2)                # (B, N, L)
        return text.to(device), (math.log(self.eps) * ending)[:, None, :].to(device)

    def attention_bias(self, T: int, B: int, L: int) -> torch.Tensor | None:
        """route_attend = λ > 0: (B, T, L) added to the cross-attention logits of T pixels, in rows whose text
        names route_compose_from experts or more (at least two): λ·log(r_i(p) + ε) on the text tokens of expert i
        (0 on the pixel's own expert's phrase), and λ·log ε on the tokens after the last phrase (the end token and
        padding, which a causal encoder fills with a summary of the whole prompt where the first-named subject
        dominates); tokens before the first phrase keep 0. A pixel then reads the phrase it is routed to. Computed
        once per pixel map (T and its version in the pass). None when off, unknown or no row qualifies."""
        terms = self._attend_text
        if terms is None or terms[0].shape[0] != B or terms[0].shape[2] != L:
            return None
        slot = ("attend", T, self.versions.get(T, 0))
        if slot not in self._logmaps:
            r = self._pixels(T)
            if r is None or r.shape[0] != B:
                self._logmaps[slot] = None
            else:
                logr = torch.log(r.float() + self.eps)                               # (B, T, N)
                logr = logr - logr.amax(-1, keepdim=True)                             # 0 for the pixel's own expert
                self._logmaps[slot] = self.attend * (logr @ terms[0] + terms[1])     # (B, T, L)
        return self._logmaps[slot]

    def map_for(self, network: str, B: int, T: int, key: str | None = None) -> torch.Tensor | None:
        """(B, T, N) r for a module of `network` (key: its '<network>.<path>') reading T tokens, or None."""
        text = self.denoiser_tokens
        role = self.role(key) if network == self.denoiser else None
        if network != self.denoiser:
            m = self.text_maps.get(network)
        elif role == "joint" and text is not None and T > text.shape[1]:
            image = self._pixels(T - text.shape[1])
            image = text.new_zeros(text.shape[0], T - text.shape[1], self.n) if image is None else image.to(text)
            m = torch.cat([text, image], dim=1)                     # FLUX single blocks: [text, image]
        elif role == "text" or (role is None and text is not None and T == text.shape[1]):
            m = text                                                # the denoiser's text tokens
        else:
            m = self._pixels(T)
        if m is None or m.shape[0] != B or m.shape[1] != T:
            return None
        return m

    def version(self, network: str, T: int, key: str | None = None) -> tuple:
        """Names the routing map a module reading T tokens gets in this pass (`map_for`): it changes only when
        an attention stores new maps for the image tokens it reads (text tokens' maps stay for the pass)."""
        role = self.role(key) if network == self.denoiser else None
        text = self.denoiser_tokens
        L = 0 if text is None else text.shape[1]
        if network != self.denoiser or role == "text" or (role is None and T == L):
            return role, T, 0
        return role, T, self.versions.get(T - L if role == "joint" else T, 0)

    def log_map(self, network: str, B: int, T: int, key: str | None = None) -> torch.Tensor | None:
        """log(r + ε) (B, T, N) float32 for a module of `network` reading T tokens (see `map_for`), or None where
        r is not known; computed once per (network, `version`) and shared by every group of the pass."""
        slot = (network, *self.version(network, T, key))
        if slot not in self._logmaps:
            r = self.map_for(network, B, T, key)
            self._logmaps[slot] = None if r is None else torch.log(r.float() + self.eps)
        logr = self._logmaps[slot]
        return logr if logr is None or logr.shape[0] == B else None

    def apply(self, G: torch.Tensor, network: str, beta: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """G (B, T, N) softmax weights -> G ∝ G · present · (r + ε)^β where r is known, renormalised (the routed
        weights one at a time; the layers compute the same as one softmax of log terms, `Group._routed_weights`)."""
        if self.all_absent(network):
            return torch.zeros_like(G)                                      # every expert off: the base model
        logs = torch.log(G.float())
        present = self.log_present(network)
        if present is not None:
            logs = logs + present.to(G.device)
        logr = self.log_map(network, G.shape[0], G.shape[1], key)
        if logr is not None:
            logs = torch.addcmul(logs, beta.float(), logr.to(G.device))
        return torch.softmax(logs, dim=-1).to(G.dtype)


def balanced_shares(m: torch.Tensor, eps: float, rounds: int = 10) -> torch.Tensor:
    """(B, T, N) attention masses -> each pixel's shares of the experts (rows sum to 1), balanced so that every
    expert attended somewhere holds the same total share of the image (Sinkhorn's alternate scaling of the
    experts' columns and the pixels' rows): the first-named subject, which takes most attention everywhere,
    keeps only the places where it is attended most compared with the others (as FreeFuse's balanced argmax).
    An expert attended nowhere (its trigger not in that row's text) stays at 0; a row without masses stays 0."""
    p = m.float().clamp_min(0)
    for _ in range(rounds):
        p = p / (p.mean(1, keepdim=True) + eps * 1e-3)           # every expert the same total
        p = p / (p.sum(-1, keepdim=True) + eps * 1e-3)           # every pixel's shares sum to 1
    return p


def hard_shares(m: torch.Tensor) -> torch.Tensor:
    """(B, T, N) scores -> one-hot (B, T, N) on each pixel's highest score; a row of zeros stays 0."""
    hard = F.one_hot(m.argmax(-1), m.shape[-1]).to(m.dtype)
    return hard * (m.amax(-1, keepdim=True) > 0)


def phrase_spans(phrase_maps: torch.Tensor) -> list[list[tuple[int, int, int]]]:
    """(B, L, N) phrase ownership (trigger_positions(..., "phrase")) -> per row the (start, end, expert) token
    spans of its trigger phrases, in order: runs of tokens owned by one expert."""
    out = []
    owned = phrase_maps.amax(-1) > 0                                    # (B, L)
    owner = phrase_maps.argmax(-1)                                      # (B, L)
    for b in range(phrase_maps.shape[0]):
        spans, start = [], None
        for j in range(phrase_maps.shape[1] + 1):
            here = j < phrase_maps.shape[1] and bool(owned[b, j])
            if start is not None and (not here or owner[b, j] != owner[b, start]):
                spans.append((start, j, int(owner[b, start])))
                start = None
            if here and start is None:
                start = j
        out.append(spans)
    return out


def phrase_prompts(ids: torch.Tensor, spans: list[list[tuple[int, int, int]]], least: int = 2):
    """The token rows that encode each trigger phrase on its own: [the preamble (the first token, BOS, and the
    words before the row's first phrase), the phrase, the row's own ending (end token, padding)], cut or padded
    with its last token to the row's length; only rows naming `least` experts or more (never fewer than two).
    -> (ids (P, L) or None, [(row, span start, span end, where the span starts in its new row)])."""
    rows, where = [], []
    L = ids.shape[1]
    for b, row_spans in enumerate(spans):
        if len({k for _, _, k in row_spans}) < max(2, least):
            continue
        preamble = ids[b, :row_spans[0][0]].tolist()                    # BOS + words before the first phrase
        ending = ids[b, row_spans[-1][1]:].tolist() or [int(ids[b, -1])]  # end token and padding
        for s, e, _ in row_spans:
            row = (preamble + ids[b, s:e].tolist() + ending)[:L]
            rows.append(row + [row[-1]] * (L - len(row)))
            where.append((b, s, e, len(preamble)))
    if not rows:
        return None, []
    return torch.tensor(rows, dtype=ids.dtype, device=ids.device), where


def splice_states(joint, alone, where):
    """`joint` (an encoder's output: a ModelOutput or a tuple) with, for each (row, start, end, offset) of
    `where`, the tokens start:end of that row taken from the matching row of `alone` (offset:offset + end −
    start), in the last hidden state and in every hidden state both carry."""
    def spliced(a, b):                                                   # (B, L, d), (P, L, d)
        a = a.clone()
        for k, (row, s, e, o) in enumerate(where):
            a[row, s:e] = b[k, o:o + e - s].to(a.dtype)
        return a
    if isinstance(joint, (tuple, list)):
        return type(joint)([spliced(joint[0], alone[0]), *joint[1:]])
    joint.last_hidden_state = spliced(joint.last_hidden_state, alone.last_hidden_state)
    if getattr(joint, "hidden_states", None) is not None and getattr(alone, "hidden_states", None) is not None:
        joint.hidden_states = tuple(spliced(a, b) for a, b in zip(joint.hidden_states, alone.hidden_states))
    return joint


def _locate(row: torch.Tensor, hidden: torch.Tensor, widths: set[int]) -> tuple[int, int, int] | None:
    """(k, t0, f0) when sample k of `hidden` (B', L', D') sits in `row` (L, D) at token offset t0 ∈ {0, L − L'}
    and feature offset f0 ∈ {0, D − D', another encoder's width}; None when it is nowhere there."""
    (L, D), (_, Lh, Dh) = row.shape, hidden.shape
    if Lh > L or Dh > D:
        return None
    hidden = hidden.to(row.device, row.dtype)
    for t0 in dict.fromkeys((0, L - Lh)):
        for f0 in dict.fromkeys((0, D - Dh, *sorted(w for w in widths if w + Dh <= D))):
            block = row[t0:t0 + Lh, f0:f0 + Dh]
            for k in range(hidden.shape[0]):
                if torch.equal(block[0], hidden[k, 0]) and torch.equal(block, hidden[k]):
                    return k, t0, f0
    return None
