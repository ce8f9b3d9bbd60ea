"""Seeing inside: traces, the logit lens, the comparison with transformers, step-through decoding."""

import math
import re

import pytest
import torch

import phi3_scratch as p3
from phi3_scratch.tracing import compare_with_transformers, format_comparison

from .conftest import SMALL_ORIGINAL_MAX


@pytest.fixture
def tiny_gqa(checkpoints):
    folder, hf = checkpoints("tiny-longrope")  # 6 query heads over 2 kv heads, partial rotary, tied
    return p3.Phi3ForCausalLM.from_pretrained(folder), hf


def test_traced_attention_probabilities_are_the_ones_used(tiny_gqa):
    model, _ = tiny_gqa
    ids = torch.randint(3, 256, (2, 10))
    with torch.no_grad(), p3.trace(model) as t:
        logits = model(ids)
    assert model.model.probe is None  # off again after the block
    with torch.no_grad():
        assert torch.equal(model(ids), logits)  # tracing changes nothing
    for i in range(model.config.num_hidden_layers):
        q, k = t[f"layers.{i}.q"], t[f"layers.{i}.k"]  # (B, 6, T, hd), (B, 2, T, hd)
        k = k.repeat_interleave(model.config.kv_groups, dim=1)  # query head h reads kv head h // 3
        scores = q @ k.transpose(-1, -2) / math.sqrt(model.config.head_dim) + t["mask"][:, None]
        assert torch.allclose(t[f"layers.{i}.attn_probs"], scores.softmax(-1), atol=1e-6)
        assert torch.allclose(t[f"layers.{i}.residual"],
                              t[f"layers.{i}.attn_residual"] + t[f"layers.{i}.mlp_out"])
    assert torch.equal(t["logits"], logits)
    assert list(t.flat())[0] == "embed" and "layers.1.v" in repr(t)
    assert "layers.1.v" in t and t.get("layers.1.v") is t["layers.1.v"] and t.get("layers.9.v") is None
    attn = model.model.layers[0].self_attn  # the output is built from those probabilities
    probs, v = t["layers.0.attn_probs"], t["layers.0.v"].repeat_interleave(model.config.kv_groups, dim=1)
    out = (probs @ v).transpose(1, 2).reshape(2, 10, -1)  # (B, T, nH * hd)
    assert torch.allclose(attn.o_proj(out), t["layers.0.attn_out"], atol=1e-5)


def test_trace_of_a_cached_decode_step_and_nested_traces(tiny_gqa):
    model, _ = tiny_gqa
    cache = model.new_cache(1, max_len=16)
    with torch.no_grad(), p3.trace(model) as outer:
        model(torch.randint(3, 256, (1, 6)), cache)
        with p3.trace(model, only={"attn_probs"}) as inner:
            model(torch.randint(3, 256, (1, 1)), cache)  # one new query over 7 keys
        assert model.model.probe is outer  # the outer trace is back
        model(torch.randint(3, 256, (1, 1)), cache)
    assert inner["layers.0.attn_probs"].shape == (1, 6, 1, 7) and "layers.0.q" not in inner
    assert outer["layers.1.attn_probs"].shape == (1, 6, 1, 8)  # the last call inside the outer block


def test_a_trace_holds_one_forward_pass_never_a_mix(tiny_gqa):
    """The body called alone after the whole model: the trace is the body's call, without the
    earlier call's logits (which would not belong to its final_norm)."""
    model, _ = tiny_gqa
    ids = torch.randint(3, 256, (1, 6))
    with torch.no_grad(), p3.trace(model) as t:
        model(ids)
        model.model(ids[:, :2])
    assert t["final_norm"].shape[1] == t["layers.0.q"].shape[2] == 2 and "logits" not in t
    # every name, layers' too
    assert list(t) == list(t.keys()) == list(t.flat()) and len(t) == 3 + 15 * len(t.layers) + 1


def test_logit_lens_last_layer_is_the_model_output(tiny_gqa):
    model, _ = tiny_gqa
    ids = torch.randint(3, 256, (1, 7))
    lens = p3.logit_lens(model, ids, all_positions=True)
    assert lens.shape == (model.config.num_hidden_layers, 1, 7, model.config.vocab_size)
    with torch.no_grad():
        assert torch.allclose(lens[-1], model(ids), atol=1e-5)
    assert not torch.allclose(lens[0], lens[-1])
    assert torch.allclose(p3.logit_lens(model, ids), lens[:, :, -1], atol=1e-5)  # default: the last position


def test_comparison_with_transformers_agrees_everywhere(tiny_gqa):
    model, hf = tiny_gqa
    rows = compare_with_transformers(model, hf, torch.randint(3, 256, (1, 12)))
    names = [r["name"] for r in rows]
    assert names[0] == "embed" and names[-1] == "logits" and "layers.1.attn_probs" in names
    assert all(r["ok"] for r in rows), format_comparison(rows, 1e-5)


def test_comparison_points_at_a_planted_bug(tiny_gqa, report):
    """A wrong RMSNorm eps in layer 1's input norm: the first row above tolerance is that norm."""
    model, hf = tiny_gqa
    model.model.layers[1].input_layernorm.eps = 0.5
    rows = compare_with_transformers(model, hf, torch.randint(3, 256, (1, 12)))
    first = [r for r in rows if r["first_bad"]]
    assert len(first) == 1 and first[0]["name"] == "layers.1.input_norm"
    assert all(r["ok"] for r in rows[: rows.index(first[0])])  # everything before it agrees
    report(f"compare, planted eps=0.5 in layers.1.input_layernorm: first flagged {first[0]['name']} "
           f"(relative difference {first[0]['rel']:.2e}); "
           f"{sum(not r['ok'] for r in rows)} of {len(rows)} above")


def test_comparison_checks_its_arguments(tiny_gqa, checkpoints):
    model, hf = tiny_gqa
    ids = torch.randint(3, 256, (1, 12))
    with pytest.raises(p3.Phi3Error, match="hf_model must be transformers' Phi3ForCausalLM, got NoneType"):
        compare_with_transformers(model, None, ids)
    with pytest.raises(p3.Phi3Error, match="model must be this package's Phi3ForCausalLM"):
        compare_with_transformers(hf, model, ids)  # the two swapped
    with pytest.raises(p3.Phi3Error,
                       match=r"input_ids must be a 2-D LongTensor \(batch, tokens\), got \(12,\)"):
        compare_with_transformers(model, hf, ids[0])
    with pytest.raises(p3.Phi3Error, match="tolerance must be a positive number"):
        compare_with_transformers(model, hf, ids, tolerance=-1)
    bf16 = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-longrope")[0], dtype="bf16")
    with pytest.raises(p3.Phi3Error,
                       match="the two models run in different dtypes, ours torch.bfloat16 and transformers' "
                             "torch.float32"):
        compare_with_transformers(bf16, hf, ids)
    other = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])  # another checkpoint's shape
    with pytest.raises(p3.Phi3Error,
                       match=r"different shapes \(ours vs transformers'\): hidden_size 64 vs 96, "
                             r"num_attention_heads 4 vs 6"):
        compare_with_transformers(other, hf, ids)


def test_comparison_in_bf16(checkpoints):
    folder, _ = checkpoints("tiny-window")
    import transformers

    model = p3.Phi3ForCausalLM.from_pretrained(folder, dtype="bf16")
    hf = transformers.Phi3ForCausalLM.from_pretrained(folder, dtype=torch.bfloat16,
                                                      attn_implementation="eager").eval()
    rows = compare_with_transformers(model, hf, torch.randint(3, 256, (1, 12)))
    assert all(r["ok"] for r in rows), format_comparison(rows, 2e-2)


def test_stepper_greedy_steps_equal_generate(tiny_gqa):
    model, _ = tiny_gqa
    prompt = torch.randint(3, 256, (1, SMALL_ORIGINAL_MAX - 3))  # the steps cross the LongRoPE switch
    expected = p3.generate(model, prompt, 8, eos_token_id=[])[0, prompt.shape[1]:].tolist()
    stepper = p3.Stepper(model, prompt, top_k=3)
    chosen = [record.chosen for record, _ in zip(stepper, range(8))]
    assert chosen == expected


def test_stepper_stays_consistent_after_a_forced_choice(tiny_gqa):
    model, _ = tiny_gqa
    prompt = torch.randint(3, 256, (9,)).tolist()
    stepper = p3.Stepper(model, prompt, top_k=4)
    first = stepper.record()
    assert first.position == 9 and first.cache_length == 9 and first.chosen is None
    assert [c.prob for c in first.candidates] == sorted((c.prob for c in first.candidates), reverse=True)
    forced = first.candidates[2].token_id  # not the argmax
    record = stepper.choose(forced)
    stepper.choose()  # and one greedy step after it
    assert record.chosen == forced and stepper.ids == prompt + [forced, stepper.record().chosen]
    assert stepper.cache.length == len(stepper.ids) == stepper.record().position
    with torch.no_grad():  # the cache holds what a fresh pass over the same sequence computes
        fresh = model.new_cache(1, max_len=32)
        logits = model(torch.tensor([stepper.ids]), fresh)[0, -1]
    n = stepper.cache.length
    for layer in range(model.config.num_hidden_layers):
        assert torch.allclose(stepper.cache.keys[layer][:, :, :n], fresh.keys[layer][:, :, :n], atol=1e-5)
        assert torch.allclose(stepper.cache.values[layer][:, :, :n], fresh.values[layer][:, :, :n], atol=1e-5)
    assert torch.allclose(stepper.record().logits, logits, atol=1e-4)
    with pytest.raises(p3.Phi3Error, match="token_id must be in 0..255, got 999"):
        stepper.choose(999)


def test_stepper_argument_checks(tiny_gqa):
    model, _ = tiny_gqa
    with pytest.raises(p3.Phi3Error, match=r"prompt_ids is empty"):
        p3.Stepper(model, [])
    with pytest.raises(p3.Phi3Error, match=r"prompt_ids must be one sequence .* got shape \(2, 3\)"):
        p3.Stepper(model, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(p3.Phi3Error, match="max_new_tokens must be a positive integer, got 0"):
        p3.Stepper(model, [1, 2], max_new_tokens=0)
    stepper = p3.Stepper(model, torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    stepper.choose(torch.tensor(9))  # a 0-d tensor is a token id too
    stepper.choose()
    assert stepper.ids == [5, 6, 7, 9, stepper.ids[-1]]
    with pytest.raises(p3.Phi3Error, match="the sequence is full: 5 tokens of max_len=5"):
        stepper.choose()


def test_a_name_the_trace_does_not_hold_says_what_it_holds():
    model = p3.Phi3ForCausalLM.from_pretrained("tiny")
    with p3.trace(model) as t:
        model(torch.tensor([[1, 2]]))
    for name in ("layers.9.q", "layers.x.q", "layers.0", "attn_probs", "layers.0.atn_probs"):
        with pytest.raises(KeyError,
                           match=rf"no record '{re.escape(name)}' in this trace \(print\(trace\) lists its "
                                 r"65 names; a layer's are layers.<0..3>.<input_norm\|q_raw\|"):
            t[name]
    assert t.get("layers.9.q") is None and "layers.0.q" in t
    with pytest.raises(p3.Phi3Error, match=r"trace\(only=...\) takes a set of names, e.g. \{'attn_probs'\}"):
        with p3.trace(model, only="attn_probs"):
            pass


def test_stepper_takes_a_prompt_as_long_as_the_model(checkpoints):
    """A prompt of every position still has a next-token record (generate may add that one token);
    only choosing, which feeds the token in, has no room."""
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])  # 64 positions
    ids = torch.randint(3, 256, (64,), generator=torch.Generator().manual_seed(1))
    stepper = p3.Stepper(model, ids)
    assert stepper.record().argmax == int(p3.generate(model, ids[None], 1)[0, -1])
    with pytest.raises(p3.Phi3Error, match="the sequence is full: 64 tokens of max_len=64"):
        stepper.choose()
    with pytest.raises(p3.Phi3Error, match="the prompt has 65 tokens, more than the model's 64 positions"):
        p3.Stepper(model, torch.cat([ids, ids[:1]]))
