"""`bench` and `tour`: generation timed with and without the KV cache, and the notebook in order."""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from ..errors import Phi3Error
from ..generation import generate
from ..tokenizer import Tokenizer
from .anatomy import cmd_arch, cmd_next_token
from .common import check_max_new_tokens, encode_prompt, load, model_folder, require_transformers, stream_text


TOUR_PROMPT = "What does the KV cache do?"  # a question of the tiny model's corpus (scripts/tiny_corpus.txt)
# The teaching notebook's own prompts (Rioplatense Spanish), which the tour uses on a real checkpoint.
NOTEBOOK_PROMPTS = {
    "generate": "Mandale un mensajito a Juan pidiéndole perdón por haberle pisado el pie en el bondi. "
                "Explicale qué pasó, pero sin chamuyo.",
    "next_token": "La universidad más prestigiosa del mundo es la Universidad de",
    "timing": "Escribe una carta muy larga explicando por qué el asado del domingo se quemó. "
              "Describe qué salió mal.",
}


def cmd_bench(args, loaded=None) -> None:
    if getattr(args, "vs_transformers", False):
        return bench_vs_transformers(args)
    if getattr(args, "prefill", None) is not None:  # would be ignored
        raise Phi3Error("--prefill times a forward pass against transformers': "
                        "it goes with --vs-transformers")
    model, tokenizer = loaded or load(args)
    ids = encode_prompt(tokenizer, args.prompt, args.chat, model.lm_head.weight.device)
    ways = {"with KV cache": dict(use_cache=True), "without cache": dict(use_cache=False)}
    if getattr(args, "compile", False):
        ways["cache, compiled"] = dict(use_cache=True, compile=True)
    # One untimed run of each way first: a first call pays for allocations and kernel choices.
    # A short one will do, except compiled: it compiles for the cache length the timed runs use.
    for way, options in ways.items():
        warm_up = args.max_new_tokens if options.get("compile") else min(args.max_new_tokens, 8)
        generate(model, ids, warm_up, eos_token_id=[], **options)
    times = {way: [] for way in ways}
    for run in range(args.runs):  # alternate, so that every way sees the same machine conditions
        for way, options in ways.items():
            start = time.perf_counter()
            out = generate(model, ids, args.max_new_tokens, eos_token_id=[], **options)
            if ids.device.type == "cuda":
                torch.cuda.synchronize()
            times[way].append(time.perf_counter() - start)
    new = out.shape[1] - ids.shape[1]
    print(f"{new} new tokens after a {ids.shape[1]}-token prompt, "
          f"{args.runs} run{'s' * (args.runs != 1)} each, stop tokens ignored")
    for way in ways:
        median = statistics.median(times[way])
        print(f"{way:15s} median {median:8.3f} s  {new / median:8.1f} tokens/s  "
              f"(runs: {', '.join(f'{t:.3f}' for t in times[way])})")
    print("the cache is "
          f"{statistics.median(times['without cache']) / statistics.median(times['with KV cache']):.1f}x "
          "faster")


def bench_vs_transformers(args) -> None:
    """phi3_scratch.benchmark on this model's checkpoint: ours and transformers', side by side."""
    from .. import benchmark

    require_transformers("bench --vs-transformers")
    chosen = [flag for flag, given in (("--quantize", args.quantize),
                                       ("--attention", args.attention != "eager"),
                                       ("--compile", args.compile)) if given]
    if chosen:
        raise Phi3Error(f"bench --vs-transformers times every variant itself (this model eager, sdpa, "
                        f"compiled, int8 and compiled int8; transformers' eager, sdpa and compiled): "
                        f"drop {', '.join(chosen)}")
    check_max_new_tokens(args)
    folder = model_folder(args)
    tokenizer = Tokenizer.from_pretrained(args.tokenizer or folder)
    tokens = len(encode_prompt(tokenizer, args.prompt, args.chat, "cpu")[0])
    argv = ["--checkpoint", str(folder), "--label", args.model, "--device", args.device,
            "--runs", str(args.runs), "--new-tokens", str(args.max_new_tokens), "--prompt-len", str(tokens),
            "--prefill", *map(str, [512] if args.prefill is None else args.prefill)]
    if args.dtype:
        argv += ["--dtype", args.dtype]
    print(f"phi3_scratch and transformers on {args.model}: a random prompt of {tokens} tokens "
          f"(as long as PROMPT), {args.max_new_tokens} new tokens; one JSON line per measurement", flush=True)
    benchmark.main(argv)


def cmd_tour(args) -> None:
    """The notebook's steps in order. On a real checkpoint, with the notebook's prompts as it sends
    them (no chat template; 200 new tokens, then 100 for the timing); the tiny model, which knows
    only its corpus, gets questions it can answer, in the chat template."""
    tiny = args.model == "tiny"
    step = lambda **changes: argparse.Namespace(**{**vars(args), **changes})  # args for one step
    print("== 1. Load: the config, then each weight tensor, straight onto the device ==")
    model, tokenizer = load(args)
    device = model.lm_head.weight.device
    prompt = args.prompt or (TOUR_PROMPT if tiny else NOTEBOOK_PROMPTS["generate"])
    template = "in the chat template" if tiny else "as it is (no chat template)"
    how = f"sampled at temperature {args.temperature:g}" if args.temperature > 0 else "greedy"
    print(f"\n== 2. Generate: {prompt!r} {template}, {how}, {args.max_new_tokens} new tokens, "
          "only the new text ==")
    stream_text(model, tokenizer, encode_prompt(tokenizer, prompt, tiny, device), args)
    print("\n== 3. Architecture: embedding, decoder layers (attention + MLP), final norm, head ==")
    cmd_arch(args, model)
    print("\n== 4. Next token: run the body (model.model), then the head (lm_head) on the last position ==")
    next_prompt = prompt if tiny else NOTEBOOK_PROMPTS["next_token"]
    cmd_next_token(step(prompt=next_prompt, top_k=5, chat=tiny), (model, tokenizer))
    print("\n== 5. KV cache: the same generation timed with and without it ==")
    timing = step(prompt=prompt, chat=True, max_new_tokens=min(args.max_new_tokens, 50)) if tiny else \
        step(prompt=NOTEBOOK_PROMPTS["timing"], chat=False, max_new_tokens=100)
    cmd_bench(timing, (model, tokenizer))
