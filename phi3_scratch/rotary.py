"""Rotary position embeddings (RoPE) as Phi-3 uses them: default, LongRoPE, and partial rotary.

RoPE treats each pair of channels (i, i + rotary_dim/2) of q and k as a point.
It rotates that point by the angle position * inv_freq[i].
A dot product q.k then depends only on how far apart the two positions are.
The layout is "rotate-half" (first half paired with second half), not interleaved neighbours:

    x_rot = x * cos + rotate_half(x) * sin,   rotate_half([a, b]) = [-b, a]

    inv_freq[i] = 1 / (ext[i] * theta ** (2i / rotary_dim)),   i < rotary_dim / 2

Default RoPE has ext = 1. LongRoPE (the 128k models) stretches the frequencies:
- ext = short_factor while the sequence fits in original_max_position_embeddings.
- ext = long_factor once the call's largest position + 1 (its sequence length) exceeds it.
- with both factor sets, cos and sin are scaled by an attention factor.

Default RoPE is here LongRoPE with factors of 1 and an attention factor of 1.
So one code path serves both.

Partial rotary (Phi-4-mini, factor 0.75): only the first rotary_dim channels of each head rotate;
the rest pass through unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import Phi3Config


class Phi3RotaryEmbedding(nn.Module):
    def __init__(self, config: Phi3Config, device: torch.device | str | None = None):
        super().__init__()
        self.original_max_position_embeddings = config.original_max_position_embeddings
        dim = config.rotary_dim
        # theta ** (2i / dim) in fp32, i < dim / 2
        base = config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim)
        if config.rope_type == "longrope":
            short = torch.tensor(config.rope_short_factor, dtype=torch.float32, device=device)
            long = torch.tensor(config.rope_long_factor, dtype=torch.float32, device=device)
            self.attention_factor = config.longrope_attention_factor
        else:
            short = long = torch.ones_like(base)
            self.attention_factor = 1.0
        # Computed from the config, never loaded from the checkpoint: persistent=False.
        self.register_buffer("short_inv_freq", 1.0 / (short * base), persistent=False)  # (dim/2,)
        self.register_buffer("long_inv_freq", 1.0 / (long * base), persistent=False)  # (dim/2,)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for every position, (B, T, rotary_dim) each, in `dtype`.

        LongRoPE chooses its factors once per call, for every token in it, from the largest position.
        A call whose positions all fit in the original context uses the short factors.
        torch.where (not a Python `if`) keeps the choice on the device: no host sync.
        """
        use_long = position_ids.max() + 1 > self.original_max_position_embeddings
        inv_freq = torch.where(use_long, self.long_inv_freq, self.short_inv_freq)  # (dim/2,)
        angles = position_ids[..., None].float() * inv_freq  # (B, T, dim/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, dim): channel i and i + dim/2 share an angle
        cos = angles.cos() * self.attention_factor  # (B, T, dim), fp32
        sin = angles.sin() * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[a, b] -> [-b, a] on the last dimension: the 90-degree turn of each (a_i, b_i) pair."""
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first rotary_dim channels of every head of x; pass the rest through.

    x: (B, heads, T, head_dim); cos, sin: (B, T, rotary_dim).
    """
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rotary_dim): the same angles for every head
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:  # every channel rotates (all but Phi-4-mini): no slice and cat to copy
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    x_rot = x_rot * cos + rotate_half(x_rot) * sin  # (B, heads, T, rotary_dim)
    return torch.cat((x_rot, x_pass), dim=-1)  # (B, heads, T, head_dim)
