"""The MoLE layers: a frozen nn.Linear / nn.Conv2d plus N frozen LoRA experts mixed by a learnable gate.

    y = W x + Σ_i G_i · strength_i · s_i B_i A_i x          (the paper: per sample, G is (B, N))

Computed as ONE stacked LoRA of rank R = Σ r_i: h = A_cat x (B, ..., R); each rank channel is scaled by
the weight of the expert it belongs to, c = (G_i s_i strength_i) repeated r_i times (B, R); y = W x +
B_cat (h ⊙ c). That is the cost of a single rank-R LoRA, not N separate LoRA passes.

Gate (docs/MOLE.md): input = the experts' outputs pooled over tokens / pixels. Mean pooling commutes with the
linear up-projection, so pool(E_i) = s_i B_i pool(h_i) exactly, and no expert output is ever formed at
full size. z = layer_norm(pool(E_0) ⊕ … ⊕ pool(E_{N-1})) without affine; logits = proj(z) with a
zero-initialised Linear(N·d_out, N); G = softmax(logits / τ), τ = exp(log_tau), log_tau = 0 initially.
An untrained gate gives G_i = 1/N: the equal-weight linear merge, exactly.

One gate serves a group of wrapped modules (granularity, see attach.py). It is evaluated once per
forward pass by the group's *leader* — the first member that ran in the first pass (run order is not
registration order) — and reused by the others. The projection is created lazily at that first run,
for the leader's d_out; an unmaterialised gate gives zero logits (= equal weights).

Per-token gates (MoleConfig(gate="token"), not in the paper): the same Gate reads each token's / pixel's
expert outputs instead of their mean and gives weights (B, T, N), so two subjects at two places in one
image can get different experts. Members of a group whose token count differs from the leader's (cross-
attention keys/values read the text, not the pixels) use the leader's weights averaged over its tokens.
Recording and the balance loss see the per-sample mean over tokens. The per-token gate is computed in rank
space, never forming the (B, T, N, d_out) expert outputs: E = M h is linear in the stacked down-projections h
(R channels), so its mean over the N·d_out features is u·h, its variance hᵀ Q h (Q: R × R, from the experts'
B and scales) and W (E − mean) = C v with v = h V Λ^½ (Q = V Λ Vᵀ); the gate's logits are then
F.linear(F.layer_norm(h K), D, b) with K = √k [VΛ^½, −VΛ^½] (R × 2k, fixed per module) and D, b from the
projection and τ (prepared once per gate state outside training). The same function as layer_norm + proj on
the concatenated outputs (tested to float rounding), at the cost of R-sized rows: in FLUX's single blocks the
leader is proj_mlp (d_out 12,288).

Static gates (MoleConfig(gate="static"): MoLE's static ablation; LoraHub's one weight per LoRA, here learned
by gradient): G = softmax(l / τ) with ONE logit l_i per expert and one τ for the whole attachment — every
group's Gate holds the same two Parameters — so the weights never depend on the input. l = 0 at start: the
equal-weight linear merge, like the other kinds.

Trigger-routed gates (MoleConfig(gate="token", route="trigger"), mole_core/routing.py): the leader's
logits / τ are cached unrouted; every member then takes the gate at its own tokens (the mean of the leader's
softmax over its tokens for another layout), multiplies it by the routing term of those tokens, (r + ε)^β with
β the gate's `route_beta` (and by 0 for an expert whose trigger the call does not name, route_absent="off"),
renormalises — computed as one softmax of logits/τ + log present + β log(r + ε) — and only then applies
forced weights and the mask. Computed once per routing-map version (`TriggerRouter.version`: it changes when an
attention stores new maps for those tokens), not once per member; log(r + ε) once per version for all groups.
A call that names no expert's trigger is the base model: outside training the layers skip their experts
(decided in the routing's pre-hooks, a Python bool).

On a GPU (issue 26): a member costs three ops beyond its base layer (A_cat x; h ⊙ c; one addmm / baddbmm
adding B_cat (h ⊙ c) into the base output); the gate and the per-rank scales c are computed once per group and
pass; nothing in a forward syncs with the host (no .item(), no data-dependent shapes; call-time settings live on
the device, recorded gates are copied to the host after the network's forward), so a step can be captured as a
CUDA graph (mole_core/graphs.py) and torch.compile traces it without graph breaks.

Regions (mole_core/regions.py): after the weights of a member are known, a per-pixel expert-weight map (the
user's regions, FreeFuse's masks) multiplies them at modules that read image tokens and renormalises them
(`Group._regional`); a pixel no region covers gets weight 0 everywhere: the base model there.

Call-time settings (mask, strengths, forced gate weights, recording, regions) live in a `Runtime` object shared
by the layers of one attachment; they are set through `MoleHandle.settings`, never stored as modes.

References: MoLE (Wu et al., ICLR 2024, arXiv 2404.13628); peft `LoraLayer(base_layer)` for the
wrap-don't-subclass convention.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mole_core.lora import LoraWeights


class Gate(nn.Module):
    """One gate: expert outputs (..., N, d_out) -> expert weights (..., N): pooled per sample (B, N, d_out)
    or per token (B, T, N, d_out); the same parameters either way.

    static: (logits (N,), log_tau ()) Parameters shared by all gates of a static attachment; such a gate
    ignores the outputs (only their leading shape counts) and never gets a projection.
    Trainable parameters of MoLE are exactly the parameters of the modules of this class.
    """

    def __init__(self, n_experts: int, static: tuple[nn.Parameter, nn.Parameter] | None = None,
                 route_beta: float | None = None, learn_beta: bool = True):
        super().__init__()
        self.n_experts = n_experts
        self.route_beta_init = route_beta                 # trigger routing (routing.py): β of G ∝ G·(r+ε)^β
        if route_beta is not None:
            beta = torch.tensor(float(route_beta))
            if learn_beta:
                self.route_beta = nn.Parameter(beta)
            else:
                self.register_buffer("route_beta", beta)
        if static is None:
            self.log_tau = nn.Parameter(torch.zeros(()))     # temperature τ = exp(log_tau), τ = 1 at start
            self.register_parameter("logits", None)
        else:
            self.logits, self.log_tau = static               # (N,), (): the same objects in every gate
        self.register_module("proj", None)                # Linear(N·d_out, N), created at the leader's first run
        self.leader: str | None = None                    # key of the member that evaluates this gate

    @property
    def d_out(self) -> int | None:
        return None if self.proj is None else self.proj.in_features // self.n_experts

    def materialise(self, d_out: int, device=None) -> None:
        """Create the zero-initialised projection for experts' outputs of size d_out (no-op if present
        or static)."""
        if self.logits is not None:
            return
        if self.proj is not None:
            if self.d_out != d_out:
                raise ValueError(f"Gate led by '{self.leader}' was built for d_out={self.d_out}, found {d_out}.")
            return
        proj = nn.Linear(self.n_experts * d_out, self.n_experts, device=device, dtype=torch.float32)
        nn.init.zeros_(proj.weight)
        nn.init.zeros_(proj.bias)
        self.proj = proj

    def reset(self) -> None:
        """Back to the untrained gate (zero logits, τ = 1): equal weights."""
        with torch.no_grad():
            for p in self.parameters():                   # log_tau, and the logits or the projection
                p.zero_()
            if self.route_beta_init is not None:          # routing's β goes back to its initial value
                self.route_beta.fill_(self.route_beta_init)

    def forward(self, outputs: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.scaled_logits(outputs), dim=-1)         # (..., N)

    def scaled_logits(self, outputs: torch.Tensor) -> torch.Tensor:
        """logits / τ (..., N) float32 of expert outputs (..., N, d_out): the softmax's input."""
        *lead, N, d_out = outputs.shape                                    # (..., N, d_out)
        if self.logits is not None:
            logits = self.logits.float().expand(*lead, N)                  # static: the same for every input
        elif self.proj is None:
            logits = outputs.new_zeros(*lead, N, dtype=torch.float32)      # unmaterialised = equal weights
        else:
            z = outputs.float().reshape(*lead, N * d_out)                  # concat_i E_i
            z = F.layer_norm(z, (N * d_out,))
            logits = F.linear(z, self.proj.weight.float(), self.proj.bias.float())   # (..., N)
        return logits / self.log_tau.float().exp()                         # (..., N)


class Runtime:
    """State shared by all layers of one attachment for the current call (not persistent modes).

    mask (N,) bool | None, strengths (N,) float | None, gates (N,) or (B, N) float | None: set by
    `MoleHandle.settings`; each is kept on the attachment's `device` (so a forward copies nothing from the
    host, and a CUDA graph reads them as inputs), and the mask's "every expert off" is decided once, here
    (`all_off`, a Python bool: no host sync inside a forward). recording: a `Recording` or None; gate weights
    wait in `pending` (on the device) until the network's forward returns, then go to the recording. calls:
    forward count per network (the recording's step index). evaluated: per network, the softmax gates (with
    grad) of its last forward, for the balance loss.
    """

    def __init__(self, expert_names: list[str], device=None):
        self.expert_names = list(expert_names)
        self.device = device                      # where the model's weights are (None: leave tensors as given)
        self.all_off = False                      # mask set and no expert on: the base model exactly
        self._mask = self._strengths = self._gates = None
        self.recording = None
        self.regions = None                       # regions.RegionMaps: per-pixel expert weights, or None
        self.pending: list[tuple[str, str, torch.Tensor]] = []   # (group, network, weights) not yet recorded
        self.calls: dict[str, int] = {}
        self.evaluated: dict[str, list[torch.Tensor]] = {}

    def _here(self, value: torch.Tensor | None) -> torch.Tensor | None:
        return value if value is None or self.device is None else value.to(self.device)

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask

    @mask.setter
    def mask(self, value: torch.Tensor | None) -> None:
        self.all_off = value is not None and not bool(value.any())         # once per setting, not per forward
        self._mask = self._here(value)

    @property
    def strengths(self) -> torch.Tensor | None:
        return self._strengths

    @strengths.setter
    def strengths(self, value: torch.Tensor | None) -> None:
        self._strengths = self._here(value)

    @property
    def gates(self) -> torch.Tensor | None:
        return self._gates

    @gates.setter
    def gates(self, value: torch.Tensor | None) -> None:
        self._gates = self._here(value)

    def record(self, group: str, network: str, G: torch.Tensor) -> None:
        """Keep one gate evaluation for the recording (moved to the host after the forward: `flush`)."""
        if self.recording is not None:
            self.pending.append((group, network, G.detach()))

    def flush(self, network: str) -> None:
        """After a forward of `network`: hand its pending gate weights to the recording (one host copy each)."""
        step = self.calls.get(network, 1) - 1
        keep = []
        for group, net, G in self.pending:
            if net != network:
                keep.append((group, net, G))
            elif self.recording is not None:
                self.recording.add(group, net, step, G)
        self.pending = keep


def per_sample(G: torch.Tensor) -> torch.Tensor:
    """Gate weights (B, N) or per token (B, T, N) -> per sample (B, N): the mean over tokens."""
    return G.mean(1) if G.dim() == 3 else G


class Group:
    """A gate plus its per-pass caches; shared (not registered) by the members of one group.

    The gate is evaluated once per pass (by the leader); what the members need from it — the weights at
    their token count, routed where routing applies, and the per-rank-channel scales c — is computed once
    per pass for each distinct need and reused (`coef`), so a member costs three ops: A, the scaling, B.
    """

    def __init__(self, name: str, network: str, gate: Gate, runtime: Runtime, per_token: bool = False,
                 router=None):
        self.name, self.network, self.gate, self.runtime = name, network, gate, runtime
        self.per_token = per_token                        # gate per token / pixel instead of per sample
        self.router = router                              # routing.TriggerRouter (route="trigger") or None
        self.cache: torch.Tensor | None = None            # (B, N) or (B, T, N) effective weights of this pass
                                                          # (routed groups: the gate's own softmax)
        self.routed: dict = {}                            # routed groups: routing map version -> weights
        self.bases: dict = {}                             # routed groups: leader's / mean layout -> log weights
        self.coef: dict = {}                              # (weights key, member layout, dtype) -> c (B, T|1, R)
        self.leader_module: "_MoleBase | None" = None     # the member that evaluates the gate
        self.prepared = None                              # per-token gates: (stamp, (D, b)), see start_pass

    def start_pass(self) -> None:
        """A new forward of the network: forget this pass's weights; outside training, keep the per-token gate's
        rank-space weights while the gate's parameters stay as they are (`prepared`)."""
        self.cache, self.routed, self.bases, self.coef = None, {}, {}, {}
        self.prepared = self._prepared_weights()

    def _prepared_weights(self):
        """(D, b) of the leader's `rank_gate_weights`, computed here (in the network's pre-hook, eagerly) and reused
        by the passes while the gate's tensors are unchanged; None in training (computed in the forward, with
        gradient) and before the leader is known."""
        gate, leader = self.gate, self.leader_module
        if (not self.per_token or gate.proj is None or leader is None or leader.key != gate.leader
                or torch.is_grad_enabled()):
            return None
        stamp = self._gate_stamp(leader)
        if self.prepared is None or self.prepared[0] != stamp:
            return stamp, leader.rank_gate_weights(gate)
        return self.prepared

    def _gate_stamp(self, leader: "_MoleBase") -> tuple:
        """What the prepared weights depend on: the leader, and the gate's tensors (storage and in-place version)."""
        tensors = (self.gate.proj.weight, self.gate.proj.bias, self.gate.log_tau)
        return (leader.key, *((t.data_ptr(), t._version, t.dtype) for t in tensors))

    def built(self) -> bool:
        """The gate's shape is known (its leader ran once): a pass may skip it without losing that."""
        return self.gate.leader is not None and (self.gate.logits is not None or self.gate.proj is not None)

    def _is_leader(self, member: "_MoleBase") -> bool:
        gate = self.gate
        if gate.leader is None:
            gate.leader = member.key
        if member.key != gate.leader and self.cache is None:
            raise RuntimeError(
                f"MoLE group '{self.name}': module '{member.key}' ran before the group's leader "
                f"'{gate.leader}' in this forward pass. The gate is evaluated by the first module of the "
                f"group to run; this model runs its modules in a different order than when the gate "
                f"was built (or a submodule was called outside its network's forward).")
        if member.key == gate.leader:
            self.leader_module = member
            return True
        return False

    def _evaluate(self, member: "_MoleBase", h: torch.Tensor) -> torch.Tensor:
        """The gate's softmax (B, N) or (B, T, N) from the leader's stacked down-projections h (B, T, R)."""
        gate = self.gate
        if gate.logits is not None:                                        # static: the input does not count
            lead = (h.shape[0], h.shape[1]) if self.per_token else (h.shape[0],)
            return torch.softmax(gate.logits.float() / gate.log_tau.float().exp(), dim=-1).expand(*lead, -1)
        if self.per_token:
            return torch.softmax(self._evaluate_logits(member, h), dim=-1)  # (B, T, N)
        gate.materialise(member.d_out, h.device)
        return gate(member.expert_outputs(h, False))                       # (B, N)

    def _evaluate_logits(self, member: "_MoleBase", h: torch.Tensor) -> torch.Tensor:
        """The gate's logits / τ (B, T, N) (per-token gates; routed groups route them before the softmax)."""
        gate = self.gate
        if gate.logits is not None:
            return (gate.logits.float() / gate.log_tau.float().exp()).expand(h.shape[0], h.shape[1], -1)
        gate.materialise(member.d_out, h.device)
        if self.prepared is not None and self.prepared[0][0] == member.key:
            return member.token_logits(h, self.prepared[1])               # (B, T, N)
        weights = member.rank_gate_weights(gate)
        if not torch.is_grad_enabled() and not torch.compiler.is_compiling():   # eager inference: keep them
            self.prepared = (self._gate_stamp(member), weights)
        return member.token_logits(h, weights)

    def weights(self, member: "_MoleBase", h: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Effective expert weights for `member` (B, N) or per token (B, T', N), and a key naming them within
        this pass; the leader evaluates, the others reuse. h: the member's down-projections (B, T, R)."""
        if self.router is not None:
            return self._routed_weights(member, h)
        if self._is_leader(member):
            rt = self.runtime
            G = self._evaluate(member, h)
            rt.evaluated.setdefault(self.network, []).append(G)   # reduced when read
            G = self._forced_and_masked(G)
            rt.record(self.name, self.network, G)
            self.cache = G
        return self.cache, ("gate",)

    def _routed_weights(self, member: "_MoleBase", h: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """Trigger-routed groups: G = softmax(logits/τ + log present + β log(r + ε)) at this member's T tokens
        (= the gate's softmax times present times (r + ε)^β, renormalised; routing.py), then forced weights and
        the mask. The leader's logits are evaluated once per pass; the weights once per routing map version
        (`TriggerRouter.version`: it changes only when an attention stores new maps for these tokens), so members
        reading the same tokens in between share them."""
        router, rt, T = self.router, self.runtime, h.shape[1]
        leader = self._is_leader(member)
        if leader:
            self.cache = self._evaluate_logits(member, h)                  # (B, T, N) logits / τ, unrouted
        key = ("routed", *router.version(self.network, T, member.key))
        if key in self.routed:
            return self.routed[key], key
        if router.all_absent(self.network):                                # no expert named: all off
            G = self.cache.new_zeros(self.cache.shape[0], 1, self.cache.shape[2])
        else:
            logr = router.log_map(self.network, h.shape[0], T, member.key)
            base = self._base_logits(T)
            G = torch.softmax(base if logr is None else torch.addcmul(base, self.gate.route_beta.float(), logr), -1)
        if leader:
            rt.evaluated.setdefault(self.network, []).append(G)   # reduced when read
        G = self._forced_and_masked(G)
        if leader:
            rt.record(self.name, self.network, G)
        self.routed[key] = G
        return G, key

    def _base_logits(self, T: int) -> torch.Tensor:
        """The unrouted log weights at T tokens, absent experts at -inf: the leader's logits / τ (B, T, N) at
        its own token count, else the log of its softmax's mean over its tokens (B, 1, N); once per pass each."""
        own = self.cache.shape[1] == T
        if own not in self.bases:
            base = self.cache if own else torch.log(torch.softmax(self.cache, -1).mean(1, keepdim=True))
            present = self.router.log_present(self.network)
            self.bases[own] = base if present is None else base + present
        return self.bases[own]

    def _forced_and_masked(self, G: torch.Tensor) -> torch.Tensor:
        rt = self.runtime
        if rt.gates is not None:                                           # forced weights (no gate)
            forced = rt.gates.to(G.device, G.dtype)
            G = (forced.unsqueeze(1) if forced.dim() == 2 and G.dim() == 3 else forced).expand_as(G)
        if rt.mask is not None:                                            # G'_i = m_i G_i / Σ m_j G_j
            G = G * rt.mask
            G = G / G.sum(-1, keepdim=True).clamp_min(1e-12)
        return G

    def _regional(self, member: "_MoleBase", G: torch.Tensor, key, T: int) -> tuple[torch.Tensor, tuple | None]:
        """Regions (mole_core/regions.py): at a module reading T image tokens, G'_i(p) = G_i(p) w_i(p) /
        Σ_j G_j(p) w_j(p) (a pixel no region covers: all 0, the base model); elsewhere G unchanged."""
        regions = self.runtime.regions
        w = None if regions is None else regions.at(self.network, member.key, T)    # (1, T, N) or None
        if w is None:
            return G, key
        G = G.unsqueeze(1) if G.dim() == 2 else G if G.shape[1] == T else G.mean(1, keepdim=True)
        G = G * w.to(G.device, G.dtype)                                    # (B, T, N)
        G = G / G.sum(-1, keepdim=True).clamp_min(1e-12)
        return G, (None if key is None else (key, "regions", T))

    def coefficients(self, member: "_MoleBase", h: torch.Tensor) -> torch.Tensor:
        """Per-rank-channel scales c = G_i s_i strength_i for `member`: (B, 1, R), or (B, T, R) for per-token
        gates; computed once per pass for each (weights, rank layout and scales, dtype) and shared.

        h: the member's stacked down-projections in token layout (B, T, R)."""
        G, key = self.weights(member, h)                                   # (B, N) or (B, T', N)
        G, key = self._regional(member, G, key, h.shape[1])
        if G.shape[0] != h.shape[0]:
            raise RuntimeError(f"MoLE group '{self.name}': gate computed for batch {G.shape[0]} by "
                               f"'{self.gate.leader}', but '{member.key}' got batch {h.shape[0]}.")
        tokens = h.shape[1] if G.dim() == 3 and G.shape[1] == h.shape[1] else 1
        ckey = None if key is None else (key, tokens, member.layout, h.dtype)
        if ckey is not None and ckey in self.coef:
            return self.coef[ckey]
        if G.dim() == 2:
            G = G.unsqueeze(1)                                             # (B, 1, N)
        elif tokens == 1 and G.shape[1] != 1:
            G = G.mean(1, keepdim=True)          # another token layout than the leader's (e.g. text tokens)
        if self.runtime.strengths is not None:
            G = G * self.runtime.strengths
        # c_r = G_i s_i strength_i on expert i's rank channels r; a matmul with the one-hot (N, R) rows of s_i
        # is that gather (every other term is an exact zero)
        c = (G @ member.rank_mix.float()).to(h.dtype)                     # (B, T|1, R)
        if ckey is not None:
            self.coef[ckey] = c
        return c


class _MoleBase(nn.Module):
    """Shared bookkeeping of MoleLinear / MoleConv2d. Experts are stacked along the rank axis."""

    def __init__(self, base: nn.Module, key: str, experts: list[LoraWeights | None], A_shape: tuple,
                 group: Group):
        super().__init__()
        self.base = base
        self.key = key                                    # "<network>.<module path>" in the attached model
        self.group = group                                # plain object: not registered (shared)
        w = base.weight
        ranks = [0 if e is None else e.rank for e in experts]
        scales = [0.0 if e is None else float(e.scale) for e in experts]
        A = [e.A.reshape(e.rank, *A_shape) for e in experts if e is not None]
        B = [e.B.reshape(e.B.shape[0], e.rank) for e in experts if e is not None]
        d_out = w.shape[0]
        self.register_buffer("A_cat", torch.cat(A).to(w.device, w.dtype))            # (R, *A_shape)
        self.register_buffer("B_cat", torch.cat(B, dim=1).to(w.device, w.dtype))      # (d_out, R)
        self.register_buffer("scales", torch.tensor(scales, device=w.device))         # (N,) s_i
        self.register_buffer("expert_of_rank", torch.repeat_interleave(
            torch.arange(len(experts), device=w.device), torch.tensor(ranks, device=w.device)))  # (R,)
        self.register_buffer("rank_onehot", F.one_hot(self.expert_of_rank, len(experts)).float())  # (R, N)
        # (N, R): row i holds s_i on expert i's rank channels, for the gate's pooled expert outputs
        self.register_buffer("rank_mix", (self.rank_onehot * self.scales[self.expert_of_rank, None]).T.contiguous())
        self.layout = (tuple(ranks), tuple(scales))       # members with equal layouts share their scales c
        self.n_experts, self.d_out = len(experts), d_out
        if group.per_token and group.gate.logits is None:
            self._rank_space_gate()

    def _rank_space_gate(self) -> None:
        """Constants of the per-token gate computed in rank space (the same function as Gate on the expert
        outputs, see `token_logits`). The gate's input is E = M h (N·d_out features), M = the experts' scaled
        up-projections, block i = s_i B_i on expert i's rank channels; its mean is u·h, its (biased) variance
        hᵀ Q h with Q = MᵀM / (N·d_out) − u uᵀ (R × R). With Q = V Λ Vᵀ (the k directions with λ > 0) and
        v = h V Λ^½: var = ‖v‖², and W (E − mean) = C v with C = W (M − 1 uᵀ) V Λ^-½."""
        N, d = self.n_experts, self.d_out
        Bs = self.B_cat.double() * self.scales.double()[self.expert_of_rank]          # (d_out, R): s_r B_r
        u = Bs.sum(0) / (N * d)                                                        # (R,)
        same = (self.expert_of_rank[:, None] == self.expert_of_rank[None, :]).double()
        lam, V = torch.linalg.eigh((Bs.T @ Bs) * same / (N * d) - torch.outer(u, u))    # Q's eigenpairs
        keep = lam > lam.max() * 1e-14 if bool(lam.max() > 0) else torch.zeros_like(lam, dtype=torch.bool)
        S, Vk = lam[keep].sqrt(), V[:, keep]
        if S.numel() == 0:                        # no expert moves this output: E is constant, the gate gives b
            S, Vk = torch.ones(1, dtype=V.dtype, device=V.device), torch.zeros_like(V[:, :1])
        P = Vk * S                                                                     # (R, k): v = h P
        k = P.shape[1]
        # y = √k [v, −v] has mean 0 and variance ‖v‖²: F.layer_norm(y) = √k [v, −v] / √(‖v‖² + eps)
        self.register_buffer("gate_K", (torch.cat([P, -P], 1) * k ** 0.5).float(), persistent=False)  # (R, 2k)
        self.register_buffer("gate_VSinv", (Vk / S).float(), persistent=False)                       # (R, k)
        self.register_buffer("gate_u", u.float(), persistent=False)                                   # (R,)

    def rank_gate_weights(self, gate: Gate) -> tuple[torch.Tensor, torch.Tensor]:
        """(D (N, 2k), b (N,)) with logits / τ = F.linear(F.layer_norm(h K), D, b) for this leader and `gate`:
        D = [C, −C] / (2√k τ), b = bias / τ (C: see `_rank_space_gate`)."""
        N, d = self.n_experts, self.d_out
        W, tau = gate.proj.weight.float(), gate.log_tau.float().exp()
        WM = ((W.view(N, N, d) @ self.B_cat.float()) * self.rank_mix.float()).sum(1)     # (N, R) = W M
        C = (WM - W.sum(1, keepdim=True) * self.gate_u) @ self.gate_VSinv              # (N, k)
        D = torch.cat([C, -C], 1) / (2 * C.shape[1] ** 0.5 * tau)
        return D, gate.proj.bias.float() / tau

    def token_logits(self, h: torch.Tensor, weights: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """The per-token gate's logits / τ (B, T, N) from the stacked down-projections h (B, T, R): three ops of
        R-sized rows, never the (B, T, N, d_out) expert outputs."""
        y = h.float() @ self.gate_K                                                     # (B, T, 2k)
        return F.linear(F.layer_norm(y, (y.shape[-1],)), *weights)

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped layer's weight, forwarded as peft's BaseTunerLayer does: code that reads
        `module.weight` (transformers' T5 checks `wo.weight.dtype`) sees the base layer's own tensor."""
        return self.base.weight

    def extra_repr(self) -> str:
        return f"key={self.key!r}, experts={self.n_experts}, rank={self.A_cat.shape[0]}, group={self.group.name!r}"

    def expert_outputs(self, h: torch.Tensor, per_token: bool) -> torch.Tensor:
        """The gate's input: E_i = s_i B_i h_i pooled over tokens (B, N, d_out), or per token (B, T, N, d_out);
        float32. h: the stacked down-projections (B, T, R) (mean pooling commutes with B)."""
        h_in = h if per_token else h.mean(1)                               # (B, [T,] R)
        blocks = h_in.float().unsqueeze(-2) * self.rank_mix.float()        # (B, [T,] N, R)
        return blocks @ self.B_cat.float().t()                             # (B, [T,] N, d_out)

    def _mix(self, h: torch.Tensor) -> torch.Tensor:
        """Per-rank-channel scales c from the group's gate: (B, 1, R), or (B, T, R) for per-token gates.

        h: the stacked down-projections in token layout (B, T, R)."""
        return self.group.coefficients(self, h)

    def _all_off(self) -> bool:
        """Every expert off: the mask (decided when set), or a routed call naming no expert's trigger outside
        training (decided in the routing's pre-hooks). A Python bool: no device sync."""
        group = self.group
        return group.runtime.all_off or (group.router is not None and not torch.is_grad_enabled()
                                         and group.router.all_absent(group.network) and group.built())


class MoleLinear(_MoleBase):
    """nn.Linear `base` plus gated LoRA experts. Input (B, ..., d_in) or (B, d_in).

    Three ops beyond the base's own: h = A_cat x, h ⊙ c, and y + B_cat (h ⊙ c) as one addmm into the base's
    output (the group's gate work is done once per group and pass, see `Group`)."""

    def __init__(self, base: nn.Linear, key: str, experts: list[LoraWeights | None], group: Group):
        super().__init__(base, key, experts, (base.in_features,), group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self._all_off():
            return y                                                       # every expert off: the base model
        if x.dim() == 1:
            raise ValueError(f"MoLE module '{self.key}' got an unbatched 1-D input; MoLE gates are per sample.")
        h = F.linear(x, self.A_cat.to(x.dtype))                            # (B, ..., R)
        tokens = h.reshape(h.shape[0], -1, h.shape[-1])                    # (B, T, R), T = 1 for 2-D input
        scaled = tokens * self._mix(tokens)                                # (B, T, R)
        out = torch.addmm(y.reshape(-1, self.d_out), scaled.reshape(-1, scaled.shape[-1]),
                          self.B_cat.to(x.dtype).t())                      # (B·T, d_out) = y + (h ⊙ c) B_catᵀ
        return out.reshape(y.shape)                                        # (B, ..., d_out)


class MoleConv2d(_MoleBase):
    """nn.Conv2d `base` plus gated LoRA experts: A with the base's kernel/stride/padding, B 1x1 (applied as
    one batched matmul accumulated into the base's output)."""

    def __init__(self, base: nn.Conv2d, key: str, experts: list[LoraWeights | None], group: Group):
        super().__init__(base, key, experts, tuple(base.weight.shape[1:]), group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self._all_off():
            return y
        b = self.base
        if x.dim() != 4:
            raise ValueError(f"MoLE module '{self.key}' expects a batched (B, C, H, W) input; found {tuple(x.shape)}.")
        h = F.conv2d(x, self.A_cat.to(x.dtype), None, b.stride, b.padding, b.dilation)   # (B, R, H', W')
        Bn, R, H, W = h.shape
        tokens = h.flatten(2).transpose(1, 2)              # (B, H'W', R): row-major, as diffusers' attention
        c = self._mix(tokens).transpose(1, 2)                              # (B, R, H'W'|1)
        scaled = h.reshape(Bn, R, H * W) * c                               # (B, R, H'W')
        up = self.B_cat.to(x.dtype).expand(Bn, -1, -1)                     # (B, d_out, R)
        out = torch.baddbmm(y.reshape(Bn, self.d_out, H * W), up, scaled)  # y + B_cat (h ⊙ c)
        return out.reshape(y.shape)                                        # (B, d_out, H', W')
