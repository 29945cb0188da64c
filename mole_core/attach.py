"""Attaching N LoRAs to a model as gated experts (MoLE), and detaching them again.

    handle = attach(components, [lora_a, lora_b, lora_c], MoleConfig(granularity="block"))
    with handle.settings(mask={"lora_b": False}), handle.recording() as rec:
        image = pipe(prompt).images[0]
    rec.to_csv("gates.csv")
    handle.detach()                                   # the very same base modules are back

`model` is what the LoRA keys resolve against with `model.get_submodule(key)`: for a pipeline the
`nn.ModuleDict({"unet": pipe.unet, "text_encoder": pipe.text_encoder})` (each entry a *network*), or a
bare transformers / diffusers model (then the model is the one network, keys are its module paths).

Granularity (docs/MOLE.md, the paper's Table 9) decides which wrapped modules share one gate:
  matrix   every wrapped module has its own gate (m-MoLE)
  layer    the nearest attention / MLP / feed-forward ancestor (l-MoLE); the module itself if none
  block    the outermost transformer block / encoder or decoder layer / resnet block below the network
           (diffusers Transformer2DModel, BasicTransformerBlock, ResnetBlock2D; transformers *EncoderLayer,
           *DecoderLayer, *Block); the module itself if none (b-MoLE, default)
  network  the whole network: unet, text_encoder, or the bare model (n-MoLE)
Groups never span two networks. "Outermost" for blocks because diffusers nests BasicTransformerBlock in
Transformer2DModel, whose proj_in / proj_out belong to the same block (the issue counts a
Transformer2DModel as one transformer block).

Gate kinds (MoleConfig.gate): "sample" (the paper: one decision per sample), "token" (per token / pixel),
"static" (one learned logit per expert for the whole attachment, whatever the input: MoLE's static
ablation, LoraHub's idea trained by gradient; the groups then only decide who evaluates it), "prompt" (text
models: one decision per sample read from the prompt by mole_core.text.gate.PromptGate and given to every
group as forced weights, `settings(gates=G)`; the groups' own gates are built as static ones and unused).

Trigger routing (MoleConfig(gate="token", route="trigger"), mole_core/routing.py): per-token gates pushed
towards the expert whose trigger a text token belongs to / a pixel or image token attends to (SD 1.x, SDXL,
SD3, FLUX); the handle needs each expert's trigger words (`handle.set_triggers(pipeline_encoders(pipe),
{name: words})`, or `handle.set_triggers(pipe.tokenizer, ...)` with one text encoder); detach removes its
hooks and attention processors.

Settings are per call (context managers that restore what was there), never modes stored in the model.

References: MoLE (Wu et al., ICLR 2024); peft `BaseTuner.inject_adapter` (replace the module in its
parent, keep the original as `.base`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mole_core.atomic import write_csv
from mole_core.layers import Gate, Group, MoleConv2d, MoleLinear, Runtime, per_sample
from mole_core.lora import Lora, LoraWeights, module_problem

GRANULARITIES = ("matrix", "layer", "block", "network")
GATE_KINDS = ("sample", "token", "static", "prompt")
# Class-name patterns. GEGLU (ff.net.0) and ModuleLists (attn.to_out) match neither on purpose.
LAYER_CLASS = re.compile(r"(Attention|MLP|Mlp|FeedForward|LayerFF|DenseActDense|DenseGatedActDense)$")
BLOCK_CLASS = re.compile(r"(Block|EncoderLayer|DecoderLayer|Layer|ResnetBlock2D|ResnetBlockCondNorm2D|"
                         r"Transformer2DModel)$")


@dataclass
class MoleConfig:
    granularity: str = "block"      # "matrix" | "layer" | "block" | "network": which modules share one gate
    gate: str = "sample"            # "sample": one decision per sample (the paper); "token": per token / pixel;
                                    # "static": one learned weight per expert, the same for every input
    route: str = "none"             # "trigger" (per-token gates only, pipelines only; routing.py): each
                                    # token / pixel is pushed towards the expert whose trigger it belongs to
                                    # or attends to: G ∝ G_gate · (r + route_eps)^β; needs the triggers
                                    # (MoleHandle.set_triggers). "none": the gates as they are.
    route_beta: float = 1.0         # β at start (and after reset_gates); 0 = the per-token gate exactly
    route_learn_beta: bool = True   # β is a gate Parameter (trained) or a fixed buffer
    route_tokens: str = "trigger"   # text tokens of expert i: "trigger" (its trigger's tokens) or "phrase"
                                    # (from its trigger up to the next expert's trigger)
    route_norm: str = "mass"        # pixels: "mass" (attention mass on the trigger tokens), "share"
                                    # (masses divided by their sum over experts) or "spatial" (each expert's
                                    # map over its image mean, then shared)
    route_eps: float = 1e-3         # ε in (r + ε)^β: how far an expert whose trigger is not attended is cut
    route_absent: str = "keep"      # an expert whose trigger is in no prompt of a network call: "keep" (only
                                    # cut by ε^β like any unattended expert) or "off" (switched off in that
                                    # call, the rest renormalised; no trigger at all = the base model there)
    route_pixels: bool = True       # also route the UNet's pixels by cross-attention mass (False: only text
                                    # tokens: the text encoder and the cross-attention keys / values)
    route_encode: str = "joint"     # "separate": in a prompt naming two or more triggers, each trigger's phrase
                                    # is encoded on its own (after the prompt's preamble), so a phrase named
                                    # later does not read the earlier ones (a causal CLIP); "joint": as given
    route_attend: float = 0.0       # λ ≥ 0: the UNet's cross-attention logits of a pixel get λ·log(r_i + ε) on
                                    # expert i's text tokens (a pixel attends to the phrase it is routed to)
                                    # and λ·log ε on the prompt's end and padding tokens (routing.py)
    route_compose_from: int = 2     # route_encode="separate" and route_attend act only in prompts naming at
                                    # least this many experts' triggers (fewer: the routing as without them)

    @property
    def describe(self) -> str:
        """"block", "block, per-token" or "static": how result labels name this configuration."""
        if self.gate in ("static", "prompt"):
            return self.gate                   # the granularity changes nothing: one decision for every module
        routed = ", trigger-routed" if self.route == "trigger" else ""
        return self.granularity + (", per-token" if self.gate == "token" else "") + routed


# ----------------------------------------------------------------------------------------------
# Grouping
# ----------------------------------------------------------------------------------------------

def _network_of(model: nn.Module, key: str) -> str:
    """'unet' / 'text_encoder' for a ModuleDict of networks, '' for a bare model."""
    return key.split(".", 1)[0] if isinstance(model, nn.ModuleDict) else ""


def group_of(model: nn.Module, key: str, granularity: str) -> str:
    """The name of the group (a module path in `model`) whose gate the module `key` uses."""
    network = _network_of(model, key)
    if granularity == "matrix":
        return key
    if granularity == "network":
        return network or "model"
    parts = key.split(".")
    first = 1 if network else 0                                   # the network root itself never counts
    ancestors = [".".join(parts[:i]) for i in range(first + 1, len(parts))]   # outermost first
    classes = [type(model.get_submodule(a)).__name__ for a in ancestors]
    if granularity == "layer":
        hits = [a for a, c in zip(ancestors, classes) if LAYER_CLASS.search(c)]
        return hits[-1] if hits else key                          # nearest
    if granularity == "block":
        hits = [a for a, c in zip(ancestors, classes) if BLOCK_CLASS.search(c)]
        return hits[0] if hits else key                           # outermost
    raise ValueError(f"Unknown granularity '{granularity}' (expected one of {', '.join(GRANULARITIES)}).")


def _gate_key(group: str) -> str:
    """nn.ModuleDict keys may not contain '.'."""
    return group.replace(".", "/")


# ----------------------------------------------------------------------------------------------
# Recording gate weights
# ----------------------------------------------------------------------------------------------

GATE_COLUMNS = ["group", "step", "sample", "expert", "weight"]  # the tidy gate table's columns


def write_gates_csv(rows: list[dict], path) -> Path:
    """Write tidy gate rows (group, step, sample, expert, weight) as CSV, atomically: the one gate-CSV writer
    (a Recording's `to_csv`, the app's download and the CLI's --gates-out)."""
    return write_csv(path, rows, GATE_COLUMNS)

class Recording:
    """Every gate evaluation inside `with handle.recording() as rec:`.

    An entry is (group, network, step, weights (B, N)); step = the index of the network's forward call
    since the recording began (for a UNet inside a pipeline call: the denoising step).
    """

    def __init__(self, expert_names: list[str], groups: list[str], tokens: bool = False):
        self.expert_names = list(expert_names)
        self.groups = list(groups)
        self.entries: list[tuple[str, str, int, torch.Tensor]] = []
        self.tokens = tokens                       # also keep per-token weights (B, T, N) in token_entries
        self.token_entries: list[tuple[str, str, int, torch.Tensor]] = []

    def add(self, group: str, network: str, step: int, weights: torch.Tensor) -> None:
        """weights: (B, N), or per token (B, T, N) (stored as the mean over tokens, and whole if `tokens`)."""
        w = weights.detach().float().cpu()
        if self.tokens:
            self.token_entries.append((group, network, step, w))
        self.entries.append((group, network, step, w.mean(1) if w.dim() == 3 else w))

    def table(self) -> list[dict]:
        """Tidy rows {"group", "step", "sample", "expert", "weight"}."""
        return [{"group": group, "step": step, "sample": b, "expert": name, "weight": float(w[b, i])}
                for group, _, step, w in self.entries
                for b in range(w.shape[0]) for i, name in enumerate(self.expert_names)]

    def to_csv(self, path) -> Path:
        """Write `table()` as CSV, atomically."""
        return write_gates_csv(self.table(), path)

    def mean_by_group(self) -> tuple[list[str], torch.Tensor]:
        """(groups, weights (G, N)): mean over steps and samples, groups in network order."""
        sums: dict[str, list] = {}
        for group, _, _, w in self.entries:
            acc = sums.setdefault(group, [torch.zeros(len(self.expert_names)), 0])
            acc[0] += w.sum(0)
            acc[1] += w.shape[0]
        groups = [g for g in self.groups if g in sums]
        if not groups:
            return [], torch.zeros(0, len(self.expert_names))
        return groups, torch.stack([sums[g][0] / sums[g][1] for g in groups])

    def mean_by_step(self, network: str | None = None) -> tuple[list[int], torch.Tensor]:
        """(steps, weights (S, N)): mean over groups and samples per step, for one network (or all)."""
        sums: dict[int, list] = {}
        for _, net, step, w in self.entries:
            if network is not None and net != network:
                continue
            acc = sums.setdefault(step, [torch.zeros(len(self.expert_names)), 0])
            acc[0] += w.sum(0)
            acc[1] += w.shape[0]
        steps = sorted(sums)
        if not steps:
            return [], torch.zeros(0, len(self.expert_names))
        return steps, torch.stack([sums[s][0] / sums[s][1] for s in steps])


# ----------------------------------------------------------------------------------------------
# The handle
# ----------------------------------------------------------------------------------------------

class MoleHandle:
    """An attachment of N experts to a model: settings, recording, gate access, detach."""

    def __init__(self, model: nn.Module, config: MoleConfig, expert_names: list[str],
                 layers: dict[str, nn.Module], groups: dict[str, Group], runtime: Runtime, hooks: list,
                 router=None):
        self.model = model
        self.config = config
        self.expert_names = list(expert_names)
        self.layers = layers                               # key -> MoleLinear | MoleConv2d, network order
        self.groups = list(groups)                         # group names, network order
        self._groups = groups
        self.gates = nn.ModuleDict({_gate_key(g): grp.gate for g, grp in groups.items()})
        self._runtime = runtime
        self._hook_specs = hooks                           # [(network root, pre-hook, post-hook)]
        self._hooks = _register(hooks)
        self.router = router                               # routing.TriggerRouter (route="trigger") or None
        if router is not None:
            router.install()
        self.attached = True

    def set_triggers(self, tokenizer, triggers: dict) -> None:
        """The trigger word(s) of each expert, {name: "zwx" | ["zwx", "sks person", ...]}, tokenised by each text
        encoder's own tokenizer (used by route="trigger"; a no-op otherwise). `tokenizer`: one tokenizer (every
        text encoder of the attached model uses it: SD 1.x), or {encoder name: tokenizer | (encoder module,
        tokenizer)} (image.families.pipeline_encoders(pipe) gives it for any pipeline; a module for encoders outside
        the attachment, such as FLUX's and SD3's T5). An expert without one is never routed to."""
        unknown = [k for k in triggers if k not in self.expert_names]
        if unknown:
            raise ValueError(f"Triggers name unknown expert(s) {', '.join(unknown)}; the experts are "
                             f"{', '.join(self.expert_names)}.")
        if self.router is not None:
            self.router.set_triggers(tokenizer, triggers, self.expert_names)

    # ---- lifecycle -------------------------------------------------------------------------------
    def detach(self) -> None:
        """Put the original modules back (the very same objects): outputs are bit-identical to before."""
        if not self.attached:
            return
        for key, layer in self.layers.items():
            parent_name, _, child = key.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, layer.base)
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.router is not None:
            self.router.remove()
        self.attached = False

    def reattach(self) -> None:
        """Put this attachment back after `detach`, gates as they are (a job interrupted by another caller's
        attachment goes on where it was). The modules must be the base modules it left there."""
        if self.attached:
            return
        places = []
        for key, layer in self.layers.items():
            parent_name, _, child = key.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            if getattr(parent, child) is not layer.base:
                raise RuntimeError(f"Module '{key}' changed after this attachment was detached (another attachment "
                                   f"is on it?); detach that one first.")
            places.append((parent, child, layer))
        for parent, child, layer in places:
            setattr(parent, child, layer)
        self._hooks = _register(self._hook_specs)
        if self.router is not None:
            self.router.install()
        self.attached = True

    # ---- call-time settings ----------------------------------------------------------------------
    def _per_expert(self, value, what: str, default: float | None) -> torch.Tensor:
        """A dict name -> value or a sequence of N values, as a float tensor (N,) (or (B, N) for gates)."""
        names, n = self.expert_names, len(self.expert_names)
        if isinstance(value, dict):
            unknown = [k for k in value if k not in names]
            if unknown:
                raise ValueError(f"{what} names unknown expert(s) {', '.join(map(str, unknown))}; "
                                 f"the experts are {', '.join(names)}.")
            if default is None and len(value) != n:
                raise ValueError(f"{what} must give a value for every expert ({', '.join(names)}); "
                                 f"found {', '.join(value)}.")
            return torch.tensor([float(value.get(k, default)) for k in names])
        t = torch.as_tensor(value, dtype=torch.float32) if not torch.is_tensor(value) else value.float()
        if t.shape[-1] != n or t.dim() not in (1, 2):
            raise ValueError(f"{what} must have one value per expert ({n}: {', '.join(names)}); "
                             f"found shape {tuple(t.shape)}.")
        return t

    @contextmanager
    def settings(self, mask=None, strengths=None, gates=None, record: Recording | None = None, regions=None):
        """Per-call settings; the previous ones are restored on exit. None leaves a setting as it is.

        mask: dict name -> bool (missing names stay on) or N bools. Off experts are removed at every
          gate and the rest renormalised: G'_i = m_i G_i / Σ_j m_j G_j. All off == the base model exactly.
        strengths: dict name -> float (missing = 1) or N floats; multiplies each expert's contribution.
        gates: fixed expert weights instead of the learned gate: dict name -> float (all names) or
          (N,) / (B, N). Used as given (no renormalisation unless a mask is set): one-hot = that LoRA
          alone, constants w = the linear merge with weights w.
        record: a Recording that receives every gate evaluation.
        regions: a mole_core.regions.RegionMaps (per-pixel expert weights at the image-token modules); None
          leaves the current one (outside a call: none).
        """
        rt = self._runtime
        saved = (rt.mask, rt.strengths, rt.gates, rt.recording, rt.regions)
        try:
            if mask is not None:
                rt.mask = self._per_expert(mask, "mask", True) != 0
            if strengths is not None:
                rt.strengths = self._per_expert(strengths, "strengths", 1.0)
            if gates is not None:
                rt.gates = self._per_expert(gates, "gates", None)
            if record is not None:
                rt.recording = record
            if regions is not None:
                rt.regions = regions.to(rt.device)
            yield self
        finally:
            rt.mask, rt.strengths, rt.gates, rt.recording, rt.regions = saved

    @contextmanager
    def apart(self, mask):
        """A denoiser call of its own inside a call (regional passes, mole_core/image/regional.py): the experts of
        `mask` only (as `settings`), everywhere (no regions), not recorded, not counted as a step, and the trigger
        router's state put back on exit, so the call around it reads its routing as before."""
        rt = self._runtime
        saved = (rt.regions, rt.recording, dict(rt.calls))
        # the pass's own text switches none of its experts off (absent="keep")
        aside = self.router.aside(absent="keep") if self.router is not None else nullcontext()
        try:
            rt.regions, rt.recording = None, None
            with aside, self.settings(mask=mask):
                yield self
        finally:
            rt.regions, rt.recording = saved[:2]
            rt.calls.update(saved[2])

    @contextmanager
    def recording(self, tokens: bool = False):
        """`with handle.recording() as rec:` records every gate evaluation (see Recording); `tokens` keeps
        the per-token weights too (rec.token_entries)."""
        rec = Recording(self.expert_names, self.groups, tokens)
        rt = self._runtime
        saved_calls = dict(rt.calls)
        rt.calls = {k: 0 for k in rt.calls}
        try:
            with self.settings(record=rec):
                yield rec
        finally:
            rt.calls = saved_calls

    # ---- gates -----------------------------------------------------------------------------------
    def gate_modules(self) -> list[Gate]:
        return [m for m in self.gates.modules() if isinstance(m, Gate)]

    def gate_parameters(self) -> list[nn.Parameter]:
        """The trainable parameters of MoLE: those of the Gate modules (selected by type, not by name),
        each once (static gates share theirs)."""
        return list({id(p): p for gate in self.gate_modules() for p in gate.parameters()}.values())

    def gate_layout(self) -> dict[str, dict]:
        """Per group: its leader (the member that evaluates the gate) and d_out (None: unmaterialised)."""
        return {g: {"leader": grp.gate.leader, "d_out": grp.gate.d_out} for g, grp in self._groups.items()}

    def gate_state_dict(self) -> dict[str, torch.Tensor]:
        """'<group with / for .>.log_tau' and '.proj.weight' / '.proj.bias' of materialised gates; static
        gates: '.log_tau' and '.logits', the same values under every group."""
        return {k: v.detach().clone() for k, v in self.gates.state_dict().items()}

    def load_gate_state_dict(self, state: dict[str, torch.Tensor], layout: dict[str, dict] | None = None) -> None:
        """Load gate tensors (and leaders) saved by `gate_state_dict` / a mixture; shapes must match."""
        static = self.config.gate in ("static", "prompt")
        names = ("log_tau", "logits") if static else ("log_tau", "proj.weight", "proj.bias", "route_beta")
        known = {f"{_gate_key(g)}.{p}" for g in self.groups for p in names}
        unknown = sorted(set(state) - known)
        if unknown:
            raise ValueError(f"Gate state has tensors for groups this attachment does not have "
                             f"(another model, granularity or gate kind?): {', '.join(unknown[:5])}")
        n = len(self.expert_names)
        with torch.no_grad():
            for g, grp in self._groups.items():
                k, gate = _gate_key(g), grp.gate
                if f"{k}.log_tau" not in state:
                    raise ValueError(f"Gate state has no tensors for group '{g}' (another model or granularity?).")
                gate.log_tau.copy_(state[f"{k}.log_tau"])
                if f"{k}.route_beta" in state:
                    if gate.route_beta_init is None:
                        raise ValueError(f"Gate state of group '{g}' has a routing β, but this attachment "
                                         f"is not trigger-routed (route='none').")
                    gate.route_beta.copy_(state[f"{k}.route_beta"])
                if layout and g in layout and layout[g].get("leader"):
                    if layout[g]["leader"] not in self.layers:
                        raise ValueError(f"Gate of group '{g}' is led by '{layout[g]['leader']}', which has no "
                                         f"experts in this attachment.")
                    gate.leader = layout[g]["leader"]
                if static:                                 # one set of weights: the same in every group
                    logits, ref = state.get(f"{k}.logits"), _gate_key(self.groups[0])
                    if logits is None or tuple(logits.shape) != (n,):
                        raise ValueError(f"Static gate of group '{g}': expected logits of shape ({n},); found "
                                         f"{None if logits is None else tuple(logits.shape)}.")
                    if not (torch.equal(logits, state[f"{ref}.logits"])
                            and torch.equal(state[f"{k}.log_tau"], state[f"{ref}.log_tau"])):
                        raise ValueError(f"Static gate state: group '{g}' holds other values than group "
                                         f"'{self.groups[0]}'; a static gate is one set of weights for the "
                                         f"whole attachment.")
                    gate.logits.copy_(logits)
                    continue
                if f"{k}.proj.weight" not in state:
                    gate.proj = None                       # unmaterialised in the file: equal weights
                    continue
                w, b = state[f"{k}.proj.weight"], state[f"{k}.proj.bias"]
                if w.shape[0] != n or w.shape[1] % n:
                    raise ValueError(f"Gate of group '{g}': expected a weight of shape ({n}, {n}·d_out); "
                                     f"found {tuple(w.shape)}.")
                leader = self.layers.get(gate.leader) if gate.leader else None
                if leader is not None and leader.d_out != w.shape[1] // n:
                    raise ValueError(f"Gate of group '{g}': saved for d_out={w.shape[1] // n}, but its leader "
                                     f"'{gate.leader}' has d_out={leader.d_out} here.")
                gate.materialise(w.shape[1] // n, gate.log_tau.device)
                gate.proj.weight.copy_(w)
                gate.proj.bias.copy_(b)

    def reset_gates(self) -> None:
        """Every gate back to untrained (zero logits, τ = 1): equal weights."""
        for gate in self.gate_modules():
            gate.reset()

    # ---- losses and summaries --------------------------------------------------------------------
    def _last_gates(self) -> torch.Tensor:
        Gs = [per_sample(G) for per_network in self._runtime.evaluated.values() for G in per_network]
        if not Gs:
            raise RuntimeError("No gate has been evaluated yet: run a forward pass of the model first.")
        return torch.cat(Gs)                                               # (M·B, N)

    def balance_loss(self) -> torch.Tensor:
        """L_balance = −Σ_i log q_i, q_i = mean of G_i over the M gate evaluations of the last forward
        pass of each network and their samples (with gradient, unlike the released reference code)."""
        q = self._last_gates().mean(0)                                     # (N,)
        return -torch.log(q.clamp_min(1e-12)).sum()

    def mean_gates(self) -> list[float]:
        """q_i of the last forward pass, one float per expert (for progress display)."""
        return [float(v) for v in self._last_gates().detach().mean(0)]


# ----------------------------------------------------------------------------------------------
# attach
# ----------------------------------------------------------------------------------------------

def _register(hooks: list) -> list:
    """Register (root, pre-hook, post-hook) triples; the removable handles."""
    handles = []
    for root, pre, post in hooks:
        handles += [root.register_forward_pre_hook(pre), root.register_forward_hook(post)]
    return handles


def _check_fit(lora: Lora, key: str, module: nn.Module, w: LoraWeights) -> None:
    """ValueError naming the LoRA, the module, the expected and the found shapes (lora.module_problem's rule)."""
    if isinstance(module, (MoleLinear, MoleConv2d)):
        raise ValueError(f"Module '{key}' already carries MoLE experts; detach the previous attachment first.")
    problem = module_problem(key, module, w)
    if problem:
        raise ValueError(f"LoRA '{lora.name}', {problem}.")


def _router(model: nn.Module, config: MoleConfig, n_experts: int):
    """The TriggerRouter a routed config asks for (None without routing); ValueError naming a bad setting."""
    if config.route == "none":
        return None
    from mole_core.routing import ROUTE_ABSENT, ROUTE_ENCODE, ROUTE_NORMS, ROUTE_TOKENS, ROUTES, TriggerRouter
    if config.route not in ROUTES:
        raise ValueError(f"Unknown route '{config.route}' (expected one of {', '.join(ROUTES)}).")
    if config.gate != "token":
        raise ValueError(f"route='{config.route}' needs per-token gates (gate='token'); got gate='{config.gate}'.")
    if config.route_absent not in ROUTE_ABSENT:
        raise ValueError(f"route_absent must be one of {', '.join(ROUTE_ABSENT)}; got {config.route_absent!r}.")
    if config.route_tokens not in ROUTE_TOKENS or config.route_norm not in ROUTE_NORMS:
        raise ValueError(f"route_tokens must be one of {', '.join(ROUTE_TOKENS)} and route_norm one of "
                         f"{', '.join(ROUTE_NORMS)}; got {config.route_tokens!r}, {config.route_norm!r}.")
    if config.route_encode not in ROUTE_ENCODE:
        raise ValueError(f"route_encode must be one of {', '.join(ROUTE_ENCODE)}; got {config.route_encode!r}.")
    if not float(config.route_attend) >= 0 or not int(config.route_compose_from) >= 2:
        raise ValueError(f"route_attend must be at least 0 and route_compose_from at least 2; got "
                         f"{config.route_attend!r}, {config.route_compose_from!r}.")
    if not (float(config.route_eps) > 0):
        raise ValueError(f"route_eps must be above 0; got {config.route_eps!r}.")
    return TriggerRouter(model, n_experts, config.route_tokens, config.route_norm, float(config.route_eps),
                         bool(config.route_pixels), config.route_absent, config.route_encode,
                         float(config.route_attend), int(config.route_compose_from))


def _targets(model: nn.Module, loras: list[Lora]) -> dict[str, nn.Module]:
    """Module key -> the model's module, for every key any of `loras` targets; ValueError for no LoRA, duplicate
    expert names, a key that does not resolve or a LoRA that does not fit its module."""
    names = [lora.name for lora in loras]
    if not loras:
        raise ValueError("attach needs at least one LoRA.")
    if len(set(names)) != len(names):
        raise ValueError(f"Expert names must be unique; found {', '.join(names)}.")
    if isinstance(model, nn.ModuleDict) and any("." not in k for lora in loras for k in lora.modules):
        raise ValueError("With a ModuleDict of networks, LoRA keys must be '<network>.<module path>'.")
    modules: dict[str, nn.Module] = {}
    for lora in loras:
        for key, w in lora.modules.items():
            try:
                module = model.get_submodule(key)
            except AttributeError:
                raise ValueError(f"LoRA '{lora.name}': module '{key}' does not exist in this model.") from None
            _check_fit(lora, key, module, w)
            modules[key] = module
    return modules


def attach(model: nn.Module, loras: list[Lora], config: MoleConfig | None = None) -> MoleHandle:
    """Wrap every module targeted by any of `loras` in a MoleLinear / MoleConv2d; return the handle.

    Raises ValueError for duplicate expert names, a key that does not resolve, a module that is not
    Linear / Conv2d, or a shape mismatch (naming the module, the expected and the found shapes).
    """
    config = config or MoleConfig()
    # 1. check inputs
    if config.granularity not in GRANULARITIES:
        raise ValueError(f"Unknown granularity '{config.granularity}' (expected one of {', '.join(GRANULARITIES)}).")
    if config.gate not in GATE_KINDS:
        raise ValueError(f"Unknown gate kind '{config.gate}' (expected one of {', '.join(GATE_KINDS)}).")
    if config.gate == "prompt" and isinstance(model, nn.ModuleDict):
        raise ValueError("gate='prompt' reads a text model's prompt (mole_core.text.gate); a pipeline takes the gate "
                         "kinds sample, token, static or routed.")
    router = _router(model, config, len(loras))
    names = [lora.name for lora in loras]
    modules = _targets(model, loras)

    # 2. order the targets as the model registers them, and group them
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    missing = [k for k in modules if k not in order]
    if missing:
        raise ValueError(f"Module '{missing[0]}' is registered under another name too (a shared module); "
                         f"address it by its first name.")
    keys = sorted(modules, key=order.__getitem__)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    runtime = Runtime(names, device)
    if router is not None:
        router.runtime = runtime
    groups: dict[str, Group] = {}
    static = (nn.Parameter(torch.zeros(len(loras))), nn.Parameter(torch.zeros(()))) \
        if config.gate in ("static", "prompt") else None       # (logits, log_tau) shared by every gate
    for key in keys:
        g = group_of(model, key, config.granularity)
        if g not in groups:
            beta = float(config.route_beta) if router is not None else None
            groups[g] = Group(g, _network_of(model, key), Gate(len(loras), static, beta, config.route_learn_beta),
                              runtime, config.gate == "token", router)

    # 3. wrap: replace each module in its parent (the first member of a group owns its gate)
    layers: dict[str, nn.Module] = {}
    owned: set[str] = set()
    for key in keys:
        base, group = modules[key], groups[group_of(model, key, config.granularity)]
        experts = [lora.modules.get(key) for lora in loras]
        cls = MoleLinear if isinstance(base, nn.Linear) else MoleConv2d
        layer = cls(base, key, experts, group)
        if group.name not in owned:
            layer.add_module("gate", group.gate.to(device))
            owned.add(group.name)
        parent_name, _, child = key.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, layer)
        layers[key] = layer

    # 4. a pre-hook on each network root starts a new forward pass (clear the groups' caches, count calls);
    #    a post-hook hands the pass's gate weights to the recording (host copies outside the forward)
    hooks = []                                   # (root, pre-hook, post-hook): the handle registers them
    networks = dict.fromkeys(grp.network for grp in groups.values())
    for network in networks:
        root = model[network] if network else model
        members = [grp for grp in groups.values() if grp.network == network]
        runtime.calls[network] = 0

        def start_pass(module, args, network=network, members=members):
            runtime.calls[network] = runtime.calls.get(network, 0) + 1
            runtime.evaluated[network] = []
            runtime.pending = [p for p in runtime.pending if p[1] != network]   # a pass that raised
            for grp in members:
                grp.start_pass()

        def end_pass(module, args, output, network=network):
            runtime.flush(network)

        hooks.append((root, start_pass, end_pass))
    return MoleHandle(model, config, names, layers, groups, runtime, hooks, router)


# ---- the attachment an engine keeps between calls ----------------------------------------------------

def file_stamp(path) -> tuple:
    """(path, size, mtime) of a LoRA file or adapter folder: changes when the file is rewritten."""
    stat = Path(path).stat()
    return str(path), stat.st_size, stat.st_mtime_ns


class KeptAttachment:
    """The one MoLE attachment an engine (image or text) keeps between calls; each engine holds one.

    `get` returns the attachment for exactly these LoRA files and this MoleConfig, attaching on first use
    and re-attaching when either changes (a file rewritten in place counts: size and mtime are in the key),
    so a call's result depends on its arguments alone, never on what the previous caller left attached.
    `training` gives fresh gates for a training run that steps aside for waiting callers between steps
    and puts its attachment back after them. `check_mixture` hashes a mixture's LoRA files once per file
    state, not on every call. Nothing is re-read while the attachment is kept: the key is one stat per file.
    """

    def __init__(self):
        self.handle: MoleHandle | None = None
        self._key: tuple = ()
        self._training: MoleHandle | None = None
        self._checked: set[tuple] = set()

    def get(self, files: dict, mole: MoleConfig, build) -> MoleHandle:
        """The attachment for `files` (expert name -> LoRA file) and `mole`; `build()` makes one when needed."""
        key = (tuple((name, file_stamp(path)) for name, path in files.items()), dataclasses.astuple(mole))
        if self.handle is not None and (key != self._key or self.handle is self._training):
            self.detach()
        if self.handle is None:
            self.handle, self._key = build(), key
        return self.handle

    def detach(self) -> None:
        """The model is the bare base model again."""
        if self.handle is not None:
            self.handle.detach()
        self.handle, self._key = None, ()

    def experts_off(self):
        """A context: every expert of the kept attachment off (= the base model exactly), if one is kept."""
        if self.handle is None:
            return contextlib.nullcontext()
        return self.handle.settings(mask=[False] * len(self.handle.expert_names))

    @contextlib.contextmanager
    def training(self, files: dict, mole: MoleConfig, build, lock, should_stop=None):
        """Fresh gates for a training run, held under `lock` (a mole_core.locks.FairLock): yields
        (handle, between_steps). between_steps() lets whoever waits for the model go first, puts this
        attachment back if they attached another, and says whether to stop. A run that fails detaches:
        half-trained gates never leak into the next untrained call."""
        self.detach()
        handle = self.get(files, mole, build)
        key, self._training = self._key, handle

        def between_steps() -> bool:
            if lock.yield_to_waiters() and self.handle is not handle:
                self.detach()
                handle.reattach()
                self.handle, self._key = handle, key
            return should_stop is not None and bool(should_stop())

        try:
            yield handle, between_steps
        except BaseException:
            self.detach()
            raise
        finally:
            self._training = None

    @staticmethod
    def check_finite(handle: MoleHandle) -> None:
        """ValueError when training left a gate parameter that is not a finite number."""
        if not all(torch.isfinite(p).all() for p in handle.gate_parameters()):
            raise ValueError("Gate training diverged (the gates are not finite numbers): lower the learning rate "
                             "or α.")

    def check_mixture(self, mixture, files: list[tuple[str, str | Path]], model_id: str | None = None) -> None:
        """`mixture.check(files, model_id)` once per (mixture, file states): big LoRA files are hashed once."""
        stamp = (tuple(mixture.sha256s), tuple(file_stamp(p) for _, p in files), mixture.meta.get("model_id"), model_id)
        if stamp not in self._checked:
            mixture.check(files, model_id)
            self._checked.add(stamp)
