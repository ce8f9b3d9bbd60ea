"""KVCache: the keys and values of the positions already seen, so each new token costs one step.

Without a cache, generating token n runs the whole sequence of n tokens through the model again.
With one, every layer keeps the k and v it computed for earlier positions (rotary already
applied), and a new token only computes its own q, k and v and attends over the stored ones.

Everything is allocated once, at its final size, and filled left to right:

    keys[layer]   (batch, kv_heads, max_len, head_dim)
    values[layer] (batch, kv_heads, max_len, head_dim)
    length        how many positions are filled; slots [length, max_len) are unused

so in a debugger `cache.keys[0][0, :, :cache.length]` is exactly what layer 0 attends over.
"""

from __future__ import annotations

import torch

from .errors import Phi3Error


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.length = 0

    def check_room(self, batch_size: int, new_tokens: int) -> None:
        """Raise a clear error before a forward pass that would not fit in this cache."""
        if batch_size != self.batch_size:
            raise Phi3Error(f"input batch size {batch_size} does not match the cache's batch size {self.batch_size}")
        if self.length + new_tokens > self.max_len:
            raise Phi3Error(
                f"KV cache full: it holds {self.length} of max_len={self.max_len} positions and "
                f"{new_tokens} more were given; make a larger cache with model.new_cache(max_len=...)"
            )

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new k, v (B, kv_heads, T, head_dim) after the filled slots and return
        everything stored so far, (B, kv_heads, length + T, head_dim) each. `length` itself moves
        on in `advance`, once every layer has written."""
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens

    def reset(self) -> None:
        """Forget every position (the tensors stay allocated and are overwritten next time)."""
        self.length = 0

    def __repr__(self) -> str:
        b, h, n, d = self.keys[0].shape
        return (
            f"KVCache(layers={len(self.keys)}, batch={b}, kv_heads={h}, head_dim={d}, "
            f"length={self.length}/{n}, dtype={self.keys[0].dtype}, device={self.keys[0].device})"
        )
