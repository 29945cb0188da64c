"""Trigger routing for per-token MoLE gates (ours, not in the paper): MoleConfig(gate="token", route="trigger").

Each expert i has trigger word(s) (a bank entry's `trigger`). The routing term tells every token / pixel
which expert's subject it belongs to, from signals the model computes anyway:

- text tokens (the text encoder's modules, and the UNet's cross-attention keys / values, which read the
  text): r_i(j) = 1 when token j belongs to expert i's trigger, else 0;
- pixels (every UNet module whose tokens are the latent pixels): r_i(p) = the cross-attention mass of
  pixel p on expert i's trigger tokens, Σ_{j ∈ trig_i} softmax(q_p·k_j / √d), averaged over heads, taken
  from the most recent cross-attention (attn2) at that resolution — in this forward pass when one ran
  already, else from the previous UNet call on the same text (the previous denoising step).

The gate's weights become   G_i(p) ∝ G_i^gate(p) · (r_i(p) + ε)^β     (= softmax(logits/τ + β log(r + ε)))
with β a per-gate Parameter (MoleConfig.route_beta at start; learnable unless route_learn_beta=False).
A token / pixel with the same r for every expert (no trigger in the prompt, a trigger-free token) keeps the
gate's weights exactly in proportion, so β = 0 or a prompt without triggers is the per-token gate.

Which text tokens count as expert i's (MoleConfig.route_tokens):
  "trigger"  only the trigger's own tokens (multi-token triggers: every token of the sequence);
  "phrase"   from the trigger up to the next token of another expert's trigger (CLIP's text encoder is
             causal: "on the left" after "zwx" carries where the zwx goes); special tokens never count.
route_pixels=False routes only the text tokens (no attention maps are recorded, processors untouched).
route_norm: "mass" uses r as above; "share" divides each pixel's masses by their sum over experts
(r_i = m_i / (Σ_j m_j + ε)), so only which expert a pixel attends to counts, not how much; "spatial" first
divides each expert's map by its mean over the image (m_i(p) / mean_q m_i(q)), then shares: on small models
the text mentioned first takes most of the attention everywhere, and only the contrast between places says
where a subject goes (as Prompt-to-Prompt normalises a token's map over the image).

How the trigger positions reach the UNet: a forward pre-hook on the text encoder reads its input ids (the
pipeline's prompt and negative prompt, or a DiffusionTask's captions) and records, with a forward hook, the
text encoder's output rows; a pre-hook on the UNet matches each row of its encoder_hidden_states to a
recorded output (exact equality) and so knows each sample's trigger positions. Rows that match nothing
(prompt_embeds passed directly) get r = 0: the per-token gate. The cross-attention masses are computed by
`RecordingAttnProcessor`, installed on the UNet's cross-attention modules for the attachment's lifetime
(the classic AttnProcessor computation: probs = softmax(QKᵀ/√d), out = probs V, equal to SDPA up to float
rounding); detach restores the original processors.

References: Prompt-to-Prompt (Hertz et al., 2022) for cross-attention maps as a subject's layout;
MoLE (Wu et al., ICLR 2024) for the gates this term biases.
"""
from __future__ import annotations

import torch
from torch import nn

ROUTES = ("none", "trigger")
ROUTE_TOKENS = ("trigger", "phrase")
ROUTE_NORMS = ("mass", "share", "spatial")
ROUTE_ABSENT = ("keep", "off")
_KEEP = 16           # text-encoder outputs remembered for matching


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
        tokens = self.router.unet_tokens
        if getattr(self.router.runtime, "all_off", False) or self.router.all_absent("unet"):   # the base model exactly
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


class TriggerRouter:
    """The routing maps of one attachment and the hooks that fill them (see the module docstring)."""

    def __init__(self, model: nn.Module, n_experts: int, tokens: str = "trigger", norm: str = "mass",
                 eps: float = 1e-3, pixels: bool = True, absent: str = "keep"):
        if not isinstance(model, nn.ModuleDict) or "unet" not in model:
            raise ValueError('route="trigger" needs a pipeline\'s networks (a ModuleDict with "unet" and '
                             '"text_encoder", as pipeline_components gives).')
        self.model, self.n, self.tokens, self.norm, self.eps = model, n_experts, tokens, norm, eps
        self.pixels = pixels                           # route pixels by attention mass (else text tokens only)
        self.absent = absent                           # "off": experts whose trigger no prompt of the call has
        self.present: dict[str, torch.Tensor] = {}     # network -> (N,) bool of the current call (route_absent)
        self.trigger_ids: list[list[tuple[int, ...]]] = [[] for _ in range(n_experts)]
        self.special: set[int] = set()
        self.text_map: torch.Tensor | None = None      # (B, L, N) of the text encoder's current call
        self.recorded: list[tuple[torch.Tensor, torch.Tensor]] = []   # (output rows (B, L, d), maps (B, L, N))
        self.unet_tokens: torch.Tensor | None = None   # (B, L, N) trigger positions of the UNet's text
        self.masses: dict[int, torch.Tensor] = {}      # pixels T -> (B, T, N) cross-attention masses
        self.stamp = 0                                 # +1 per stored map in a UNet pass: the layers reuse
                                                       # routed weights while it stays the same
        self._absent: dict[str, bool] = {}             # network -> every expert absent (decided in the pre-hooks)
        self._prev_text: torch.Tensor | None = None
        self._handles: list = []
        self._processors: dict[str, object] = {}
        self.runtime = None                            # layers.Runtime of the attachment (its mask)

    # ---- triggers ------------------------------------------------------------------------------
    def set_triggers(self, tokenizer, triggers: dict, names: list[str]) -> None:
        self.trigger_ids = trigger_token_ids(tokenizer, triggers, names)
        self.special = {i for i in (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
                        if i is not None}

    # ---- hooks ---------------------------------------------------------------------------------
    def install(self) -> None:
        if self._handles:
            return
        unet = self.model["unet"]
        te = self.model["text_encoder"] if "text_encoder" in self.model else None
        if te is not None:
            self._handles.append(te.register_forward_pre_hook(self._text_pre, with_kwargs=True))
            self._handles.append(te.register_forward_hook(self._text_post))
        self._handles.append(unet.register_forward_pre_hook(self._unet_pre, with_kwargs=True))
        for name, module in unet.named_modules():
            if self.pixels and getattr(module, "is_cross_attention", False) and hasattr(module, "set_processor"):
                self._processors[name] = module.processor
                module.processor = RecordingAttnProcessor(self, module.processor)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        unet = self.model["unet"]
        for name, proc in self._processors.items():
            unet.get_submodule(name).processor = proc
        self._processors = {}
        self.reset()

    def reset(self) -> None:
        self.text_map, self.recorded, self.unet_tokens, self.masses, self._prev_text = None, [], None, {}, None
        self.present, self._absent, self.stamp = {}, {}, 0

    def _set_present(self, network: str, maps: torch.Tensor | None) -> None:
        if maps is None:
            self.present.pop(network, None)
            self._absent.pop(network, None)
        else:
            self.present[network] = self._present(maps)
            self._absent[network] = not bool(self.present[network].any())   # host sync here, not in a forward

    def _text_pre(self, module, args, kwargs):
        ids = args[0] if args else kwargs.get("input_ids")
        self.text_map = None if ids is None else trigger_positions(ids, self.trigger_ids, self.tokens, self.special)
        self._set_present("text_encoder", self.text_map)

    def _text_post(self, module, args, output):
        hidden = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", None)
        if self.text_map is not None and torch.is_tensor(hidden):
            self.recorded.append((hidden.detach(), self.text_map))
            self.recorded = self.recorded[-_KEEP:]

    def _unet_pre(self, module, args, kwargs):
        ehs = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if ehs is None:
            self.unet_tokens, self.masses, self.stamp = None, {}, 0
            return
        B, L, _ = ehs.shape
        tokens, matched = torch.zeros(B, L, self.n), False
        for b in range(B):
            row = ehs[b].detach()
            for hidden, maps in reversed(self.recorded):
                hit = next((k for k in range(hidden.shape[0]) if hidden.shape[1:] == row.shape
                            and torch.equal(hidden[k].to(row.device, row.dtype), row)), None)
                if hit is not None:
                    tokens[b], matched = maps[hit], True
                    break
        self._set_present("unet", tokens if matched else None)   # unseen text: nothing is switched off
        self.stamp = 0
        same = self._prev_text is not None and self._prev_text.shape == ehs.shape and torch.equal(self._prev_text, ehs.detach())
        if not same:
            self.masses = {}                            # another text (training batch): no stale maps
        self._prev_text = ehs.detach()
        self.unet_tokens = tokens.to(ehs.device)

    def _present(self, maps: torch.Tensor) -> torch.Tensor:
        """(N,) bool: the expert's trigger is in some prompt of the call; an expert without trigger words
        (none given, or set_triggers never called) always counts as present."""
        untriggered = torch.tensor([not seqs for seqs in self.trigger_ids], device=maps.device)
        return (maps.sum((0, 1)) > 0) | untriggered

    def all_absent(self, network: str) -> bool:
        return self.absent == "off" and self._absent.get(network, False)

    def store_mass(self, T: int, mass: torch.Tensor) -> None:
        self.masses[T] = mass.detach()
        self.stamp += 1

    # ---- the routing term ----------------------------------------------------------------------
    def map_for(self, network: str, B: int, T: int) -> torch.Tensor | None:
        """(B, T, N) r for a module of `network` reading T tokens, or None (no routing there)."""
        if network == "text_encoder":
            m = self.text_map
        elif self.unet_tokens is not None and T == self.unet_tokens.shape[1]:
            m = self.unet_tokens                       # cross-attention keys / values: text tokens
        else:
            m = self.masses.get(T)
            if m is not None and self.norm == "spatial":               # each expert's map over its own mean:
                m = m / (m.mean(1, keepdim=True) + self.eps)              # where, not how much (mention order)
            if m is not None and self.norm in ("share", "spatial"):
                m = m / (m.sum(-1, keepdim=True) + self.eps)
        if m is None or m.shape[0] != B or m.shape[1] != T:
            return None
        return m

    def apply(self, G: torch.Tensor, network: str, beta: torch.Tensor) -> torch.Tensor:
        """G (B, T, N) softmax weights -> G ∝ G · (r + ε)^β where r is known, renormalised."""
        if self.absent == "off" and network in self.present:
            G = G * self.present[network].to(G.device, G.dtype)            # absent experts off, the rest renormalised
            G = G / G.sum(-1, keepdim=True).clamp_min(1e-12)              # (all absent: zeros = the base model)
        r = self.map_for(network, G.shape[0], G.shape[1])
        if r is None:
            return G
        logr = torch.log(r.to(G.device, torch.float32) + self.eps)
        logr = logr - logr.max(-1, keepdim=True).values          # for stability; cancels in the softmax
        W = G.float() * torch.exp(beta.float() * logr)
        return (W / W.sum(-1, keepdim=True).clamp_min(1e-12)).to(G.dtype)
