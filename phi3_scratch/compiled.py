"""The compiled decode step (`compile=True`): the same layers, one token at a time, fixed shapes.

Why: at batch 1, an eager decode step of Phi-3-mini launches some 1,500 small GPU kernels from
Python, one per operation. Launching them takes longer than the GPU needs to read the 7.6 GB of
weights (about 2 ms on an H200), so eager decoding is bound by launch overhead, not by memory.

How: torch.compile traces one decode step through the model's own modules, fuses the small
elementwise operations into few kernels and, on a GPU (mode="reduce-overhead"), records the whole
step as one CUDA graph that is replayed for every token. A graph replays fixed shapes at fixed
addresses, so this step differs from the eager forward (Phi3Model.forward) in three places, all
outside the layers:

    cache writes   index_copy_ at a slot held in a device tensor, not a slice at a Python int
    attention      over every slot of the preallocated cache; the mask hides those not written yet
    checks         none inside the step: stream_tokens validated its input once, before the loop

The prompt (prefill) and the LongRoPE cache rebuild still run eagerly, into the same cache tensors.
Each cache length is one more compilation (about a minute for Phi-3-mini on a GPU), so lengths
come in few sizes: CACHE_BLOCK (256) positions, doubled until the sequence fits. The cache is kept
on the model and reused by the next call that fits in it, so that the compiled code and its CUDA
graph are reused too. Should torch still reach its recompile limit, the stream goes on with the
same step uncompiled, with a warning.
"""

from __future__ import annotations

import warnings
import weakref

import torch

from .cache import KVCache
from .model import slot_mask

CACHE_BLOCK = 256


class SlotWriter:
    """What Phi3Attention sees as its cache inside the compiled step."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], slot: torch.Tensor):
        self.keys, self.values, self.slot = keys, values, slot

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, nKV, 1, hd) at `slot`; return the whole buffers, (B, nKV, max_len, hd)."""
        self.keys[layer].index_copy_(2, self.slot, k)
        self.values[layer].index_copy_(2, self.slot, v)
        return self.keys[layer], self.values[layer]


def decode_step(model, keys: list[torch.Tensor], values: list[torch.Tensor], token: torch.Tensor,
                slot: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Logits (B, V) after `token` (B, 1), whose k and v go to cache slot `slot` (1,).

    real (B, max_len): False at the prompt's padding slots, True elsewhere.
    """
    body = model.model
    B, S = real.shape
    mask = slot_mask(slot[:, None], S, real, model.config.sliding_window, B)  # (B, 1, S)
    earlier = torch.arange(S, device=slot.device) < slot  # (S,): the slots before this token's
    positions = (real & earlier).sum(-1, keepdim=True)  # (B, 1): real tokens before it (left padding skipped)
    h = body.embed_tokens(token)  # (B, 1, H)
    cos, sin = body.rotary_emb(positions, h.dtype)
    cache = SlotWriter(keys, values, slot)
    for layer in body.layers:
        h = layer(h, cos, sin, mask, cache)
    return model.lm_head(body.norm(h)[:, -1])  # (B, V)


_compiled = {}  # device type -> the compiled decode_step


def compiled_step(device: torch.device):
    if device.type not in _compiled:
        # On a GPU: CUDA graphs (what mode="reduce-overhead" turns on), and coordinate-descent tuning,
        # with which inductor turns each (1, H) x (H, N) product into a reduction kernel tuned to
        # read the weight at full memory bandwidth (without it, a decode step ran at half the
        # bandwidth on an H200). Both cost compile time: about a minute for Phi-3-mini.
        options = {"triton.cudagraphs": True, "coordinate_descent_tuning": True} if device.type == "cuda" else None
        _compiled[device.type] = torch.compile(decode_step, options=options, fullgraph=True, dynamic=False)
    return _compiled[device.type]


def static_cache(model, batch_size: int, needed: int) -> KVCache:
    """The model's reusable decode cache for batch_size rows and at least `needed` positions, empty.

    The cache the model holds is reused if it is large enough and no open stream is using it;
    otherwise a new one of CACHE_BLOCK x 2^k positions replaces it. It also holds `real`
    (B, max_len), the padding mask of the compiled step, kept at one address too.
    """
    max_len = CACHE_BLOCK
    while max_len < needed:
        max_len *= 2
    max_len = min(max_len, model.config.max_position_embeddings)
    weight = model.lm_head.weight
    held = getattr(model, "_static_cache", None)
    fits = held is not None and held.batch_size == batch_size and held.max_len >= needed and \
        held.keys[0].dtype == weight.dtype and held.keys[0].device == weight.device
    if not fits or held.decoder() is not None:  # too small, another kind, or in use by an open stream
        cache = model.new_cache(batch_size, max_len=max_len)
        cache.decoder = lambda: None  # no CompiledDecoder is using it yet
        cache.real = torch.ones(batch_size, max_len, dtype=torch.bool, device=weight.device)
        for t in cache.keys + cache.values + [cache.real]:
            # The graph reads and writes these in place, at addresses that must never change.
            torch._dynamo.mark_static_address(t)
        held = cache
        object.__setattr__(model, "_static_cache", held)  # a plain attribute, not a submodule or buffer
    held.reset()
    return held


class CompiledDecoder:
    """Calls the compiled step for one new token per row; the host never waits for the GPU here."""

    def __init__(self, model, cache: KVCache, attention_mask: torch.Tensor | None):
        self.model, self.cache = model, cache
        cache.decoder = weakref.ref(self)  # while this decoder lives, static_cache hands out another cache
        self.real = cache.real  # (B, max_len): the prompt's padding; every generated token is real
        self.real.fill_(True)
        if attention_mask is not None:
            self.real[:, : attention_mask.shape[1]] = attention_mask.bool()
        self.step = compiled_step(model.lm_head.weight.device)

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """token (B, 1) at slot cache.length -> logits for the token after it, (B, V)."""
        self.cache.check_room(token.shape[0], 1)
        slot = torch.full((1,), self.cache.length, device=token.device)  # a fill kernel, not a host-to-device copy
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may now be overwritten
        # A fresh (B, 1) tensor: a column sliced from the sequence has strides that change with its
        # length, and every new stride would compile the step again.
        token = token.clone(memory_format=torch.contiguous_format)
        args = (self.model, self.cache.keys, self.cache.values, token, slot, self.real)
        try:
            logits = self.step(*args)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            warnings.warn(
                f"compile=True: torch has compiled the decode step for {torch._dynamo.config.recompile_limit} "
                f"shapes (batch size, cache length, dtype, model) in this process, its limit; this stream "
                f"goes on uncompiled (raise torch._dynamo.config.recompile_limit or call torch._dynamo.reset())",
                stacklevel=2)
            self.step = decode_step  # the same step, run eagerly: the same tokens, without the speed
            logits = self.step(*args)
        self.cache.advance(1)
        return logits.clone()  # the graph's output buffer is reused by the next replay
