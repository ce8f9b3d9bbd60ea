"""KVCache: the keys and values of the positions already seen, so each new token costs one step.

Without a cache, generating token n runs the whole sequence of n tokens through the model again.
With one, every layer keeps the k and v it computed for earlier positions (rotary already applied).
A new token only computes its own q, k and v, and attends over the stored ones.

Everything is allocated once, at its final size, and filled left to right:

    keys[layer]   (batch, kv_heads, max_len, head_dim)
    values[layer] (batch, kv_heads, max_len, head_dim)
    length        how many positions are filled; slots [length, max_len) are unused

In a debugger, between forward passes, `cache.keys[0][0, :, :cache.length]` holds every key
layer 0 can attend over. The mask then applies the sliding window and any padding.

Inside a forward pass, every layer writes its new positions at slots length, length + 1, ...
`length` still counts only the earlier positions then. It moves on in `advance`, at the end of the pass.

A static cache (`static=True`, what `compile=True` uses) is the same cache with fixed shapes.
Then one compiled decode step serves every token:
- `length` is a tensor on the device, not a Python int.
  A compiled step that read a Python count would be compiled again for each value.
- new k and v are written at the slots that tensor names.
- attention runs over all max_len slots; the mask hides the unfilled ones.
- the padding of the prompt is kept in `real`.
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
        static: bool = False,
    ):
        shape = (batch_size, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch_size = batch_size
        self.max_len = max_len
        self.static = static
        self.length = torch.zeros((), dtype=torch.long, device=device) if static else 0
        # static only: False at the prompt's padding slots, True elsewhere (B, max_len)
        self.real = torch.ones(batch_size, max_len, dtype=torch.bool, device=device) if static else None
        self.in_use = False  # static only: an open compile=True stream is writing into it
        self.padded = False  # dynamic only: a checked call filled it with left padding (checks.check_inputs)
        if static:
            for t in [*self.keys, *self.values, self.length, self.real]:
                # A compiled step (a CUDA graph on a GPU) reads and writes these in place: their
                # addresses must never change.
                torch._dynamo.mark_static_address(t)

    def check_room(self, batch_size: int, new_tokens: int) -> None:
        """Raise a clear error before a forward pass that would not fit in this cache."""
        if batch_size != self.batch_size:
            raise Phi3Error(
                f"input batch size {batch_size} does not match the cache's batch size {self.batch_size}"
            )
        # A static cache's length is on the device: reading it waits for the GPU.
        # Only a checked call pays that (a user's, not generate's decode steps).
        length = int(self.length) if self.static else self.length
        if length + new_tokens > self.max_len:
            raise Phi3Error(
                f"KV cache full: it holds {length} of max_len={self.max_len} positions and "
                f"{new_tokens} more were given; make a larger cache with model.new_cache(max_len=...)"
            )

    def slots(self, new_tokens: int, device) -> torch.Tensor:
        """Where the new tokens go, (new_tokens,): length, length + 1, ..."""
        return torch.arange(new_tokens, device=device) + self.length

    def key_slots(self, new_tokens: int) -> int:
        """How many slots attention reads: the filled ones and the new (all of them, if static)."""
        return self.max_len if self.static else self.length + new_tokens

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What attention reads, (B, kv_heads, key_slots(T), head_dim) each, after storing this layer's k, v.

        - k, v: (B, kv_heads, T, head_dim), stored at `slots` (T,).
        - `length` itself moves on in `advance`, once every layer has written.
        """
        if self.static:  # slots is a device tensor: write there, read every slot
            self.keys[layer].index_copy_(2, slots, k)
            self.values[layer].index_copy_(2, slots, v)
            return self.keys[layer], self.values[layer]
        end = self.length + k.shape[2]
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def advance(self, new_tokens: int) -> None:
        self.length += new_tokens  # a static cache adds on the device, in place

    def reset(self) -> None:
        """Forget every position; the tensors stay allocated and are overwritten next time.

        A static cache keeps `real`: after LongRoPE's rebuild the prompt's padding is still padding.
        """
        if self.static:
            self.length.zero_()
        else:
            self.length, self.padded = 0, False

    def __repr__(self) -> str:
        b, h, n, d = self.keys[0].shape
        length = "on the device" if self.static else self.length
        return (
            f"KVCache(layers={len(self.keys)}, batch={b}, kv_heads={h}, head_dim={d}, "
            f"length={length}/{n}, dtype={self.keys[0].dtype}, device={self.keys[0].device}"
            f"{', static' if self.static else ''})"
        )
