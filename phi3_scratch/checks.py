"""The input checks: every one the model's callers need, run once per call at the edge.

- Phi3ForCausalLM.forward and Phi3Model.forward call check_inputs on entry (check=False skips it).
- generate checks its input once, before its loop; each decode step then skips the checks.
- model.new_cache and set_attention check their arguments here too.

A check that reads values (the id range, the mask's 0s and 1s) waits for the device once.
That is the price of a clear error instead of an index error deep inside the embedding.
"""

from __future__ import annotations

import torch

from .cache import KVCache
from .config import Phi3Config
from .errors import Phi3Error, is_integer, type_name

ATTENTION_KERNELS = ("eager", "sdpa")  # the names of model.py's attention functions (ATTENTION)


def check_inputs(config: Phi3Config, input_ids, cache: KVCache | None, attention_mask,
                 weight: torch.Tensor) -> None:
    """Refuse input the model cannot run, with the reason: once per public call, never per decode step.

    - Checking the id range and the mask's values reads a few numbers back from the device.
      On a GPU each is a wait: the price of a clear error instead of an index error in the embedding.
    - generate pays it once, before its loop, and then calls forward with check=False.
    """
    B, T = check_input_ids(input_ids, config.vocab_size)
    check_on_device(weight.device, input_ids=input_ids, attention_mask=attention_mask)
    past = 0
    if cache is not None:
        check_cache(cache, config, weight)
        cache.check_room(B, T)
        if cache.static:
            if attention_mask is not None:
                raise Phi3Error("a static cache keeps its own padding mask (cache.real); "
                                "pass attention_mask=None")
            return
        past = cache.length
        if attention_mask is None and cache.padded:
            raise Phi3Error(f"the cache holds a left-padded batch: pass attention_mask of shape "
                            f"(batch, cached + new) = {(B, past + T)} on every call, "
                            f"or the padded keys would be attended to")
    if past + T > config.max_position_embeddings:
        raise Phi3Error(
            f"sequence of {past + T} positions ({past} cached + {T} new) is longer than the "
            f"model's max_position_embeddings {config.max_position_embeddings}"
        )
    if attention_mask is not None:
        pads = check_attention_mask(attention_mask, (B, past + T), "(batch, cached + new tokens)")
        if cache is not None:  # remember padding: a later call without the mask would not see it
            cache.padded = cache.padded or pads


def check_on_device(device: torch.device, **tensors) -> None:
    """Each tensor given (None: not given) on the model's device, or an error saying where to move it."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.device != device:
            raise Phi3Error(f"{name} is on {t.device} but the model is on {device}: "
                            f"move it with .to({str(device)!r})")


def check_cache(cache, config: Phi3Config, weight: torch.Tensor) -> None:
    """A KVCache made for this model: its layers, kv heads, head size, dtype and device."""
    if not isinstance(cache, KVCache):
        raise Phi3Error(f"cache must be a KVCache (model.new_cache(batch_size, max_len=...)), "
                        f"got {type(cache).__name__}")
    keys = cache.keys[0]
    have = (len(cache.keys), keys.shape[1], keys.shape[3], str(keys.dtype), str(keys.device))
    want = (config.num_hidden_layers, config.num_key_value_heads, config.head_dim, str(weight.dtype),
            str(weight.device))
    if have != want:
        fields = "(layers, kv heads, head size, dtype, device)"
        raise Phi3Error(f"the cache does not fit this model: its {fields} are {have}, the model's {want}; "
                        f"make it with model.new_cache(batch_size, max_len=...)")


def check_input_ids(input_ids: torch.Tensor, vocab_size: int, name: str = "input_ids") -> tuple[int, int]:
    """(B, T) of a 2-D tensor of ids in the vocabulary; a Phi3Error saying what is wrong otherwise, calling
    the tensor by the caller's name for it (the Stepper's is prompt_ids)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise Phi3Error(f"{name} must be a 2-D LongTensor (batch, tokens), got {shape}")
    B, T = input_ids.shape
    if B == 0 or T == 0:  # before the dtype: torch.tensor([[]]) is a float tensor
        raise Phi3Error(f"{name} is empty: shape {(B, T)}; give at least one token per row")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise Phi3Error(f"{name} must hold integer token ids, got dtype {input_ids.dtype}")
    lo, hi = torch.stack(torch.aminmax(input_ids)).tolist()  # one read from the device for both
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise Phi3Error(f"token id {bad} is outside the vocabulary: expected ids in 0..{vocab_size - 1}")
    return B, T


def check_attention_mask(mask, shape: tuple[int, int], meaning: str) -> bool:
    """Refuse a mask of another type, shape or values; return whether it pads (one read of the device)."""
    if not isinstance(mask, torch.Tensor):
        raise Phi3Error(f"attention_mask must be a tensor of 0 and 1, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise Phi3Error(f"attention_mask must have shape {meaning} = {shape}, got {tuple(mask.shape)}")
    valid = pads = False  # a float or complex mask is refused without reading it
    if not (mask.dtype.is_floating_point or mask.dtype.is_complex):
        valid, pads = torch.stack([((mask == 0) | (mask == 1)).all(), (mask == 0).any()]).tolist()
    if not valid:
        raise Phi3Error(f"attention_mask must hold only 0 (padding) and 1 (real token) as integers or bools, "
                        f"got dtype {mask.dtype} with values {mask.unique().tolist()[:6]}")
    return pads


def check_attention_kernel(kernel) -> None:
    """One of ATTENTION_KERNELS (model.py's attention functions, by name)."""
    if kernel not in ATTENTION_KERNELS:
        raise Phi3Error(f"attention must be {' or '.join(map(repr, ATTENTION_KERNELS))}, got {kernel!r}")


def check_logits_to_keep(logits_to_keep) -> None:
    if not is_integer(logits_to_keep) or logits_to_keep < 0:
        raise Phi3Error(f"logits_to_keep must be an integer >= 0 (0 keeps every position), "
                        f"got {logits_to_keep!r}")


def check_new_cache(config: Phi3Config, batch_size, max_len) -> None:
    """Arguments of model.new_cache: a positive batch size, a length the model has positions for."""
    if not is_integer(batch_size) or batch_size < 1:
        raise Phi3Error(f"batch_size must be a positive integer, "
                        f"got {batch_size!r} ({type_name(batch_size)})")
    if not is_integer(max_len) or not 0 < max_len <= config.max_position_embeddings:
        raise Phi3Error(
            f"max_len must be an integer in 1..max_position_embeddings={config.max_position_embeddings}, "
            f"got {max_len!r} ({type_name(max_len)})"
        )


def check_greedy_decode(config: Phi3Config, input_ids, max_new_tokens, device: torch.device) -> None:
    """greedy_decode's arguments: ids the model reads, a length its positions and its one cache hold."""
    B, T = check_input_ids(input_ids, config.vocab_size)
    check_on_device(device, input_ids=input_ids)
    if not is_integer(max_new_tokens) or max_new_tokens < 1:
        raise Phi3Error(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    fed = T + max_new_tokens - 1  # the last new token is returned, never fed back
    if fed > config.max_position_embeddings:
        raise Phi3Error(f"prompt of {T} tokens + max_new_tokens={max_new_tokens} - 1 = {fed} positions, "
                        f"more than the model's max_position_embeddings {config.max_position_embeddings}")
    if config.rope_type == "longrope" and fed > config.original_max_position_embeddings:
        raise Phi3Error(f"{fed} positions pass LongRoPE's original context "
                        f"({config.original_max_position_embeddings}), where every cached key must be "
                        f"rotated again: greedy_decode keeps one cache, so use "
                        f"generate(model, input_ids, max_new_tokens, eos_token_id=[]), "
                        f"which starts over there")
