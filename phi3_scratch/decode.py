"""The reference decode loop: read this one first, then generation.py.

    prefill:  logits = model(prompt, cache)     one pass over the prompt fills the KV cache
    decode:   token  = argmax(logits[:, -1])    the last position predicts the next token
              logits = model(token, cache)      one new position; earlier keys come from the cache

No options: no sampling, no stop tokens, no padding, no compile. generate (generation.py) adds them.
"""

from __future__ import annotations

import torch

from .checks import check_greedy_decode
from .generation import as_causal_lm


def greedy_decode(model, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """The prompt and max_new_tokens greedy tokens, (B, T + max_new_tokens); it never stops early.

    - The input is checked once, here; the model calls below skip the checks (check=False).
    - The same tokens as generate(model, input_ids, max_new_tokens, eos_token_id=[]).
    """
    model = as_causal_lm(model, "greedy_decode(model, input_ids, max_new_tokens)")
    check_greedy_decode(model.config, input_ids, max_new_tokens, model.lm_head.weight.device)
    B, T = input_ids.shape
    with torch.inference_mode():  # no autograd records: nothing here is trained
        cache = model.new_cache(B, max_len=T + max_new_tokens - 1)  # the last token is never fed back
        logits = model(input_ids, cache, logits_to_keep=1, check=False)  # (B, 1, V): prefill
        token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1): the first new token
        tokens = [input_ids.long(), token]
        for _ in range(max_new_tokens - 1):
            logits = model(token, cache, check=False)  # (B, 1, V): one position, the rest is cached
            token = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens.append(token)
    return torch.cat(tokens, dim=1)  # (B, T + max_new_tokens)
