"""p3.intervene: an edit inside the forward pass, checked against the same edit made in transformers.

Where transformers has a module boundary for a point, the same edit is made there with a hook
(o_proj's input viewed per head, down_proj's input, a decoder layer's output, qkv_proj's output,
...): fp32 logits within 1e-4, greedy tokens equal through generate. Scores, probabilities and
rotated q and k, which transformers computes inline, are checked against the edit written out by
hand from the trace.
"""

import math

import pytest
import torch

import phi3_scratch as p3
from phi3_scratch.loading import TINY

from .conftest import SMALL_ORIGINAL_MAX

PROMPT = torch.tensor([[1, 486, 351, 407, 878, 302, 699, 924]])
OTHER = torch.tensor([[1, 306, 277, 357, 926, 656, 541, 311]])  # as long as PROMPT: for patching


@pytest.fixture(scope="module")
def pair():
    transformers = pytest.importorskip("transformers")
    hf = transformers.Phi3ForCausalLM.from_pretrained(TINY, attn_implementation="eager").eval()
    return p3.Phi3ForCausalLM.from_pretrained(TINY), hf


def hooked(hf, module: str, fn, pre: bool = False):
    """A transformers hook that applies fn to a module's output (or, pre=True, its first input)."""
    target = hf.get_submodule(module)
    if pre:
        return target.register_forward_pre_hook(lambda m, args: (fn(args[0].clone()), *args[1:]))

    def after(m, args, output):
        if isinstance(output, tuple):
            return (fn(output[0].clone()), *output[1:])
        return fn(output.clone())
    return target.register_forward_hook(after)


def both(model, hf, edits, hf_hooks, ids=PROMPT, new=10):
    """Logits and greedy tokens of both models, each with its edit: ((ours, theirs), (ours, theirs))."""
    handles = [hooked(hf, *hook) for hook in hf_hooks]
    try:
        with torch.no_grad(), p3.intervene(model, edits):
            ours = model(ids), p3.generate(model, ids, new, eos_token_id=[])
        with torch.no_grad():
            theirs = hf(ids).logits, hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                                 do_sample=False, eos_token_id=[], pad_token_id=0)
    finally:
        for handle in handles:
            handle.remove()
    return (ours[0], theirs[0]), (ours[1], theirs[1])


def assert_same(logits, tokens, base):
    (ours, theirs), (our_tokens, their_tokens) = logits, tokens
    assert (ours - theirs).abs().max() < 1e-4
    assert (ours - base).abs().max() > 1e-3  # the edit changed something
    assert torch.equal(our_tokens, their_tokens)


def test_ablating_a_head_zeroes_o_projs_input_there_as_in_transformers(pair):
    model, hf = pair
    hd = model.config.head_dim
    with torch.no_grad():
        base = model(PROMPT)

    def zero_head(x):  # o_proj's input (B, T, nH * hd): head 2 is channels 2*hd..3*hd
        x[..., 2 * hd:3 * hd] = 0
        return x
    logits, tokens = both(model, hf, p3.ablate_head(1, 2),
                          [("model.layers.1.self_attn.o_proj", zero_head, True)])
    assert_same(logits, tokens, base)


def test_ablating_a_neuron_zeroes_down_projs_input_there_as_in_transformers(pair):
    model, hf = pair
    with torch.no_grad():
        base = model(PROMPT)

    def zero(x):
        x[..., 17] = 0
        return x
    logits, tokens = both(model, hf, p3.ablate_neuron(2, 17), [("model.layers.2.mlp.down_proj", zero, True)])
    assert_same(logits, tokens, base)


def test_steering_adds_to_a_decoder_layers_output_as_in_transformers(pair):
    model, hf = pair
    vector = torch.linspace(-1, 1, model.config.hidden_size)
    with torch.no_grad():
        base = model(PROMPT)
    logits, tokens = both(model, hf, p3.steer(0, vector, scale=3.0),
                          [("model.layers.0", lambda h: h + 3.0 * vector)])
    assert_same(logits, tokens, base)


def test_activation_patching_puts_another_runs_residual_in_place_as_in_transformers(pair):
    model, hf = pair
    with torch.no_grad():
        base = model(PROMPT)
    with torch.no_grad(), p3.trace(model) as t:
        model(OTHER)  # the source run
    source = t["layers.1.residual"]
    recorded = {}
    handle = hooked(hf, "model.layers.1", lambda h: recorded.setdefault("h", h))
    with torch.no_grad():
        hf(OTHER)
    handle.remove()
    assert torch.allclose(recorded["h"], source, atol=1e-5)
    with torch.no_grad(), p3.intervene(model, p3.patch("layers.1.residual", source, positions=[5, 6, 7])):
        ours = model(PROMPT)

    def put(h):
        h[:, 5:8] = recorded["h"][:, 5:8]
        return h
    handle = hooked(hf, "model.layers.1", put)
    with torch.no_grad():
        theirs = hf(PROMPT).logits
    handle.remove()
    assert (ours - theirs).abs().max() < 1e-4 and (ours - base).abs().max() > 1e-3
    assert torch.allclose(ours[:, :5], base[:, :5], atol=1e-5)  # causal: the earlier positions see no change


@pytest.mark.parametrize("point, module, pre, edit", [
    ("layers.0.input_norm", "model.layers.0.input_layernorm", False, lambda x: x * 1.5),
    ("layers.1.attn_out", "model.layers.1.self_attn.o_proj", False, lambda x: -x),
    ("layers.2.mlp_out", "model.layers.2.mlp.down_proj", False, lambda x: x * 0.25),
    ("layers.3.post_attn_norm", "model.layers.3.post_attention_layernorm", False, lambda x: x.flip(-1)),
    ("embed", "model.embed_tokens", False, lambda x: x + 0.1),
    ("final_norm", "model.norm", False, lambda x: x * 2),
])
def test_an_edit_at_a_module_boundary_matches_the_same_hook_in_transformers(pair, point, module, pre, edit):
    model, hf = pair
    with torch.no_grad():
        base = model(PROMPT)
    logits, tokens = both(model, hf, {point: edit}, [(module, edit, pre)])
    assert_same(logits, tokens, base)


def test_an_edit_of_q_before_rotary_matches_editing_qkv_projs_output(pair):
    model, hf = pair
    hd = model.config.head_dim
    with torch.no_grad():
        base = model(PROMPT)

    def scale_head_3(q):  # q_raw (B, nH, T, hd)
        q[:, 3] *= 2
        return q

    def scale_qkv(x):  # qkv_proj's output (B, T, q | k | v): query head 3 is channels 3*hd..4*hd
        x[..., 3 * hd:4 * hd] *= 2
        return x
    logits, tokens = both(model, hf, {"layers.1.q_raw": scale_head_3},
                          [("model.layers.1.self_attn.qkv_proj", scale_qkv)])
    assert_same(logits, tokens, base)


def test_an_edit_of_the_scores_is_what_the_softmax_and_the_heads_use(pair):
    """transformers computes scores inline: the edit is checked by hand, from the trace's own q, k, v."""
    model, _ = pair
    c = model.config

    def hide_key_0(scores):  # (B, nH, T, S): no query of head 1 reads the first token
        scores[:, 1, :, 0] = -1e9
        return scores
    with torch.no_grad(), p3.intervene(model, {"layers.2.scores": hide_key_0}), p3.trace(model) as t:
        model(PROMPT)
    q, k, v = t["layers.2.q"], t["layers.2.k"], t["layers.2.v"]
    k, v = k.repeat_interleave(c.kv_groups, dim=1), v.repeat_interleave(c.kv_groups, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(c.head_dim)
    scores[:, 1, :, 0] = -1e9
    assert torch.allclose(t["layers.2.scores"], scores, atol=1e-5)  # recorded: the edited scores
    probs = (scores + t["mask"][:, None]).softmax(-1)
    assert torch.allclose(t["layers.2.attn_probs"], probs, atol=1e-6)
    assert t["layers.2.attn_probs"][:, 1, 1:, 0].abs().max() == 0  # query 0 has no other key to read
    assert t["layers.2.attn_probs"][:, 0, 1:, 0].min() > 0  # head 0 still reads it
    assert torch.allclose(t["layers.2.head_out"], probs @ v, atol=1e-5)


def test_an_edit_of_the_probabilities_and_of_rotated_k_by_hand(pair):
    model, _ = pair
    c = model.config

    def uniform_head_0(probs):  # (B, nH, T, S): head 0 averages the keys it may see
        allowed = probs[:, 0] > 0
        probs[:, 0] = allowed / allowed.sum(-1, keepdim=True)
        return probs
    with torch.no_grad(), p3.intervene(model, {"layers.0.attn_probs": uniform_head_0,
                                               "layers.0.k": lambda k: k * 0.5}), p3.trace(model) as t:
        model(PROMPT)
    k = t["layers.0.k"].repeat_interleave(c.kv_groups, dim=1)  # recorded after the edit
    with torch.no_grad(), p3.trace(model) as plain:
        model(PROMPT)
    assert torch.allclose(t["layers.0.k"], plain["layers.0.k"] * 0.5)
    scores = t["layers.0.q"] @ k.transpose(-1, -2) / math.sqrt(c.head_dim)
    assert torch.allclose(t["layers.0.scores"], scores, atol=1e-5)  # the scores read the edited k
    v = t["layers.0.v"].repeat_interleave(c.kv_groups, dim=1)
    probs = t["layers.0.attn_probs"]
    assert torch.allclose(probs[:, 0].sum(-1), torch.ones(1, PROMPT.shape[1]))
    assert torch.allclose(probs[:, 0, 3, :4], torch.full((1, 4), 0.25))  # position 3 sees 4 keys, evenly
    assert torch.allclose(t["layers.0.head_out"], probs @ v, atol=1e-5)


def test_edits_reach_every_forward_of_generate_the_stepper_and_the_uncached_path(pair):
    model, _ = pair
    edits = p3.ablate_head(0, 1)
    with torch.no_grad(), p3.intervene(model, edits):
        cached = p3.generate(model, PROMPT, 12, eos_token_id=[])
        uncached = p3.generate(model, PROMPT, 12, use_cache=False, eos_token_id=[])
        stepper = p3.Stepper(model, PROMPT[0].tolist(), max_new_tokens=12)
        chosen = [stepper.choose().position for _ in range(3)]
        full = model(torch.tensor([stepper.ids]))[0, -1]  # every token so far, at once
    assert torch.equal(cached, uncached) and len(chosen) == 3
    assert torch.allclose(stepper.record().logits, full, atol=1e-4)  # the cached steps were edited too
    assert not torch.equal(cached, p3.generate(model, PROMPT, 12, eos_token_id=[]))


def test_edits_reach_the_re_prefill_at_the_longrope_switch(checkpoints):
    folder, hf = checkpoints("tiny-longrope")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 256, (1, SMALL_ORIGINAL_MAX - 4))
    hd = model.config.head_dim

    def zero_head(x):
        x[..., hd:2 * hd] = 0
        return x
    handle = hooked(hf, "model.layers.0.self_attn.o_proj", zero_head, pre=True)
    try:
        with torch.no_grad():
            expected = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                   do_sample=False, eos_token_id=[], pad_token_id=0)
    finally:
        handle.remove()
    with torch.no_grad(), p3.intervene(model, p3.ablate_head(0, 1)):
        assert torch.equal(p3.generate(model, ids, 12, eos_token_id=[]), expected)  # crosses the switch


def test_after_the_block_the_model_is_as_before(pair):
    model, _ = pair
    with torch.no_grad():
        before = model(PROMPT)
        with p3.trace(model) as t:
            with p3.intervene(model, p3.ablate_head(1, 0)):
                model(PROMPT)
                assert t["layers.1.head_out"][:, 0].abs().max() == 0  # the trace records the edit
            model(PROMPT)
            assert t["layers.1.head_out"][:, 0].abs().max() > 0  # the trace goes on, the edit is gone
        assert model.model.probe is None
        assert torch.equal(model(PROMPT), before)
        with pytest.raises(p3.Phi3Error):
            with p3.intervene(model, {"layers.0.attn_out": lambda x: x[:, :1]}):
                model(PROMPT)
        assert model.model.probe is None and torch.equal(model(PROMPT), before)


def test_the_sdpa_kernel_keeps_its_edits_and_hands_scores_to_the_eager_one(pair):
    model, _ = pair
    with torch.no_grad(), p3.intervene(model, p3.ablate_head(1, 2)):
        eager = model(PROMPT)
        model.set_attention("sdpa")
        try:
            fused = model(PROMPT)
            with p3.intervene(model, {"layers.1.scores": lambda s: s * 0.5}):
                halved = model(PROMPT)
        finally:
            model.set_attention("eager")
        with p3.intervene(model, {"layers.1.scores": lambda s: s * 0.5}):
            halved_eager = model(PROMPT)
    assert torch.allclose(eager, fused, atol=1e-4)
    assert torch.allclose(halved, halved_eager, atol=1e-5) and not torch.allclose(halved, eager, atol=1e-3)


def test_bad_edits_are_refused_by_name(pair):
    model, _ = pair
    refusals = [
        ({"layers.9.head_out": lambda x: x}, r"'layers.9.head_out': the model has 4 layers, 0..3"),
        ({"layers.1.heads_out": lambda x: x}, r"'layers.1.heads_out' is not a point of the forward pass; "
                                              r"a layer's points are layers.<0..3>.<input_norm\|q_raw"),
        ({"positions": lambda x: x}, r"'positions' is not a point"),
        ({"layers.1.attn_out": 3},
         r"the edit for 'layers.1.attn_out' must be a function of the tensor, got int"),
        ({}, r"edits must be a non-empty dict"),
    ]
    for edits, message in refusals:
        with pytest.raises(p3.Phi3Error, match=message):
            with p3.intervene(model, edits):
                pass
    wrong = [
        ({"layers.1.attn_out": lambda x: x[:, :2]},
         r"the edit for layers.1.attn_out returned shape \(1, 2, 128\), "
         r"torch.float32 on cpu; expected shape \(1, 8, 128\)"),
        ({"layers.0.mlp_act": lambda x: x.double()}, r"returned shape \(1, 8, 384\), torch.float64"),
        ({"layers.0.mlp_act": lambda x: "no"},
         r"the edit for layers.0.mlp_act returned str; expected a tensor"),
        (p3.ablate_head(0, 7), r"ablate_head: head 7: layer 0 has 4 heads, 0..3"),
        (p3.ablate_neuron(0, 999), r"ablate_neuron: index 999: layer 0's MLP has 384 channels"),
        (p3.steer(0, torch.ones(5)), r"steer: the vector has 5 numbers; the residual stream has 128"),
    ]
    for edits, message in wrong:
        with pytest.raises(p3.Phi3Error, match=message):
            with torch.no_grad(), p3.intervene(model, edits):
                model(PROMPT)
    with pytest.raises(p3.Phi3Error, match=r"compile=True runs a compiled decode step, which no trace or "
                                           r"intervention reaches"):
        with p3.intervene(model, p3.ablate_head(0, 0)):
            p3.generate(model, PROMPT, 3, compile=True)
    with pytest.raises(p3.Phi3Error, match=r"ablate_head: head must be an integer >= 0, got -1"):
        p3.ablate_head(0, -1)
