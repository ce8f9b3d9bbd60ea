"""One test per Phi-3 peculiarity (docs: ../shared/docs/PHI3_REFERENCE.md), checked on our model alone."""

import math

import pytest
import torch

import phi3_scratch as p3
from phi3_scratch import family
from phi3_scratch.model import Phi3Attention, Phi3RMSNorm, positions_and_mask
from phi3_scratch.rotary import Phi3RotaryEmbedding, apply_rotary


def tiny_config(**overrides) -> p3.Phi3Config:
    fields = dict(vocab_size=64, hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                  original_max_position_embeddings=64)
    return p3.Phi3Config(**{**fields, **overrides})


def random_model(config: p3.Phi3Config) -> p3.Phi3ForCausalLM:
    torch.manual_seed(0)
    model = p3.Phi3ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 1 / math.sqrt(p.shape[-1]))
    return model


def test_sliding_window_query_sees_exactly_W_keys_itself_included():
    """Window W = 4: query q sees keys q-3..q. Microsoft's first code allowed W + 1 keys; transformers
    does not."""
    allowed = positions_and_mask(torch.arange(10), 10, None, 4, 1)[1][0] == 0  # (T, S)
    assert allowed.sum(-1).tolist() == [1, 2, 3, 4, 4, 4, 4, 4, 4, 4]
    assert allowed[9, 6:10].all() and not allowed[9, :6].any()
    # End to end with one layer: the token W positions back no longer reaches the last logit.
    model = random_model(tiny_config(sliding_window=4))
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        base = model(ids)[0, -1]
        outside, inside = ids.clone(), ids.clone()
        outside[0, 11 - 4] = (ids[0, 7] + 1) % 64  # distance 4: outside the window
        inside[0, 11 - 3] = (ids[0, 8] + 1) % 64  # distance 3: the oldest key inside it
        assert torch.equal(model(outside)[0, -1], base)
        assert not torch.allclose(model(inside)[0, -1], base)


def test_sliding_window_larger_than_sequence_changes_nothing():
    ids = torch.randint(0, 64, (1, 20))
    with torch.no_grad():
        windowed = random_model(tiny_config(sliding_window=262144))(ids)
        plain = random_model(tiny_config(sliding_window=None))(ids)
    assert torch.equal(windowed, plain)


def test_longrope_switches_factors_per_call_at_original_max():
    config = tiny_config(rope_type="longrope", original_max_position_embeddings=16,
                         max_position_embeddings=64, rope_short_factor=[1.0] * 8, rope_long_factor=[4.0] * 8)
    rope = Phi3RotaryEmbedding(config)
    short_cos, _ = rope(torch.arange(16)[None], torch.float32)  # largest position + 1 = 16: short factors
    long_cos, _ = rope(torch.arange(17)[None], torch.float32)  # 17 > 16: long factors, for EVERY token
    assert not torch.allclose(short_cos[0, 5], long_cos[0, 5])
    shared = torch.arange(5, 17)[None]  # positions that start late still choose by the largest one
    assert torch.allclose(rope(shared, torch.float32)[0][0, 0], long_cos[0, 5])


def test_longrope_attention_factor_of_the_128k_models():
    config = family.config("microsoft/Phi-3-mini-128k-instruct")
    assert config.longrope_attention_factor == pytest.approx(1.1902380714238083, abs=1e-15)


def test_longrope_attention_factor_scales_short_and_long_factors():
    small = tiny_config(rope_type="longrope", original_max_position_embeddings=16, max_position_embeddings=64,
                        rope_short_factor=[1.0] * 8, rope_long_factor=[4.0] * 8)
    factor = math.sqrt(1 + math.log(4) / math.log(16))
    rope = Phi3RotaryEmbedding(small)
    for length in (3, 40):  # short factors, long factors: cos(0) is the factor itself in both
        cos, sin = rope(torch.arange(length)[None], torch.float32)
        assert torch.allclose(cos[0, 0], torch.full((16,), factor))
        assert torch.allclose(cos[0, 1] ** 2 + sin[0, 1] ** 2, torch.full((16,), factor**2))


def test_rotary_is_rotate_half_not_interleaved():
    """Channel i pairs with channel i + rotary_dim/2, not with its neighbour i + 1."""
    rope = Phi3RotaryEmbedding(tiny_config())  # head_dim 16
    cos, sin = rope(torch.tensor([[3]]), torch.float32)
    x = torch.zeros(1, 1, 1, 16)
    x[..., 0] = 1.0
    y = apply_rotary(x, cos, sin)[0, 0, 0]
    assert y[0] == pytest.approx(math.cos(3.0)) and y[8] == pytest.approx(math.sin(3.0))
    assert torch.count_nonzero(y) == 2


def test_partial_rotary_leaves_the_last_channels_unrotated():
    """Phi-4-mini: partial_rotary_factor 0.75 rotates 12 of 16 channels per head."""
    config = tiny_config(partial_rotary_factor=0.75)
    assert config.rotary_dim == 12
    cos, sin = Phi3RotaryEmbedding(config)(torch.arange(5)[None], torch.float32)
    assert cos.shape == (1, 5, 12)
    x = torch.randn(1, 4, 5, 16)
    y = apply_rotary(x, cos, sin)
    assert torch.equal(y[..., 12:], x[..., 12:])
    assert not torch.allclose(y[:, :, 1:, :12], x[:, :, 1:, :12])


def test_gqa_query_head_reads_kv_head_h_div_groups():
    """8 query heads over 2 kv heads: heads 0-3 use kv head 0, heads 4-7 kv head 1."""
    config = tiny_config(num_attention_heads=8, num_key_value_heads=2)  # head_dim 8
    attn = Phi3Attention(config, 0)
    torch.nn.init.normal_(attn.qkv_proj.weight)
    x = torch.randn(1, 6, 64)
    cos, sin = Phi3RotaryEmbedding(config)(torch.arange(6)[None], torch.float32)
    mask = positions_and_mask(torch.arange(6), 6, None, None, 1)[1]
    with torch.no_grad():
        ours = attn(x, cos, sin, mask, None)
        # Reference: copy each kv head to its 4 query heads and run plain multi-head attention.
        q, k, v = attn.qkv_proj(x).split([64, 16, 16], dim=-1)
        q = apply_rotary(q.view(1, 6, 8, 8).transpose(1, 2), cos, sin)
        k = apply_rotary(k.view(1, 6, 2, 8).transpose(1, 2), cos, sin).repeat_interleave(4, dim=1)
        v = v.view(1, 6, 2, 8).transpose(1, 2).repeat_interleave(4, dim=1)
        probs = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8) + mask[:, None], dim=-1)
        ref = attn.o_proj((probs @ v).transpose(1, 2).reshape(1, 6, 64))
    assert torch.allclose(ours, ref, atol=1e-5)


def test_tied_embeddings_share_one_matrix(checkpoints):
    """Phi-4-mini has no lm_head.weight in its checkpoint: the head is the embedding matrix."""
    folder, _ = checkpoints("tiny-longrope")  # tied, like Phi-4-mini
    model = p3.Phi3ForCausalLM.from_pretrained(folder)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert "lm_head.weight" not in (folder / "model.safetensors.index.json").read_text()
    untied, _ = checkpoints("tiny-window")
    model = p3.Phi3ForCausalLM.from_pretrained(untied)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_rmsnorm_casts_back_before_multiplying_by_the_weight():
    norm = Phi3RMSNorm(64)
    torch.manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(1 + torch.randn(64))
    norm = norm.to(torch.bfloat16)
    x = torch.randn(4, 64).to(torch.bfloat16)
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.equal(norm(x), norm.weight * normed.to(torch.bfloat16))
    # the wrong order differs
    assert not torch.equal(norm(x), (norm.weight.float() * normed).to(torch.bfloat16))
