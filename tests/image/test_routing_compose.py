"""Routing for three and more subjects (issue 23): each trigger phrase encoded on its own
(route_encode="separate"), balanced pixel shares (route_norm="balanced"), the cross-attention bias
(route_attend) — on the tiny pipeline: a separately encoded phrase equals that phrase encoded as a prompt of its
own; one phrase changes nothing; balanced shares ignore how much each expert is attended overall; a prompt
without triggers is still the base model bit for bit; detach leaves the pipeline as found."""
from __future__ import annotations

import numpy as np
import torch

from mole_core.attach import MoleConfig, attach
from mole_core.routing import (TriggerRouter, balanced_shares, phrase_prompts, phrase_spans, trigger_positions,
                               trigger_token_ids)
from tests.helpers import components_of, inputs, pipeline_loras, randomise_gates
from tests.image.test_routing import PROMPT, TRIGGERS, render

NAMES = ["alpha", "beta", "gamma"]


def _ids(tok, text):
    return tok([text], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids


def _routed(pipe, **kw):
    comps = components_of(pipe)
    handle = attach(comps, pipeline_loras(comps), MoleConfig(gate="token", route="trigger", **kw))
    handle.set_triggers(pipe.tokenizer, TRIGGERS)
    randomise_gates(handle, inputs())
    return handle


def test_phrase_spans_and_phrase_prompts(tiny_pipe):
    tok = tiny_pipe.tokenizer
    ids = _ids(tok, PROMPT)                                     # "a gt on the left and a red square on the right"
    special = {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id}
    spans = phrase_spans(trigger_positions(ids, trigger_token_ids(tok, TRIGGERS, NAMES), "phrase", special))
    words = tok.convert_ids_to_tokens(ids[0].tolist())
    assert [k for _, _, k in spans[0]] == [0, 1]
    assert [[words[j] for j in range(s, e)] for s, e, _ in spans[0]] == [
        ["g", "t</w>", "on</w>", "the</w>", "left</w>", "and</w>", "a</w>"],
        ["red</w>", "square</w>", "on</w>", "the</w>", "right</w>"]]
    batch, where = phrase_prompts(ids, spans)
    assert batch.shape == (2, ids.shape[1]) and [w[0] for w in where] == [0, 0]
    second = tok.convert_ids_to_tokens(batch[1].tolist())
    assert second[:7] == ["<|startoftext|>", "a</w>", "red</w>", "square</w>", "on</w>", "the</w>", "right</w>"]
    assert second[7] == "<|endoftext|>"                          # the row's own ending follows the phrase
    one, _ = phrase_prompts(_ids(tok, "a red square"), phrase_spans(
        trigger_positions(_ids(tok, "a red square"), trigger_token_ids(tok, TRIGGERS, NAMES), "phrase", special)))
    assert one is None                                           # one phrase: nothing to encode apart


def test_separate_phrase_equals_the_phrase_encoded_alone(tiny_pipe):
    """The states of a later phrase are those of the preamble + that phrase as a prompt of its own (through the
    same routed text encoder), and the first phrase's are the joint ones (a causal encoder)."""
    tok, enc = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    joint_handle = _routed(tiny_pipe, route_tokens="phrase")
    state = joint_handle.gate_state_dict(), joint_handle.gate_layout()
    with torch.no_grad():
        joint = enc(_ids(tok, PROMPT))[0]
        alone = enc(_ids(tok, "a red square on the right"))[0]
    joint_handle.detach()
    handle = _routed(tiny_pipe, route_tokens="phrase", route_encode="separate")
    handle.load_gate_state_dict(*state)
    with torch.no_grad():
        separate = enc(_ids(tok, PROMPT))[0]
        single = enc(_ids(tok, "a red square on the right"))[0]
    handle.detach()
    n_first = 1 + 1 + 7                                          # BOS, "a", the first phrase (7 tokens)
    torch.testing.assert_close(separate[0, :n_first], joint[0, :n_first])
    torch.testing.assert_close(separate[0, n_first:n_first + 5], alone[0, 2:7], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(separate[0, n_first:n_first + 5], joint[0, n_first:n_first + 5], atol=1e-4)
    torch.testing.assert_close(single, alone)                    # one phrase: the joint encoding, unchanged


def test_separate_encoding_without_triggers_is_the_base_and_detach_restores(tiny_pipe):
    plain = "a green circle on the left"
    base, base_trig = render(tiny_pipe, plain), render(tiny_pipe)
    handle = _routed(tiny_pipe, route_tokens="phrase", route_absent="off", route_encode="separate",
                     route_norm="balanced", route_attend=1.0)
    np.testing.assert_array_equal(render(tiny_pipe, plain), base)     # no trigger anywhere: the base, bit for bit
    assert not np.allclose(render(tiny_pipe), base_trig, atol=1e-4)   # two triggers: routed
    handle.detach()
    np.testing.assert_array_equal(render(tiny_pipe), base_trig)


def test_balanced_shares_ignore_how_much_and_balance_the_experts():
    torch.manual_seed(0)
    m = torch.rand(2, 32, 3) + 0.05
    m[1, :, 2] = 0                                               # row 1: expert 2 attended nowhere
    p = balanced_shares(m, 1e-3)
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 32), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(p[0].mean(0), torch.full((3,), 1 / 3), atol=2e-2, rtol=0)
    assert torch.all(p[1, :, 2] == 0)
    scaled = balanced_shares(m * torch.tensor([10.0, 1.0, 0.1]), 1e-3)      # the first-named takes 100× more
    torch.testing.assert_close(scaled, p, atol=1e-4, rtol=1e-4)
    assert torch.all(balanced_shares(torch.zeros(1, 4, 3), 1e-3) == 0)      # no masses: no routing


def test_attention_bias_on_other_experts_phrases_and_the_ending(tiny_pipe):
    comps = components_of(tiny_pipe)
    router = TriggerRouter(comps, 2, norm="share", eps=1e-3, attend=2.0)
    text = torch.zeros(2, 5, 2)
    text[:, 1, 0] = text[:, 2, 1] = 1                            # token 1: expert 0's, token 2: expert 1's
    text[1, 2, 1] = 0                                            # row 1 names expert 0 only
    router.denoiser_tokens = text                                 # as the denoiser's pre-hook sets them
    router._attend_text = router._attend_terms(text, text.device)
    router.masses[4] = torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.5, 0.5], [0.0, 0.0]]).expand(2, 4, 2)
    bias = router.attention_bias(4, 2, 5)
    assert bias.shape == (2, 4, 5)
    assert torch.all(bias[0, :, 0] == 0)                         # the preamble (BOS): untouched
    torch.testing.assert_close(bias[0, :, 3:], torch.full((4, 2), 2.0 * float(np.log(1e-3))))  # the ending
    assert bias[0, 0, 1] == 0 and bias[0, 0, 2] < -3             # pixel 0 is expert 0's: expert 1's phrase cut
    assert bias[0, 1, 2] == 0 and bias[0, 1, 1] < -3
    assert torch.all(bias[0, 2:, 1:3].abs() < 1e-5)              # equal shares or no masses: phrases alike
    assert torch.all(bias[1] == 0)                               # one phrase only: no bias at all
    assert TriggerRouter(comps, 2).attention_bias(4, 2, 5) is None          # route_attend = 0: off


def test_compose_from_three_leaves_two_subject_prompts_as_before(tiny_pipe):
    """The default (mix.ROUTED: separate encoding and the attention bias from three named subjects on): a prompt
    naming two experts renders exactly as the routing without them; one naming three does not."""
    from mole_core.mix import ROUTED
    three = "a gt on the left and a red square and a blue circle on the right"
    before = {k: v for k, v in ROUTED.items() if k not in ("route_encode", "route_attend", "route_compose_from")}
    handle = _routed(tiny_pipe, **{k: v for k, v in before.items() if k not in ("balance_alpha", "route")})
    state = handle.gate_state_dict(), handle.gate_layout()
    old_two, old_three = render(tiny_pipe), render(tiny_pipe, three)
    handle.detach()
    assert ROUTED["route_compose_from"] == 3 and ROUTED["route_encode"] == "separate" and ROUTED["route_attend"] > 0
    handle = _routed(tiny_pipe, **{k: v for k, v in ROUTED.items() if k not in ("balance_alpha", "route")})
    handle.load_gate_state_dict(*state)
    np.testing.assert_array_equal(render(tiny_pipe), old_two)
    assert not np.allclose(render(tiny_pipe, three), old_three, atol=1e-4)
    handle.detach()
