"""`compile=True`: the model's own forward, one token at a time, compiled with torch.compile.

Why: at batch 1, an eager decode step of Phi-3-mini launches about 1,400 small GPU kernels from
Python, one per operation. Launching them takes longer than the GPU needs to read the 7.6 GB of
weights (about 2 ms on an H200), so eager decoding is bound by launch overhead, not by memory.

How:
- torch.compile traces one decode step, `model(token, cache, logits_to_keep=1)`.
  That is the very code eager generation runs (Phi3ForCausalLM.forward).
- It fuses the small elementwise operations into few kernels.
- On a GPU, it records the whole step as one CUDA graph, replayed for every token.
- A graph replays fixed shapes at fixed addresses, so the step runs with a static KVCache (cache.py).
  Its length lives on the device, and k and v are written at the slots it names.
  Attention reads every slot; the mask hides those not written yet.
- The prompt (prefill) and LongRoPE's cache rebuild run the same forward eagerly, into the same cache.

Each cache length is one more compilation (about a minute for Phi-3-mini on a GPU), so lengths
come in few sizes: CACHE_BLOCK (256; 64 on the CPU) positions, doubled until the sequence fits.
The cache is kept on the model and reused by the next call that fits in it, so that the compiled
code and its CUDA graph are reused too. Should torch still reach its recompile limit, the stream
goes on with the same step uncompiled, with a warning.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref

import torch

from . import cpu_kernels
from .cache import KVCache

CACHE_BLOCK = 256
# A CPU step reads every slot's keys and values too, but compiles in seconds, not a minute: shorter blocks.
CPU_CACHE_BLOCK = 64


def decode_step(model, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits (B, V) for the token after `token` (B, 1): the model's forward, the last position only."""
    return model(token, cache, logits_to_keep=1, check=False)[:, -1]


def cpu_decode_step(model, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """decode_step with its one-row fp32 products on every core (cpu_kernels.fast_linear).

    The mode is entered inside the compiled function: torch.compile traces through it, so the
    compiled step calls the kernels with no mode active (around the step, the mode's Python ran
    at every product: 10 us each, measured)."""
    with cpu_kernels.fast_linear():
        return decode_step(model, token, cache)


_compiled = {}  # device type -> decode_step, compiled


def compiled_step(device: torch.device):
    if device.type not in _compiled:
        # On a GPU: CUDA graphs (what mode="reduce-overhead" turns on), and coordinate-descent tuning,
        # with which inductor turns each (1, H) x (H, N) product into a reduction kernel tuned for
        # this shape instead of calling cuBLAS (on an H200: 3.47 ms a step against ~3.6 with cuBLAS,
        # docs/SPEED.md). Both cost compile time: about a minute for Phi-3-mini.
        # On the CPU: realize_opcount_threshold 0 stores each intermediate result once. By default
        # inductor recomputes the cheap ones where they are read: the new key's rotary (cos, sin)
        # then runs again for each of the cache's slots, in every layer (mid: 3.9 -> 2.0 ms a step).
        options = ({"triton.cudagraphs": True, "coordinate_descent_tuning": True}
                   if device.type == "cuda" else {"realize_opcount_threshold": 0, "cpp_wrapper": True})
        step = cpu_decode_step if device.type == "cpu" and cpu_kernels.available() else decode_step
        _compiled[device.type] = torch.compile(step, options=options, fullgraph=True, dynamic=False)
    return _compiled[device.type]


def static_cache(model, batch_size: int, needed: int) -> KVCache:
    """The model's reusable static cache for batch_size rows and at least `needed` positions, empty.

    The cache the model holds is reused if it is large enough and no open stream is using it;
    otherwise a new one of CACHE_BLOCK (CPU_CACHE_BLOCK on the CPU) x 2^k positions replaces it.
    """
    weight = model.model.embed_tokens.weight  # the model's dtype and device
    max_len = CPU_CACHE_BLOCK if weight.device.type == "cpu" else CACHE_BLOCK
    while max_len < needed:
        max_len *= 2
    max_len = min(max_len, model.config.max_position_embeddings)
    held = getattr(model, "_static_cache", None)
    fits = held is not None and held.batch_size == batch_size and held.max_len >= needed and \
        held.keys[0].dtype == weight.dtype and held.keys[0].device == weight.device
    if not fits or held.in_use:  # too small, another kind, or in use by an open stream
        held = model.new_cache(batch_size, max_len=max_len, static=True)
        # a KVCache is no Module or tensor: a plain attribute, not in the state dict
        model._static_cache = held
    held.reset()
    return held


class CompiledDecoder:
    """Runs the compiled step for one new token per row; the host never waits for the GPU here.

    While it lives, its static cache is marked in use, so a second stream gets a cache of its own.
    """

    def __init__(self, model, cache: KVCache, attention_mask: torch.Tensor | None):
        self.model, self.cache = model, cache
        cache.in_use = True
        weakref.finalize(self, setattr, cache, "in_use", False)
        cache.real.fill_(True)  # (B, max_len): the prompt's padding; every generated token is real
        if attention_mask is not None:
            cache.real[:, : attention_mask.shape[1]] = attention_mask.bool()
        device = model.lm_head.weight.device
        self.step = compiled_step(device)
        self.warm = False  # True once the first step has run with every guard checked
        # On the CPU, the prompt's fp32 products of up to 16 rows run on every core (cpu_kernels.py);
        # the compiled step enters the same mode itself (cpu_decode_step), int8's kernels need none.
        self.products = cpu_kernels.fast_linear() if device.type == "cpu" and cpu_kernels.available() \
            else contextlib.nullcontext()

    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, V) after the prompt (B, T): the model's forward, eager, into the static cache.

        With the CPU kernels, a short prompt's products run on every core too."""
        with self.products:
            return self.model(input_ids, self.cache, attention_mask, logits_to_keep=1, check=False)[:, -1]

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """token (B, 1) at the cache's next slot -> logits for the token after it, (B, V)."""
        torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may now be overwritten
        # A fresh (B, 1) tensor: a column sliced from the sequence has strides that change with its
        # length, and every new stride would compile the step again.
        token = token.clone(memory_format=torch.contiguous_format)
        # After its first step, a stream calls the step with the same model, cache and shapes:
        # torch then checks only the guards that tell its compiled versions apart (0.3 ms a step on
        # a CPU, checking every parameter).
        known = torch.compiler.set_stance(skip_guard_eval_unsafe=self.warm)
        self.warm = True
        try:
            with known:
                logits = self.step(self.model, token, self.cache)
        except torch._dynamo.exc.FailOnRecompileLimitHit:
            warnings.warn(
                f"compile=True: torch has compiled the decode step for "
                f"{torch._dynamo.config.recompile_limit} shapes (batch size, cache length, dtype, model) "
                f"in this process, its limit; this stream goes on uncompiled "
                f"(raise torch._dynamo.config.recompile_limit or call torch._dynamo.reset())",
                stacklevel=2)
            self.step = decode_step  # the same step, run eagerly: the same tokens, without the speed
            logits = self.step(self.model, token, self.cache)
        return logits.clone()  # the graph's output buffer is reused by the next replay
