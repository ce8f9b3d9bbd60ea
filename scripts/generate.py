"""Greedy generation from token ids, streamed, then the same run timed with and without the KV cache.

    python scripts/generate.py MODEL [--ids 1 450 ...] [--max-new-tokens 200] [--device cuda] [--dtype bf16]

MODEL is a local checkpoint folder or a Hugging Face repo id. Without --ids the prompt is the
model's BOS token. (Text in and out comes with the tokenizer; this script works on ids.)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

import phi3_scratch as p3


def timed_generate(model, ids, new, use_cache) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = p3.generate(model, ids, new, use_cache=use_cache, eos_token_id=[])
    if ids.device.type == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--ids", type=int, nargs="+")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()
    try:
        start = time.perf_counter()
        model = p3.Phi3ForCausalLM.from_pretrained(args.model, device=args.device, dtype=args.dtype)
        weight = model.lm_head.weight
        print(f"loaded {args.model}: {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"{weight.dtype}, {weight.device}, in {time.perf_counter() - start:.2f} s")
        ids = torch.tensor([args.ids or [model.config.bos_token_id or 0]], device=weight.device)

        print("new ids:", end="", flush=True)
        for token in p3.stream_tokens(model, ids, args.max_new_tokens):  # stops at the model's stop ids
            print(f" {int(token[0])}", end="", flush=True)
        print()

        cached, t_cached = timed_generate(model, ids, args.max_new_tokens, use_cache=True)
        uncached, t_uncached = timed_generate(model, ids, args.max_new_tokens, use_cache=False)
        n = cached.shape[1] - ids.shape[1]
        print(f"{n} tokens, stop ids ignored: with KV cache {t_cached:.2f} s ({n / t_cached:.0f} tokens/s), "
              f"without {t_uncached:.2f} s ({n / t_uncached:.0f} tokens/s); same tokens: {torch.equal(cached, uncached)}")
    except p3.Phi3Error as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
