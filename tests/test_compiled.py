"""compile=True (compiled.py) and the "sdpa" attention kernel: the same tokens and logits as eager.

torch.compile runs here on the CPU (inductor's C++ backend, no CUDA graphs), which checks the
static-shape decode step itself: slot writes, attention over the whole cache, positions from the
padding mask, the LongRoPE rebuild. The CUDA-graph capture and the speed are checked on a GPU by
scripts/gpu_checks.sh.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import phi3_scratch as p3
from phi3_scratch import compiled

from .conftest import INLINE, SMALL_ORIGINAL_MAX, model_params


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()  # each test compiles afresh, far from torch's recompile limit
    yield
    torch._dynamo.reset()


def padded_batch(seed: int, lengths: tuple[int, ...]):
    torch.manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(3, 256, (len(lengths), width))
    mask = torch.ones_like(ids)
    for row, n in enumerate(lengths):
        mask[row, : width - n] = 0
    return ids, mask


def compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.mark.parametrize("name", model_params("tiny-window", "tiny-longrope"))
def test_compiled_decode_gives_the_eager_tokens(checkpoints, name):
    """tiny-window: 30 positions through a sliding window of 8; tiny-longrope: GQA, partial rotary,
    tied head, and a padded batch that crosses the LongRoPE switch (the cache is rebuilt eagerly)."""
    folder, _ = checkpoints(name)
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids, mask = padded_batch(7, (SMALL_ORIGINAL_MAX - 4, 11))
    eager = p3.generate(model, ids, 14, eos_token_id=[], attention_mask=mask)
    before = compiled_graphs()
    fast = p3.generate(model, ids, 14, eos_token_id=[], attention_mask=mask, compile=True)
    assert compiled_graphs() > before, "the decode step was not compiled"
    assert torch.equal(fast, eager)


def test_compiled_decode_logits_match_eager(checkpoints):
    """Step by step, the compiled logits equal the eager ones to float rounding."""
    folder, _ = checkpoints("tiny-longrope")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 256, (1, 20))
    with torch.inference_mode():
        eager = model(ids)[0, 10:]  # (10, V): one forward over the whole sequence
        cache = compiled.static_cache(model, 1, 20)
        model(ids[:, :10], cache)  # prefill, eager
        decoder = compiled.CompiledDecoder(model, cache, None)
        steps = [decoder(ids[:, i : i + 1])[0] for i in range(10, 20)]
    assert (torch.stack(steps) - eager).abs().max() < 1e-4


def test_compiled_decode_reuses_its_cache_and_compiled_step(checkpoints):
    folder, _ = checkpoints("tiny-window")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 256, (1, 5))
    first = p3.generate(model, ids, 6, eos_token_id=[], compile=True)
    graphs, cache = compiled_graphs(), model._static_cache
    second = p3.generate(model, torch.randint(3, 256, (1, 9)), 6, eos_token_id=[], compile=True)
    assert compiled_graphs() == graphs, "a second prompt length recompiled the step"
    assert model._static_cache is cache
    assert cache.max_len == min(compiled.CPU_CACHE_BLOCK, model.config.max_position_embeddings)
    assert first.shape == (1, 11) and second.shape == (1, 15)


def test_cache_lengths_double_and_a_larger_cache_is_reused(checkpoints, monkeypatch):
    """Few cache lengths, so few compilations: 16, 32, 64 here (the CPU's first block set to 16)."""
    monkeypatch.setattr(compiled, "CPU_CACHE_BLOCK", 16)
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-longrope")[0])
    lengths = []
    for prompt, new in ((4, 8), (20, 10), (40, 10), (5, 3)):
        ids = torch.randint(3, 256, (1, prompt))
        out = p3.generate(model, ids, new, eos_token_id=[], compile=True)
        assert torch.equal(out, p3.generate(model, ids, new, eos_token_id=[]))
        lengths.append(model._static_cache.max_len)
    assert lengths == [16, 32, 64, 64]  # the last, short request reuses the 64-position cache


def test_at_the_recompile_limit_the_stream_goes_on_uncompiled(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    ids = torch.randint(3, 256, (2, 5))
    with torch._dynamo.config.patch(recompile_limit=1):
        p3.generate(model, ids[:1], 4, eos_token_id=[], compile=True)  # compiles for batch 1
        with pytest.warns(UserWarning, match="goes on uncompiled"):  # batch 2 would be a second compilation
            out = p3.generate(model, ids, 6, eos_token_id=[], compile=True)
    assert torch.equal(out, p3.generate(model, ids, 6, eos_token_id=[]))


def test_compiled_decode_stops_at_the_same_token(checkpoints):
    folder, _ = checkpoints("tiny-window")
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    ids = torch.randint(3, 256, (1, 5))
    free = p3.generate(model, ids, 20, eos_token_id=[])
    stop = int(free[0, 5 + 6])
    first = (free[0, 5:] == stop).nonzero()[0].item()
    stopped = p3.generate(model, ids, 20, eos_token_id=[stop], compile=True)
    assert stopped.shape == (1, 5 + first + 1) and int(stopped[0, -1]) == stop


def test_compile_needs_the_cache(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    with pytest.raises(p3.Phi3Error, match="use_cache=True"):
        p3.generate(model, torch.tensor([[5, 6]]), 3, use_cache=False, compile=True)


@pytest.mark.parametrize("name", model_params(*INLINE, "Phi-3-mini-4k-instruct", "Phi-4-mini-instruct",
                                              "phi-4"))
def test_sdpa_kernel_gives_the_eager_logits(checkpoints, name):
    """Padding, the sliding window, GQA and the cache through torch's fused attention."""
    folder, hf = checkpoints(name)
    model = p3.Phi3ForCausalLM.from_pretrained(folder, attention="sdpa")
    assert all(layer.self_attn.kernel == "sdpa" for layer in model.model.layers)
    ids, mask = padded_batch(8, (SMALL_ORIGINAL_MAX + 4, 12))
    with torch.no_grad():
        fused = model(ids, attention_mask=mask)
        cache = model.new_cache(2, max_len=ids.shape[1])
        model(ids[:, :-3], cache, mask[:, :-3])
        fused_cached = model(ids[:, -3:], cache, mask)
        eager = model.set_attention("eager")(ids, attention_mask=mask)
        theirs = hf(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (fused - eager)[real].abs().max() < 1e-4
    assert (fused_cached - eager[:, -3:]).abs().max() < 1e-4
    assert (fused - theirs)[real].abs().max() < 1e-3


def test_sdpa_kernel_in_fp16_with_left_padding_gives_no_nan(checkpoints):
    folder, _ = checkpoints("tiny-window")
    model = p3.Phi3ForCausalLM.from_pretrained(folder, dtype="fp16", attention="sdpa")
    ids, mask = padded_batch(9, (8, 3))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
    assert torch.isfinite(logits[mask.bool()]).all()


def test_sdpa_gets_a_finite_mask_in_fp16(checkpoints, monkeypatch):
    """The fp16 clamp itself: torch's CPU kernel returns 0 for a row with every key masked, so the
    test above cannot fail on a CPU; a GPU kernel gives NaN for -inf there."""
    import torch.nn.functional as F

    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0], dtype="fp16", attention="sdpa")
    masks, kernel = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda q, k, v, attn_mask=None:
                            masks.append(attn_mask) or kernel(q, k, v, attn_mask=attn_mask))
    ids, mask = padded_batch(9, (8, 3))
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert masks and all(torch.isfinite(m).all() for m in masks)


def test_a_trace_records_attention_probabilities_even_with_sdpa(checkpoints):
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0], attention="sdpa")
    with p3.trace(model) as t, torch.no_grad():
        model(torch.tensor([[5, 6, 7]]))
    assert t.layers[0]["attn_probs"].shape == (1, 4, 3, 3)


def test_unknown_attention_kernel_is_refused(checkpoints):
    folder, _ = checkpoints("tiny-window")
    with pytest.raises(p3.Phi3Error, match="'eager' or 'sdpa', got 'flash'"):
        p3.Phi3ForCausalLM.from_pretrained(folder, attention="flash")
    with pytest.raises(p3.Phi3Error, match="'eager' or 'sdpa', got 'flash'"):
        p3.Phi3ForCausalLM.from_pretrained(folder).set_attention("flash")


def test_two_compiled_streams_on_one_model_do_not_share_a_cache(checkpoints):
    """The model keeps one cache for compiled decoding; a second stream read while the first is
    still open must get its own, or each would overwrite the other's keys."""
    model = p3.Phi3ForCausalLM.from_pretrained(checkpoints("tiny-window")[0])
    a, b = torch.randint(3, 256, (1, 6)), torch.randint(3, 256, (1, 9))
    first = p3.stream_tokens(model, a, 8, eos_token_id=[], compile=True)
    second = p3.stream_tokens(model, b, 8, eos_token_id=[], compile=True)
    interleaved = [(next(first), next(second)) for _ in range(8)]
    assert torch.equal(torch.stack([x for x, _ in interleaved], 1),
                       p3.generate(model, a, 8, eos_token_id=[])[:, 6:])
    assert torch.equal(torch.stack([y for _, y in interleaved], 1),
                       p3.generate(model, b, 8, eos_token_id=[])[:, 9:])
