"""Generation: repeatedly append the next token, greedy by default.

    prefill:  logits = model(prompt)                 one pass over the whole prompt
    decode:   token  = argmax(logits[:, -1])         the last position predicts the next token
              logits = model(token, cache)           one new position, earlier k/v from the cache

With temperature > 0 the token is sampled instead (`sample`): top-k and top-p first cut the
candidates, and a seed makes the draw reproducible.

- `stream_tokens` is the loop itself: it yields each new token as soon as it is chosen.
  `break phi3_scratch.generation.stream_tokens` stops in it; next_logits runs each decode step.
- `generate` collects what it yields.
- The input is checked once, before the loop.
  A decode step then reads one value back from the device, the stop flag.
- With compile=True the decode steps run the same forward compiled (compiled.py).
  No Python breakpoint stops there: debug with the default, eager.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .compiled import CompiledDecoder, static_cache
from .checks import check_attention_mask, check_input_ids, check_on_device
from .errors import Phi3Error, is_integer, is_number, type_name, warn
from .model import Phi3ForCausalLM, Phi3Model


def stream_tokens(
    model: Phi3ForCausalLM,
    input_ids: torch.Tensor,  # (B, T), left-padded when rows differ in length
    max_new_tokens: int = 200,
    use_cache: bool = True,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,  # (B, T): 1 real token, 0 padding
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    compile: bool = False,
    pad_token_id: int | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,), one step at a time.

    eos_token_id: the stop ids. None means the model's (generation_config.json, else config.json);
    [] never stops early. A row that has stopped gets the pad id until every row has stopped:
    pad_token_id, or None for the model's (config.pad_token_id, else the first stop id).
    temperature 0 is greedy; above 0 the token is drawn by `sample` with top_k, top_p and seed.
    compile=True runs each decode step as one compiled step (compiled.py; a CUDA graph on a GPU).
    """
    model = as_causal_lm(model, "generate(model, input_ids)")
    # The input is checked once, before the loop.
    stop_ids, pad_id = check_generation(model, input_ids, max_new_tokens, use_cache, eos_token_id,
                                        attention_mask, temperature, top_k, top_p, seed, compile,
                                        pad_token_id)
    B, T = input_ids.shape
    generator = None if seed is None else torch.Generator(device=input_ids.device).manual_seed(seed)
    # Every block of work runs in inference mode (no autograd records); the yields stay outside it,
    # so the caller's code between two tokens runs as it would anyway.
    with torch.inference_mode():
        stops = torch.tensor(stop_ids, dtype=torch.long, device=input_ids.device)  # (n_stop,)
        seq = input_ids.long()  # (B, T), and attention_mask (B, T) with it: one column longer a step
        # Columns of padding every row has: LongRoPE counts the longest row's real tokens, not the width.
        padding = 0 if attention_mask is None else T - int(attention_mask.sum(1).max())
        cache = decoder = None
        positions = T + max_new_tokens - 1  # what the model reads: the last new token is never fed back
        if use_cache and compile:
            cache = static_cache(model, B, positions)
            decoder = CompiledDecoder(model, cache, attention_mask)  # keeps the prompt's padding in the cache
        elif use_cache:
            cache = model.new_cache(B, max_len=positions)
        if decoder is not None:
            logits = decoder.prefill(seq, attention_mask)  # (B, V): prefill
        else:
            logits = last_logits(model, seq, cache, attention_mask)  # (B, V): prefill
        finished = torch.zeros(B, dtype=torch.bool, device=seq.device)  # (B,): rows that hit a stop id
    stopped = None  # (): "every row had stopped" one step ago, still on the device
    for step in range(max_new_tokens):
        with torch.inference_mode():
            if temperature == 0:
                token = logits.float().argmax(-1)  # (B,): greedy; the first index wins a tie
            else:
                token = sample(logits, temperature, top_k, top_p, generator)  # (B,)
            token = token.masked_fill(finished, pad_id)  # rows that stopped only pad
        # The stop check reads a flag back from the device, which waits for the GPU to catch up.
        # Reading the previous step's flag, after this step's work is queued, waits only for
        # that earlier work and keeps the GPU busy; the price is one unused step at the end.
        if stopped is not None and bool(stopped):
            return
        yield token
        if step == max_new_tokens - 1:
            return
        with torch.inference_mode():
            finished |= torch.isin(token, stops)
            stopped = finished.all()
            seq = torch.cat([seq, token[:, None]], dim=1)  # (B, T + step + 1)
            if attention_mask is not None:  # (B, T + step + 1): the new token is real
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            logits = next_logits(model, seq, cache, attention_mask, decoder, padding)  # (B, V)


def as_causal_lm(model, where: str) -> Phi3ForCausalLM:
    """The Phi3ForCausalLM a tool runs: `model` itself, or the one a notebook model wraps (notebook.py)."""
    inner = getattr(model, "causal_lm", model)  # p3.AutoModelForCausalLM's model keeps the plain one there
    if not isinstance(inner, Phi3ForCausalLM):
        hint = " (the body, model.model: pass the whole model)" if isinstance(model, Phi3Model) else ""
        raise Phi3Error(f"{where}: model must be this package's Phi3ForCausalLM "
                        f"(p3.Phi3ForCausalLM.from_pretrained), got {type_name(model)}{hint}")
    return inner


def check_generation(model, input_ids, max_new_tokens, use_cache, eos_token_id, attention_mask, temperature,
                     top_k, top_p, seed, compile, pad_token_id=None) -> tuple[list[int], int]:
    """stream_tokens' arguments checked, with the reason for each refusal; returns the stop ids and
    the pad id."""
    config = model.config
    B, T = check_input_ids(input_ids, config.vocab_size)
    check_on_device(model.lm_head.weight.device, input_ids=input_ids, attention_mask=attention_mask)
    if not is_integer(max_new_tokens) or max_new_tokens < 1:
        raise Phi3Error(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if T + max_new_tokens - 1 > config.max_position_embeddings:  # the last new token is never fed back
        raise Phi3Error(
            f"prompt of {T} tokens + max_new_tokens={max_new_tokens} - 1 "
            f"(the last new token is not fed back) = {T + max_new_tokens - 1} positions, "
            f"more than the model's max_position_embeddings {config.max_position_embeddings}"
        )
    if attention_mask is not None:
        check_attention_mask(attention_mask, (B, T), "the shape of input_ids")
        if not bool(attention_mask[:, -1].all()):
            raise Phi3Error("attention_mask: every row must end with a real token; "
                            "pad on the left, not the right")
    elif B > 1 and config.pad_token_id not in (None, config.bos_token_id) and \
            bool((input_ids[:, 0] == config.pad_token_id).any()):  # a pad id that is also BOS may start a row
        warn(f"input_ids: a row starts with the pad id {config.pad_token_id} and no attention_mask was "
             "given, so padding is read as text; pass attention_mask (1 real token, 0 padding)")
    check_sampling(temperature, top_k, top_p, seed)
    ignored = [f"{name}={value!r}" for name, value in (("top_k", top_k), ("top_p", top_p), ("seed", seed))
               if value is not None]
    if temperature == 0 and ignored:
        warn(f"{', '.join(ignored)}: only sampling reads {'it' if len(ignored) == 1 else 'them'}, and "
             "temperature=0 is greedy decoding; give a temperature > 0 to sample")
    for name, flag in (("use_cache", use_cache), ("compile", compile)):
        if not isinstance(flag, bool):  # "no" would be true
            raise Phi3Error(f"{name} must be True or False, got {flag!r}")
    if compile and not use_cache:
        raise Phi3Error("compile=True compiles the cached decode step; it needs use_cache=True")
    if compile and model.model.probe is not None:  # p3.trace or p3.intervene is active
        raise Phi3Error("compile=True runs a compiled decode step, which no trace or intervention reaches; "
                        "inside p3.trace or p3.intervene, generate with compile=False")
    stop_ids = config.stop_token_ids if eos_token_id is None else stop_id_list(eos_token_id)
    outside = [i for i in stop_ids if not 0 <= i < config.vocab_size]
    if outside:  # no token could ever match: generation would never stop
        where = "eos_token_id" if eos_token_id is not None else "the model's stop ids (config.stop_token_ids)"
        raise Phi3Error(f"{where}: {outside} outside the vocabulary, 0..{config.vocab_size - 1}")
    if pad_token_id is not None:
        pad_id, where = pad_token_id, "pad_token_id"
        if not is_integer(pad_id):
            raise Phi3Error(f"pad_token_id must be a token id or None, got {pad_id!r}")
    elif config.pad_token_id is not None:
        pad_id, where = config.pad_token_id, "the model's pad id (config.pad_token_id)"
    else:
        pad_id, where = (stop_ids[0] if stop_ids else 0), "the pad id"
    # A row that stops early is fed the pad id while the others go on.
    if B > 1 and stop_ids and not 0 <= pad_id < config.vocab_size:
        raise Phi3Error(f"{where}: {pad_id} is outside the vocabulary, 0..{config.vocab_size - 1}; "
                        f"a row that stops before the others is filled with it (give pad_token_id=...)")
    return stop_ids, pad_id


def next_logits(model, seq: torch.Tensor, cache, attention_mask, decoder=None,
                padding: int = 0) -> torch.Tensor:
    """Logits (B, V) for the token after `seq` (B, L). The cache holds positions 0..L-2, so only
    seq[:, -1] runs (without a cache, all of seq).

    One decode step, for generate and the Stepper alike. decoder: a compiled.CompiledDecoder, which
    runs the step compiled. padding: the columns of left padding that every row has.
    """
    if cache is None:
        return last_logits(model, seq, None, attention_mask)  # the whole sequence again
    if crosses_longrope_switch(model.config, seq.shape[1] - padding):
        # The cached keys were rotated with the short factors. Now that the sequence is longer
        # than the original context, every key must use the long factors: start over with one
        # forward over the whole sequence, as transformers' generate does.
        cache.reset()
        return last_logits(model, seq, cache, attention_mask)
    if decoder is not None:
        return decoder(seq[:, -1:])
    return last_logits(model, seq[:, -1:], cache, attention_mask)  # only the new token


def last_logits(model, input_ids, cache, attention_mask) -> torch.Tensor:
    """The model's forward for the next token only: logits at the last position, (B, V)
    (logits_to_keep=1, see Phi3ForCausalLM.forward). Inputs checked once by the caller: check=False."""
    return model(input_ids, cache, attention_mask, logits_to_keep=1, check=False)[:, -1]


def stop_id_list(eos_token_id) -> list[int]:
    ids = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
    if isinstance(ids, (list, tuple)) and all(map(is_integer, ids)):
        return list(ids)
    raise Phi3Error(f"eos_token_id must be None, a token id or a list of token ids, got {eos_token_id!r:.80}")


def check_sampling(temperature: float, top_k: int | None, top_p: float | None, seed: int | None = None,
                   flags: bool = False) -> None:
    """Refuse a sampling setting out of range. flags=True: the CLI's names (--top-p), where None is no
    value."""
    name = (lambda arg: "--" + arg.replace("_", "-")) if flags else (lambda arg: arg)
    optional = "" if flags else " or None"
    if not is_number(temperature) or not 0 <= temperature < float("inf"):  # "not" also refuses NaN
        raise Phi3Error(f"{name('temperature')} must be a finite number >= 0 (0 is greedy), "
                        f"got {temperature!r}")
    if top_k is not None and (not is_integer(top_k) or top_k < 1):
        raise Phi3Error(f"{name('top_k')} must be a positive integer{optional}, got {top_k!r}")
    if top_p is not None and (not is_number(top_p) or not 0 < top_p <= 1):
        raise Phi3Error(f"{name('top_p')} must be in (0, 1]{optional}, got {top_p!r}")
    if seed is not None and (not is_integer(seed) or not -(2**63) <= seed < 2**64):
        raise Phi3Error(f"{name('seed')} must be an integer in -2**63..2**64 - 1 (torch's generator seeds)"
                        f"{optional}, got {seed!r}")


def sample(logits: torch.Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw one token per row from softmax(logits / temperature), (B, V) -> (B,).

    top_k keeps the k most likely tokens; top_p keeps the smallest set of most likely tokens whose
    probabilities add up to at least p (the most likely token always stays).
    """
    logits = logits.float()
    # Largest logit 0 first: the same softmax, and a tiny temperature overflows to -inf, never to inf - inf.
    logits = (logits - logits.amax(-1, keepdim=True)) / temperature  # (B, V)
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
        drop_sorted = mass_before >= top_p  # (B, V), in sorted order
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)  # back to vocabulary order
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(-1)  # (B, V)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]  # (B,)


def crosses_longrope_switch(config, seq_len: int) -> bool:
    """True at the one step where a sequence that the cache holds up to seq_len - 1 positions first
    passes LongRoPE's original context: seq_len - 1 <= original_max < seq_len. seq_len counts the
    longest row's real tokens (rotary.py chooses the factors from the largest position)."""
    return config.rope_type == "longrope" and seq_len == config.original_max_position_embeddings + 1


def generate(
    model: Phi3ForCausalLM,
    input_ids: torch.Tensor,
    max_new_tokens: int = 200,
    use_cache: bool = True,
    eos_token_id: int | list[int] | None = None,
    attention_mask: torch.Tensor | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    compile: bool = False,
    pad_token_id: int | None = None,
) -> torch.Tensor:
    """Greedy (or sampled) decoding. Returns the prompt and the new tokens, (B, T + new),
    new <= max_new_tokens."""
    new = list(stream_tokens(model, input_ids, max_new_tokens, use_cache, eos_token_id, attention_mask,
                             temperature, top_k, top_p, seed, compile, pad_token_id))
    return torch.cat([input_ids.long(), torch.stack(new, dim=1)], dim=1)
