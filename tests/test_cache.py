"""KVCache: prefill then one token at a time gives the full forward's logits at every position."""

import pytest
import torch

import phi3_scratch as p3

from .conftest import model_params


# name: (prefill length, total length)
CASES = {
    "tiny-window": (3, 30),  # decoding runs past the sliding window of 8
    "tiny-longrope": (33, 40),  # prefill already past the LongRoPE switch
    "Phi-3-mini-4k-instruct": (3, 30),
    "Phi-3-medium-4k-instruct": (5, 30),  # GQA
    "Phi-4-mini-instruct": (34, 45),  # partial rotary, tied head, LongRoPE
    "phi-4": (1, 20),
}


@pytest.mark.parametrize("name", model_params(*CASES))
def test_cached_decoding_equals_full_forward_at_every_position(checkpoints, name):
    prefill, total = CASES[name]
    folder, _ = checkpoints(name)
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids = torch.randint(0, 256, (2, total))
    with torch.no_grad():
        full = model(ids)  # (2, total, V)
        cache = model.new_cache(2, max_len=total)
        steps = [model(ids[:, :prefill], cache)]
        for t in range(prefill, total):
            steps.append(model(ids[:, t : t + 1], cache))
    assert cache.length == total
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4  # logits reach ~80 here


def test_cache_is_preallocated_and_readable(checkpoints):
    folder, _ = checkpoints("tiny-longrope")  # 6 query heads over 2 kv heads
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    c = model.config
    cache = model.new_cache(3, max_len=16)
    assert len(cache.keys) == len(cache.values) == c.num_hidden_layers
    assert cache.keys[0].shape == (3, c.num_key_value_heads, 16, c.head_dim)  # kv heads, not query heads
    assert cache.length == 0
    pointer = cache.keys[0].data_ptr()
    with torch.no_grad():
        model(torch.randint(0, 256, (3, 5)), cache)
    assert cache.length == 5 and cache.keys[0].data_ptr() == pointer  # written in place, never regrown
    assert cache.keys[1][:, :, :5].abs().sum() > 0 and cache.keys[1][:, :, 5:].abs().sum() == 0
    assert "length=5/16" in repr(cache)
    cache.reset()
    assert cache.length == 0


def test_cache_overflow_is_a_clear_error(checkpoints):
    folder, _ = checkpoints("tiny-window")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    cache = model.new_cache(1, max_len=8)
    model(torch.randint(0, 256, (1, 6)), cache)
    with pytest.raises(p3.Phi3Error, match=r"KV cache full: it holds 6 of max_len=8 positions and 3 more"):
        model(torch.randint(0, 256, (1, 3)), cache)
    assert cache.length == 6  # the failed call wrote nothing
    with pytest.raises(p3.Phi3Error, match="batch size 2 does not match the cache's batch size 1"):
        model(torch.randint(0, 256, (2, 1)), cache)
    with pytest.raises(p3.Phi3Error,
                       match=r"max_len must be an integer in 1..max_position_embeddings=64, got 65 \(int\)"):
        model.new_cache(1, max_len=65)
